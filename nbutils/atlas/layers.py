"""The per-layer `clusters` step: read h and activations of a layer's examples, embed, cluster, tabulate.

`layers_tables` reads consecutive layers in one pass while their vectors fit a memory budget (`passes.read_layers`,
fixed batches of all windows, so a layer's values do not depend on the group it was read in), then clusters each
layer (`cluster_layer`: one neuron at a time, e = h ⊙ w or the settings' space, `clustering`) and turns the
result into the layer's tables (`neurons`, `examples`, `contexts`, `vectors`, `bands`). With a residual store the
pass keeps no h: each layer reads its examples' h again from the store when it is clustered (`_stored_h`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from nbutils import _env, clustering, passes, viz
from nbutils._validation import check_int_range
from nbutils.atlas.labels import decode_texts, token_labels, vocab_of
from nbutils.atlas.settings import TEXT_CONTEXT, AtlasSettings, LayerTables
from nbutils.atlas.units import NEURONS, Units
from nbutils.cache import scratch_folder
from nbutils.passes import read_layers

__all__ = ["layer_tables", "layers_tables", "features_table", "cluster_layer", "ClusteredLayer",
           "PARALLEL_MIN_VALUES"]


# --------------------------------------------------------------------------------------------------
# Reading: one pass over all windows for a group of layers


@dataclass
class _Gather:
    """What one layer needs from the pass: h at its distinct example keys, activations around its examples."""

    examples: pd.DataFrame
    keys: np.ndarray  # [n_unique] window * n_pos + pos
    inverse: np.ndarray  # [n_examples] row of h of each example
    h: "np.ndarray | _RowsFile | None"  # [n_unique, d_model] float32, as the model computes it; in memory or in a
    # file; None: read again from the residual store when the layer is clustered (`_stored_h`)
    context: np.ndarray  # [n_examples, before + after + 1] float32, NaN outside the window
    band: tuple | None = None  # the running band sample: (priority, window, pos, act) [d_mlp, bands, per_band]
    band_context: Tensor | None = None  # [d_mlp, bands, per_band, width] activations around each sampled token


class _RowsFile:
    """Rows `[n, d]` float32 filled by slices `rows[a:b] = x` into a file (plain writes: the pages do not stay in
    the process's memory), read back whole by `load()`, which deletes the file."""

    def __init__(self, path: Path, n: int, d: int) -> None:
        self.path, self.shape = path, (n, d)
        self._file = open(path, "wb")
        self._file.truncate(n * d * 4)

    def __setitem__(self, rows: slice, x: np.ndarray) -> None:
        self._file.seek(rows.start * self.shape[1] * 4)
        self._file.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())

    def load(self) -> np.ndarray:
        self._file.close()
        rows = np.fromfile(self.path, dtype=np.float32).reshape(self.shape)
        self.path.unlink()
        return rows


def _new_gather(model: Any, windows: Tensor, top: Any, layer: int, settings: AtlasSettings, units: Units,
                spill: Path | None = None, stored_h: bool = False) -> _Gather:
    """An empty `_Gather` of one layer; h goes to a file in the folder `spill` when given, and is not kept when
    `stored_h` (the residual store gives it again)."""
    n_pos = windows.shape[1]
    width = settings.before + settings.after + 1
    ex = clustering._layer_examples(top, windows, layer).reset_index(drop=True)
    keys, inverse = np.unique(ex["window"].to_numpy(np.int64) * n_pos + ex["pos"].to_numpy(np.int64),
                              return_inverse=True)
    shape = (len(keys), units.d_in(model))
    h: "np.ndarray | _RowsFile | None" = None
    if not stored_h:
        h = _RowsFile(spill / f"h-{layer}.f32", *shape) if spill is not None else np.zeros(shape, dtype=np.float32)
    g = _Gather(ex, keys, inverse.reshape(-1), h, np.full((len(ex), width), np.nan, dtype=np.float32))
    if settings.bands:
        from nbutils import bands as _bands

        shape = (units.count(model), settings.bands, settings.per_band)
        g.band = _bands._empty(shape)
        g.band_context = torch.full((*shape, width), float("nan"))
    return g


