"""One forward-pass loop: read some MLP hooks of some layers over fixed batches of windows.

The atlas's layer pass, its cross activations and the explorer's neuron pass all read activations this way. Batches
are fixed slices `lo..hi` of the windows given (`batch_size` rows each), whatever layers are asked for, so a
layer's values do not depend on which other layers are read with it. The pass stops after the deepest layer's MLP
(`stop_at_layer`) and hands each layer's tensors to a callback as soon as that layer's hooks have all fired, then
drops them: one layer's activations of one batch are held at a time.

The batches run through the plain Hugging Face model that shares the bridge's parameters
(`mlp_forward.plain_taps`) when every hook asked for has a plain tap (the MLP's input, its normalised input and
its activation), so a pass reads the same numbers as the top-k collection, at its speed; other hooks run
through the bridge. The two agree to float rounding (tested per family). Given a usable residual store of the same
windows (`nbutils.residuals`, filled by the collection), the plain path runs only each layer's norm and MLP input
projection on the stored rows: the same numbers, without the attention and the down projections.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from nbutils import mlp_forward
from nbutils import residuals as residuals_module
from nbutils._env import pooled_memory
from nbutils.models import hook_name

__all__ = ["read_layers", "replays"]

OnLayer = Callable[[int, dict[str, Tensor], int, int], None]


@torch.inference_mode()
def read_layers(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layers: Sequence[int],
    kinds: Sequence[str],
    on_layer: OnLayer,
    *,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "reading layers",
    plain_hf: bool = True,
    residuals: Any = None,
) -> None:
    """Run `windows` through `model` in batches of `batch_size` rows, up to the MLP of the deepest of `layers`.

    Args:
        layers: MLP layers to read; kinds: hooks of each (`models.HOOK_KINDS`: `"mlp_in"`, `"ln_normalized"`,
            `"pre"`, `"pre_linear"`, `"post"`, or a residual-stream hook such as `"resid_pre"` that a sparse
            dictionary reads).
        on_layer: called as `on_layer(layer, read, lo, hi)` once per batch and layer, when that layer's hooks have
            fired; `read[kind]` is `[hi - lo, window, d]` on the model's device (valid during the call only).
        progress: a tqdm bar over the tokens, titled `desc`.
        plain_hf: run through the plain Hugging Face model when it can show every kind (else the bridge).
        residuals: a usable `residuals.ResidualStore` of these same windows: each layer's norm and MLP input
            projection run on its stored rows instead of the model (same batches, same numbers).
    No input checks: callers check `layers` and `windows`.
    """
    from tqdm.auto import tqdm

    layers, kinds = sorted(set(int(l) for l in layers)), list(dict.fromkeys(kinds))
    if not layers or len(windows) == 0:
        return
    n_windows, n_pos = windows.shape
    device = next(model.parameters()).device
    held: dict[int, dict[str, Tensor]] = {}
    bounds = (0, 0)

    def read(t: Tensor, layer: int, kind: str) -> None:
        lo, hi = bounds
        got = held.setdefault(layer, {})
        got[kind] = t.reshape(hi - lo, n_pos, -1)  # [batch, pos, d]; some families fire flattened
        if len(got) == len(kinds):
            on_layer(layer, held.pop(layer), lo, hi)

    forward = mlp_forward.mlp_forward(model, plain_hf)
    taps = mlp_forward.plain_taps(forward, layers, kinds)
    bar = tqdm(total=n_windows * n_pos, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    if taps is None:
        hooks = [(hook_name(layer, kind, model), lambda t, hook, l=layer, k=kind: read(t, l, k))
                 for layer in layers for kind in kinds]
        handles = []

        def run(batch: Tensor) -> None:
            model.run_with_hooks(batch, fwd_hooks=hooks, return_type=None, stop_at_layer=layers[-1] + 1)
    else:
        replay = _replay_plan(residuals, forward, layers, (n_windows, n_pos))

        def read_and_stop(t: Tensor, layer: int, kind: str) -> None:
            read(t, layer, kind)
            if layer not in held and (replay is not None or layer == layers[-1]):  # nothing more is needed
                raise mlp_forward.StopForward

        handles = [tap.register(lambda t, l=layer, k=kind: read_and_stop(t, l, k))
                   for (layer, kind), tap in taps.items()]

        def run(batch: Tensor) -> None:
            if replay is None:
                mlp_forward.run_plain(forward, batch)
            else:
                _replay(replay, residuals, *bounds, device)

    try:
        with pooled_memory():  # the same large activations every batch
            for lo in range(0, n_windows, batch_size):
                bounds = (lo, min(lo + batch_size, n_windows))
                run(windows[lo : bounds[1]].to(device))
                bar.update((bounds[1] - lo) * n_pos)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


def replays(model: Any, windows: Tensor, layers: Sequence[int], kinds: Sequence[str], residuals: Any,
            plain_hf: bool = True) -> bool:
    """Whether `read_layers` of these arguments replays the layers from `residuals` (no model run)."""
    forward = mlp_forward.mlp_forward(model, plain_hf)
    layers = sorted(set(int(l) for l in layers))
    return (mlp_forward.plain_taps(forward, layers, list(kinds)) is not None
            and _replay_plan(residuals, forward, layers, tuple(windows.shape)) is not None)


def _replay_plan(residuals: Any, forward: mlp_forward.MlpForward, layers: list[int], shape: tuple[int, int]
                 ) -> dict[int, tuple[Any, Any]] | None:
    """`{layer: (norm, mlp)}` to replay from `residuals` (`residuals.replay_modules`), or None when there is no
    usable store of windows of this `shape` or a layer cannot be replayed (the batches then run the model)."""
    if residuals is None or not residuals.usable or tuple(residuals.shape[:2]) != tuple(shape):
        return None
    return residuals_module.replay_modules(forward, layers)


def _replay(plan: dict[int, tuple[Any, Any]], residuals: Any, lo: int, hi: int, device: torch.device) -> None:
    """Each planned layer's norm and MLP on its stored input of windows `lo..hi - 1`; the taps read them and stop
    each layer after its last tap."""
    for layer, (norm, mlp) in plan.items():
        try:
            mlp(norm(residuals.read_windows(layer, lo, hi).to(device)))
        except mlp_forward.StopForward:
            pass
