"""Streaming top-k collection: brute force, merge, cache, resume and bad input."""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from nbutils import activations, cache, mlp_forward, models, topk
from nbutils.activations import collect_top_activations, merge

K, FRAC, BATCH = 8, 0.5, 16  # 48 windows -> 3 batches


def _collect(model, windows, **kwargs):
    options = dict(k=K, frac=FRAC, batch_size=BATCH, use_cache=False, progress=False)
    options.update(kwargs)
    return collect_top_activations(model, windows, **options)


@pytest.fixture(scope="module")
def full_acts(model, windows) -> torch.Tensor:
    """Every MLP activation of every window: `[n_layers, n_windows, pos, d_mlp]`, read from the bridge's hooks."""
    names = [models.hook_name(layer, "post") for layer in range(model.cfg.n_layers)]
    with torch.inference_mode():
        _, acts = model.run_with_cache(windows, names_filter=names)
    return torch.stack([acts[name] for name in names])


@pytest.fixture(scope="module")
def top(model, windows):
    return _collect(model, windows)


@contextlib.contextmanager
def _perturbed(model, layer: int, neuron: int, delta: float):
    """Add `delta` to one MLP input bias of the model in place (the GPT-2 `c_fc` weights the bridge runs);
    restore it afterwards."""
    bias = model.original_model.transformer.h[layer].mlp.c_fc.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[neuron] += delta
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)  # exact restore (adding and subtracting delta would round)


def _count_batches(monkeypatch) -> list[int]:
    """Count the batches that actually run through the model."""
    calls: list[int] = []
    original = activations._batch_candidates

    def counting(model, batch, first_window):
        calls.append(first_window)
        return original(model, batch, first_window)

    monkeypatch.setattr(activations, "_batch_candidates", counting)
    return calls


