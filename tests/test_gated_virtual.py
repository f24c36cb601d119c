"""Virtual neurons of a gated MLP (nbutils.evaluation) on a small random Llama model built from a `transformers`
config (no download) with the default tokenizer.

Everything is checked against values read from the model's own hooks (the gate `hook_pre`, the up projection
`hook_pre_linear`), not against the weights the code combines: the virtual gate and up values are the sources'
hook values divided by their scales, the activation is `silu(g_v) * u_v`, the top examples are the brute-force
top-k of that activation over every position, and each example's label is the source whose scaled activation
`silu(g_i / s_i) * u_i / t_i` is largest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from test_families import _configs

from nbutils import _env, activations, data, embeddings, evaluation, models

LAYER, K, FRAC = 1, 12, 0.3
TOL = 1e-4  # float32 hooks against float64 sums of O(1) numbers


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random 2-layer Llama (norm scales perturbed so the fold is not trivial), its corpus windows, its top-k
    collection and its virtual neurons of layer `LAYER`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(_env.DEFAULT_MODEL_DIR)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_configs(len(tokenizer), tokenizer.eos_token_id)["llama"])
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gated") / "llama"
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = models.load_model(path)
    windows = data.corpus_windows(model, n_windows=64, window=16)  # [64, 16]
    top = activations.collect_top_activations(model, windows, k=16, frac=0.5, use_cache=False, progress=False)
    virtual = evaluation.make_virtual_neurons(model, windows, top, LAYER, 6, min_examples=4, seed=0)
    return dict(model=model, windows=windows, top=top, virtual=virtual)


def _hooks(model, windows) -> tuple[np.ndarray, np.ndarray]:
    """Gate g and up u of every neuron of `LAYER` at every position, from the model's hooks, `[n_windows, pos,
    d_mlp]` each."""
    names = [models.hook_name(LAYER, "pre"), models.hook_name(LAYER, "pre_linear")]
    with torch.inference_mode():
        _, cache = model.run_with_cache(windows, names_filter=names, stop_at_layer=LAYER + 1)
    return tuple(cache[n].double().numpy() for n in names)


def _virtual_gate_up(virtual, g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`g_v, u_v [..., n_virtual]`: each virtual neuron's sum of its sources' hook values over their scales."""
    g_v = np.zeros((*g.shape[:-1], virtual.n_virtual))
    u_v = np.zeros_like(g_v)
    for row in virtual.sources.itertuples():
        g_v[..., row.virtual] += g[..., row.neuron] / row.scale
        u_v[..., row.virtual] += u[..., row.neuron] / row.up_scale
    return g_v, u_v


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def test_gated_sources_are_scaled_at_their_top_example(llama):
    model, windows, top, virtual = llama["model"], llama["windows"], llama["top"], llama["virtual"]
    assert model.cfg.act_fn == "silu" and models.is_gated(model) and virtual.gated
    src = virtual.sources
    assert virtual.n_virtual >= 3 and src.groupby("virtual").size().between(2, 4).all()
    g, u = _hooks(model, windows)
    for j, scale, up_scale in zip(src.neuron, src.scale, src.up_scale):
        ex = top.neuron_examples(LAYER, j).iloc[0]  # the source's top example
        w, p = int(ex.window), int(ex.pos)
        assert scale == pytest.approx(g[w, p, j], rel=1e-4)
        assert up_scale == pytest.approx(u[w, p, j], rel=1e-4)
        assert scale > 0 and up_scale > 0  # a positive gate at a positive top activation: the up value is positive
        # at its own top example the source's scaled activation is silu(1) * 1
        h = embeddings.pre_mlp_vectors(model, windows, LAYER, [w], [p]).double().numpy()
        term = evaluation.virtual_neurons._source_terms(model, virtual, h, np.flatnonzero(src.neuron.to_numpy() == j)[:1])
        assert term[0, 0] == pytest.approx(_silu(1.0), rel=1e-4)


def test_gated_virtual_activation_is_act_gate_times_up(llama):
    """From h, `virtual_activations` equals silu(g_v) * u_v with g_v, u_v summed from the sources' hook values;
    each kind's embedding sums (plus its bias) to g_v, u_v or g_v + u_v."""
    model, windows, virtual = llama["model"], llama["windows"], llama["virtual"]
    rng = np.random.default_rng(0)
    wid, pos = rng.integers(0, windows.shape[0], 40), rng.integers(0, windows.shape[1], 40)
    h = embeddings.pre_mlp_vectors(model, windows, LAYER, wid, pos).double().numpy()  # [40, d_model]
    g, u = _hooks(model, windows)
    g_v, u_v = _virtual_gate_up(virtual, g[wid, pos], u[wid, pos])  # [40, n_virtual] each
    np.testing.assert_allclose(evaluation.virtual_activations(model, virtual, h), _silu(g_v) * u_v, atol=TOL)
    np.testing.assert_allclose(evaluation.virtual_activations(model, virtual, h, 2), _silu(g_v[:, 2]) * u_v[:, 2],
                               atol=TOL)
    bias = {"gate": virtual.b, "up": virtual.b_up, "both": virtual.b + virtual.b_up}
    for kind, want in (("gate", g_v), ("up", u_v), ("both", g_v + u_v)):
        W = virtual._sum(virtual.source_weights(kind))  # [d_in, n_virtual]
        h_k = np.hstack([h, h]) if kind == "both" else h
        assert W.shape == (h_k.shape[1], virtual.n_virtual)
        e = h_k[:, :, None] * W[None]  # [40, d_in, n_virtual]: every virtual neuron's embedding of this kind
        np.testing.assert_allclose(e.sum(axis=1) + bias[kind], want, atol=TOL)


def test_gated_collect_matches_brute_force(llama):
    """The streaming top-k of the virtual neurons equals sorting silu(g_v) * u_v over the full activation matrix."""
    model, windows, virtual = llama["model"], llama["windows"], llama["virtual"]
    ex = evaluation.collect_virtual_examples(model, windows, [virtual], k=6, frac=0.5, batch_size=16, progress=False)
    g_v, u_v = _virtual_gate_up(virtual, *_hooks(model, windows))
    full = _silu(g_v) * u_v  # [n_windows, pos, n_virtual]
    act = full.max(axis=1)  # [n_windows, n_virtual]: the best position of each window
    for v in range(virtual.n_virtual):
        order = np.argsort(-act[:, v], kind="stable")[:6]
        keep = order[act[order, v] >= 0.5 * act[order[0], v]]
        got = ex[(ex.layer == LAYER) & (ex.virtual == v)]
        assert len(got) >= 1
        assert got.window.tolist() == keep.tolist()
        assert got.pos.tolist() == full[keep, :, v].argmax(axis=1).tolist()
        np.testing.assert_allclose(got.act, act[keep, v], rtol=1e-4, atol=1e-5)


def test_gated_labels_are_the_argmax_source(llama):
    """Each example's label is the source with the largest silu(g_i / s_i) * u_i / t_i: the scored counts, the
    sources present and the majority share that `score_virtual_neurons` reports follow from those labels, for
    every kind; the spaces that do not depend on the kind score the same."""
    model, windows, virtual = llama["model"], llama["windows"], llama["virtual"]
    ex = evaluation.collect_virtual_examples(model, windows, [virtual], k=K, frac=FRAC, progress=False)
    g, u = _hooks(model, windows)
    grid = {"local": [0.7]}
    by_kind = {kind: evaluation.score_virtual_neurons(model, windows, virtual, ex, grid, kind=kind, chunk=4)
               for kind in ("gate", "up", "both")}
    default = evaluation.score_virtual_neurons(model, windows, virtual, ex, grid)
    assert (default.kind == "gate").all()
    for v, s in virtual.sources.groupby("virtual"):
        e = ex[ex.virtual == v]
        gi, ui = g[e.window, e.pos][:, s.neuron], u[e.window, e.pos][:, s.neuron]  # [n, m]
        terms = _silu(gi / s.scale.to_numpy()) * ui / s.up_scale.to_numpy()  # [n, m]
        top2 = np.sort(terms, axis=1)[:, -2:]
        scored = top2[:, 0] < evaluation.AMBIGUOUS * top2[:, 1]
        truth = terms.argmax(axis=1)[scored]
        for kind, scores in by_kind.items():
            rows = scores[scores.virtual == v]
            if scored.sum() < 2:
                assert rows.empty
                continue
            assert set(rows.space) == set(evaluation.SPACES) and (rows.kind == kind).all()
            assert (rows.n_examples == len(e)).all() and (rows.n_scored == scored.sum()).all()
            assert (rows.n_present == len(np.unique(truth))).all()
            np.testing.assert_allclose(rows.majority, np.bincount(truth).max() / len(truth))
    keys = ["virtual", "space", "method", "threshold"]
    for kind in ("up", "both"):
        a, b = (by_kind[k][by_kind[k].space != "embedding"].set_index(keys) for k in ("gate", kind))
        np.testing.assert_array_equal(a.ari, b.ari)
        np.testing.assert_array_equal(a.knn_accuracy, b.knn_accuracy)
    emb = by_kind["gate"][by_kind["gate"].space == "embedding"].set_index(keys)
    np.testing.assert_array_equal(emb.ari, default[default.space == "embedding"].set_index(keys).ari)


def test_gated_bad_kind(llama, model, windows):
    gated, virtual = llama["model"], llama["virtual"]
    ex = evaluation.collect_virtual_examples(gated, llama["windows"], [virtual], k=4, progress=False)
    for bad in ("in", "gates"):
        with pytest.raises(ValueError, match=r"`kind` must be one of 'gate', 'up', 'both' for this model, a gated MLP"):
            evaluation.score_virtual_neurons(gated, llama["windows"], virtual, ex, kind=bad)
    with pytest.raises(ValueError, match=r"`kind` must be one of 'gate', 'up', 'both'; got 'in'"):
        virtual.source_weights("in")
    # virtual neurons of a gated MLP on a plain model (the default one)
    with pytest.raises(ValueError, match=r"`virtual` must be made from this model \(a plain MLP\)"):
        evaluation.collect_virtual_examples(model, windows, [virtual], k=4, progress=False)
    with pytest.raises(ValueError, match=r"`kind` must be one of 'in' for this model, a plain MLP"):
        evaluation.score_virtual_neurons(model, windows, virtual, ex, kind="gate")
    with pytest.raises(ValueError, match=r"`virtual` must be made from this model"):
        evaluation.score_virtual_neurons(model, windows, virtual, ex)
