"""Streaming top-k collection of highly activating examples for every MLP neuron of every layer.

An *example* of a neuron is a corpus window together with the position where the neuron is highest in that
window, so a window gives each neuron at most one example. Per neuron the collection keeps the `k` windows
with the highest activation, then only those with `act >= frac * max`, where `max` is the neuron's highest
activation over the whole corpus. A neuron whose max is <= 0 is *dead*: it has no examples.

The collection streams. Each batch of windows runs through the model up to the last MLP, reading only the
MLP activations (`hook_post`); each layer's activations `[batch, pos, d_mlp]` are reduced on the model's
device to one candidate per (neuron, window), the max over positions (`amax`) and where it is first reached
(one comparison), and the candidates are merged with the running top-k by one `torch.topk` over the
concatenated slots, about k candidates at a time. Candidates are ranked by an int64 key
(activation, then lower window id), so there are no ties and the result does not depend on batch or shard
order; the running state is that key and the position, `[n_layers * d_mlp, k]`, kept unsorted and sorted
once at the end. Memory does not grow with the corpus, and two shards of a corpus merge with the same
operation (`merge`). The result holds three plain tensors `[n_layers, d_mlp, k]` (act, window, pos).

The activation of a neuron is the value its MLP's down projection reads: `act(pre)` for a plain MLP, `act(g) * u`
for a gated one (SwiGLU / GeGLU: Llama, Gemma, Qwen, Mistral; `nbutils.embeddings`), which is the bridge's
`hook_post` in both cases. The batches run through a plain Hugging Face model that shares the bridge's
parameters, with PyTorch hooks on its activation modules (`nbutils.mlp_forward`), else the bridge's hooks. The
keys and the merge are in `nbutils.topk`.

Results are cached (see `nbutils.cache`): a folder per (model, corpus, settings) under the cache folder,
with a checkpoint every `checkpoint_every` batches so an interrupted run resumes where it stopped.

Columns of the tables, documented once:

- `examples`: `layer, neuron, window, pos, act` — window id (row of `windows`, plus `window_offset`),
  position of the token where the neuron is highest in that window, the activation there.
- `neurons`: `layer, neuron, max_act, n_examples, dead` — one row per neuron of every layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils import cache as _cache
from nbutils import mlp_forward, topk
from nbutils._env import pooled_memory
from nbutils._validation import check_float_range, check_index_array, check_int_range, fail
from nbutils.models import check_layer, check_neuron, check_windows, hook_name
from nbutils.residuals import ResidualStore

__all__ = ["CollectSettings", "TopActivations", "collect_top_activations", "collect_top_units", "merge",
           "neuron_activations"]

_FORMAT = 1  # bump when the stored state changes meaning


@dataclass(frozen=True)
class CollectSettings:
    """Settings of one collection run (saved in the cache folder's `meta.json`, part of its key).

    Attributes:
        k: at most this many examples per neuron (the top-k windows).
        frac: keep only examples with `act >= frac * max` of their neuron; in (0, 1].
        batch_size: windows per forward pass. It can change activations in their last bits (batched
            matrix products), so it is part of the cache key.
        hook: which MLP quantity is ranked (`models.hook_name` kind); the neuron activation `"post"`.
    """

    k: int = 128
    frac: float = 0.75
    batch_size: int = 64
    hook: str = "post"

    def __post_init__(self) -> None:
        check_int_range("k", self.k, 1, 2**31 - 1)
        check_float_range("frac", self.frac, 0.0, 1.0, low_open=True)
        check_int_range("batch_size", self.batch_size, 1, 2**31 - 1)
        if self.hook != "post":
            fail("hook", "be 'post' (the MLP activation)", repr(self.hook))


@dataclass(eq=False)
class TopActivations:
    """The top-k examples of every MLP neuron of every layer, as plain tensors, and the tables built from them.

    Attributes:
        act: `[n_layers, d_mlp, k]` float32, each neuron's top-k activations, highest first (`-inf` in
            empty slots).
        window: `[n_layers, d_mlp, k]` int64 window ids (-1 in empty slots).
        pos: `[n_layers, d_mlp, k]` int64 positions of the activation in its window.
        settings: the `CollectSettings` used.
        n_windows: how many windows were read.
        window_ranges: the window ids read, as half-open `(start, stop)` ranges.
        model_id, corpus_id: fingerprints of the model's weights and of the windows (`nbutils.cache`).
        layers: the model layer of each row (default: row i is layer i); a dictionary's latents
            (`nbutils.dictionary.collect_latent_top`) are one row at the layer of the hook they read.

    `frac` is applied when the tables are built: the tensors keep all top-k windows, so shards merge exactly.
    """

    act: Float[Tensor, "n_layers d_mlp k"]
    window: Int[Tensor, "n_layers d_mlp k"]
    pos: Int[Tensor, "n_layers d_mlp k"]
    settings: CollectSettings
    n_windows: int
    window_ranges: tuple[tuple[int, int], ...]
    model_id: str = ""
    corpus_id: str = ""
    layers: tuple[int, ...] | None = None
    _tables: dict = field(default_factory=dict, repr=False)

    def row(self, layer: int) -> int:
        """The row of the tensors that holds model layer `layer`."""
        if self.layers is None:
            return check_int_range("layer", layer, 0, self.n_layers - 1, what="for this model")
        if layer not in self.layers:
            fail("layer", f"be one of the collected layers {list(self.layers)}", layer)
        return self.layers.index(layer)

    def _layer_ids(self) -> np.ndarray:
        return np.arange(self.n_layers) if self.layers is None else np.asarray(self.layers, dtype=np.int64)

    @property
    def k(self) -> int:
        return self.settings.k

    @property
    def frac(self) -> float:
        return self.settings.frac

    @property
    def n_layers(self) -> int:
        return int(self.act.shape[0])

    @property
    def d_mlp(self) -> int:
        return int(self.act.shape[1])

    @property
    def max_act(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Each neuron's highest activation over the corpus."""
        return self.act[..., 0]

    def _keep(self) -> Tensor:
        """`[n_layers, d_mlp, k]` bool: the slots that are examples (filled, neuron alive, act >= frac * max)."""
        top = self.max_act[..., None]  # [n_layers, d_mlp, 1]
        return (self.window != topk.NO_WINDOW) & (top > 0) & (self.act >= self.frac * top)

    @property
    def examples(self) -> pd.DataFrame:
        """`layer, neuron, window, pos, act`, sorted by layer, neuron, act desc (ties: lower window first)."""
        if "examples" not in self._tables:
            keep = self._keep()
            layer, neuron, _ = torch.nonzero(keep, as_tuple=True)  # row-major: already in the sorted order
            self._tables["examples"] = pd.DataFrame(
                {
                    "layer": self._layer_ids()[layer.numpy()].astype(np.int64),
                    "neuron": neuron.numpy().astype(np.int64),
                    "window": self.window[keep].numpy(),
                    "pos": self.pos[keep].numpy(),
                    "act": self.act[keep].numpy(),
                }
            )
        return self._tables["examples"]

    @property
    def neurons(self) -> pd.DataFrame:
        """`layer, neuron, max_act, n_examples, dead`: one row per neuron of every layer."""
        if "neurons" not in self._tables:
            n_layers, d_mlp = self.n_layers, self.d_mlp
            top = self.max_act
            self._tables["neurons"] = pd.DataFrame(
                {
                    "layer": np.repeat(self._layer_ids(), d_mlp),
                    "neuron": np.tile(np.arange(d_mlp), n_layers),
                    "max_act": top.reshape(-1).numpy(),
                    "n_examples": self._keep().sum(-1).reshape(-1).numpy().astype(np.int64),
                    "dead": (top <= 0).reshape(-1).numpy(),
                }
            )
        return self._tables["neurons"]

    @property
    def dead(self) -> pd.DataFrame:
        """The rows of `neurons` whose max activation over the corpus is <= 0."""
        table = self.neurons
        return table[table["dead"]].reset_index(drop=True)

    def neuron_examples(self, layer: int, neuron: int) -> pd.DataFrame:
        """The rows of `examples` of one neuron, highest activation first (empty for a dead neuron)."""
        row = self.row(layer)
        neuron = check_int_range("neuron", neuron, 0, self.d_mlp - 1, what="for this model (d_mlp)")
        table = self.examples
        rows = np.searchsorted(self._layer_ids(), table["layer"].to_numpy())  # the row of each example
        start, stop = np.searchsorted(rows * self.d_mlp + table["neuron"].to_numpy(),
                                      [row * self.d_mlp + neuron, row * self.d_mlp + neuron + 1])
        return table.iloc[start:stop].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# One batch through the model