def _assert_same(a, b) -> None:
    for name in ("act", "window", "pos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), f"state tensor `{name}` differs"
    pd.testing.assert_frame_equal(a.examples, b.examples)
    pd.testing.assert_frame_equal(a.neurons, b.neurons)


# --------------------------------------------------------------------------------------------------
# Correctness


def test_examples_match_brute_force(top, full_acts, windows):
    per_window = full_acts.max(dim=2).values  # [n_layers, n_windows, d_mlp]: one candidate per window
    n_layers, n_windows, d_mlp = per_window.shape
    examples = top.examples
    grouped = dict(tuple(examples.groupby(["layer", "neuron"])))
    checked = 0
    for layer in range(n_layers):
        for neuron in range(d_mlp):
            col = per_window[layer, :, neuron]  # [n_windows]
            peak = col.max().item()
            ranked = col.sort(descending=True).values
            cutoff = ranked[K - 1].item()  # value of the k-th window
            expected = col[(col >= cutoff) & (col >= FRAC * peak)] if peak > 0 else col[:0]
            got = grouped.get((layer, neuron), examples.iloc[:0])
            # same number of examples and the same activations, in order (ties may pick either window)
            assert len(got) == min(K, len(expected)), (layer, neuron)
            np.testing.assert_allclose(got["act"].to_numpy(), ranked[: len(got)].numpy(), rtol=1e-5, atol=1e-6)
            # every window clearly above the cut-off is present
            must = set(torch.nonzero(col > cutoff + 1e-5).reshape(-1).tolist()) if peak > 0 else set()
            must &= set(torch.nonzero(col >= FRAC * peak + 1e-5).reshape(-1).tolist())
            assert must <= set(got["window"].tolist()), (layer, neuron)
            # the position is where the neuron is highest in that window
            w, p = torch.as_tensor(got["window"].to_numpy().copy()), torch.as_tensor(got["pos"].to_numpy().copy())
            np.testing.assert_allclose(full_acts[layer, w, p, neuron].numpy(), got["act"].to_numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(per_window[layer, w, neuron].numpy(), got["act"].to_numpy(), rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == n_layers * d_mlp
    assert len(examples) > 0
    assert examples["pos"].between(0, windows.shape[1] - 1).all()


def test_tables_are_consistent(top, model):
    ex, neurons = top.examples, top.neurons
    assert list(ex.columns) == ["layer", "neuron", "window", "pos", "act"]
    assert list(neurons.columns) == ["layer", "neuron", "max_act", "n_examples", "dead"]
    assert len(neurons) == model.cfg.n_layers * model.cfg.d_mlp
    # sorted by layer, neuron, act desc
    order = ex.sort_values(["layer", "neuron", "act"], ascending=[True, True, False], kind="stable")
    assert (order.index == ex.index).all()
    assert neurons["n_examples"].sum() == len(ex)
    assert neurons["n_examples"].max() <= K
    # each neuron's first example is its max, and all are >= frac * max
    first = ex.groupby(["layer", "neuron"]).first()
    joined = first.join(neurons.set_index(["layer", "neuron"]))
    np.testing.assert_array_equal(joined["act"].to_numpy(), joined["max_act"].to_numpy())
    ratio = ex["act"].to_numpy() / ex.merge(neurons, on=["layer", "neuron"])["max_act"].to_numpy()
    assert (ratio >= FRAC).all() and (ratio <= 1).all()
    # neuron_examples is the slice of examples of one neuron
    one = top.neuron_examples(2, 7)
    expected = ex[(ex.layer == 2) & (ex.neuron == 7)].reset_index(drop=True)
    pd.testing.assert_frame_equal(one, expected)
    assert top.settings == activations.CollectSettings(k=K, frac=FRAC, batch_size=BATCH)
    assert top.n_windows == 48


def test_dead_neuron_has_no_examples(model, windows):
    with _perturbed(model, 1, 3, -1000.0):  # pre-activation far below 0 everywhere: GELU output <= 0
        result = _collect(model, windows)
    assert (1, 3) in set(zip(result.dead["layer"], result.dead["neuron"]))
    row = result.neurons[(result.neurons.layer == 1) & (result.neurons.neuron == 3)].iloc[0]
    assert row["dead"] and row["max_act"] <= 0 and row["n_examples"] == 0
    assert len(result.neuron_examples(1, 3)) == 0
    assert result.dead["dead"].all() and (result.dead["n_examples"] == 0).all()


def test_frac_one_keeps_only_the_max(model, windows, top):
    result = _collect(model, windows, frac=1.0)
    maxima = result.neurons.set_index(["layer", "neuron"])["max_act"]
    ex = result.examples
    np.testing.assert_array_equal(ex["act"].to_numpy(), maxima.loc[list(zip(ex.layer, ex.neuron))].to_numpy())
    pd.testing.assert_series_equal(result.neurons["max_act"], top.neurons["max_act"])


def test_fewer_windows_than_k(model, windows):
    result = _collect(model, windows[:5], k=20, frac=0.01, batch_size=2)
    assert result.neurons["n_examples"].max() <= 5
    assert (result.examples["window"] < 5).all()
    # no window appears twice for one neuron
    assert not result.examples.duplicated(["layer", "neuron", "window"]).any()


def test_order_key_sorts_by_act_then_window():
    act = torch.tensor([0.5, -0.25, 0.5, 0.0, -0.0, 2.0, -3.0, 0.5])
    window = torch.tensor([7, 1, 3, 4, 5, 0, 2, -1])  # the last slot is empty
    key = topk.order_key(act, window)
    order = torch.argsort(key, descending=True).tolist()
    # hand ranking: 2.0 (w0); 0.5 (w3 before w7); 0.0 (w4); -0.0 (w5); -0.25; -3.0; empty slot last
    assert order == [5, 2, 0, 3, 4, 1, 6, 7]


def test_plain_forward_matches_bridge_hooks(model, windows, full_acts):
    forward = mlp_forward.mlp_forward(model, plain_hf=True)
    assert forward.engine == "plain_hf"  # the default model is GPT-2: the fast path is used
    bridge_storage = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in bridge_storage for p in forward.plain.parameters())  # shared, not copied
    outs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, l=l: outs.__setitem__(l, out))
               for l, m in enumerate(forward.act_modules)]
    try:
        with torch.inference_mode():
            forward.plain.base_model(input_ids=windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(model.cfg.n_layers):  # the plain module's output is the bridge's hook_post
        torch.testing.assert_close(outs[layer], full_acts[layer], rtol=1e-5, atol=1e-5)
    assert mlp_forward.mlp_forward(model, plain_hf=False).engine == "bridge"


def test_plain_model_is_built_once_per_bridge_and_follows_a_replaced_parameter():
    """The plain model is reused across passes, rebuilt on the new tensor when a parameter of the bridge is
    replaced, and does not keep the bridge alive."""
    import gc
    import weakref

    from nbutils import models

    bridge = models.load_model()
    first = mlp_forward.mlp_forward(bridge, plain_hf=True)
    assert mlp_forward.mlp_forward(bridge, plain_hf=True).plain is first.plain
    owner = next(m for m in bridge.original_model.modules() if "weight" in m._parameters)
    owner.weight = torch.nn.Parameter(owner.weight.detach().clone())
    second = mlp_forward.mlp_forward(bridge, plain_hf=True)
    assert second.plain is not first.plain
    assert owner.weight.data_ptr() in {p.data_ptr() for p in second.plain.parameters()}
    alive = weakref.ref(bridge)
    del bridge, first, second, owner
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("n_pos", [9, 300])  # a uint8 rank below 256 positions, int32 above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_max_position_is_the_first_argmax(n_pos, dtype):
    gen = torch.Generator().manual_seed(n_pos)
    act = (torch.randint(-3, 4, (5, n_pos, 40), generator=gen) / 2).to(dtype)  # coarse values: many ties
    act[0, :, 0] = 0.0
    act[0, 1:3, 0] = -0.0  # -0.0 equals 0.0: the first of them
    act[1, :, 1] = -5.0
    act[1, -1, 1] = 1.0  # the max at the last position
    top = act.amax(dim=1)  # [batch, d]
    got = activations._first_max_position(act, top)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), act.float().max(dim=1).indices)  # torch's max gives the first maximal index
    assert got[0, 0] == 0 and got[1, 1] == n_pos - 1


