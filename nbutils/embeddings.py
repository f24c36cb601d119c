"""Pre-MLP vectors and neuron embeddings e = h ⊙ W_in[:, neuron].

For neuron j of layer i, `e.sum() + bias[j]` is exactly the neuron's pre-activation (the invariant every
test checks). Two LayerNorm conventions, each with its own weights and bias (`mlp_in_weights`):

- `fold_ln=True` (default, as TransformerLens' folded models and the paper): h is the normalised vector
  (centred, unit variance: ln2 before its scale γ and bias β), the weights are `γ[:, None] * W_in` with each
  column's mean over d_model removed (h sums to zero, so that mean never reaches the output; TransformerLens'
  `fold_ln` + `center_weights` does the same, and so does `enable_compatibility_mode()`), and the bias is
  `b_in + β @ W_in`. This leaves out the offset `β ⊙ w` that all examples of a neuron share, which would
  otherwise inflate every similarity.
- `fold_ln=False`: h is the raw MLP input (ln2 output), weights `W_in`, bias `b_in`.

Both are computed from the bridge's raw weights, not through compatibility-mode hook aliases. Windows are
fed as token tensors, so no BOS token is prepended and positions index the windows as they are.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils._validation import check_same_length, fail
from nbutils.models import check_layer, check_neuron, check_windows, hook_name

__all__ = [
    "mlp_in_weights",
    "pre_mlp_vectors",
    "pre_activations",
    "neuron_embeddings",
    "embed",
]

IndexLike = Sequence[int] | np.ndarray | Tensor


def mlp_in_weights(
    model: Any, layer: int, *, fold_ln: bool = True
) -> tuple[Float[Tensor, "d_model d_mlp"], Float[Tensor, "d_mlp"]]:
    """The input weights and bias of layer `layer`'s MLP in the chosen LayerNorm convention."""
    layer = check_layer(model, layer)
    with torch.no_grad():
        W = model.W_in[layer].detach().float()  # [d_model, d_mlp]
        b = model.b_in[layer].detach().float()  # [d_mlp]
        if fold_ln:
            ln = model.blocks[layer].ln2
            gamma = ln.w.detach().float()  # [d_model]
            beta = getattr(ln, "b", None)
            b = b + beta.detach().float() @ W if beta is not None else b
            W = gamma[:, None] * W
            if model.cfg.normalization_type in ("LN", "LNPre"):
                W = W - W.mean(0, keepdim=True)  # h is centred, so the column mean never reaches the output
    return W, b


def _as_index(name: str, values: IndexLike, high: int) -> Tensor:
    idx = torch.as_tensor(np.array(values), dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= high):
        bad = idx[(idx < 0) | (idx >= high)][0].item()
        fail(name, f"hold values in 0..{high - 1}", f"{bad}")
    return idx


@torch.inference_mode()
def _gather(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    window_ids: IndexLike,
    positions: IndexLike,
    kinds: tuple[str, ...],
    batch_size: int,
) -> dict[str, Tensor]:
    """Run the windows that are needed (each once, in batches, stopping after `layer`) and read the hooks
    `kinds` at (window_ids[i], positions[i]). Returns {kind: [n, ...]}."""
    layer = check_layer(model, layer)
    windows = check_windows(model, windows)
    check_same_length(window_ids=window_ids, positions=positions)
    wid = _as_index("window_ids", window_ids, windows.shape[0])
    pos = _as_index("positions", positions, windows.shape[1])
    unique, inverse = torch.unique(wid, return_inverse=True)  # each window runs once
    names = {hook_name(layer, k): k for k in kinds}
    out = {k: [] for k in kinds}
    device = next(model.parameters()).device
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        _, cache = model.run_with_cache(
            windows[chunk].to(device), names_filter=list(names), stop_at_layer=layer + 1
        )
        for name, kind in names.items():
            out[kind].append(cache[name].float().cpu())  # [chunk, window, d]
    result = {}
    for kind, parts in out.items():
        width = model.cfg.d_model if kind in ("mlp_in", "ln_normalized") else model.cfg.d_mlp
        full = torch.cat(parts) if parts else torch.zeros(0, windows.shape[1], width)  # [n_unique, window, d]
        result[kind] = full[inverse, pos]  # [n, d]
    return result


def pre_mlp_vectors(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    window_ids: IndexLike,
    positions: IndexLike,
    *,
    fold_ln: bool = True,
    batch_size: int = 64,
) -> Float[Tensor, "n d_model"]:
    """The vector h that multiplies `mlp_in_weights(model, layer, fold_ln)` at each (window, position).

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: token windows `[n_windows, window]`.
        layer: MLP layer.
        window_ids, positions: `[n]` each; example i is token `positions[i]` of window `window_ids[i]`.
        fold_ln: LayerNorm convention (module docstring).
        batch_size: windows per forward pass.

    Returns:
        `[n, d_model]` float32 on the CPU.
    """
    kind = "ln_normalized" if fold_ln else "mlp_in"
    return _gather(model, windows, layer, window_ids, positions, (kind,), batch_size)[kind]


def pre_activations(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    window_ids: IndexLike,
    positions: IndexLike,
    *,
    batch_size: int = 64,
) -> Float[Tensor, "n d_mlp"]:
    """All pre-activations of layer `layer`'s MLP at each (window, position), read from the model's hook."""
    return _gather(model, windows, layer, window_ids, positions, ("pre",), batch_size)["pre"]


def embed(h: Float[Tensor, "n d_model"], W_in: Float[Tensor, "d_model d_mlp"], neuron: int) -> Float[Tensor, "n d_model"]:
    """Neuron embeddings `h ⊙ W_in[:, neuron]` of vectors h already gathered (e.g. for a whole layer)."""
    return h * W_in[:, neuron]  # [n, d_model]


def neuron_embeddings(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    neuron: int,
    window_ids: IndexLike,
    positions: IndexLike,
    *,
    fold_ln: bool = True,
    batch_size: int = 64,
) -> Float[Tensor, "n d_model"]:
    """Neuron embeddings e = h ⊙ w of neuron `neuron` of layer `layer` at each (window, position).

    `e.sum(-1) + mlp_in_weights(model, layer, fold_ln=fold_ln)[1][neuron]` equals the pre-activation.

    Returns:
        `[n, d_model]` float32 on the CPU.
    """
    neuron = check_neuron(model, neuron)
    W, _ = mlp_in_weights(model, layer, fold_ln=fold_ln)
    h = pre_mlp_vectors(model, windows, layer, window_ids, positions, fold_ln=fold_ln, batch_size=batch_size)
    return embed(h, W, neuron)
