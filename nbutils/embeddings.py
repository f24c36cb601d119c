"""Pre-MLP vectors and neuron embeddings e = h ⊙ w, for plain and gated MLPs.

For neuron j of layer i, `e.sum() + bias[j]` is exactly a pre-activation of the neuron (the invariant every
test checks), with `(W, bias) = mlp_in_weights(model, i, fold_ln=..., kind=...)` and `h` from
`pre_mlp_vectors` in the same convention.

Which input weights (`kind`):

- Plain MLP (GPT-2, GPT-NeoX, GPT-J, OPT): neuron j outputs `act(pre_j)`, `pre = W_in h + b_in`. The only
  kind is `"in"`: `e = h ⊙ W_in[:, j]`, `e.sum() + b_in[j] = pre_j`.
- Gated MLP (SwiGLU / GeGLU: Llama, Mistral, Qwen, Gemma): neuron j outputs `act(g_j) · u_j` with gate
  `g = W_gate h + b_gate` and up projection `u = W_up h + b_up` (TransformerLens names them `W_gate` and
  `W_in`). Kinds:
  - `"gate"` (default): `e = h ⊙ W_gate[:, j]`; `e.sum() + b_gate[j] = g_j`, the input of the nonlinearity,
    the analogue of a plain neuron's pre-activation.
  - `"up"`: `e = h ⊙ W_up[:, j]`; `e.sum() + b_up[j] = u_j`.
  - `"both"`: the concatenation `[h ⊙ W_gate[:, j], h ⊙ W_up[:, j]]` (length 2·d_model): the sum of the first
    half plus `b_gate[j]` is `g_j`, the sum of the second half plus `b_up[j]` is `u_j`. `mlp_in_weights` then
    stacks the weights `[2·d_model, d_mlp]` and returns the bias `b_gate + b_up`, `pre_mlp_vectors` returns
    `[h, h]`, and `pre_activations` returns `g + u`, so `e.sum() + bias = g + u` holds as for every kind.
  Which kind separates features best has been measured only on random weights (no trained gated model is
  available offline): with virtual gated neurons (`evaluation.VirtualNeurons`) on random 4-layer Llama and
  Gemma 2 models, `python benchmarks/bench_gated_kinds.py` found the three kinds indistinguishable (mean ARI
  against the sources at the default clustering, 240 virtual neurons each: gate / up / both 0.077 / 0.079 /
  0.076 on Llama, 0.036 / 0.041 / 0.041 on Gemma 2; paired differences from gate at most 0.005, standard
  error 0.004) and none better than plain h. On a trained model it is untested; `"gate"` is the default
  because the gate decides whether the neuron is on at all.
  A missing bias (Llama and Gemma have none) is a zero bias.

The neuron's *activation* (what top-k collection ranks and `neuron_outputs` computes) is the value the down
projection reads: `act(pre)` for a plain MLP, `act(g) · u` for a gated one (signed: a large negative
output is not collected as a top example).

Two norm conventions, each with its own weights and bias (`mlp_in_weights`):

- `fold_ln=True` (default, as TransformerLens' folded models and the paper): h is the normalised vector (the
  output of the norm feeding the MLP before its scale γ and bias β: centred and unit variance for LayerNorm,
  unit root mean square for RMSNorm), the weights are `γ[:, None] * W` and the bias is `b + β @ W`. For
  LayerNorm each column's mean over d_model is removed too (h sums to zero, so that mean never reaches the
  output; TransformerLens' `fold_ln` + `center_weights` does the same). RMSNorm does not centre: only γ is
  folded (Gemma's RMSNorm scales by `1 + γ`, and that is what is folded). This leaves out the offset `β ⊙ w`
  that all examples of a neuron share, which would otherwise inflate every similarity.
- `fold_ln=False`: h is the MLP's own input (the norm's output), weights and bias as stored.

The norm is the one whose output the MLP reads: `ln2`, or the shared `ln1` of a GPT-J block (GPT-NeoX's
parallel blocks have their own `ln2`: h is never the attention output). Post-norm models (OPT-350m) have no
norm before the MLP: only `fold_ln=False` applies. Everything is computed from the bridge's raw weights, not
through compatibility-mode hook aliases. Windows are fed as token tensors, so no BOS token is prepended and
positions index the windows as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils._validation import check_index_array, check_int_range, check_positive_int, check_same_length, fail
from nbutils.models import check_layer, check_neuron, check_windows, hook_name, is_gated, mlp_norm

__all__ = [
    "KINDS",
    "embedding_kind",
    "mlp_in_weights",
    "pre_mlp_vectors",
    "pre_activations",
    "neuron_embeddings",
    "embed",
    "mlp_hooks",
    "activation_fn",
    "mlp_activation",
    "neuron_outputs",
]

IndexLike = Sequence[int] | np.ndarray | Tensor

KINDS = ("in", "gate", "up", "both")  # "in" for plain MLPs; the others for gated MLPs (module docstring)


def embedding_kind(model: Any, kind: str | None = None) -> str:
    """Check `kind` against the model's MLP and return it; `None` is the default (`"gate"` for a gated MLP,
    `"in"` for a plain one)."""
    gated = is_gated(model)
    if kind is None:
        return "gate" if gated else "in"
    allowed = ("gate", "up", "both") if gated else ("in",)
    if kind not in allowed:
        what = "a gated MLP (gate and up projections)" if gated else "a plain MLP (one input projection)"
        fail("kind", f"be one of {', '.join(repr(k) for k in allowed)} for this model, {what}", repr(kind),
             "Leave it as None for the default.")
    return kind


def _projection(model: Any, layer: int, name: str) -> tuple[Float[Tensor, "d_model d_mlp"], Float[Tensor, "d_mlp"]]:
    """Raw weights and bias of one input projection (`"in"`: TransformerLens' `W_in`, the up projection of a
    gated MLP; `"gate"`: `W_gate`). A missing bias is zeros."""
    mlp = model.blocks[layer].mlp
    W = (model.W_in[layer] if name == "in" else mlp.W_gate).detach().float()  # [d_model, d_mlp]
    b = getattr(mlp, f"b_{name}", None)
    b = torch.zeros(W.shape[1]) if b is None else b.detach().float()  # [d_mlp]
    return W, b.to(W.device)


def _check_fold(model: Any, fold_ln: bool) -> None:
    if fold_ln and getattr(getattr(model, "adapter", None), "supports_fold_ln", True) is False:
        fail("fold_ln", "be False for this model", "True",
             "Its norms come after the MLP (post-norm), so the MLP's input is not a normalised vector.")


def _fold(model: Any, layer: int, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Fold the scale (and bias) of the norm feeding the MLP into `W [d_model, d_mlp]`, `b [d_mlp]`."""
    ln = mlp_norm(model, layer)
    gamma = ln.w.detach().float()  # [d_model]
    if getattr(ln, "uses_weight_offset", False):
        gamma = 1.0 + gamma  # Gemma's RMSNorm multiplies by (1 + γ)
    beta = getattr(ln, "b", None)
    b = b + beta.detach().float() @ W if beta is not None else b
    W = gamma[:, None] * W
    if not getattr(ln, "uses_rms_norm", model.cfg.normalization_type not in ("LN", "LNPre")):
        W = W - W.mean(0, keepdim=True)  # LayerNorm: h is centred, so the column mean never reaches the output
    return W, b