def test_merging_several_batches_at_once_changes_nothing(model, windows, tmp_path, monkeypatch):
    """Candidates are merged k at a time; a checkpoint merges what is pending: both give the same state."""
    merges: list[int] = []
    original = topk.merge_topk

    def counting(state, candidates, k):
        merges.append(candidates[0].shape[1])
        return original(state, candidates, k)

    monkeypatch.setattr(topk, "merge_topk", counting)
    pooled = _collect(model, windows, k=20)  # batches of 16: merged two at a time, the last one alone
    assert merges == [32, 16]
    merges.clear()
    every = _collect(model, windows, k=20, use_cache=True, cache_dir=tmp_path, checkpoint_every=1)
    assert merges == [16, 16, 16]  # a checkpoint after every batch merges it first
    _assert_same(pooled, every)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gelu_new_is_hugging_faces_bit_for_bit(dtype):
    from transformers.activations import NewGELUActivation

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=gen) * 3, torch.linspace(-30, 30, 4001), torch.tensor(
        [0.0, -0.0, 1e-30, -1e-30, 1e-3, 60.0, -60.0, 3e4, -3e4, float("inf"), float("-inf")])]).to(dtype)
    kept = x.clone()
    got, expected = mlp_forward.gelu_new(x), NewGELUActivation()(x)
    assert torch.equal(x, kept)  # the input is not changed
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(got.view(bits), expected.view(bits))


def test_plain_model_runs_gelu_new_and_keeps_gradients(model):
    act = mlp_forward.mlp_forward(model, plain_hf=True).act_modules[0]
    x = torch.randn(3, 5, model.cfg.d_mlp, requires_grad=True)
    act(x).sum().backward()  # with a gradient: Hugging Face's own operations
    expected = x.grad.clone()
    x.grad = None
    torch.nn.functional.gelu(x, approximate="tanh").sum().backward()
    torch.testing.assert_close(expected, x.grad)
    with torch.inference_mode():
        assert torch.equal(act(x.detach()), mlp_forward.gelu_new(x.detach()))


def test_engines_agree(model, windows, top):
    bridge = _collect(model, windows, plain_hf=False)
    torch.testing.assert_close(bridge.act, top.act, rtol=1e-5, atol=1e-5)
    same = (bridge.window == top.window).float().mean().item()
    assert same > 0.999, same  # windows can only swap places at near-ties (float rounding)
    assert len(bridge.examples) == len(top.examples)


