"""Token importance: how much each earlier token of an example drives a neuron's activation.

For the activation of `neuron` at position `pos`, token `m <= pos` is replaced by a neutral token (the
tokenizer's pad token, else BOS/EOS; `<|endoftext|>` for the default model) and the example is re-run;
the importance of `m` is the drop in activation, divided by the largest drop in the example and clipped
to [0, 1]. All `pos + 1` ablations run as one batch, cut after `pos` (later tokens cannot matter in a
causal model).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils._validation import check_int_range, check_positive_int, fail
from nbutils.models import check_layer, check_neuron, check_windows, hook_name

__all__ = ["neutral_token", "ablation_drops", "token_importance", "neuron_activations"]


def neutral_token(model: Any) -> int:
    """The token that replaces an ablated token: pad, else BOS, else EOS of the model's tokenizer."""
    tokenizer = model.tokenizer
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    fail("model", "have a tokenizer with a pad, BOS or EOS token (the neutral token)", "none of them")


def _check_tokens(model: Any, tokens: Any, pos: Any) -> tuple[Tensor, int]:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"`tokens` must be a LongTensor [window]; got {type(tokens).__name__}.")
    if tokens.ndim != 1:
        fail("tokens", "be 1-D [window] (one example)", f"shape {tuple(tokens.shape)}", "Pass `windows[w]`.")
    tokens = check_windows(model, tokens[None])[0]
    pos = check_int_range("pos", pos, 0, tokens.shape[0] - 1, what="(a position of `tokens`)")
    return tokens, pos


@torch.inference_mode()
def ablation_drops(
    model: Any,
    tokens: Int[Tensor, "window"],
    pos: int,
    layer: int,
    neuron: int,
    *,
    replacement: int | None = None,
) -> Float[np.ndarray, "pos_plus_1"]:
    """Raw activation drop `act(original) - act(token m replaced)` for each `m` in 0..pos, one batch.

    Args:
        model: a TransformerBridge.
        tokens: one example `[window]`.
        pos: the position whose activation is explained.
        layer, neuron: the neuron.
        replacement: token id put in place of each token; `None` for `neutral_token(model)`.

    Returns:
        `[pos + 1]` float64 drops (negative when replacing a token raises the activation).
    """
    layer, neuron = check_layer(model, layer), check_neuron(model, neuron)
    tokens, pos = _check_tokens(model, tokens, pos)
    replacement = neutral_token(model) if replacement is None else replacement
    replacement = check_int_range("replacement", replacement, 0, model.cfg.d_vocab - 1, what="(a token id)")
    prefix = tokens[: pos + 1]  # [pos + 1]
    batch = prefix.repeat(pos + 2, 1)  # [pos + 2, pos + 1]: row 0 original, row m + 1 ablates token m
    idx = torch.arange(pos + 1)
    batch[idx + 1, idx] = replacement
    device = next(model.parameters()).device
    name = hook_name(layer, "post")
    _, cache = model.run_with_cache(batch.to(device), names_filter=[name], stop_at_layer=layer + 1)
    act = cache[name][:, pos, neuron].double().cpu().numpy()  # [pos + 2]
    return act[0] - act[1:]


def token_importance(
    model: Any,
    tokens: Int[Tensor, "window"],
    pos: int,
    layer: int,
    neuron: int,
    *,
    replacement: int | None = None,
) -> Float[np.ndarray, "pos_plus_1"]:
    """Importance in [0, 1] of each token 0..pos for the activation of `neuron` at `pos`.

    The drop in activation when the token is replaced by a neutral token (`ablation_drops`), divided by
    the largest drop and clipped to [0, 1]; all zeros when no replacement lowers the activation.

    Args:
        model: a TransformerBridge (`models.load_model`).
        tokens: one example `[window]`, e.g. `windows[w]`.
        pos: the activating position.
        layer, neuron: the neuron.
        replacement: token id used for ablation; `None` for `neutral_token(model)`.

    Returns:
        `[pos + 1]` float64 in [0, 1].

    Raises:
        ValueError: tokens not 1-D or outside the vocabulary, `pos`, `layer` or `neuron` out of range.
    """
    drops = ablation_drops(model, tokens, pos, layer, neuron, replacement=replacement)
    top = drops.max()
    if top <= 0:
        return np.zeros_like(drops)
    return np.clip(drops / top, 0.0, 1.0)


@torch.inference_mode()
def neuron_activations(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    neuron: int,
    *,
    batch_size: int = 64,
) -> Float[np.ndarray, "n_windows window"]:
    """Activation of one neuron at every position of each window (to colour tokens by activation).

    Returns:
        `[n_windows, window]` float64.
    """
    layer, neuron = check_layer(model, layer), check_neuron(model, neuron)
    windows = check_windows(model, windows)
    batch_size = check_positive_int("batch_size", batch_size)
    name = hook_name(layer, "post")
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(windows), batch_size):
        _, cache = model.run_with_cache(windows[start : start + batch_size].to(device), names_filter=[name],
                                        stop_at_layer=layer + 1)
        parts.append(cache[name][:, :, neuron].double().cpu())  # [batch, window]
    return torch.cat(parts).numpy()
