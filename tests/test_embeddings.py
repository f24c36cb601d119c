"""Neuron embeddings: the sum invariant, an independent Hugging Face computation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from nbutils import _env, data, embeddings, models

TOL = 1e-4  # float32: sums of 128 products of O(1) numbers


def _examples(windows, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, windows.shape[0], n), rng.integers(0, windows.shape[1], n)


@pytest.mark.parametrize("fold_ln", [True, False])
def test_embedding_sum_plus_bias_is_the_pre_activation(model, windows, fold_ln):
    wid, pos = _examples(windows)
    for layer in range(model.cfg.n_layers):
        W, b = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln)
        h = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos, fold_ln=fold_ln)
        pre = embeddings.pre_activations(model, windows, layer, wid, pos)  # read from blocks.L.mlp.hook_pre
        errors = []
        for neuron in (0, 7, 511):
            e = embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, fold_ln=fold_ln)
            assert torch.equal(e, embeddings.embed(h, W, neuron))
            errors.append((e.sum(-1) + b[neuron] - pre[:, neuron]).abs().max().item())
        # every neuron of the layer at once: h @ W + b is the sum of all embeddings
        errors.append((h @ W + b - pre).abs().max().item())
        print(f"layer {layer} fold_ln={fold_ln}: max abs error {max(errors):.2e}")
        assert max(errors) < TOL


def test_folded_weights_equal_compatibility_mode():
    """Our explicit fold equals TransformerLens' own (compatibility mode folds LayerNorm and centres W_in),
    and the invariant still holds on a bridge in compatibility mode."""
    raw, compat = models.load_model(), models.load_model()
    compat.enable_compatibility_mode()
    windows = data.corpus_windows(raw, n_windows=6, window=16)
    wid, pos = np.arange(6), np.arange(6)
    for layer in range(raw.cfg.n_layers):
        W0, b0 = embeddings.mlp_in_weights(raw, layer)
        W1, b1 = embeddings.mlp_in_weights(compat, layer)
        assert torch.allclose(W0, compat.W_in[layer].detach(), atol=1e-5)
        assert torch.allclose(W0, W1, atol=1e-5) and torch.allclose(b0, b1, atol=1e-5)
        for fold_ln in (True, False):
            W, b = embeddings.mlp_in_weights(compat, layer, fold_ln=fold_ln)
            h = embeddings.pre_mlp_vectors(compat, windows, layer, wid, pos, fold_ln=fold_ln)
            pre = embeddings.pre_activations(compat, windows, layer, wid, pos)
            assert (h @ W + b - pre).abs().max() < TOL


def test_folded_embedding_by_hand(model, windows):
    """e_fold = n ⊙ (γ ⊙ w − mean(γ ⊙ w)) with n the centred, unit-variance ln2 input; the raw embedding
    carries in addition the offset β ⊙ w shared by every example."""
    wid, pos = _examples(windows, n=10)
    layer, neuron = 1, 3
    ln = model.blocks[layer].ln2
    h_raw = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos, fold_ln=False)
    n = (h_raw - ln.b.detach()) / ln.w.detach()
    assert torch.allclose(n.mean(-1), torch.zeros(len(n)), atol=1e-5)
    w = model.W_in[layer][:, neuron].detach()
    gw = ln.w.detach() * w
    expected = n * (gw - gw.mean())
    e_fold = embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, fold_ln=True)
    e_raw = embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, fold_ln=False)
    assert torch.allclose(e_fold, expected, atol=1e-4)
    assert torch.allclose(e_raw, n * gw + ln.b.detach() * w, atol=1e-5)


def test_embeddings_match_plain_hugging_face_hooks(model, windows):
    """Same product computed without nbutils or TransformerLens: forward hooks on the HF GPT-2 modules."""
    hf = GPT2LMHeadModel.from_pretrained(_env.DEFAULT_MODEL_DIR).eval()
    wid, pos = _examples(windows, n=30, seed=1)
    layer, neuron = 2, 100
    captured = {}
    block = hf.transformer.h[layer]
    handles = [
        block.ln_2.register_forward_hook(lambda m, i, o: captured.__setitem__("h_raw", o)),
        block.mlp.c_fc.register_forward_hook(lambda m, i, o: captured.__setitem__("pre", o)),
    ]
    with torch.no_grad():
        hf(windows)
    for handle in handles:
        handle.remove()
    h_raw = captured["h_raw"][wid, pos]  # [n, d_model]
    pre = captured["pre"][wid, pos, neuron]  # [n]
    w = block.mlp.c_fc.weight[:, neuron].detach()  # Conv1D: weight is [d_model, d_mlp]
    beta = block.ln_2.bias.detach()
    expected_raw = h_raw * w
    gamma = block.ln_2.weight.detach()
    normalised = (h_raw - beta) / gamma
    expected_fold = normalised * (gamma * w - (gamma * w).mean())
    got_raw = embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, fold_ln=False)
    got_fold = embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, fold_ln=True)
    assert torch.allclose(got_raw, expected_raw, atol=1e-5)
    assert torch.allclose(got_fold, expected_fold, atol=1e-4)
    assert torch.allclose(expected_raw.sum(-1) + block.mlp.c_fc.bias[neuron], pre, atol=TOL)


def test_bos_is_not_prepended(model, windows):
    """Token tensors go in as they are: position p of the window is position p of the hook."""
    h = embeddings.pre_mlp_vectors(model, windows, 0, [0, 0], [0, 1], fold_ln=False)
    _, cache = model.run_with_cache(windows[:1], names_filter=["blocks.0.mlp.hook_in"])
    assert cache["blocks.0.mlp.hook_in"].shape[1] == windows.shape[1]
    assert torch.allclose(h, cache["blocks.0.mlp.hook_in"][0, :2])


def test_order_and_duplicates_are_kept(model, windows):
    h = embeddings.pre_mlp_vectors(model, windows, 1, [5, 2, 5], [3, 3, 3])
    assert torch.equal(h[0], h[2])
    assert not torch.equal(h[0], h[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layer": 9}, ValueError, r"`layer` must be in 0\.\.3 for this model; got 9"),
        ({"neuron": 600}, ValueError, r"`neuron` must be in 0\.\.511"),
        ({"window_ids": [0, 99]}, ValueError, r"`window_ids` must hold values in 0\.\.47; got 99"),
        ({"positions": [0, 32]}, ValueError, r"`positions` must hold values in 0\.\.31; got 32"),
        ({"positions": [0]}, ValueError, r"`window_ids` and `positions` must have the same length"),
        ({"layer": 1.5}, TypeError, r"`layer` must be an integer"),
    ],
)
def test_bad_input(model, windows, kwargs, error, match):
    args = {"layer": 0, "neuron": 0, "window_ids": [0, 1], "positions": [0, 1]} | kwargs
    with pytest.raises(error, match=match):
        embeddings.neuron_embeddings(model, windows, **args)