def _batch_candidates(forward: mlp_forward.MlpForward, batch: Tensor, first_window: int) -> tuple[Tensor, Tensor]:
    """Run one batch up to the last MLP and reduce each layer's activations to one candidate per
    (neuron, window) on the device: the max over positions and where it first reaches it.

    Returns (key, pos) `[n_layers * d_mlp, batch]` (`topk.order_key`; int32 positions).
    Raises `ValueError` on NaN or inf.
    """
    n_layers, n_batch, n_pos = forward.n_layers, batch.shape[0], batch.shape[1]
    tops: list[Tensor] = [None] * n_layers  # type: ignore[list-item]
    where: list[Tensor] = [None] * n_layers  # type: ignore[list-item]

    def reduce(layer: int):
        def hook(act: Tensor) -> None:  # act: [batch, pos, d_mlp] (OPT's plain model: [batch * pos, d_mlp])
            act = act.reshape(n_batch, n_pos, -1)  # [batch, pos, d_mlp]
            tops[layer] = act.amax(dim=1)  # [batch, d_mlp]; amax is far cheaper than max with indices
            where[layer] = _first_max_position(act, tops[layer])
            if layer == n_layers - 1:
                raise mlp_forward.StopForward  # nothing after the last MLP is needed

        return hook

    if forward.plain is None:
        hooks = [(hook_name(l, "post"), lambda act, hook, f=reduce(l): f(act)) for l in range(n_layers)]
        try:
            forward.model.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
        except mlp_forward.StopForward:
            pass
    else:
        handles = [mlp_forward.Tap(m, forward.reads_input).register(reduce(l))
                   for l, m in enumerate(forward.act_modules)]
        try:
            mlp_forward.run_plain(forward, batch)
        finally:
            for handle in handles:
                handle.remove()
    top = torch.cat(tops, dim=1).float().T  # [n_layers * d_mlp, batch]
    _check_finite(top, first_window)
    ids = torch.arange(first_window, first_window + n_batch, device=batch.device)  # [batch]
    return topk.order_key(top, ids.expand_as(top)), torch.cat(where, dim=1).T