def _read_batch(g: _Gather, H: Tensor, P: Tensor, lo: int, hi: int, max_act: Tensor, settings: AtlasSettings
                ) -> None:
    """Take one batch (windows `lo..hi`) of one layer into `g`: h `H` `[batch, pos, d_model]` at the layer's example
    keys, the activations `P` `[batch, pos, d_mlp]` around its examples, and the band sample."""
    n_pos = H.shape[1]
    if g.h is not None:
        _take_h(g.h, g.keys, H, lo, hi)
    wid = g.examples["window"].to_numpy(np.int64)
    rows = np.flatnonzero((wid >= lo) & (wid < hi))
    at = g.examples["pos"].to_numpy(np.int64)[rows, None] + np.arange(-settings.before, settings.after + 1)
    valid = (at >= 0) & (at < n_pos)  # [rows, width]
    values = P[torch.as_tensor(wid[rows] - lo)[:, None], torch.as_tensor(np.clip(at, 0, n_pos - 1)),
               torch.as_tensor(g.examples["neuron"].to_numpy(np.int64)[rows])[:, None]]  # [rows, width]
    g.context[rows] = np.where(valid, values.float().cpu().numpy(), np.nan)
    if settings.bands:
        _band_merge(g, P.cpu(), lo, n_pos, max_act, settings)