def test_order_key_round_trip():
    act = torch.tensor([1.5, -0.0, -7.25, float("-inf"), 3e-39, 0.0])
    window = torch.tensor([0, 12, 2**31, -1, 5, 2**32 - 1])
    back_act, back_window = topk.decode_key(topk.order_key(act, window))
    assert torch.equal(back_window, window)
    assert torch.equal(back_act.view(torch.int32), act.view(torch.int32))  # bit for bit, -0.0 and subnormals too


def test_streaming_merge_equals_topk_of_union():
    gen = torch.Generator().manual_seed(0)
    n_neurons, k, batch = 50, 7, 5
    acts = torch.randn(n_neurons, 40, generator=gen)  # 40 windows
    acts[:, 20:] -= 10.0  # late windows are weak: most neurons take nothing from them (the skip path)
    acts[3, 30] = 50.0  # ... except one neuron
    acts[7, 10] = acts[7, 11] = 2.0  # a tie: the lower window wins
    pos = torch.randint(0, 9, (n_neurons, 40), generator=gen, dtype=torch.int32)
    state = topk.empty_state(n_neurons, k, "cpu")
    for start in range(0, 40, batch):
        ids = torch.arange(start, start + batch).expand(n_neurons, batch)
        cand = (topk.order_key(acts[:, start : start + batch], ids), pos[:, start : start + batch])
        state = topk.merge_topk(state, cand, k)
    act, window, got_pos = topk.sorted_state(*state, n_layers=1)
    order = torch.argsort(acts, dim=-1, descending=True, stable=True)[:, :k]  # stable: lower window first
    assert torch.equal(window[0], order)
    assert torch.equal(act[0], acts.gather(-1, order))
    assert torch.equal(got_pos[0], pos.gather(-1, order).long())
    assert window[0, 3, 0] == 30 and window[0, 7, 0] == 10 and window[0, 7, 1] == 11


# --------------------------------------------------------------------------------------------------
# Shards


def test_merge_of_shards_equals_one_pass(model, windows, top):
    a = _collect(model, windows[:32])  # shard boundaries at a multiple of the batch size: same batches
    b = _collect(model, windows[32:], window_offset=32)
    merged = merge(a, b)
    _assert_same(merged, top)
    assert merged.window_ranges == ((0, 32), (32, 48)) and merged.n_windows == 48
    _assert_same(merge(b, a), top)  # order does not matter


def test_merge_is_associative(model, windows):
    parts = [_collect(model, windows[s : s + 16], window_offset=s) for s in (0, 16, 32)]
    _assert_same(merge(merge(parts[0], parts[1]), parts[2]), merge(parts[0], merge(parts[1], parts[2])))


def test_merge_rejects_overlap_and_other_settings(model, windows):
    a = _collect(model, windows[:16])
    with pytest.raises(ValueError, match="`shards` must cover disjoint window ids"):
        merge(a, _collect(model, windows[8:24], window_offset=8))
    with pytest.raises(ValueError, match="`k of both shards` must be equal"):
        merge(a, _collect(model, windows[16:32], window_offset=16, k=K + 1))
    with pytest.raises(ValueError, match="`frac of both shards` must be equal"):
        merge(a, _collect(model, windows[16:32], window_offset=16, frac=0.9))
    other = _collect(model, windows[16:32], window_offset=16)
    other.model_id = "0" * 64
    with pytest.raises(ValueError, match="`shards` must come from the same model"):
        merge(a, other)


# --------------------------------------------------------------------------------------------------
# Cache


def test_cache_is_reused(model, windows, top, tmp_path, monkeypatch):
    first = _collect(model, windows, use_cache=True, cache_dir=tmp_path)
    _assert_same(first, top)
    calls = _count_batches(monkeypatch)
    again = _collect(model, windows, use_cache=True, cache_dir=tmp_path)
    assert calls == []  # loaded, nothing ran
    _assert_same(again, top)
    folders = list((tmp_path / "top_activations").iterdir())
    assert len(folders) == 1
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["key"]["k"] == K and meta["key"]["frac"] == FRAC
    assert sorted(p.name for p in folders[0].iterdir()) == ["meta.json", "result.parquet"]