def _first_max_position(act: Tensor, top: Tensor) -> Tensor:
    """Where each column of `act` `[batch, pos, d]` first reaches its max `top` `[batch, d]` (`act.amax(dim=1)`):
    `[batch, d]` int32, the indices `act.max(dim=1)` gives, found by one comparison and one small-integer `amax`
    (several times faster than `max` with indices). Meaningless where `top` is NaN."""
    n_pos = act.shape[1]
    small = torch.uint8 if n_pos < 256 else torch.int32
    rank = torch.arange(n_pos, 0, -1, dtype=small, device=act.device)[None, :, None]  # n_pos - position
    reached = act.ge(top[:, None, :])  # [batch, pos, d] bool
    reached = reached.view(torch.uint8) if small == torch.uint8 else reached.to(small)
    return n_pos - reached.mul_(rank).amax(dim=1).to(torch.int32)


def _check_finite(act: Tensor, first_window: int) -> None:
    if not torch.isfinite(act).all():
        bad = int(torch.nonzero(~torch.isfinite(act))[0, -1]) + first_window  # act: [n_neurons, batch]
        fail("activations", "be finite", f"NaN or inf in window {bad}", "Check the model's weights and dtype.")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def collect_top_activations(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    k: int = 128,
    frac: float = 0.75,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    *,
    use_cache: bool = True,
    window_offset: int = 0,
    checkpoint_every: int = 50,
    progress: bool = True,
    plain_hf: bool = True,
    residuals: ResidualStore | None = None,
) -> TopActivations:
    """Collect the top examples of every MLP neuron of every layer in one streaming pass over `windows`.

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: token windows `[n_windows, window]` (`data.corpus_windows`).
        k: at most this many examples per neuron.
        frac: keep examples with `act >= frac * max` of their neuron; in (0, 1].
        batch_size: windows per forward pass.
        cache_dir: cache folder; `None` for the default (`$NBUTILS_CACHE` or `cache/`).
        use_cache: read and write the cache (folder per model, corpus and settings; resumes an
            interrupted run). `False` computes in memory only.
        window_offset: id of the first window, to collect one shard of a larger corpus (`merge`).
        checkpoint_every: write a checkpoint every this many batches.
        progress: show a tqdm bar with tokens/s.
        plain_hf: run batches through a plain Hugging Face model sharing the bridge's parameters, with
            PyTorch hooks on its MLP activations (faster), instead of the bridge's hooks. Models whose plain
            model cannot be rebuilt use the bridge. The two agree to float rounding; the cache keeps them apart.
        residuals: a `residuals.ResidualStore` of these windows to fill as the pass runs (the atlas's later passes
            replay from it); it is usable only after a whole pass in this call (not one read from the cache, nor a
            resumed one).

    Returns:
        `TopActivations`; `.examples` is the table `layer, neuron, window, pos, act`.

    Raises:
        ValueError: bad `k`, `frac`, `batch_size` or windows (empty, not 2-D, ids outside the vocabulary).
        nbutils.cache.CacheError: a cache file that cannot be read (the message names it and how to clear it).

    Interrupted (Ctrl-C, a killed process), with `use_cache=True` the last checkpoint survives (written every
    `checkpoint_every` batches); calling again with the same model, windows and settings resumes from it and
    returns the same result as one uninterrupted pass. With `use_cache=False` nothing survives.
    """
    settings = CollectSettings(k=k, frac=frac, batch_size=batch_size)
    windows = check_windows(model, windows)
    window_offset = check_int_range("window_offset", window_offset, 0, 2**31 - 1)
    checkpoint_every = check_int_range("checkpoint_every", checkpoint_every, 1, 2**31 - 1)
    n_windows = windows.shape[0]
    ids = {"model_id": _cache.model_fingerprint(model), "corpus_id": _cache.tensor_fingerprint(windows)}
    forward = mlp_forward.mlp_forward(model, plain_hf)
    ranges = ((window_offset, window_offset + n_windows),)
    run = None
    if use_cache:
        key = {"kind": "top_activations", "format": _FORMAT, **ids, "window_offset": window_offset,
               "n_windows": n_windows, "device": _device(model).type, "engine": forward.engine, **asdict(settings)}
        run = _cache.Run("top_activations", key, cache_dir)
        finished = run.load_finished()
        if finished is not None:
            state = _read_state(run, run.result_path, finished[0], model, settings.k)
            return TopActivations(*state, settings=settings, n_windows=n_windows, window_ranges=ranges, **ids)
    n_layers, n_neurons = model.cfg.n_layers, model.cfg.n_layers * model.cfg.d_mlp
    state, done = topk.empty_state(n_neurons, settings.k, _device(model)), 0
    if run is not None:
        partial = run.load_checkpoint()
        if partial is not None:
            table, done = partial
            act, window, pos = _read_state(run, run.checkpoint_path, table, model, settings.k)
            state = (topk.order_key(act, window).reshape(n_neurons, -1).to(_device(model)),
                     pos.reshape(n_neurons, -1).to(torch.int32).to(_device(model)))
    state = _stream(forward, windows, state, done, settings, window_offset, checkpoint_every, run, progress,
                    residuals)
    if residuals is not None:
        residuals.finish()
    result = topk.sorted_state(*state, n_layers)
    if run is not None:
        run.save_finished(_state_table(*result), {"n_layers": n_layers, "d_mlp": model.cfg.d_mlp})
    return TopActivations(*result, settings=settings, n_windows=n_windows, window_ranges=ranges, **ids)