def _take_h(h: "np.ndarray | _RowsFile", keys: np.ndarray, H: Tensor, lo: int, hi: int) -> None:
    """Rows of `h` at the `keys` (window * n_pos + pos, sorted) in windows `lo..hi - 1`, from `H` `[batch, pos, d]`."""
    n_pos = H.shape[1]
    a, b = np.searchsorted(keys, [lo * n_pos, hi * n_pos])
    k = torch.as_tensor(keys[a:b].copy())
    h[a:b] = H[k // n_pos - lo, k % n_pos].float().cpu().numpy()


def _stored_h(model: Any, windows: Tensor, g: _Gather, layer: int, settings: AtlasSettings, units: Units,
              residuals: Any) -> np.ndarray:
    """h `[n_unique, d]` of the layer's examples, read again from the residual store in the layers pass's own
    batches and by its own taps, so the same numbers; no model runs."""
    h = np.empty((len(g.keys), units.d_in(model)), dtype=np.float32)
    kind = units.kinds(model, settings.fold_ln)[0]
    read_layers(model, windows, [layer], (kind,),
                lambda l, read, lo, hi: _take_h(h, g.keys, units.h(read[kind]), lo, hi),
                batch_size=settings.batch_size, residuals=residuals)
    return h


def _layers_pass(model: Any, windows: Tensor, top: Any, layers: list[int], settings: AtlasSettings,
                 progress: bool = False, spill: dict[int, Path] | None = None, units: Units = NEURONS,
                 residuals: Any = None, stored_h: bool = False) -> dict[int, _Gather]:
    """One pass over all the windows in fixed batches of `batch_size` (`passes.read_layers`), reading h and the
    activations of the units (`Units`) of every layer in `layers` at that layer's examples; h of a layer in
    `spill` goes to a file in the folder given there; with `stored_h` (`_h_in_store`) no h is kept."""
    spill = spill or {}
    h_kind, act_kind = units.kinds(model, settings.fold_ln)
    out = {layer: _new_gather(model, windows, top, layer, settings, units, spill.get(layer), stored_h)
           for layer in layers}

    def on_layer(layer: int, read: dict[str, Tensor], lo: int, hi: int) -> None:
        _read_batch(out[layer], units.h(read[h_kind]), units.act(read[act_kind]), lo, hi,
                    top.max_act[top.row(layer)].float(), settings)

    read_layers(model, windows, layers, tuple(dict.fromkeys((h_kind, act_kind))), on_layer,
                batch_size=settings.batch_size, progress=progress, residuals=residuals,
                desc=f"reading h of layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}")
    return out


def _h_in_store(model: Any, windows: Tensor, layers: list[int], settings: AtlasSettings, units: Units,
                residuals: Any) -> bool:
    """Whether h of these layers can be read again from `residuals` when each is clustered (`_stored_h`) instead of
    being kept from the pass: gigabytes at GPT-2-small shape that the store already holds."""
    return residuals is not None and passes.replays(model, windows, layers, units.kinds(model, settings.fold_ln)[:1],
                                                    residuals)


def _band_merge(g: _Gather, P: Tensor, lo: int, n_pos: int, max_act: Tensor, settings: AtlasSettings) -> None:
    """Merge one batch's activations `P` `[batch, n_pos, d_mlp]` (windows `lo..`) into the layer's band sample
    (`bands`: the `per_band` lowest priorities per (neuron, band), the same sample as `bands.collect_band_samples`),
    keeping each sampled token's context activations beside it."""
    from nbutils import bands as _bands

    batch, _, d_mlp = P.shape
    width = settings.before + settings.after + 1
    wid = torch.arange(lo, lo + batch).repeat_interleave(n_pos)  # [n_tok]
    pos = torch.arange(n_pos).repeat(batch)  # [n_tok]
    cand = _bands._batch_candidates(P.float().reshape(-1, d_mlp), _bands.priority(wid, pos), wid, pos, max_act,
                                    settings.bands, settings.per_band, threshold=g.band[0][..., -1])
    both = [torch.cat([a, b], dim=-1) for a, b in zip(g.band, cand)]  # [d_mlp, bands, 2 * per_band] each
    prio, idx = torch.topk(both[0], k=settings.per_band, dim=-1, largest=False, sorted=True)
    g.band = (prio, *(t.gather(-1, idx) for t in both[1:]))
    old = idx.clamp(max=settings.per_band - 1)  # kept slots of the running sample keep their context
    context = g.band_context.gather(2, old[..., None].expand(-1, -1, -1, width))  # [d_mlp, bands, per_band, width]
    neuron, band, slot = torch.nonzero(idx >= settings.per_band, as_tuple=True)  # slots taken by this batch's tokens
    if len(neuron):  # their context, read from this batch
        came = idx[neuron, band, slot] - settings.per_band
        w, p = cand[1][neuron, band, came].clamp(min=lo), cand[2][neuron, band, came]
        at = p[:, None] + torch.arange(-settings.before, settings.after + 1)  # [n, width]
        ctx = P.float()[(w - lo)[:, None], at.clamp(0, n_pos - 1), neuron[:, None]]
        context[neuron, band, slot] = ctx.masked_fill((at < 0) | (at >= n_pos), float("nan"))
    g.band_context = context


def _band_table(g: _Gather, layer: int, vocab: list[str], windows: Tensor, settings: AtlasSettings) -> pd.DataFrame:
    """The layer's band sample as rows `layer, neuron, band, window, pos, act, token, start, acts`, by neuron, band
    (highest first) and priority."""
    prio, window, pos, act = g.band
    filled = window.flip(1) >= 0  # highest band first
    neuron, band, slot = torch.nonzero(filled, as_tuple=True)
    band = settings.bands - 1 - band
    w, p = window[neuron, band, slot], pos[neuron, band, slot]
    n_pos = windows.shape[1]
    first = (p - settings.before).numpy()
    ctx = g.band_context[neuron, band, slot].numpy()  # [n, width]
    acts = _present(ctx)
    token_id = windows[w, p].numpy()
    return pd.DataFrame({
        "layer": np.full(len(w), layer, dtype=np.int64), "neuron": neuron.numpy().astype(np.int64),
        "band": band.numpy().astype(np.int64), "window": w.numpy().astype(np.int64), "pos": p.numpy().astype(np.int64),
        "act": act[neuron, band, slot].numpy().astype(np.float32), "token": np.asarray(vocab, dtype=object)[token_id],
        "start": np.maximum(first, 0).astype(np.int64), "acts": acts,
    }) if len(w) else pd.DataFrame({c: [] for c in ("layer", "neuron", "band", "window", "pos", "act", "token", "start",
                                                         "acts")}).astype({"layer": np.int64, "neuron": np.int64})


def _layer_bytes(top: Any, layer: int, d_model: int, settings: AtlasSettings, n_tokens: int) -> tuple[int, int]:
    """Memory the pass holds for one layer: h of its distinct examples (float32; at most one per token of the
    corpus), and the rest: the context activations and keys of every example and the band sample with its
    contexts."""
    n = int(top._keep()[top.row(layer)].sum())
    width = settings.before + settings.after + 1
    band = top.act.shape[1] * settings.bands * settings.per_band * (width + 4) * 4
    return min(n, n_tokens) * 4 * d_model, n * (4 * width + 64) + band


# --------------------------------------------------------------------------------------------------
# The step: read, cluster, tabulate


def layers_tables(model: Any, windows: Tensor, top: Any, layers: list[int], settings: AtlasSettings, *,
                  memory_budget: int = 1 << 30, progress: bool = False, spill_dir: str | os.PathLike | None = None,
                  workers: int | None = None, units: Units = NEURONS, residuals: Any = None) -> Iterator[LayerTables]:
    """The `clusters` step of several layers, in process: one pass over the windows reads every layer (up to the
    deepest), then each layer is clustered in turn. The pre-MLP vectors of the first layers stay in memory while
    they fit in `memory_budget` bytes (default 1 GiB); those of the others go to files in `spill_dir` (default:
    a temporary folder), each read back when its layer is clustered. So the pass runs every block once however
    many layers there are, and memory holds the budget plus one layer. A killed build's spill folder is removed
    by the next build (`cache.scratch_folder`). `workers`: processes clustering each layer
    (`cluster_layer`); `units`: neurons, or a dictionary's latents (`Units`). The tables equal `layer_tables` of
    each layer alone. `residuals`: a usable `residuals.ResidualStore` of these windows, replayed instead of running
    the model (the same numbers)."""
    need = [_layer_bytes(top, layer, units.d_in(model), settings, int(windows.numel())) for layer in layers]
    used = sum(rest for _, rest in need)  # held for every layer during the pass
    spilled = []
    stored_h = _h_in_store(model, windows, layers, settings, units, residuals)
    for layer, (h_bytes, _) in zip(layers, need) if not stored_h else ():  # a stored h is not kept: nothing to spill
        if used + h_bytes > memory_budget:
            spilled.append(layer)  # h to a file
        else:
            used += h_bytes
    with scratch_folder("atlas-h-", spill_dir) as folder:
        gathered = _layers_pass(model, windows, top, layers, settings, progress=progress,
                                spill={layer: Path(folder) for layer in spilled}, units=units, residuals=residuals,
                                stored_h=stored_h)
        for layer in layers:
            yield _layer_step(model, windows, top, layer, gathered.pop(layer), settings, units, workers=workers,
                              residuals=residuals)


def layer_tables(model: Any, windows: Tensor, top: Any, layer: int, settings: AtlasSettings, *,
                 units: Units = NEURONS) -> LayerTables:
    """The `clusters` step of one layer: every neuron's examples clustered, its polysemy, maps, context
    activations of the shown examples and the central embedding of each feature.

    One batched pass over the windows reads h of all the layer's examples and their context activations
    (`_layers_pass`). Deterministic: the same inputs give the same tables, in any process.
    """
    return _layer_step(model, windows, top, layer,
                       _layers_pass(model, windows, top, [layer], settings, units=units)[layer], settings, units)


def _layer_step(model: Any, windows: Tensor, top: Any, layer: int, g: _Gather, settings: AtlasSettings,
                units: Units = NEURONS, *, workers: int | None = None, residuals: Any = None) -> LayerTables:
    """Embed and cluster one layer's gathered examples, then write its tables."""
    W, b = units.weights(model, layer, settings.fold_ln)
    bounds = np.searchsorted(g.examples["neuron"].to_numpy(), np.arange(units.count(model) + 1))
    if g.h is None:
        h = _stored_h(model, windows, g, layer, settings, units, residuals)
    else:
        h = g.h.load() if isinstance(g.h, _RowsFile) else g.h
    lx = clustering.LayerExamples(layer=layer, examples=g.examples, keys=g.keys, h=h, inverse=g.inverse,
                                  bounds=bounds, W=W, b=b, n_pos=int(windows.shape[1]))
    done = cluster_layer(lx, settings, workers=workers)
    vocab = vocab_of(model)
    examples = _examples_table(model, windows, lx.examples, done, vocab)
    return LayerTables(
        layer=layer, examples=examples,
        neurons=_neurons_table(layer, top.max_act[top.row(layer)].numpy().astype(np.float32), done.stats, examples),
        contexts=_contexts_table(examples, g.context, settings),
        vectors=_vectors_table(done, units.d_in(model)),
        bands=_band_table(g, layer, vocab, windows, settings) if settings.bands else None)


@dataclass
class ClusteredLayer:
    """Per example (rows of the layer's examples): `cluster`, `central`, `shown`, `xy` `[n, 2]`; per neuron,
    `stats` rows `(n_examples, n_clusters, n_singletons, effective_clusters, monosemanticity, largest_cluster)`;
    per feature (cluster of >= `min_size`), its key `(layer, neuron, cluster)` in `vector_keys` and its central
    embedding in `vectors`."""

    cluster: np.ndarray
    central: np.ndarray
    shown: np.ndarray
    xy: np.ndarray
    stats: list[tuple]
    vector_keys: list[tuple[int, int, int]]
    vectors: list[np.ndarray]


# a layer with fewer example values (examples x d_model) is clustered in process unless `workers` is given: starting
# workers takes seconds. The default tiny model (d_model 128, tens of thousands of examples a layer) stays in
# process; GPT-2 small at 2,000 windows (about 164,000 examples x 768 a layer) goes to workers.
PARALLEL_MIN_VALUES = 20_000_000


def cluster_layer(lx: clustering.LayerExamples, settings: AtlasSettings, *, workers: int | None = None
                  ) -> ClusteredLayer:
    """Cluster every neuron's examples in the settings' space (`lx.vectors(neuron, settings.space)`: the neuron
    embeddings `h ⊙ w` by default) with the settings' method (`clustering`), and find each cluster's centre, the
    tab rows and the 2-D map. Any unit whose examples embed as `[n, d]` rows fits: `lx` says how.

    `workers` processes (default: one per core for a layer of at least `PARALLEL_MIN_VALUES` values, else 1)
    take contiguous blocks of neurons; each neuron is clustered alone on one thread, so the result does not depend
    on the number of workers.
    """
    d_mlp = len(lx.bounds) - 1
    if workers is None:
        workers = _env.available_cores() if len(lx.examples) * lx.h.shape[1] >= PARALLEL_MIN_VALUES else 1
    workers = check_int_range("workers", workers, 1, 1024)
    if workers == 1:
        return _cluster_neurons(lx, settings, 0, d_mlp)
    from joblib import Parallel, delayed

    cuts = np.searchsorted(lx.bounds, np.linspace(0, lx.bounds[-1], 4 * workers + 1)[1:-1])  # ~equal examples
    edges = np.unique(np.concatenate([[0], np.clip(cuts, 0, d_mlp), [d_mlp]]))
    light = replace(lx, examples=None)  # the workers need h, W and the row maps only
    parts = Parallel(n_jobs=workers, backend="loky")(
        delayed(_cluster_neurons)(light, settings, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]))
    arrays = (np.concatenate([getattr(p, f) for p in parts]) for f in ("cluster", "central", "shown", "xy"))
    lists = ([x for p in parts for x in getattr(p, f)] for f in ("stats", "vector_keys", "vectors"))
    return ClusteredLayer(*arrays, *lists)


