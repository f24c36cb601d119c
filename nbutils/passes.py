"""One forward-pass loop: read some MLP hooks of some layers over fixed batches of windows.

The atlas's layer pass, its cross activations and the explorer's neuron pass all read activations this way. Batches
are fixed slices `lo..hi` of the windows given (`batch_size` rows each), whatever layers are asked for, so a
layer's values do not depend on which other layers are read with it. The pass stops after the deepest layer's MLP
(`stop_at_layer`) and hands each layer's tensors to a callback as soon as that layer's hooks have all fired, then
drops them: one layer's activations of one batch are held at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from nbutils.models import hook_name

__all__ = ["read_layers"]

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
) -> None:
    """Run `windows` through `model` in batches of `batch_size` rows, up to the MLP of the deepest of `layers`.

    Args:
        layers: MLP layers to read; kinds: hooks of each (`models.hook_name`: `"mlp_in"`, `"ln_normalized"`,
            `"pre"`, `"pre_linear"`, `"post"`).
        on_layer: called as `on_layer(layer, read, lo, hi)` once per batch and layer, when that layer's hooks have
            fired; `read[kind]` is `[hi - lo, window, d]` on the model's device (valid during the call only).
        progress: a tqdm bar over the tokens, titled `desc`.
    No input checks: callers check `layers` and `windows`.
    """
    from tqdm.auto import tqdm

    layers, kinds = sorted(set(int(l) for l in layers)), list(kinds)
    if not layers or len(windows) == 0:
        return
    n_windows, n_pos = windows.shape
    device = next(model.parameters()).device
    held: dict[int, dict[str, Tensor]] = {}
    bounds = (0, 0)

    def read(t: Tensor, hook: Any, layer: int, kind: str) -> None:
        lo, hi = bounds
        got = held.setdefault(layer, {})
        got[kind] = t.reshape(hi - lo, n_pos, -1)  # [batch, pos, d]; some families fire flattened
        if len(got) == len(kinds):
            on_layer(layer, held.pop(layer), lo, hi)

    hooks = [(hook_name(layer, kind, model), lambda t, hook, l=layer, k=kind: read(t, hook, l, k))
             for layer in layers for kind in kinds]
    bar = tqdm(total=n_windows * n_pos, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    for lo in range(0, n_windows, batch_size):
        hi = min(lo + batch_size, n_windows)
        bounds = (lo, hi)
        model.run_with_hooks(windows[lo:hi].to(device), fwd_hooks=hooks, return_type=None,
                             stop_at_layer=layers[-1] + 1)
        bar.update((hi - lo) * n_pos)
    bar.close()