def collect_top_units(
    unit_acts: Callable[[int, int], Tensor],
    windows: Int[Tensor, "n_windows window"],
    n_units: int,
    *,
    k: int = 128,
    frac: float = 0.75,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "collecting top activations",
    layer: int = 0,
) -> TopActivations:
    """The same streaming top-k as `collect_top_activations` over any units that a function computes from a
    batch of windows (e.g. the latents of a sparse dictionary, `nbutils.dictionary`), in memory (no cache).

    Args:
        unit_acts: maps a range `start, stop` of windows to the units' activations there `[stop - start, window,
            n_units]`.
        windows: token windows `[n_windows, window]` (checked by the caller against its model).
        n_units: number of units.
        k, frac, batch_size, progress: as in `collect_top_activations`.
        layer: the model layer the units belong to (the `layer` column of the tables).

    Returns:
        `TopActivations` with one row (`act [1, n_units, k]`, `layers=(layer,)`); its tables name the units `neuron`.
    """
    settings = CollectSettings(k=k, frac=frac, batch_size=batch_size)
    n_units = check_int_range("n_units", n_units, 1, 2**31 - 1)
    from tqdm.auto import tqdm

    n_windows, n_pos = windows.shape
    key, pos = topk.empty_state(n_units, settings.k, "cpu")
    bar = tqdm(total=n_windows * n_pos, unit="tok", unit_scale=True, desc=desc, disable=not progress)
    with torch.inference_mode():
        for start in range(0, n_windows, settings.batch_size):
            batch = windows[start : start + settings.batch_size]  # [batch, window]
            acts = unit_acts(start, start + batch.shape[0]).float().cpu()  # [batch, window, n_units]
            if acts.shape != (batch.shape[0], n_pos, n_units):
                fail("unit_acts", f"return [batch, window, n_units] = {[batch.shape[0], n_pos, n_units]}",
                     list(acts.shape))
            top = acts.amax(dim=1)  # [batch, n_units]
            where = _first_max_position(acts, top)
            _check_finite(top.T, start)
            ids = torch.arange(start, start + batch.shape[0])[:, None].expand_as(top)  # [batch, n_units]
            candidates = (topk.order_key(top.T, ids.T), where.T)  # [n_units, batch] each (int32 positions)
            key, pos = topk.merge_topk((key, pos), candidates, settings.k)
            bar.update(batch.numel())
    bar.close()
    act, window, position = topk.sorted_state(key, pos, 1)
    return TopActivations(act, window, position, settings=settings, n_windows=n_windows,
                          window_ranges=((0, n_windows),), corpus_id=_cache.tensor_fingerprint(windows),
                          layers=(int(layer),))