def _cluster_neurons(lx: clustering.LayerExamples, settings: AtlasSettings, first: int, last: int) -> ClusteredLayer:
    """`cluster_layer` of neurons `first..last - 1`: arrays over their rows `bounds[first]:bounds[last]`."""
    from threadpoolctl import threadpool_limits

    offset = int(lx.bounds[first])
    n = int(lx.bounds[last]) - offset
    out = ClusteredLayer(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool),
                         np.zeros((n, 2), dtype=np.float32), [], [], [])
    with threadpool_limits(1):  # many small matrices: BLAS threads only add overhead
        for neuron in range(first, last):
            lo, hi = int(lx.bounds[neuron]) - offset, int(lx.bounds[neuron + 1]) - offset
            if hi == lo:
                out.stats.append((0, 0, 0, 0.0, float("nan"), 0))
                continue
            e = lx.vectors(neuron, settings.space)  # [m, d_model]
            sim = clustering.cosine_similarity(e)
            labels = clustering._labels_from_similarity(sim, settings.method, settings.threshold)
            centres = clustering._central_from_similarity(sim, labels)
            sizes = np.bincount(labels)
            out.cluster[lo:hi] = labels
            out.central[lo + centres] = True
            out.shown[lo + _shown_rows(labels, centres, settings.shown)] = True
            out.xy[lo:hi] = viz.pca_2d(e)
            out.stats.append((hi - lo, len(sizes), int((sizes == 1).sum()), clustering.effective_n_clusters(labels),
                              clustering._mono_from_similarity(sim), int(sizes[0])))
            for c in np.flatnonzero(sizes >= settings.min_size):
                out.vector_keys.append((lx.layer, neuron, int(c)))
                out.vectors.append(e[centres[c]].astype(np.float32))
    return out


