"""Tests of nbutils.importance: known answers with attention switched off, batched vs one-by-one ablation."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from nbutils import importance, models


@contextlib.contextmanager
def _attention_off(model, layers):
    """Zero the attention output (GPT-2 `c_proj` weight and bias the bridge runs) of `layers` in place, so
    each position's residual stream sees only its own token and position there; restore afterwards."""
    saved = []
    for layer in layers:
        proj = model.original_model.transformer.h[layer].attn.c_proj
        saved.append((proj, proj.weight.detach().clone(), proj.bias.detach().clone()))
        with torch.no_grad():
            proj.weight.zero_()
            proj.bias.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for proj, weight, bias in saved:
                proj.weight.copy_(weight)
                proj.bias.copy_(bias)


def _post(model, tokens, layer):
    name = models.hook_name(layer, "post")
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[name], stop_at_layer=layer + 1)
    return cache[name]  # [batch, pos, d_mlp]


@pytest.mark.parametrize("layer", [0, 2])
def test_only_the_token_itself_matters_without_attention(model, windows, layer):
    tokens, pos = windows[3], 20
    with _attention_off(model, range(layer + 1)):
        ablated = tokens[: pos + 1].clone()
        ablated[pos] = importance.neutral_token(model)
        acts = _post(model, torch.stack([tokens[: pos + 1], ablated]), layer)[:, pos]  # [2, d_mlp]
        neuron = int(torch.argmax(acts[0] - acts[1]))  # the neuron the token itself drives most
        imp = importance.token_importance(model, tokens, pos, layer, neuron)
    expected = np.zeros(pos + 1)
    expected[pos] = 1.0  # known answer: no attention, so no earlier token can change the activation
    np.testing.assert_allclose(imp, expected, atol=1e-5)


def test_batched_equals_one_by_one(model, windows):
    tokens, pos, layer = windows[5], 15, 1
    neuron = int(torch.argmax(_post(model, tokens[None, : pos + 1], layer)[0, pos]))
    drops = importance.ablation_drops(model, tokens, pos, layer, neuron)
    base = float(_post(model, tokens[None, : pos + 1], layer)[0, pos, neuron])
    for m in range(pos + 1):
        ablated = tokens[: pos + 1].clone()
        ablated[m] = importance.neutral_token(model)
        one = float(_post(model, ablated[None], layer)[0, pos, neuron])
        assert drops[m] == pytest.approx(base - one, abs=1e-4)
    imp = importance.token_importance(model, tokens, pos, layer, neuron)
    assert imp.shape == (pos + 1,) and imp.min() >= 0 and imp.max() == pytest.approx(1.0)
    assert int(np.argmax(imp)) == int(np.argmax(drops))


def test_no_drop_gives_zeros(model, windows):
    # replacing each token by itself changes nothing: every drop is 0, so every importance is 0
    tokens = windows[0].clone()
    tokens[:] = importance.neutral_token(model)
    imp = importance.token_importance(model, tokens, 6, 0, 0)
    assert imp.tolist() == [0.0] * 7


def test_importance_errors(model, windows):
    with pytest.raises(ValueError, match=r"`tokens` must be 1-D \[window\] \(one example\); got shape \(2, 32\)"):
        importance.token_importance(model, windows[:2], 3, 0, 0)
    with pytest.raises(ValueError, match=r"`pos` must be in 0..31 \(a position of `tokens`\); got 32"):
        importance.token_importance(model, windows[0], 32, 0, 0)
    with pytest.raises(ValueError, match=r"`layer` must be in 0..3 for this model; got -1"):
        importance.token_importance(model, windows[0], 3, -1, 0)
    with pytest.raises(ValueError, match=r"`neuron` must be in 0..511"):
        importance.token_importance(model, windows[0], 3, 0, 600)
    with pytest.raises(TypeError, match="`tokens` must be a LongTensor"):
        importance.token_importance(model, [1, 2, 3], 1, 0, 0)


def test_neuron_activations_match_collected_examples(model, windows):
    from nbutils import activations

    top = activations.collect_top_activations(model, windows, k=4, use_cache=False, progress=False)
    ex = top.neuron_examples(2, 7)
    acts = importance.neuron_activations(model, windows[ex.window.to_numpy().copy()], 2, 7)  # [n, window]
    np.testing.assert_allclose(acts[np.arange(len(ex)), ex.pos.to_numpy()], ex.act.to_numpy(), atol=1e-5)
    np.testing.assert_allclose(acts.max(axis=1), ex.act.to_numpy(), atol=1e-5)  # pos is each window's max