def _stream(
    forward: mlp_forward.MlpForward,
    windows: Int[Tensor, "n_windows window"],
    state: tuple[Tensor, Tensor],
    done: int,
    settings: CollectSettings,
    window_offset: int,
    checkpoint_every: int,
    run: _cache.Run | None,
    progress: bool,
    residuals: ResidualStore | None = None,
) -> tuple[Tensor, Tensor]:
    """The loop: windows `done:` in batches, merged into `state`; a checkpoint every `checkpoint_every` batches."""
    from tqdm.auto import tqdm

    n_windows, n_pos = windows.shape
    device = _device(forward.model)
    bar = tqdm(total=n_windows * n_pos, initial=done * n_pos, unit="tok", unit_scale=True,
               desc="collecting top activations", disable=not progress)
    pending: list[tuple[Tensor, Tensor]] = []  # candidates not merged yet: k of them are merged at once
    try:
        with torch.inference_mode(), pooled_memory():  # the same large activations every batch
            for i, start in enumerate(range(done, n_windows, settings.batch_size)):
                batch = windows[start : start + settings.batch_size].to(device)  # [batch, window]
                handles = residuals.hooks(forward, start) if residuals is not None else []  # keep the norm inputs
                try:
                    pending.append(_batch_candidates(forward, batch, window_offset + start))
                finally:
                    for handle in handles:
                        handle.remove()
                stop = start + batch.shape[0]
                checkpoint = run is not None and (i + 1) % checkpoint_every == 0 and stop < n_windows
                if checkpoint or stop == n_windows or sum(key.shape[1] for key, _ in pending) >= settings.k:
                    # one topk over k + k slots costs less than several over k + batch
                    state = topk.merge_topk(state, tuple(torch.cat(c, dim=1) for c in zip(*pending)), settings.k)
                    pending = []
                bar.update(batch.numel())
                if checkpoint:
                    run.save_checkpoint(_state_table(*topk.sorted_state(*state, forward.n_layers)), stop)
    finally:
        bar.close()
    return state


# --------------------------------------------------------------------------------------------------
# State <-> table (the cache stores the state as one long parquet table)


def _state_table(act: Tensor, window: Tensor, pos: Tensor) -> pd.DataFrame:
    """The state `[n_layers, d_mlp, k]` as a table `layer, neuron, rank, window, pos, act` of its filled slots."""
    filled = window != topk.NO_WINDOW
    layer, neuron, rank = torch.nonzero(filled, as_tuple=True)
    return pd.DataFrame({"layer": layer.numpy().astype(np.int32), "neuron": neuron.numpy().astype(np.int32),
                         "rank": rank.numpy().astype(np.int32), "window": window[filled].numpy(),
                         "pos": pos[filled].numpy(), "act": act[filled].numpy().astype(np.float32)})