def mlp_in_weights(
    model: Any, layer: int, *, fold_ln: bool = True, kind: str | None = None
) -> tuple[Float[Tensor, "d_in d_mlp"], Float[Tensor, "d_mlp"]]:
    """The input weights and bias of layer `layer`'s MLP in the chosen norm convention and `kind`.

    Returns:
        `W [d_model, d_mlp]` (`[2 * d_model, d_mlp]`, gate rows then up rows, for `kind="both"`) and the
        bias `[d_mlp]` (`b_gate + b_up` for `"both"`), float32.
    """
    layer = check_layer(model, layer)
    kind = embedding_kind(model, kind)
    _check_fold(model, fold_ln)
    parts = []
    with torch.no_grad():
        for name in {"in": ("in",), "gate": ("gate",), "up": ("in",), "both": ("gate", "in")}[kind]:
            W, b = _projection(model, layer, name)
            parts.append(_fold(model, layer, W, b) if fold_ln else (W, b))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([W for W, _ in parts]), sum(b for _, b in parts)  # [2 * d_model, d_mlp], [d_mlp]


def _as_index(name: str, values: IndexLike, high: int) -> Tensor:
    return torch.from_numpy(check_index_array(name, values, high))  # integers only: floats are never truncated


@torch.inference_mode()
def mlp_hooks(
    model: Any, tokens: Int[Tensor, "batch pos"], layer: int, kinds: Sequence[str]
) -> dict[str, Float[Tensor, "batch pos d"]]:
    """One forward pass of `tokens` up to layer `layer`, reading the MLP hooks `kinds` (`models.hook_name`:
    `"mlp_in"`, `"ln_normalized"`, `"pre"`, `"pre_linear"`, `"post"`) under the names of this model's family,
    each as `[batch, pos, d]` (OPT fires some inside its MLP flattened to `[batch * pos, d]`). No input checks:
    callers check `layer` and `tokens`."""
    names = {hook_name(layer, k, model): k for k in kinds}
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(tokens.to(device), names_filter=list(names), stop_at_layer=layer + 1)
    return {kind: cache[name].reshape(tokens.shape[0], tokens.shape[1], -1) for name, kind in names.items()}


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
    `kinds` (`models.hook_name`) at (window_ids[i], positions[i]). Returns {kind: [n, ...]}."""
    layer = check_layer(model, layer)
    windows = check_windows(model, windows)
    check_same_length(window_ids=window_ids, positions=positions)
    batch_size = check_positive_int("batch_size", batch_size)
    wid = _as_index("window_ids", window_ids, windows.shape[0])
    pos = _as_index("positions", positions, windows.shape[1])
    unique, inverse = torch.unique(wid, return_inverse=True)  # each window runs once
    out = {k: [] for k in kinds}
    for start in range(0, len(unique), batch_size):
        read = mlp_hooks(model, windows[unique[start : start + batch_size]], layer, kinds)
        for kind in kinds:
            out[kind].append(read[kind].float().cpu())  # [chunk, window, d]
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
    kind: str | None = None,
) -> Float[Tensor, "n d_in"]:
    """The vector h that multiplies `mlp_in_weights(model, layer, fold_ln=fold_ln, kind=kind)` at each
    (window, position).

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: token windows `[n_windows, window]`.
        layer: MLP layer.
        window_ids, positions: `[n]` each; example i is token `positions[i]` of window `window_ids[i]`.
        fold_ln: norm convention (module docstring).
        batch_size: windows per forward pass.
        kind: `None` (default), or for a gated MLP `"gate"`, `"up"` or `"both"`; only `"both"` changes h
            (it is then `[h, h]`).

    Returns:
        `[n, d_model]` (`[n, 2 * d_model]` for `"both"`) float32 on the CPU.
    """
    kind = embedding_kind(model, kind)
    _check_fold(model, fold_ln)
    hook = "ln_normalized" if fold_ln else "mlp_in"
    h = _gather(model, windows, layer, window_ids, positions, (hook,), batch_size)[hook]  # [n, d_model]
    return torch.cat([h, h], dim=-1) if kind == "both" else h


def pre_activations(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    window_ids: IndexLike,
    positions: IndexLike,
    *,
    batch_size: int = 64,
    kind: str | None = None,
) -> Float[Tensor, "n d_mlp"]:
    """All pre-activations of layer `layer`'s MLP at each (window, position), read from the model's hooks:
    `W_in h + b_in` (plain MLP), the gate `g` (`kind` `None` or `"gate"`), the up projection `u` (`"up"`), or
    `g + u` (`"both"`): in every case `neuron_embeddings(..., kind=kind).sum(-1) + bias` (`mlp_in_weights`)."""
    kind = embedding_kind(model, kind)
    hooks = {"in": ("pre",), "gate": ("pre",), "up": ("pre_linear",), "both": ("pre", "pre_linear")}[kind]
    read = _gather(model, windows, layer, window_ids, positions, hooks, batch_size)
    return sum(read[h] for h in hooks)


def embed(h: Float[Tensor, "n d_in"], W_in: Float[Tensor, "d_in d_mlp"], neuron: int) -> Float[Tensor, "n d_in"]:
    """Neuron embeddings `h ⊙ W_in[:, neuron]` of vectors h already gathered (e.g. for a whole layer)."""
    neuron = check_int_range("neuron", neuron, 0, W_in.shape[1] - 1, what="(a column of `W_in`)")
    return h * W_in[:, neuron]  # [n, d_in]


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
    kind: str | None = None,
) -> Float[Tensor, "n d_in"]:
    """Neuron embeddings e = h ⊙ w of neuron `neuron` of layer `layer` at each (window, position).

    `e.sum(-1) + mlp_in_weights(model, layer, fold_ln=fold_ln, kind=kind)[1][neuron]` equals the
    pre-activation (`pre_activations(..., kind=kind)`); `kind` as in the module docstring.

    Returns:
        `[n, d_model]` (`[n, 2 * d_model]` for `"both"`) float32 on the CPU.
    """
    neuron = check_neuron(model, neuron)
    W, _ = mlp_in_weights(model, layer, fold_ln=fold_ln, kind=kind)
    h = pre_mlp_vectors(model, windows, layer, window_ids, positions, fold_ln=fold_ln, batch_size=batch_size,
                        kind=kind)
    return embed(h, W.cpu(), neuron)


# --------------------------------------------------------------------------------------------------
# The neuron's activation: what the down projection reads


def _gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
}


def activation_fn(model: Any) -> Callable[[Tensor], Tensor]:
    """The MLP's elementwise nonlinearity (`model.cfg.act_fn`): applied to the pre-activation of a plain
    MLP, to the gate of a gated one. Names outside the common ones come from `transformers.activations`."""
    name = model.cfg.act_fn
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        fail("model", "use an MLP activation that transformers knows", repr(name))
    return ACT2FN[name]


def neuron_outputs(
    model: Any, layer: int, h: Float[Tensor, "n d_model"] | Float[np.ndarray, "n d_model"], *, fold_ln: bool = True
) -> Float[Tensor, "n d_mlp"] | Float[np.ndarray, "n d_mlp"]:
    """Every neuron's activation, what the down projection reads, from pre-MLP vectors h of layer `layer`:
    `act(h @ W_in + b_in)` for a plain MLP, `act(h @ W_gate + b_gate) * (h @ W_up + b_up)` for a gated one.

    Args:
        model: a TransformerBridge.
        layer: MLP layer.
        h: `[n, d_model]` in the `fold_ln` convention (`pre_mlp_vectors`), a tensor or a numpy array.
        fold_ln: the norm convention of h.

    Returns:
        `[n, d_mlp]`: a numpy float64 array for a numpy h, else a tensor of h's dtype and device.
    """
    act = activation_fn(model)
    as_numpy = not isinstance(h, Tensor)

    def pre(kind: str):
        W, b = mlp_in_weights(model, layer, fold_ln=fold_ln, kind=kind)
        if as_numpy:
            return h @ W.numpy().astype(np.float64) + b.numpy().astype(np.float64)  # [n, d_mlp]
        return h @ W.to(h) + b.to(h)  # [n, d_mlp]

    if as_numpy:
        h = np.asarray(h, dtype=np.float64)
    gated = is_gated(model)
    x = pre("gate" if gated else "in")
    out = act(torch.as_tensor(x)) if as_numpy else act(x)
    if gated:
        out = out * torch.as_tensor(pre("up"))
    return out.numpy() if as_numpy else out


def mlp_activation(model: Any, pre: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """Neuron activations from pre-activations, as the down projection reads them: `act(pre)` for a plain MLP;
    for a gated MLP `pre` is the gate g and `up` the up projection u (`pre_activations(...,
    kind="up")`), giving `act(g) * u`. From pre-MLP vectors, `neuron_outputs` does both in one step."""
    if is_gated(model) and up is None:
        fail("up", "be given for a gated MLP (the neuron's activation is act(gate) * up)", "None",
             "Read it with `pre_activations(..., kind='up')`, or use `neuron_outputs`.")
    out = activation_fn(model)(torch.as_tensor(np.asarray(pre, dtype=np.float64))).numpy()
    return out * np.asarray(up, dtype=np.float64) if is_gated(model) else out