def test_interrupted_run_resumes(model, windows, top, tmp_path, monkeypatch):
    original = topk.merge_topk
    merges: list[int] = []

    def failing(state, candidates, k):
        merges.append(1)
        if len(merges) == 3:  # the third batch fails after two checkpoints
            raise KeyboardInterrupt
        return original(state, candidates, k)

    monkeypatch.setattr(topk, "merge_topk", failing)
    with pytest.raises(KeyboardInterrupt):
        _collect(model, windows, use_cache=True, cache_dir=tmp_path, checkpoint_every=1)
    monkeypatch.setattr(topk, "merge_topk", original)
    folder = next((tmp_path / "top_activations").iterdir())
    assert (folder / "checkpoint.parquet").exists() and not (folder / "result.parquet").exists()

    calls = _count_batches(monkeypatch)
    resumed = _collect(model, windows, use_cache=True, cache_dir=tmp_path, checkpoint_every=1)
    assert calls == [32]  # only the third batch ran again
    _assert_same(resumed, top)
    assert not (folder / "checkpoint.parquet").exists()


@pytest.mark.parametrize("change", ["k", "frac", "batch_size", "engine", "corpus", "model"])
def test_other_settings_do_not_reuse_cache(model, windows, tmp_path, monkeypatch, change):
    base = _collect(model, windows, use_cache=True, cache_dir=tmp_path)
    calls = _count_batches(monkeypatch)
    options: dict = {}
    data = windows
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if change == "k":
        options["k"] = K + 1
    elif change == "frac":
        options["frac"] = 0.9
    elif change == "batch_size":
        options["batch_size"] = 24
    elif change == "engine":
        options["plain_hf"] = False
    elif change == "corpus":
        data = windows.clone()
        data[5, 3] = (data[5, 3] + 1) % model.cfg.d_vocab  # one token differs
    else:
        context = _perturbed(model, 0, 0, 5.0)
    with context:
        other = _collect(model, data, use_cache=True, cache_dir=tmp_path, **options)
    assert len(calls) > 0, "the cache of other settings was reused"
    assert len(list((tmp_path / "top_activations").iterdir())) == 2
    if change == "model":  # the new result really comes from the changed model
        assert other.max_act[0, 0] > base.max_act[0, 0] + 1.0
    if change == "k":
        assert other.act.shape[-1] == K + 1


def _finished_folder(model, windows, tmp_path):
    _collect(model, windows[:16], use_cache=True, cache_dir=tmp_path)
    return next((tmp_path / "top_activations").iterdir())


@pytest.mark.parametrize("name", ["result.parquet", "meta.json"])
def test_corrupt_file_raises_and_keeps_it(model, windows, tmp_path, name):
    folder = _finished_folder(model, windows, tmp_path)
    (folder / name).write_bytes(b"not what it should be")
    with pytest.raises(cache.CacheError, match=rf"{name}.*unreadable.*Nothing was deleted.*rm -r"):
        _collect(model, windows[:16], use_cache=True, cache_dir=tmp_path)
    assert (folder / name).read_bytes() == b"not what it should be"


def test_missing_result_raises(model, windows, tmp_path):
    folder = _finished_folder(model, windows, tmp_path)
    (folder / "result.parquet").unlink()
    with pytest.raises(cache.CacheError, match="result.parquet is missing although meta.json says"):
        _collect(model, windows[:16], use_cache=True, cache_dir=tmp_path)


def test_folder_of_other_settings_raises(model, windows, tmp_path):
    folder = _finished_folder(model, windows, tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["key"]["k"] = 99
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(cache.CacheError, match="meta.json was written by other settings"):
        _collect(model, windows[:16], use_cache=True, cache_dir=tmp_path)
    assert (folder / "result.parquet").exists()


def test_corrupt_checkpoint_raises(model, windows, tmp_path, monkeypatch):
    monkeypatch.setattr(topk, "merge_topk", _fail_on_second(topk.merge_topk))
    with pytest.raises(KeyboardInterrupt):
        _collect(model, windows, use_cache=True, cache_dir=tmp_path, checkpoint_every=1)
    monkeypatch.undo()
    folder = next((tmp_path / "top_activations").iterdir())
    (folder / "checkpoint.parquet").write_bytes(b"PAR1 half written")
    with pytest.raises(cache.CacheError, match="checkpoint.parquet is unreadable"):
        _collect(model, windows, use_cache=True, cache_dir=tmp_path, checkpoint_every=1)


def test_half_written_folder_recomputes_cleanly(model, windows, top, tmp_path):
    # a run killed before its first checkpoint: meta.json says running, a temporary file is left over
    _collect(model, windows, use_cache=True, cache_dir=tmp_path)
    folder = next((tmp_path / "top_activations").iterdir())
    (folder / "result.parquet").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    meta["status"] = "running"
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / ".checkpoint.parquet.123.tmp").write_bytes(b"half")
    again = _collect(model, windows, use_cache=True, cache_dir=tmp_path)
    _assert_same(again, top)