def _state_from_table(table: pd.DataFrame, n_layers: int, d_mlp: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `_state_table`: (act, window, pos) `[n_layers, d_mlp, k]`."""
    shape = (n_layers, d_mlp, k)
    act = torch.full(shape, float("-inf"))
    window = torch.full(shape, topk.NO_WINDOW, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    index = tuple(torch.tensor(table[c].to_numpy(np.int64)) for c in ("layer", "neuron", "rank"))
    windows = torch.tensor(table["window"].to_numpy(np.int64))
    if len(table) and (int(windows.min()) < 0 or min(int(i.min()) for i in index) < 0):
        raise ValueError("negative window, layer, neuron or rank")
    act[index] = torch.tensor(table["act"].to_numpy(np.float32))
    window[index] = windows
    pos[index] = torch.tensor(table["pos"].to_numpy(np.int64))
    return act, window, pos


def _read_state(run: _cache.Run, path: Path, table: pd.DataFrame, model: Any, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """`_state_from_table` for a table read from the cache; a table that does not fit raises `CacheError`."""
    try:
        return _state_from_table(table, model.cfg.n_layers, model.cfg.d_mlp, k)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as err:
        raise run._error(path, f"does not hold a valid top-k state ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------------------------------
# Merging shards


def merge(a: TopActivations, b: TopActivations) -> TopActivations:
    """Combine the results of two disjoint shards of a corpus; equals one collection over their union.

    Collect each shard with `window_offset` set to its first window's id in the whole corpus, so window ids
    are global. Both must come from the same model with the same `k`, `frac` and hook. The result is
    identical to one pass when shard boundaries fall on batch boundaries (the same batches run); otherwise
    activations can differ in their last bits (batched matrix products), as between two batch sizes.

    Raises:
        ValueError: different models or settings, or shards whose window ids overlap.
    """
    for name in ("k", "frac", "hook"):
        if getattr(a.settings, name) != getattr(b.settings, name):
            fail(f"{name} of both shards", "be equal", f"{getattr(a.settings, name)!r} and {getattr(b.settings, name)!r}")
    if a.model_id != b.model_id or a.act.shape[:2] != b.act.shape[:2] or a.layers != b.layers:
        fail("shards", "come from the same model", f"model fingerprints {a.model_id[:12]} and {b.model_id[:12]}")
    for lo, hi in a.window_ranges:
        for lo2, hi2 in b.window_ranges:
            if lo < hi2 and lo2 < hi:
                fail("shards", "cover disjoint window ids", f"overlap of [{lo}, {hi}) and [{lo2}, {hi2})",
                     "Collect each shard with `window_offset` = its first window's id in the whole corpus.")
    n_layers, d_mlp, k = a.act.shape

    def flat(top: TopActivations) -> tuple[Tensor, Tensor]:
        return (topk.order_key(top.act, top.window).reshape(n_layers * d_mlp, k),  # [n_neurons, k]
                top.pos.reshape(n_layers * d_mlp, k).to(torch.int32))

    state = topk.sorted_state(*topk.merge_topk(flat(a), flat(b), k), n_layers)
    ranges = tuple(sorted(a.window_ranges + b.window_ranges))
    corpus_id = _cache.text_fingerprint(json.dumps(sorted([a.corpus_id, b.corpus_id])))
    return TopActivations(*state, settings=a.settings, n_windows=a.n_windows + b.n_windows,
                          window_ranges=ranges, model_id=a.model_id, corpus_id=corpus_id, layers=a.layers)


# --------------------------------------------------------------------------------------------------
# One neuron along whole windows (for colouring tokens)


def neuron_activations(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    neuron: int,
    window_ids: Any = None,
    *,
    batch_size: int = 64,
) -> Float[Tensor, "n window"]:
    """One neuron's activation (`hook_post`) at every position of some windows.

    Args:
        model: a TransformerBridge.
        windows: token windows `[n_windows, window]`.
        layer, neuron: the neuron.
        window_ids: rows of `windows` to run `[n]` (e.g. `top.neuron_examples(layer, neuron)["window"]`);
            `None` for all.
        batch_size: windows per forward pass.

    Returns:
        `[n, window]` float32 on the CPU, row i for window `window_ids[i]`.
    """
    windows = check_windows(model, windows)
    layer, neuron = check_layer(model, layer), check_neuron(model, neuron)
    batch_size = check_int_range("batch_size", batch_size, 1, 2**31 - 1)
    ids = torch.arange(len(windows)) if window_ids is None else torch.from_numpy(
        check_index_array("window_ids", window_ids, len(windows), what=f"rows of `windows` (0..{len(windows) - 1})"))
    name, device, out = hook_name(layer, "post"), _device(model), []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            batch = windows[ids[start : start + batch_size]].to(device)  # [batch, window]
            _, acts = model.run_with_cache(batch, names_filter=[name], stop_at_layer=layer + 1)
            out.append(acts[name][..., neuron].float().cpu())  # [batch, window]
    return torch.cat(out) if out else torch.zeros(0, windows.shape[1])
