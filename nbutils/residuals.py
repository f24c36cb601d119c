"""The residual stream where each MLP reads it, kept on disk by the collection so that later passes replay one
layer's norm and MLP instead of running the model again.

The atlas needs three passes over the corpus: the top-k collection, the layers pass (h and activations around
every example) and the cross activations of similar features. Only the first has to run the model. While it runs,
`ResidualStore` keeps the input of every layer's MLP norm (`x`, `[n_windows, n_pos, d_model]` per layer, in the
model's dtype) in one file per layer; then

- `replay` runs a layer's norm and MLP input projection on stored rows (the plain model's own modules, same
  shapes as in the forward, so the same numbers bit for bit: tested per family), which is all the layers pass
  needs: about 0.4 of a forward at GPT-2-small shape, where the attention and the down projections are skipped;
  each layer step reads its examples' h again the same way (`atlas.layers`);
- `read_tokens` gives the rows of some (window, position) pairs, from which one neuron's activation is a dot
  product (the cross activations).

A store is made only when the plain model shows the MLP's input as its norm's output (`replay_modules`) and when it
fits `DISK_BUDGET` and half the free space of its folder; otherwise the passes run the model as before. It lives
in a scratch folder (`cache.scratch_folder`) for one build: a killed build's store is removed by the next one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["DISK_BUDGET", "ResidualStore", "replay_modules", "store_bytes"]

DISK_BUDGET = 16 << 30  # bytes a store may take on disk (GPT-2 small over 2,000 x 64 tokens: 4.7 GB)
_READ_WINDOWS = 256  # windows read at once when picking tokens (GPT-2 small: 50 MB)


def replay_modules(forward: Any, layers: Sequence[int]) -> dict[int, tuple[Any, Any]] | None:
    """`{layer: (norm, mlp)}`: the modules of the plain model (`mlp_forward.MlpForward`) whose `mlp(norm(x))` is what
    the forward runs at each of `layers`, or None (the bridge engine, or a norm the plain model does not name)."""
    if forward.plain is None:
        return None
    from nbutils.mlp_forward import _hf_names
    from nbutils.models import mlp_norm

    model = forward.model
    names = _hf_names(model.original_model)
    found: dict[int, tuple[Any, Any]] = {}
    for layer in layers:
        paths = [names.get(id(getattr(bridge, "original_component", bridge)))
                 for bridge in (mlp_norm(model, layer), model.blocks[layer].mlp)]
        if None in paths:
            return None
        found[layer] = (forward.plain.get_submodule(paths[0]), forward.plain.get_submodule(paths[1]))
    return found


def store_bytes(model: Any, windows: Tensor) -> int:
    """Bytes a store of `windows` `[n_windows, n_pos]` takes: every token, every layer, `d_model` values."""
    dtype = next(model.parameters()).dtype
    return int(windows.numel()) * model.cfg.n_layers * model.cfg.d_model * torch.empty((), dtype=dtype).element_size()


class ResidualStore:
    """Per layer, the MLP norm's input of every window `[n_windows, n_pos, d_model]`, filled batch by batch.

    Attributes:
        folder: where the layer files are; shape: `(n_windows, n_pos, d_model)`; dtype: the model's.
        usable: True once every layer's rows of every window are written and the MLP was seen to read its norm's
            output; the passes replay only from a usable store.
    """

    def __init__(self, folder: str | os.PathLike, n_layers: int, shape: tuple[int, int, int], dtype: torch.dtype):
        self.folder, self.shape, self.dtype = Path(folder), tuple(int(s) for s in shape), dtype
        self._row_bytes = self.shape[1] * self.shape[2] * torch.empty((), dtype=dtype).element_size()  # one window
        self._files = []
        for layer in range(n_layers):
            f = open(self.folder / f"layer{layer}.bin", "wb")
            f.truncate(self.shape[0] * self._row_bytes)
            self._files.append(f)
        self._written = np.zeros(n_layers, dtype=np.int64)  # windows written in order, per layer
        self._checked = False  # the MLP's input was seen to be its norm's output
        self._broken = False
        self._modules: dict[int, tuple[Any, Any]] | None = None  # (norm, mlp) per layer, found on the first batch

    @classmethod
    def create(cls, model: Any, windows: Tensor, folder: str | os.PathLike) -> "ResidualStore | None":
        """A store for `windows` in `folder`, or None when it would take more than `DISK_BUDGET` or half the free
        space there."""
        need, free = store_bytes(model, windows), shutil.disk_usage(folder).free
        if need > DISK_BUDGET or need > free // 2:
            import warnings

            warnings.warn(f"No residual store: it would take {need / 1e9:.1f} GB, against a budget of "
                          f"{DISK_BUDGET / 1e9:.1f} GB (`residuals.DISK_BUDGET`) and {free / 1e9:.1f} GB free in "
                          f"{folder}, of which it may take half. Every pass runs the model instead: slower, the "
                          "same tables.", stacklevel=2)
            return None
        dtype = next(model.parameters()).dtype
        return cls(folder, model.cfg.n_layers, (windows.shape[0], windows.shape[1], model.cfg.d_model), dtype)

    @property
    def usable(self) -> bool:
        return self._checked and not self._broken and bool((self._written == self.shape[0]).all())

    def hooks(self, forward: Any, lo: int) -> list[Any]:
        """Register, on the plain model, the hooks that write the norm inputs of every layer for the batch whose
        first window is `lo` (a row of the store). Returns the handles to remove; none when the modules are not
        found (the store then stays unusable)."""
        if self._modules is None:
            self._modules = replay_modules(forward, range(len(self._files))) or {}
            self._broken = self._broken or not self._modules
        handles = []
        for layer, (norm, mlp) in self._modules.items():
            seen: dict[str, Any] = {}
            handles.append(norm.register_forward_pre_hook(lambda m, args, l=layer: self._write(l, lo, args[0])))
            if not self._checked:
                handles.append(norm.register_forward_hook(lambda m, args, out, s=seen: s.__setitem__("out", out)))
                handles.append(mlp.register_forward_pre_hook(
                    lambda m, args, s=seen: self._check(args[0] is s.get("out"))))
        return handles

    def _check(self, same: bool) -> None:
        if not same:
            self._broken = True  # the MLP reads something else than its norm's output: replay would differ
        self._checked = self._checked or same

    def _write(self, layer: int, lo: int, x: Tensor) -> None:
        if self._written[layer] != lo:  # a resumed collection: windows before it were not seen here
            self._broken = True
            return
        rows = x.detach().reshape(-1, self.shape[1], self.shape[2]).to("cpu").contiguous()
        f = self._files[layer]
        f.seek(lo * self._row_bytes)
        f.write(rows.view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype
        self._written[layer] = lo + rows.shape[0]

    def finish(self) -> None:
        """Close the files after the collection (reads open them again)."""
        for f in self._files:
            f.close()

    def read_windows(self, layer: int, lo: int, hi: int) -> Tensor:
        """Stored rows of windows `lo..hi - 1` of `layer`: `[hi - lo, n_pos, d_model]` in the model's dtype."""
        raw = np.fromfile(self.folder / f"layer{layer}.bin", dtype=np.uint8, count=(hi - lo) * self._row_bytes,
                          offset=lo * self._row_bytes)
        return torch.from_numpy(raw).view(self.dtype).reshape(hi - lo, self.shape[1], self.shape[2])

    def read_tokens(self, layer: int, window: np.ndarray, pos: np.ndarray) -> Iterator[tuple[np.ndarray, Tensor]]:
        """The stored rows of the tokens (`window[i]`, `pos[i]`) of `layer`, read a few hundred windows at a time:
        yields `(index, rows)`, `rows[r]` `[d_model]` being token `index[r]`; every token once."""
        order = np.argsort(window, kind="stable")
        cuts = np.searchsorted(window[order], np.arange(0, self.shape[0] + _READ_WINDOWS, _READ_WINDOWS))
        for c, lo in enumerate(range(0, self.shape[0], _READ_WINDOWS)):
            index = order[cuts[c] : cuts[c + 1]]
            if len(index):
                block = self.read_windows(layer, lo, min(lo + _READ_WINDOWS, self.shape[0]))
                yield index, block[torch.as_tensor(window[index] - lo), torch.as_tensor(pos[index].astype(np.int64))]