def _fail_on_second(original):
    count = []

    def failing(state, candidates, k):
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt
        return original(state, candidates, k)

    return failing


def test_model_fingerprint_follows_weights(model):
    before = cache.model_fingerprint(model)
    with _perturbed(model, 3, 1, 1e-3):
        during = cache.model_fingerprint(model)
    assert during != before and cache.model_fingerprint(model) == before


def test_neuron_activations_match_examples(model, windows, top, full_acts):
    ex = top.neuron_examples(2, 11)
    along = activations.neuron_activations(model, windows, 2, 11, ex["window"].to_numpy(), batch_size=3)
    assert along.shape == (len(ex), windows.shape[1])
    torch.testing.assert_close(along, full_acts[2, torch.tensor(ex["window"].to_numpy()), :, 11], rtol=1e-5, atol=1e-6)
    # the example's position is the window's maximum, and its act is the value there
    assert (along.argmax(dim=1).numpy() == ex["pos"].to_numpy()).all()
    np.testing.assert_allclose(along.max(dim=1).values.numpy(), ex["act"].to_numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`window_ids` must hold rows of `windows` \(0\.\.47\)"):
        activations.neuron_activations(model, windows, 2, 11, [0, 48])
    with pytest.raises(ValueError, match=r"`layer` must be in 0\.\.3"):
        activations.neuron_activations(model, windows, 4, 11)


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, r"`k` must be in 1\.\."),
        ({"k": 2.5}, TypeError, r"`k` must be an integer"),
        ({"frac": 0.0}, ValueError, r"`frac` must be in \(0\.0, 1\.0\]; got 0\.0"),
        ({"frac": 1.5}, ValueError, r"`frac` must be in \(0\.0, 1\.0\]; got 1\.5"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be in 1\.\."),
    ],
)
def test_bad_settings(model, windows, kwargs, error, match):
    with pytest.raises(error, match=match):
        _collect(model, windows, **kwargs)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda w: w[:0], ValueError, r"`windows` must be a non-empty 2-D tensor"),
        (lambda w: w[0], ValueError, r"`windows` must be a non-empty 2-D tensor"),
        (lambda w: w[None], ValueError, r"`windows` must be a non-empty 2-D tensor"),
        (lambda w: w.float(), ValueError, r"`windows` must hold integer token ids"),
        (lambda w: w.tolist(), TypeError, r"`windows` must be a LongTensor"),
        (lambda w: torch.where(w == w[0, 0], 10**6, w), ValueError, r"`windows` must hold token ids in 0\.\."),
        (lambda w: torch.where(w == w[0, 0], -1, w), ValueError, r"`windows` must hold token ids in 0\.\."),
    ],
)
def test_bad_windows(model, windows, make, error, match):
    with pytest.raises(error, match=match):
        _collect(model, make(windows))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_pooled_memory_reuses_freed_large_allocations():
    """Freeing and allocating the same 64 MB tensor faults its pages in each time by default (glibc maps it afresh);
    inside `pooled_memory` the freed memory is reused, so the page faults fall to a fraction."""
    import resource

    from nbutils._env import pooled_memory

    def faults_of_20_allocations() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            torch.ones(16 << 20)  # 64 MB, written, freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    plain = faults_of_20_allocations()
    with pooled_memory():
        pooled = faults_of_20_allocations()
    assert plain > 20 * 10_000  # 16,384 pages of 4 kB each time
    assert pooled < plain / 4