def _shown_rows(labels: np.ndarray, centres: np.ndarray, shown: int) -> np.ndarray:
    """Rows listed in the tabs (as the explorer lists them): per cluster of >= 2 examples its centre first, then
    by activation (rows are sorted by activation), at most `shown`; then up to `shown` singletons."""
    sizes = np.bincount(labels)
    keep: list[np.ndarray] = []
    for c in np.flatnonzero(sizes >= 2):
        members = np.flatnonzero(labels == c)
        rest = members[members != centres[c]][: shown - 1]
        keep.append(np.concatenate([[centres[c]], rest]))
    singles = np.flatnonzero(sizes[labels] == 1)[:shown]
    keep.append(singles)
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)


def _examples_table(model: Any, windows: Tensor, ex: pd.DataFrame, done: ClusteredLayer, vocab: list[str]
                    ) -> pd.DataFrame:
    n, n_pos = len(ex), windows.shape[1]
    window, pos = ex["window"].to_numpy(np.int64), ex["pos"].to_numpy(np.int64)
    token_id = windows[torch.as_tensor(window.copy()), torch.as_tensor(pos.copy())].numpy().astype(np.int64)
    tokens, inverse = np.unique(window * n_pos + pos, return_inverse=True)  # a token is often several neurons' example
    rows = windows.tolist()
    text_ids = [rows[w][max(0, p - TEXT_CONTEXT + 1) : p + 1] for w, p in zip((tokens // n_pos).tolist(),
                                                                              (tokens % n_pos).tolist())]
    context = np.asarray(decode_texts(model.tokenizer, text_ids) if n else [], dtype=object)[inverse.reshape(-1)]
    return pd.DataFrame({
        "layer": ex["layer"].to_numpy(np.int64), "neuron": ex["neuron"].to_numpy(np.int64), "window": window,
        "pos": pos,
        "act": ex["act"].to_numpy(np.float32), "cluster": done.cluster, "is_central": done.central,
        "shown": done.shown, "token_id": token_id, "token": np.asarray(vocab, dtype=object)[token_id],
        "context": context, "x": done.xy[:, 0], "y": done.xy[:, 1],
    })


def _neurons_table(layer: int, max_act: np.ndarray, stats: list[tuple], examples: pd.DataFrame) -> pd.DataFrame:
    d_mlp = len(max_act)
    s = np.array(stats, dtype=object).reshape(d_mlp, 6)
    labels_by_neuron = token_labels(examples, ["neuron"]) if len(examples) else pd.Series(dtype=object)
    return pd.DataFrame({
        "layer": np.full(d_mlp, layer, dtype=np.int64), "neuron": np.arange(d_mlp, dtype=np.int64),
        "max_act": max_act, "n_examples": s[:, 0].astype(np.int64), "dead": max_act <= 0,
        "n_clusters": s[:, 1].astype(np.int64), "n_singletons": s[:, 2].astype(np.int64),
        "effective_clusters": s[:, 3].astype(np.float64), "monosemanticity": s[:, 4].astype(np.float64),
        "largest_cluster": s[:, 5].astype(np.int64),
        "label": [labels_by_neuron.get(j, "") for j in range(d_mlp)],
    })


def _contexts_table(examples: pd.DataFrame, context: np.ndarray, settings: AtlasSettings) -> pd.DataFrame:
    shown_rows = examples[examples["shown"]]
    first = shown_rows["pos"].to_numpy() - settings.before  # token of column 0 of `context`
    acts = _present(context[examples["shown"].to_numpy()])
    return pd.DataFrame({
        "layer": shown_rows["layer"].to_numpy(), "neuron": shown_rows["neuron"].to_numpy(),
        "window": shown_rows["window"].to_numpy(), "pos": shown_rows["pos"].to_numpy(),
        "start": np.maximum(first, 0).astype(np.int64), "acts": acts,
    })


def _present(context: np.ndarray) -> list[np.ndarray]:
    """Each row of `context` `[n, width]` without its NaN (the tokens outside the window), as views of one array."""
    present = ~np.isnan(context)
    return np.split(context[present], np.cumsum(present.sum(axis=1))[:-1]) if len(context) else []


def _vectors_table(done: ClusteredLayer, d_model: int) -> pd.DataFrame:
    vectors = pd.DataFrame(done.vector_keys, columns=["layer", "neuron", "cluster"]).astype(np.int64)
    vectors["vector"] = list(np.array(done.vectors, dtype=np.float32).reshape(-1, d_model))
    return vectors


def features_table(examples: pd.DataFrame, min_size: int) -> pd.DataFrame:
    """The `features` step of one layer: one row per cluster of at least `min_size` examples, from the layer's
    `examples` table: `layer, neuron, cluster, size, window, pos, act` (the central example), `mean_act`, `label`."""
    columns = ["layer", "neuron", "cluster", "size", "window", "pos", "act", "mean_act", "label"]
    if examples.empty:
        return pd.DataFrame(columns=columns)
    groups = examples.groupby(["layer", "neuron", "cluster"], sort=True)
    agg = groups.agg(size=("act", "size"), mean_act=("act", "mean")).reset_index()
    agg["label"] = token_labels(examples, ["layer", "neuron", "cluster"]).to_numpy()
    centres = examples[examples["is_central"]][["layer", "neuron", "cluster", "window", "pos", "act"]]
    table = agg.merge(centres, on=["layer", "neuron", "cluster"], how="left")
    table = table[table["size"] >= min_size].sort_values(["layer", "neuron", "cluster"]).reset_index(drop=True)
    table["mean_act"] = table["mean_act"].astype(np.float32)
    return table[columns].astype({"size": np.int64, "window": np.int64, "pos": np.int64})

