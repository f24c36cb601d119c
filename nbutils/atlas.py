"""The feature atlas: a model's feature clusters computed once, then read and queried without the model.

`build_atlas(model, windows, ...)` runs every heavy step once and writes one self-describing folder:

- `collect`: the streaming top-k collection (`activations.collect_top_activations`, which resumes from its own
  checkpoints), stored as `top.parquet` (every filled top-k slot), with the windows (`windows.parquet`) and the
  text of every token id (`vocab.parquet`) so that any example can be shown without the corpus or the tokenizer.
- per layer, `clusters`: every neuron's examples clustered (`clustering`, the default method unless another is
  asked for) into `neurons/`, `examples/`, `contexts/` (the neuron's activation on the tokens around each example
  a tab shows, so a tab is drawn with no forward pass), `vectors/` (each feature's central neuron embedding) and
  `bands/` (examples below the top: a deterministic sample per neuron and activation band, as `bands` draws it,
  with the same context activations, taken in the same pass);
- per layer, `features`: one row per cluster of at least `min_size` examples, with a readable label, into
  `features/`;
- `similar`: every feature's nearest features of other neurons, in the same layer and in other layers, by cosine
  similarity of their central neuron embeddings, scored by shared examples and cross activation, into
  `similar.parquet`.

`manifest.json` records the model (name, fingerprint), the corpus (source, windows, window length, fingerprint),
the settings, the package versions and each step's status and files. Every parquet file carries the atlas key's
hash in its metadata and its row count in the manifest: a truncated, foreign or half-written file raises
`cache.CacheError` naming it, and is never used.

**Resumable.** Files are written atomically (temporary file, then rename) and a step is marked done in the
manifest only after its files are. A build that is killed at any point and started again with the same
arguments verifies the finished steps, never redoes them, and resumes at the first unfinished (layer, step);
the collection itself resumes from its last checkpoint. The result is identical to an uninterrupted build.

**Memory** is bounded by a group of layers (`layers_tables`, 1.5 GiB by default) and never holds more than one
layer's activations of a batch: the collection state (`n_layers * d_mlp * k` slots, 20 bytes each), the pre-MLP
vectors of each grouped layer's distinct examples (`<= n_windows * window * d_model` float32: all tokens, at
large k) with their context activations, and one layer's tables while it is clustered. The similar step holds
the central embedding of every feature (`n_features * d_model` float32), every feature's example keys, and
`n_features * n_similar * CROSS_MEMBERS` cross-activation requests, and streams the windows once for them.

**Reading.** `Atlas.open(path)` needs no model. Tables are queried through DuckDB (embedded, no server) straight
from the parquet files, so a query over millions of example rows loads only what it returns:
`atlas.sql("SELECT ...")`, `atlas.search(token=..., text=...)`, `atlas.most_polysemantic(n)`.

Columns (in addition to those of `activations`):

- `neurons`: `layer, neuron, max_act, n_examples, dead, n_clusters, n_singletons, effective_clusters,
  monosemanticity, largest_cluster, label`.
- `examples`: `layer, neuron, window, pos, act, cluster, is_central, shown, token_id, token, context, x, y`
  (`shown`: listed in a tab, with its activations in `contexts`; `context`: the text of up to `TEXT_CONTEXT`
  tokens ending at the activating token; `x, y`: the example's place in the neuron's 2-D map, PCA of the unit
  neuron embeddings).
- `contexts`: `layer, neuron, window, pos, start, acts` (the neuron's activation on tokens `start..` of the window).
- `features`: `layer, neuron, cluster, size, window, pos, act, mean_act, label` (window/pos/act: the central
  example).
- `similar`: `layer, neuron, cluster, rank, other_layer, other_neuron, other_cluster, other_size, similarity,
  shared_examples` (Jaccard overlap of the example sets), `cross_act` (mean activation of the other feature's
  neuron on up to `CROSS_MEMBERS` of this feature's examples, over that neuron's max activation).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from nbutils import _env, activations, cache, clustering, embeddings, viz
from nbutils._validation import check_choice, check_int_range, fail
from nbutils.cache import CacheError
from nbutils.models import check_windows, hook_name

__all__ = [
    "FORMAT",
    "TABLES",
    "AtlasSettings",
    "LayerTables",
    "Atlas",
    "build_atlas",
    "layer_tables",
    "layers_tables",
    "features_table",
    "similar_table",
    "token_label",
    "default_path",
    "load_or_build",
]

FORMAT = 2  # bump when a table changes meaning (2: band samples per layer)
TABLES = ("neurons", "examples", "contexts", "features", "similar", "windows", "vocab", "top")
TEXT_CONTEXT = 12  # tokens of text stored per example, ending at the activating token
CROSS_MEMBERS = 16  # examples of a feature on which a similar feature's neuron is run
LABEL_TOKENS = 3  # tokens named in a label
_KEY_META = b"nbutils_atlas_key"
_STEP_META = b"nbutils_atlas_step"


@dataclass(frozen=True)
class AtlasSettings:
    """Everything that changes an atlas's content (part of its key, saved in its manifest).

    Attributes:
        k, frac, batch_size: the collection (`activations.CollectSettings`).
        method, threshold: the clustering (`clustering.cluster`); `None` resolves to the defaults.
        fold_ln: LayerNorm convention of the embeddings (`embeddings`).
        min_size: smallest cluster that is a feature.
        n_similar: similar features kept per feature.
        shown: examples per cluster tab whose context activations are stored (central first, then by act).
        before, after: tokens of stored context before and after the activating token.
        bands, per_band: examples below the top: `per_band` tokens sampled in each of `bands` equal-width
            activation bands of (0, max] of every neuron (`bands.collect_band_samples`); `bands=0` skips them.
    """

    k: int = 128
    frac: float = 0.75
    batch_size: int = 64
    method: str | None = None
    threshold: float | int | None = None
    fold_ln: bool = True
    min_size: int = 3
    n_similar: int = 5
    shown: int = 20
    before: int = 20
    after: int = 10
    bands: int = 10
    per_band: int = 8

    def __post_init__(self) -> None:
        activations.CollectSettings(k=self.k, frac=self.frac, batch_size=self.batch_size)  # checks them
        method = check_choice("method", clustering.DEFAULT_METHOD if self.method is None else self.method,
                              clustering.METHODS)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "threshold", clustering._check_threshold(method, self.threshold))
        if not isinstance(self.fold_ln, bool):
            raise TypeError(f"`fold_ln` must be True or False; got {self.fold_ln!r}.")
        check_int_range("min_size", self.min_size, 1, 10**6)
        check_int_range("n_similar", self.n_similar, 1, 1000)
        check_int_range("shown", self.shown, 1, 10**6)
        check_int_range("before", self.before, 0, 10**6)
        check_int_range("after", self.after, 0, 10**6)
        check_int_range("bands", self.bands, 0, 1000, what="(0: no band samples)")
        check_int_range("per_band", self.per_band, 1, 100_000)


@dataclass
class LayerTables:
    """The `clusters` step of one layer: plain tables, picklable (a remote worker can return it)."""

    layer: int
    neurons: pd.DataFrame
    examples: pd.DataFrame
    contexts: pd.DataFrame
    vectors: pd.DataFrame
    bands: pd.DataFrame | None = None


@dataclass(frozen=True)
class Units:
    """What the build reads for one layer's units: the MLP's neurons (`dictionary=None`), or the latents of a sparse
    dictionary (`nbutils.dictionary.Dictionary`, one layer: the block of the hook it reads).

    Per unit kind: where the embedding's input vector is read and how (`h`: the norm's output for neurons, the
    dictionary's encoder input `u` for latents), the weight columns and bias the embedding multiplies and sums to
    (`weights`), and where the activation that ranks the examples is read and how (`act`: `hook_post`, or the
    dictionary's encode of its hook's vector).
    """

    dictionary: Any = None

    def count(self, model: Any) -> int:
        return int(model.cfg.d_mlp) if self.dictionary is None else self.dictionary.d_sae

    def d_in(self, model: Any) -> int:
        return int(model.cfg.d_model) if self.dictionary is None else self.dictionary.d_in

    def hooks(self, model: Any, layer: int, fold_ln: bool) -> tuple[str, str]:
        """The hooks of the input vector and of the activation (one hook for latents: both come from it)."""
        if self.dictionary is None:
            return hook_name(layer, "ln_normalized" if fold_ln else "mlp_in", model), hook_name(layer, "post", model)
        from nbutils.dictionary import attach

        name = hook_name(*attach(model, self.dictionary), model)
        return name, name

    def h(self, t: Tensor) -> Tensor:
        return t if self.dictionary is None else self.dictionary.encoder_input(t.float())

    def act(self, t: Tensor) -> Tensor:
        return t if self.dictionary is None else self.dictionary.encode(t.float())

    def weights(self, model: Any, layer: int, fold_ln: bool) -> tuple[np.ndarray, np.ndarray]:
        """`W [d_in, n_units]` and `b [n_units]` (float64): the embedding `h ⊙ W[:, j]` sums, plus `b[j]`, to the
        unit's pre-activation."""
        if self.dictionary is None:
            W, b = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln)
        else:
            W, b = self.dictionary.W_enc, self.dictionary.bias
        return W.numpy().astype(np.float64), b.numpy().astype(np.float64)


NEURONS = Units()


# --------------------------------------------------------------------------------------------------
# Labels and token text


def _vocab(model: Any) -> list[str]:
    """The text of every token id (decoded one at a time, as `to_str_tokens` shows them); cached on the model."""
    cached = getattr(model, "_nbutils_vocab", None)
    if cached is None:
        tokenizer = model.tokenizer
        cached = tokenizer.batch_decode([[i] for i in range(model.cfg.d_vocab)])
        try:
            model._nbutils_vocab = cached
        except AttributeError:
            pass
    return cached


def _show(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)  # quotes make leading spaces and newlines visible


def token_labels(table: pd.DataFrame, keys: list[str], *, n: int = LABEL_TOKENS) -> pd.Series:
    """`token_label` of every group of `table` (rows with a `token` column) grouped by `keys`, vectorised."""
    counts = table.groupby(keys + ["token"], sort=False).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts.groupby(keys)["count"].transform("sum")
    counts = counts.sort_values(keys + ["count", "token"], ascending=[True] * len(keys) + [False, True], kind="stable")
    top = counts.groupby(keys, sort=False).head(n)
    parts = top["token"].map(_show) + " " + (100 * top["share"]).map("{:.0f}%".format)
    return parts.groupby([top[k] for k in keys], sort=True).agg(" · ".join)


def token_label(tokens: Iterable[str], *, n: int = LABEL_TOKENS) -> str:
    """A short summary of what examples share: their most common activating tokens with their shares.

    `token_label([" the", " the", " a"])` is `'" the" 67% · " a" 33%'`; empty input gives `""`.
    """
    table = pd.DataFrame({"group": 0, "token": pd.Series(list(tokens), dtype=object)})
    labels = token_labels(table, ["group"], n=n)
    return str(labels.iloc[0]) if len(labels) else ""


# --------------------------------------------------------------------------------------------------
# The per-layer steps (pure functions of the model, windows and collection)


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


@dataclass
class _Gather:
    """What one layer needs from the pass: h at its distinct example keys, activations around its examples."""

    examples: pd.DataFrame
    keys: np.ndarray  # [n_unique] window * n_pos + pos
    inverse: np.ndarray  # [n_examples] row of h of each example
    h: np.ndarray  # [n_unique, d_model] float32, as the model computes it (exact in float64 products)
    context: np.ndarray  # [n_examples, before + after + 1] float32, NaN outside the window
    band: tuple | None = None  # the running band sample: (priority, window, pos, act) [d_mlp, bands, per_band]
    band_context: Tensor | None = None  # [d_mlp, bands, per_band, width] activations around each sampled token


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
    cw, cp = cand[1].clamp(min=lo), cand[2]  # [d_mlp, bands, per_band]; empty slots point at a real token
    at = cp[..., None] + torch.arange(-settings.before, settings.after + 1)  # [d_mlp, bands, per_band, width]
    neuron = torch.arange(d_mlp)[:, None, None, None].expand_as(at)
    ctx = P.float()[(cw - lo)[..., None].expand_as(at), at.clamp(0, n_pos - 1), neuron]
    ctx = ctx.masked_fill((at < 0) | (at >= n_pos), float("nan"))
    both = [torch.cat([a, b], dim=-1) for a, b in zip(g.band, cand)]  # [d_mlp, bands, 2 * per_band] each
    prio, idx = torch.topk(both[0], k=settings.per_band, dim=-1, largest=False, sorted=True)
    g.band = (prio, *(t.gather(-1, idx) for t in both[1:]))
    both_ctx = torch.cat([g.band_context, ctx], dim=2)  # [d_mlp, bands, 2 * per_band, width]
    g.band_context = both_ctx.gather(2, idx[..., None].expand(-1, -1, -1, width))


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
    acts = [row[~np.isnan(row)] for row in ctx]
    token_id = windows[w, p].numpy()
    return pd.DataFrame({
        "layer": np.full(len(w), layer, dtype=np.int64), "neuron": neuron.numpy().astype(np.int64),
        "band": band.numpy().astype(np.int64), "window": w.numpy().astype(np.int64), "pos": p.numpy().astype(np.int64),
        "act": act[neuron, band, slot].numpy().astype(np.float32), "token": [vocab[t] for t in token_id],
        "start": np.maximum(first, 0).astype(np.int64), "acts": acts,
    }) if len(w) else pd.DataFrame({c: [] for c in ("layer", "neuron", "band", "window", "pos", "act", "token", "start",
                                                         "acts")}).astype({"layer": np.int64, "neuron": np.int64})


def _layer_bytes(top: Any, layer: int, d_model: int, settings: AtlasSettings, n_tokens: int) -> int:
    """Memory the pass holds for one layer: h of its distinct examples (float32; at most one per token of the
    corpus), the context activations and keys of every example, and the band sample with its contexts."""
    n = int(top._keep()[top.row(layer)].sum())
    width = settings.before + settings.after + 1
    band = top.act.shape[1] * settings.bands * settings.per_band * (width + 4) * 4 * 2  # x2: while merging
    return min(n, n_tokens) * 4 * d_model + n * (4 * width + 64) + band


@torch.inference_mode()
def _layers_pass(model: Any, windows: Tensor, top: Any, layers: list[int], settings: AtlasSettings,
                 progress: bool = False, units: Units = NEURONS) -> dict[int, _Gather]:
    """One pass over all the windows, in fixed batches of `batch_size` (the same for any set of layers, so each
    layer's values are the same whether it runs alone, with others or on another worker), up to the deepest
    layer asked for; reads h and the neuron activations of every layer in `layers` at that layer's examples.
    """
    from tqdm.auto import tqdm

    n_windows, n_pos = windows.shape
    offsets = np.arange(-settings.before, settings.after + 1)  # [width]
    out: dict[int, _Gather] = {}
    for layer in layers:
        ex = clustering._layer_examples(top, windows, layer).reset_index(drop=True)
        keys, inverse = np.unique(ex["window"].to_numpy(np.int64) * n_pos + ex["pos"].to_numpy(np.int64),
                                  return_inverse=True)
        out[layer] = _Gather(ex, keys, inverse.reshape(-1), np.zeros((len(keys), units.d_in(model)), dtype=np.float32),
                             np.full((len(ex), len(offsets)), np.nan, dtype=np.float32))
        if settings.bands:
            from nbutils import bands as _bands

            shape = (units.count(model), settings.bands, settings.per_band)
            out[layer].band = _bands._empty(shape)
            out[layer].band_context = torch.full((*shape, len(offsets)), float("nan"))
    device = next(model.parameters()).device
    held: dict[int, Tensor] = {}  # h of the layer whose MLP is running, until its activations arrive

    def read_h(layer: int, H: Tensor, lo: int, hi: int) -> None:
        held[layer] = H.reshape(hi - lo, n_pos, -1)  # [batch, n_pos, d_model]

    def read_post(layer: int, P: Tensor, lo: int, hi: int) -> None:
        g, H = out[layer], held.pop(layer)
        P = P.reshape(hi - lo, n_pos, -1)  # [batch, n_pos, d_mlp]
        a, b = np.searchsorted(g.keys, [lo * n_pos, hi * n_pos])
        k = torch.as_tensor(g.keys[a:b].copy())
        g.h[a:b] = H[k // n_pos - lo, k % n_pos].float().cpu().numpy()
        wid = g.examples["window"].to_numpy(np.int64)
        rows = np.flatnonzero((wid >= lo) & (wid < hi))
        at = g.examples["pos"].to_numpy(np.int64)[rows, None] + offsets  # [rows, width]
        valid = (at >= 0) & (at < n_pos)
        values = P[torch.as_tensor(wid[rows] - lo)[:, None], torch.as_tensor(np.clip(at, 0, n_pos - 1)),
                   torch.as_tensor(g.examples["neuron"].to_numpy(np.int64)[rows])[:, None]]  # [rows, width]
        g.context[rows] = np.where(valid, values.float().cpu().numpy(), np.nan)
        if settings.bands:
            _band_merge(g, P.cpu(), lo, n_pos, top.max_act[top.row(layer)].float(), settings)

    def read_both(layer: int, t: Tensor, lo: int, hi: int) -> None:  # a hook that returns None leaves t as it is
        read_h(layer, units.h(t), lo, hi)
        read_post(layer, units.act(t), lo, hi)

    bar = tqdm(total=n_windows * n_pos, unit="tok", unit_scale=True, disable=not progress, leave=False,
               desc=f"reading h of layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}")
    for lo in range(0, n_windows, settings.batch_size):
        hi = min(lo + settings.batch_size, n_windows)
        # hooks, not a cache: each layer's tensors are read and dropped as the forward pass goes, so one layer's
        # activations are held at a time
        hooks = []
        for layer in layers:
            h_hook, act_hook = units.hooks(model, layer, settings.fold_ln)
            if h_hook == act_hook:  # a dictionary: u and its latents' activations both come from one vector
                hooks.append((h_hook, lambda t, hook, l=layer: read_both(l, t, lo, hi)))
            else:
                hooks += [(h_hook, lambda t, hook, l=layer: read_h(l, units.h(t), lo, hi)),
                          (act_hook, lambda t, hook, l=layer: read_post(l, units.act(t), lo, hi))]
        model.run_with_hooks(windows[lo:hi].to(device), fwd_hooks=hooks, return_type=None,
                             stop_at_layer=max(layers) + 1)
        bar.update((hi - lo) * n_pos)
    bar.close()
    return out


def _layer_examples_of(model: Any, layer: int, g: _Gather, fold_ln: bool, n_pos: int, units: Units = NEURONS
                       ) -> clustering.LayerExamples:
    W, b = units.weights(model, layer, fold_ln)
    bounds = np.searchsorted(g.examples["neuron"].to_numpy(), np.arange(units.count(model) + 1))
    return clustering.LayerExamples(layer=layer, examples=g.examples, keys=g.keys, h=g.h, inverse=g.inverse,
                                    bounds=bounds, W=W, b=b, n_pos=n_pos)


def layers_tables(model: Any, windows: Tensor, top: Any, layers: list[int], settings: AtlasSettings, *,
                  memory_budget: int = 3 << 29, progress: bool = False, units: Units = NEURONS) -> Iterator[LayerTables]:
    """The `clusters` step of several layers, in process: consecutive layers are read in one pass while their
    pre-MLP vectors fit in `memory_budget` bytes (default 1.5 GiB; a layer alone otherwise), then clustered one
    by one. A larger budget means fewer passes (each up to its group's deepest layer), a smaller one less memory.
    The tables equal `layer_tables` of each layer alone."""
    d_model = units.d_in(model)
    groups: list[list[int]] = []
    used = 0
    for layer in layers:
        need = _layer_bytes(top, layer, d_model, settings, int(windows.numel()))
        if groups and used + need <= memory_budget:
            groups[-1].append(layer)
            used += need
        else:
            groups.append([layer])
            used = need
    for group in groups:
        gathered = _layers_pass(model, windows, top, group, settings, progress=progress, units=units)
        for layer in group:
            yield _cluster_layer(model, windows, top, layer, gathered.pop(layer), settings, units)


def layer_tables(model: Any, windows: Tensor, top: Any, layer: int, settings: AtlasSettings, *,
                 units: Units = NEURONS) -> LayerTables:
    """The `clusters` step of one layer: every neuron's examples clustered, its polysemy, maps, context
    activations of the shown examples and the central embedding of each feature.

    One batched pass over the windows reads h of all the layer's examples and their context activations
    (`_layers_pass`). Deterministic: the same inputs give the same tables, in any process.
    """
    return _cluster_layer(model, windows, top, layer,
                          _layers_pass(model, windows, top, [layer], settings, units=units)[layer], settings, units)


def _cluster_layer(model: Any, windows: Tensor, top: Any, layer: int, g: _Gather, settings: AtlasSettings,
                   units: Units = NEURONS) -> LayerTables:
    from threadpoolctl import threadpool_limits

    lx = _layer_examples_of(model, layer, g, settings.fold_ln, int(windows.shape[1]), units)
    context = g.context
    ex = lx.examples
    n, d_mlp = len(ex), units.count(model)
    cluster = np.zeros(n, dtype=np.int64)
    central = np.zeros(n, dtype=bool)
    shown = np.zeros(n, dtype=bool)
    xy = np.zeros((n, 2), dtype=np.float32)
    max_act = top.max_act[top.row(layer)].numpy().astype(np.float32)
    stats, vec_rows, vecs = [], [], []
    with threadpool_limits(1):  # many small matrices: BLAS threads only add overhead
        for neuron in range(d_mlp):
            lo, hi = int(lx.bounds[neuron]), int(lx.bounds[neuron + 1])
            if hi == lo:
                stats.append((0, 0, 0, 0.0, float("nan"), 0))
                continue
            e = lx.embeddings(neuron)  # [m, d_model]
            sim = clustering.cosine_similarity(e)
            labels = clustering._labels_from_similarity(sim, settings.method, settings.threshold)
            centres = clustering._central_from_similarity(sim, labels)
            sizes = np.bincount(labels)
            cluster[lo:hi] = labels
            central[lo + centres] = True
            shown[lo + _shown_rows(labels, centres, settings.shown)] = True
            xy[lo:hi] = viz.pca_2d(e)
            stats.append((hi - lo, len(sizes), int((sizes == 1).sum()), clustering.effective_n_clusters(labels),
                          clustering._mono_from_similarity(sim), int(sizes[0])))
            for c in np.flatnonzero(sizes >= settings.min_size):
                vec_rows.append((layer, neuron, int(c)))
                vecs.append(e[centres[c]].astype(np.float32))
    token_id = windows[torch.as_tensor(ex["window"].to_numpy(np.int64).copy()),
                       torch.as_tensor(ex["pos"].to_numpy(np.int64).copy())].numpy().astype(np.int64)
    vocab = _vocab(model)
    tokens = [vocab[t] for t in token_id]
    text_ids = [windows[w, max(0, p - TEXT_CONTEXT + 1) : p + 1].tolist()
                for w, p in zip(ex["window"].to_numpy(), ex["pos"].to_numpy())]
    examples = pd.DataFrame({
        "layer": ex["layer"].to_numpy(np.int64), "neuron": ex["neuron"].to_numpy(np.int64),
        "window": ex["window"].to_numpy(np.int64), "pos": ex["pos"].to_numpy(np.int64),
        "act": ex["act"].to_numpy(np.float32), "cluster": cluster, "is_central": central, "shown": shown,
        "token_id": token_id, "token": tokens, "context": model.tokenizer.batch_decode(text_ids) if n else [],
        "x": xy[:, 0], "y": xy[:, 1],
    })
    s = np.array(stats, dtype=object).reshape(d_mlp, 6)
    labels_by_neuron = token_labels(examples, ["neuron"]) if n else pd.Series(dtype=object)
    neurons = pd.DataFrame({
        "layer": np.full(d_mlp, layer, dtype=np.int64), "neuron": np.arange(d_mlp, dtype=np.int64),
        "max_act": max_act, "n_examples": s[:, 0].astype(np.int64), "dead": max_act <= 0,
        "n_clusters": s[:, 1].astype(np.int64), "n_singletons": s[:, 2].astype(np.int64),
        "effective_clusters": s[:, 3].astype(np.float64), "monosemanticity": s[:, 4].astype(np.float64),
        "largest_cluster": s[:, 5].astype(np.int64),
        "label": [labels_by_neuron.get(j, "") for j in range(d_mlp)],
    })
    shown_rows = examples[examples["shown"]]
    first = shown_rows["pos"].to_numpy() - settings.before  # token of column 0 of `context`
    start = np.maximum(first, 0)
    acts = [row[~np.isnan(row)] for row in context[examples["shown"].to_numpy()]]
    contexts = pd.DataFrame({
        "layer": shown_rows["layer"].to_numpy(), "neuron": shown_rows["neuron"].to_numpy(),
        "window": shown_rows["window"].to_numpy(), "pos": shown_rows["pos"].to_numpy(),
        "start": start.astype(np.int64), "acts": acts,
    })
    d_model = units.d_in(model)
    vectors = pd.DataFrame(vec_rows, columns=["layer", "neuron", "cluster"]).astype(np.int64)
    vectors["vector"] = list(np.array(vecs, dtype=np.float32).reshape(-1, d_model))
    band_rows = _band_table(g, layer, vocab, windows, settings) if settings.bands else None
    return LayerTables(layer=layer, neurons=neurons, examples=examples, contexts=contexts, vectors=vectors,
                       bands=band_rows)


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


# --------------------------------------------------------------------------------------------------
# The similar step (all layers together)


def _nearest_other(u: np.ndarray, owner: np.ndarray, k: int, chunk_bytes: int = 1 << 28, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows by cosine among rows of *other* owners (neurons). `u` unit rows `[n, d]` float32.
    Returns (indices `[n, k]`, -1 where fewer exist; similarities `[n, k]`), most similar first, equal
    similarities by index."""
    from tqdm.auto import tqdm

    n = len(u)
    ind = np.full((n, k), -1, dtype=np.int64)
    sim = np.full((n, k), np.nan, dtype=np.float32)
    kk = min(k, n)
    step = max(1, chunk_bytes // max(1, 4 * n))
    ut, own = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)), torch.from_numpy(np.asarray(owner))
    for lo in tqdm(range(0, n, step), desc="nearest features", unit="block", disable=not progress, leave=False):
        block = ut[lo : lo + step] @ ut.T  # [chunk, n]
        block.masked_fill_(own[lo : lo + step, None] == own[None, :], float("-inf"))  # not itself, not its own neuron
        vals, part = (t.numpy() for t in torch.topk(block, kk, dim=1))  # [chunk, kk]
        order = np.lexsort((part, -vals), axis=1)  # by similarity desc, then index
        part, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
        valid = np.isfinite(vals)
        ind[lo : lo + len(block), :kk] = np.where(valid, part, -1)
        sim[lo : lo + len(block), :kk] = np.where(valid, vals, np.nan)
    return ind, sim


@torch.inference_mode()
def _cross_acts(model: Any, windows: Tensor, window: np.ndarray, pos: np.ndarray, layer: np.ndarray,
                neuron: np.ndarray, batch_size: int, progress: bool = False, units: Units = NEURONS) -> np.ndarray:
    """Activation of neuron (`layer[i]`, `neuron[i]`) at (`window[i]`, `pos[i]`) for every request i `[n]`, from
    one pass over the distinct windows in batches of `batch_size`, up to the deepest layer asked for. Each layer's
    activations are read as the pass reaches it and dropped, so memory holds one layer's batch at a time."""
    values = np.zeros(len(window), dtype=np.float32)
    if len(window) == 0:
        return values
    order = np.argsort(window, kind="stable")  # requests by window
    unique, starts = np.unique(window[order], return_index=True)
    starts = np.append(starts, len(order))
    layers = sorted(int(l) for l in np.unique(layer))
    device = next(model.parameters()).device
    n_pos = windows.shape[1]
    from tqdm.auto import tqdm

    for lo in tqdm(range(0, len(unique), batch_size), desc="cross activations", unit="batch", disable=not progress,
                   leave=False):
        hi = min(lo + batch_size, len(unique))
        rows = order[starts[lo] : starts[hi]]  # the requests of these windows
        local = np.searchsorted(unique[lo:hi], window[rows])  # [rows] window's row in the batch

        def read(act: Tensor, hook: Any, l: int) -> None:
            sel = layer[rows] == l
            block = act.reshape(hi - lo, n_pos, -1)  # [batch, pos, d_mlp]
            values[rows[sel]] = block[torch.as_tensor(local[sel]), torch.as_tensor(pos[rows][sel].astype(np.int64)),
                                      torch.as_tensor(neuron[rows][sel].astype(np.int64))].float().cpu().numpy()

        hooks = [(units.hooks(model, l, True)[1], lambda act, hook, l=l: read(units.act(act), hook, l)) for l in layers]
        model.run_with_hooks(windows[torch.as_tensor(unique[lo:hi])].to(device), fwd_hooks=hooks, return_type=None,
                             stop_at_layer=layers[-1] + 1)
    return values


EXAMPLE_COLUMNS = ["layer", "neuron", "cluster", "window", "pos", "act"]  # what the similar step reads of `examples`


def similar_table(model: Any, windows: Tensor, features: pd.DataFrame, vectors: Callable[[int], pd.DataFrame],
                  examples: Callable[[int], pd.DataFrame], max_act: np.ndarray, settings: AtlasSettings,
                  n_pos: int, progress: bool = False, units: Units = NEURONS) -> pd.DataFrame:
    """The `similar` step: for every feature, its `n_similar` nearest features of other neurons (any layer).

    Args:
        features: the `features` rows of all layers; vectors: layer -> the central embeddings of that layer's
            features (`layer, neuron, cluster, vector`); examples: layer -> that layer's `examples` table
            (`EXAMPLE_COLUMNS` are enough); max_act: `[n_layers, n_units]`, indexed by layer; units: neurons
            or a dictionary's latents (`Units`).

    Memory: the unit feature vectors (`[n_features, d_model]` float32, filled a layer at a time), one layer's
    examples at a time, every feature's example keys (int64, one per example of a feature), and
    `n_features * n_similar * CROSS_MEMBERS` cross-activation requests (a few int32 arrays), in plain numpy.
    """
    columns = ["layer", "neuron", "cluster", "rank", "other_layer", "other_neuron", "other_cluster", "other_size",
               "similarity", "shared_examples", "cross_act"]
    keys = ["layer", "neuron", "cluster"]
    feats = features[keys + ["size"]].sort_values(keys).reset_index(drop=True)
    if len(feats) < 2:
        return pd.DataFrame(columns=columns)
    d_mlp, n_feats = int(max_act.shape[1]), len(feats)
    f_layer, f_neuron, f_cluster = (feats[c].to_numpy(np.int64) for c in keys)
    owner = f_layer * d_mlp + f_neuron
    code = owner << 32 | f_cluster  # [n_features] sorted, as `feats` is

    def feature_index(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Each row's feature (row of `feats`) and whether it has one (clusters too small to be features don't)."""
        row_code = (table["layer"].to_numpy(np.int64) * d_mlp + table["neuron"].to_numpy(np.int64)) << 32 \
            | table["cluster"].to_numpy(np.int64)
        fid = np.minimum(np.searchsorted(code, row_code), n_feats - 1)
        return fid, code[fid] == row_code

    u, found = None, np.zeros(n_feats, dtype=bool)
    for layer in np.unique(f_layer):
        v = vectors(int(layer))
        if v.empty:
            continue  # its features are reported missing below
        fid, ok = feature_index(v)
        if u is None:
            u = np.zeros((n_feats, len(v["vector"].iloc[0])), dtype=np.float32)  # [n_features, d_model]
        if ok.any():
            u[fid[ok]] = np.stack(v["vector"].to_numpy()[ok])
        found[fid[ok]] = True
        del v
    if not found.all():
        raise CacheError(f"{int((~found).sum())} features have no stored central embedding; rebuild the atlas.")
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), np.finfo(np.float32).tiny)  # unit rows, in place
    ind, sim = _nearest_other(u, owner, settings.n_similar, progress=progress)
    del u
    i_idx, rank = np.nonzero(ind >= 0)
    j_idx = ind[i_idx, rank]
    pairs = pd.DataFrame({  # one row per (feature, rank)
        "layer": f_layer[i_idx], "neuron": f_neuron[i_idx], "cluster": f_cluster[i_idx], "rank": rank.astype(np.int64),
        "other_layer": f_layer[j_idx], "other_neuron": f_neuron[j_idx], "other_cluster": f_cluster[j_idx],
        "other_size": feats["size"].to_numpy(np.int64)[j_idx], "similarity": sim[i_idx, rank].astype(np.float32),
    })
    # every feature's examples, one layer at a time: keys window * n_pos + pos (sorted, for the overlap) and its
    # CROSS_MEMBERS highest (the examples a similar feature's neuron is run on)
    member_parts, member_feat, top_parts = [], [], []
    for layer in np.unique(f_layer):
        ex = examples(int(layer))
        fid, keep = feature_index(ex)
        fid, act = fid[keep], ex["act"].to_numpy(np.float32)[keep]
        key = ex["window"].to_numpy(np.int64)[keep] * n_pos + ex["pos"].to_numpy(np.int64)[keep]
        del ex
        by_key = np.lexsort((key, fid))
        member_parts.append(key[by_key])
        member_feat.append(fid[by_key])
        by_act = np.lexsort((-act, fid))  # within a feature: highest act first (ties: table order)
        f_sorted = fid[by_act]
        first = np.searchsorted(f_sorted, f_sorted, side="left")
        top = by_act[np.arange(len(by_act)) - first < CROSS_MEMBERS]
        top_parts.append((fid[top], key[top]))
    member_key = np.concatenate(member_parts)
    member_offsets = np.searchsorted(np.concatenate(member_feat), np.arange(n_feats + 1))
    del member_parts, member_feat
    shared = np.zeros(len(pairs), dtype=np.float32)
    for r, (i, j) in enumerate(zip(i_idx.tolist(), j_idx.tolist())):
        a = member_key[member_offsets[i] : member_offsets[i + 1]]
        b = member_key[member_offsets[j] : member_offsets[j + 1]]
        inter = len(np.intersect1d(a, b, assume_unique=True))
        shared[r] = inter / (len(a) + len(b) - inter)
    pairs["shared_examples"] = shared
    del member_key
    # cross activation: the other neuron on this feature's top members, as flat int32 request arrays
    tm_key = np.concatenate([t[1] for t in top_parts])  # by feature, as `member_key`
    tm_offsets = np.searchsorted(np.concatenate([t[0] for t in top_parts]), np.arange(n_feats + 1))
    counts = (tm_offsets[1:] - tm_offsets[:-1])[i_idx]  # [n_pairs] requests of each pair
    pair = np.repeat(np.arange(len(pairs), dtype=np.int64), counts)  # [n_requests]
    member = np.repeat(tm_offsets[:-1][i_idx], counts) + (np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts,
                                                                                            counts))
    req_key = tm_key[member]
    del member
    other_layer, other_neuron = f_layer[j_idx][pair], f_neuron[j_idx][pair]
    vals = _cross_acts(model, windows, (req_key // n_pos).astype(np.int32), (req_key % n_pos).astype(np.int32),
                       other_layer.astype(np.int32), other_neuron.astype(np.int32), settings.batch_size, progress,
                       units)
    del req_key
    scale = max_act[other_layer, other_neuron].astype(np.float64)
    rel = np.where(scale > 0, vals / np.where(scale > 0, scale, 1.0), np.nan)
    sums = np.bincount(pair, weights=rel, minlength=len(pairs))
    pairs["cross_act"] = (sums / np.maximum(counts, 1)).astype(np.float32)
    return pairs[columns].sort_values(["layer", "neuron", "cluster", "rank"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# The folder: atomic parquet files carrying the key, a manifest of steps


def _write_table(path: Path, table: pd.DataFrame, key_hash: str, step: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _KEY_META: key_hash.encode(),
                                           _STEP_META: step.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    cache._atomic_write(path, lambda f: pq.write_table(arrow, f, row_group_size=65536))
    return len(table)


def _check_file(path: Path, key_hash: str, rows: int | None, folder: Path) -> None:
    """A finished step's file: readable footer, this atlas's key, the recorded row count; else `CacheError`."""
    import pyarrow.parquet as pq

    hint = (f"Nothing was deleted. Delete this file to recompute its step (`rm '{path}'`), or the whole folder "
            f"(`rm -r '{folder}'`).")
    if not path.exists():
        raise CacheError(f"Atlas file {path} is missing although the manifest lists it as finished. {hint}")
    try:
        meta = pq.read_metadata(path)
    except Exception as err:  # a damaged footer raises several pyarrow types; all mean the same here
        raise CacheError(f"Atlas file {path} is unreadable ({type(err).__name__}: {err}). {hint}") from err
    found = (meta.metadata or {}).get(_KEY_META, b"").decode()
    if found != key_hash:
        raise CacheError(f"Atlas file {path} belongs to another atlas (key {found[:12] or 'none'}, this atlas "
                         f"{key_hash[:12]}). {hint}")
    if rows is not None and meta.num_rows != rows:
        raise CacheError(f"Atlas file {path} has {meta.num_rows} rows; the manifest recorded {rows}. {hint}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("neuron-embeddings", "torch", "transformer_lens", "transformers", "numpy", "pandas", "pyarrow",
                 "duckdb", "scikit-learn", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model_name(model: Any) -> str:
    """What `models.load_model` takes to load this model again: its hub name or folder (the offline default by
    its name, so that an atlas stays usable when the project folder moves)."""
    from nbutils import models

    inner = getattr(model, "original_model", None)
    path = getattr(getattr(inner, "config", None), "_name_or_path", "") or getattr(model.cfg, "model_name", "")
    try:
        if str(path) and Path(path).resolve() == _env.DEFAULT_MODEL_DIR.resolve():
            return models.DEFAULT_MODEL_NAME
    except OSError:
        pass
    return str(path)


class _Folder:
    """The atlas folder and its manifest (written atomically after every step)."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def key_hash(self) -> str:
        return self.manifest["key_hash"]

    def file(self, name: str) -> Path:
        return self.path / name

    def done(self, step: str) -> bool:
        info = self.manifest["steps"].get(step)
        if info is None or info.get("status") != "done":
            return False
        for name, rows in info["files"].items():
            _check_file(self.file(name), self.key_hash, rows, self.path)
        return True

    def finish(self, step: str, files: dict[str, pd.DataFrame], seconds: float) -> None:
        rows = {name: _write_table(self.file(name), table, self.key_hash, step) for name, table in files.items()}
        self.manifest["steps"][step] = {"status": "done", "files": rows, "seconds": round(seconds, 3)}
        self.save()

    def save(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=True, default=str) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        cache._atomic_write(self.path / "manifest.json", lambda f: f.write(text.encode()))


def _read_manifest(path: Path) -> dict | None:
    file = path / "manifest.json"
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        manifest["key"], manifest["key_hash"], manifest["steps"]  # noqa: B018 - the fields that must be there
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheError(f"Atlas manifest {file} is unreadable ({type(err).__name__}: {err}). Nothing was "
                         f"deleted. Remove the folder to rebuild (`rm -r '{path}'`).") from err
    return manifest


def _steps(layers: list[int]) -> list[str]:
    return ["collect", *[f"layer {l} {s}" for l in layers for s in ("clusters", "features")], "similar"]


def _layer_file(table: str, layer: int) -> str:
    return f"{table}/layer={layer:03d}.parquet"


def _check_path_arg(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a folder path (str or Path); got {type(value).__name__} {value!r}.")
    path = Path(value).expanduser()
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            fail(name, "be a folder (or not exist yet)", f"{str(path)!r}, where {str(parent)!r} is a file",
                 "Pass another folder.")
    return path


# --------------------------------------------------------------------------------------------------
# Building


def default_path(*, model_name: str, source: str, n_windows: int, window: int, layers: Iterable[int] | None = None,
                 cache_dir: str | os.PathLike | None = None, **settings: Any) -> Path:
    """The readable default folder of an atlas: `<cache>/atlas/<model>-<source>-<n_windows>x<window>-k<k>-<hash>`,
    where `<hash>` names the settings (`AtlasSettings` fields in `settings`, defaults resolved, and `layers`), so that
    other settings, or a new default method, get their own folder. The manifest inside holds the full content key
    (the model's weights too): an atlas of other weights there is an error, never an input."""
    resolved = asdict(AtlasSettings(**settings))
    chosen = None if layers is None else sorted(int(l) for l in layers)
    digest = cache.text_fingerprint(json.dumps({"format": FORMAT, "settings": resolved, "layers": chosen},
                                               sort_keys=True))[:8]
    name = Path(str(model_name)).name or "model"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{source}-{n_windows}x{window}-k{resolved['k']}-{digest}")
    return _env.cache_dir(cache_dir) / "atlas" / slug


def build_atlas(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    *,
    k: int = 128,
    frac: float = 0.75,
    layers: Iterable[int] | None = None,
    method: str | None = None,
    threshold: float | int | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str | None = None,
    progress: bool = True,
    top: Any = None,
    map_layers: Callable[[list[int], AtlasSettings], Iterator[LayerTables]] | None = None,
    sae: Any = None,
    **options: Any,
) -> "Atlas":
    """Build (or resume, or just open) the feature atlas of `model` over `windows`.

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: token windows `[n_windows, window]` (`data.corpus_windows`), ids 0..n_windows-1.
        k, frac: examples per neuron (`activations.collect_top_activations`).
        layers: MLP layers to cluster (default all); the collection always covers every layer.
        method, threshold: clustering (`clustering.cluster`; `None`: the measured default).
        out: the atlas folder; default `<cache>/atlas/<hash of the key>`.
        cache_dir: the cache folder (collection checkpoints, default atlas folders).
        source: the corpus source name, recorded in the manifest (default `$NBUTILS_SOURCE` or `"offline"`).
        progress: tqdm bars over the collection and the steps.
        top: a precomputed `activations.TopActivations` of this model over exactly these windows (e.g. merged
            shards): the collection step stores it instead of collecting.
        map_layers: runs the `clusters` step of many layers, e.g. on remote workers:
            `map_layers(layers, settings)` yields a `LayerTables` per layer, in any order. Default: in process.
        sae: a sparse dictionary (a SAELens folder, or a `dictionary.Dictionary`): the atlas is then of its
            latents instead of the MLP neurons, with the same tables (`neuron` is the latent, `layer` the block of
            the hook it reads). The manifest records its config and weight hash, which are part of the key.
        **options: other `AtlasSettings` fields (`fold_ln`, `min_size`, `n_similar`, `shown`, `before`, `after`,
            `batch_size`).

    Returns:
        the finished `Atlas`.

    Raises:
        ValueError / TypeError: bad arguments (named); `top` from another model or corpus.
        cache.CacheError: `out` holds an atlas of other settings, or a finished step's file is damaged.

    Interrupted at any point, the next call with the same arguments resumes at the first unfinished step
    (module docstring); what is finished survives.
    """
    from tqdm.auto import tqdm

    from nbutils import data

    unknown = set(options) - {f.name for f in fields(AtlasSettings)}
    if unknown:
        raise TypeError(f"build_atlas() got unknown options {sorted(unknown)}; see `AtlasSettings`.")
    settings = AtlasSettings(k=k, frac=frac, method=method, threshold=threshold, **options)
    windows = check_windows(model, windows)
    n_layers = model.cfg.n_layers
    units, sparse = _dictionary_units(model, sae, layers, top, map_layers)
    if sparse is not None:
        layers = [sparse["layer"]]
    if layers is None:
        layer_list = list(range(n_layers))
    else:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"`layers` must be a list of layer indices; got {type(layers).__name__} {layers!r}.")
        layer_list = sorted({check_int_range("layers", l, 0, n_layers - 1, what="for this model") for l in layers})
        if not layer_list:
            fail("layers", "name at least one layer", "an empty list", "Pass None for all layers.")
    out_path = _check_path_arg("out", out)
    _check_path_arg("cache_dir", cache_dir)
    if top is not None:
        _check_top_arg(model, windows, top, settings)
    source = data._source(source)
    model_id, corpus_id = cache.model_fingerprint(model), cache.tensor_fingerprint(windows)
    key = {"format": FORMAT, "model_id": model_id, "corpus_id": corpus_id, "layers": layer_list,
           "settings": asdict(settings),
           **({"dictionary": {"weights_hash": sparse["weights_hash"], "cfg": sparse["cfg"]}} if sparse else {})}
    key = json.loads(json.dumps(key, sort_keys=True))
    key_hash = cache.text_fingerprint(json.dumps(key, sort_keys=True))
    path = out_path if out_path is not None else _env.cache_dir(cache_dir) / "atlas" / key_hash[:20]
    manifest = _read_manifest(path)
    if manifest is None:
        if path.exists() and any(path.iterdir()):
            raise CacheError(f"Folder {path} is not empty and holds no atlas manifest. Nothing was deleted. Pass "
                             "another `out` folder, or empty this one.")
        manifest = {
            "format": FORMAT, "key": key, "key_hash": key_hash, "layers": layer_list,
            "model": {"name": _model_name(model), "fingerprint": model_id, "n_layers": n_layers,
                      "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp, "d_vocab": model.cfg.d_vocab},
            "corpus": {"source": source, "n_windows": int(windows.shape[0]), "window": int(windows.shape[1]),
                       "fingerprint": corpus_id},
            "settings": asdict(settings), "versions": _versions(), "steps": {}, "status": "running",
            "units": "latents" if sparse else "neurons", **({"dictionary": sparse} if sparse else {}),
        }
    elif manifest["key_hash"] != key_hash:
        raise CacheError(f"Folder {path} holds an atlas of another model, corpus or settings (key "
                         f"{manifest['key_hash'][:12]}, asked for {key_hash[:12]}). Nothing was deleted. Pass another "
                         f"`out` folder, or remove that one to rebuild (`rm -r '{path}'`).")
    folder = _Folder(path, manifest)
    folder.save()
    steps = _steps(layer_list)
    bar = tqdm(total=len(steps), desc="atlas steps", unit="step", disable=not progress)
    try:
        started = time.perf_counter()
        if not folder.done("collect"):
            if units.dictionary is not None:
                from nbutils.dictionary import collect_latent_top

                top = collect_latent_top(model, windows, units.dictionary, k=settings.k, frac=settings.frac,
                                         batch_size=settings.batch_size, progress=progress)
            elif top is None:
                top = activations.collect_top_activations(model, windows, k=settings.k, frac=settings.frac,
                                                          batch_size=settings.batch_size, cache_dir=cache_dir,
                                                          progress=progress)
            vocab = _vocab(model)
            folder.finish("collect", {
                "top.parquet": activations._state_table(top.act, top.window, top.pos),
                "windows.parquet": pd.DataFrame({"window": np.arange(len(windows), dtype=np.int64),
                                                 "tokens": list(windows.numpy().astype(np.int32))}),
                "vocab.parquet": pd.DataFrame({"token_id": np.arange(len(vocab), dtype=np.int64), "token": vocab}),
            }, time.perf_counter() - started)
        bar.update(1)
        if top is None:
            top = _read_top(folder)
        todo = [l for l in layer_list if not folder.done(f"layer {l} clusters")]
        bar.update(len(layer_list) - len(todo))
        runner = map_layers if map_layers is not None else (
            lambda ls, st: layers_tables(model, windows, top, ls, st, progress=progress, units=units))
        started, waiting = time.perf_counter(), set(todo)
        for tables in runner(todo, settings):
            l = getattr(tables, "layer", None)
            if l not in waiting:
                fail("map_layers", f"yield one LayerTables per asked layer {sorted(waiting)}", f"layer {l!r}")
            waiting.discard(l)
            folder.finish(f"layer {l} clusters", {
                _layer_file("neurons", l): tables.neurons, _layer_file("examples", l): tables.examples,
                _layer_file("contexts", l): tables.contexts, _layer_file("vectors", l): tables.vectors,
                **({_layer_file("bands", l): tables.bands} if tables.bands is not None else {}),
            }, time.perf_counter() - started)
            bar.update(1)
            started = time.perf_counter()
        if waiting:
            fail("map_layers", "yield the tables of every asked layer", f"none for layers {sorted(waiting)}")
        for l in layer_list:
            if not folder.done(f"layer {l} features"):
                started = time.perf_counter()
                ex = pd.read_parquet(folder.file(_layer_file("examples", l)))
                folder.finish(f"layer {l} features", {_layer_file("features", l): features_table(ex, settings.min_size)},
                              time.perf_counter() - started)
            bar.update(1)
        if not folder.done("similar"):
            started = time.perf_counter()
            feats = pd.concat([pd.read_parquet(folder.file(_layer_file("features", l))) for l in layer_list],
                              ignore_index=True)
            table = similar_table(model, windows, feats,
                                  lambda l: pd.read_parquet(folder.file(_layer_file("vectors", l))),
                                  lambda l: pd.read_parquet(folder.file(_layer_file("examples", l)),
                                                            columns=EXAMPLE_COLUMNS),
                                  _max_act_by_layer(top), settings, int(windows.shape[1]), progress=progress,
                                  units=units)
            folder.finish("similar", {"similar.parquet": table}, time.perf_counter() - started)
        bar.update(1)
    finally:
        bar.close()
    folder.manifest["status"] = "complete"
    folder.save()
    return Atlas.open(path)


def _dictionary_units(model: Any, sae: Any, layers: Any, top: Any, map_layers: Any) -> tuple[Units, dict | None]:
    """The units of an atlas (`build_atlas`'s `sae`) and, for a dictionary, what the manifest records of it."""
    if sae is None:
        return NEURONS, None
    from nbutils import dictionary

    d = sae if isinstance(sae, dictionary.Dictionary) else dictionary.load_dictionary(sae)
    layer, kind = dictionary.attach(model, d)
    if layers is not None and (isinstance(layers, (str, bytes)) or list(layers) != [layer]):
        fail("layers", f"be None or [{layer}] with `sae` (the block of its hook {d.hook_name!r})", repr(layers))
    if top is not None or map_layers is not None:
        fail("sae", "be used without `top` and `map_layers`", "both an sae and one of them",
             "The latents are collected and clustered in this process.")
    return Units(d), {"layer": layer, "hook": hook_name(layer, kind, model), "saelens_hook": d.hook_name,
                      "architecture": d.architecture, "d_sae": d.d_sae, "d_in": d.d_in,
                      "path": "" if isinstance(sae, dictionary.Dictionary) else str(Path(sae).expanduser().resolve()),
                      "weights_hash": d.fingerprint(), "cfg": json.loads(json.dumps(d.cfg, default=str))}


def _max_act_by_layer(top: activations.TopActivations) -> np.ndarray:
    """Each unit's max activation `[n_layers, n_units]` indexed by model layer (rows of layers not collected: 0)."""
    if top.layers is None:
        return top.max_act.numpy()
    out = np.zeros((max(top.layers) + 1, top.d_mlp), dtype=np.float32)
    out[list(top.layers)] = top.max_act.numpy()
    return out


def _check_top_arg(model: Any, windows: Tensor, top: Any, settings: AtlasSettings) -> None:
    if not isinstance(top, activations.TopActivations):
        raise TypeError(f"`top` must be an activations.TopActivations; got {type(top).__name__}.")
    if (top.n_layers, top.d_mlp) != (model.cfg.n_layers, model.cfg.d_mlp):
        fail("top", f"come from this model ({model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons)",
             f"{top.n_layers} x {top.d_mlp}")
    if top.n_windows != len(windows) or not _contiguous(top.window_ranges, len(windows)):
        fail("top", f"cover exactly the windows 0..{len(windows) - 1}", f"ranges {list(top.window_ranges)}",
             "Collect (or merge shards) over these windows with global window ids.")
    if (top.k, top.frac) != (settings.k, settings.frac):
        fail("top", f"be collected with k={settings.k}, frac={settings.frac}", f"k={top.k}, frac={top.frac}")
    if top.model_id and top.model_id != cache.model_fingerprint(model):
        fail("top", "come from this model's weights", f"model fingerprint {top.model_id[:12]}")


def _contiguous(ranges: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """`ranges` sorted when they tile [0, n) exactly, else an empty list."""
    ordered = sorted(ranges)
    expected = 0
    for lo, hi in ordered:
        if lo != expected:
            return []
        expected = hi
    return ordered if expected == n else []


def _read_top(folder: _Folder) -> activations.TopActivations:
    m = folder.manifest
    table = pd.read_parquet(folder.file("top.parquet"))
    n_layers, d_mlp, k = m["model"]["n_layers"], m["model"]["d_mlp"], m["settings"]["k"]
    sparse = m.get("dictionary")
    if sparse:  # one row: the dictionary's latents at its hook's layer
        n_layers, d_mlp = 1, sparse["d_sae"]
    act, window, pos = activations._state_from_table(table, n_layers, d_mlp, k)
    settings = activations.CollectSettings(k=k, frac=m["settings"]["frac"], batch_size=m["settings"]["batch_size"])
    n = m["corpus"]["n_windows"]
    return activations.TopActivations(act, window, pos, settings=settings, n_windows=n, window_ranges=((0, n),),
                                      model_id=m["model"]["fingerprint"], corpus_id=m["corpus"]["fingerprint"],
                                      layers=(sparse["layer"],) if sparse else None)


def load_or_build(*, model: Any = None, source: str | None = None, n_windows: int, window: int = 64,
                  k: int = 128, frac: float = 0.75, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, **options: Any) -> "Atlas":
    """The atlas of a model and corpus in its readable default folder (`default_path`): opened at once when it is
    complete, else built (or resumed) there. `atlas.loaded_from_cache` says which.

    Args:
        model: a loaded model, or a model name or folder (`models.load_model`; `None`: `$NBUTILS_MODEL` or the
            offline default). A name is loaded only when the atlas must be built.
        source: corpus source (`data.corpus_windows`); n_windows, window: the corpus windows.
        k, frac, **options: as in `build_atlas`.
    """
    from nbutils import data, models

    loaded = model if hasattr(model, "cfg") else None
    name = _model_name(loaded) if loaded is not None else _env.switch(model, "NBUTILS_MODEL", models.DEFAULT_MODEL_NAME)
    src = data._source(source)
    path = default_path(model_name=str(name), source=src, n_windows=n_windows, window=window, cache_dir=cache_dir,
                        k=k, frac=frac, **options)
    manifest = _read_manifest(path)
    if manifest is not None and manifest.get("status") == "complete":
        atlas = Atlas.open(path)
        if loaded is not None:
            atlas._model = atlas.check_model(loaded)
        atlas.loaded_from_cache = True
        return atlas
    lm = loaded if loaded is not None else models.load_model(name)
    windows = data.corpus_windows(lm, n_windows=n_windows, window=window, source=src)
    atlas = build_atlas(lm, windows, k=k, frac=frac, out=path, cache_dir=cache_dir, source=src, progress=progress,
                        **options)
    atlas._model = lm
    return atlas


# --------------------------------------------------------------------------------------------------
# Reading


class Atlas:
    """A finished atlas folder, read without the model. Tables are parquet files queried through DuckDB.

    Attributes:
        path: the folder; manifest: its `manifest.json`; settings: the `AtlasSettings`;
        n_layers, d_mlp, d_model: the model's sizes (`d_mlp`: the dictionary's `d_sae` in an atlas of latents);
        layers: the clustered layers; dictionary: what the manifest records of the dictionary whose latents the
        atlas holds (None for neurons); loaded_from_cache: True when `load_or_build` found it finished.
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.settings = AtlasSettings(**manifest["settings"])
        m = manifest["model"]
        self.n_layers, self.d_mlp, self.d_model = int(m["n_layers"]), int(m["d_mlp"]), int(m["d_model"])
        self.layers: list[int] = list(manifest["layers"])
        self.dictionary: dict | None = manifest.get("dictionary")
        if self.dictionary:
            self.d_mlp = int(self.dictionary["d_sae"])  # the units of its one layer are the latents
        self.loaded_from_cache = False
        self._con: Any = None
        self._windows: Tensor | None = None
        self._vocab: list[str] | None = None
        self._top: Any = None
        self._model: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Atlas":
        """Open a finished atlas; every file is checked (readable, this atlas's key, recorded row count).

        Raises:
            FileNotFoundError: no atlas there. cache.CacheError: unfinished, damaged or foreign files.
        """
        folder = _check_path_arg("path", path)
        manifest = _read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"No atlas at {folder} (no manifest.json). Build one with "
                                    "`atlas.build_atlas(model, windows, out=...)` or `python -m nbutils atlas build`.")
        f = _Folder(folder, manifest)
        missing = [s for s in _steps(manifest["layers"]) if not f.done(s)]
        if missing or manifest.get("status") != "complete":
            raise CacheError(f"The atlas at {folder} is unfinished (next step: {missing[0] if missing else 'none'}). "
                             "Run the same build again to resume it.")
        return cls(folder, manifest)

    def __repr__(self) -> str:
        c = self.manifest["corpus"]
        return (f"Atlas({str(self.path)!r}: {self.manifest['model']['name']}, {self.n_layers} layers x {self.d_mlp} "
                f"neurons, {c['n_windows']} windows x {c['window']} tokens, k={self.settings.k}, "
                f"{self.settings.method} at {self.settings.threshold})")

    # ------------------------------------------------------------------ SQL

    @property
    def con(self) -> Any:
        """The DuckDB connection, with one view per table (`neurons, examples, contexts, features, similar,
        windows, vocab`)."""
        if self._con is None:
            import duckdb

            con = duckdb.connect(":memory:")
            con.execute("SET threads TO 2")
            for table in ("neurons", "examples", "contexts", "features") + (("bands",) if self.settings.bands else ()):
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{self._glob(table)}')")
            for table in ("similar", "windows", "vocab"):  # "similar" is also a SQL keyword: quote it in queries
                file = str(self.path / f"{table}.parquet").replace("'", "''")
                con.execute(f'CREATE VIEW "{table}" AS SELECT * FROM read_parquet(\'{file}\')')
            self._con = con
        return self._con

    def _glob(self, table: str) -> str:
        return str(self.path / table / "layer=*.parquet").replace("'", "''")

    def sql(self, query: str, params: list | dict | None = None) -> pd.DataFrame:
        """Run a SQL query over the atlas's views (DuckDB) and return a DataFrame.

        `atlas.sql("SELECT layer, count(*) FROM features GROUP BY layer")`; `params` fills `?` or `$name`.
        """
        if not isinstance(query, str) or not query.strip():
            raise TypeError(f"`query` must be a SQL string; got {query!r}.")
        import duckdb

        try:
            return self.con.execute(query, params).df() if params is not None else self.con.execute(query).df()
        except duckdb.Error as err:
            message = " ".join(str(err).split())  # DuckDB's message spans lines: keep it on one
            raise ValueError(f"`query` failed: {message}") from None

    def table(self, name: str, layer: int | None = None) -> pd.DataFrame:
        """A whole table (of one layer, for the per-layer tables) as a DataFrame."""
        check_choice("name", name, ("neurons", "examples", "contexts", "features", "similar"))
        if layer is None:
            return self.sql(f'SELECT * FROM "{name}"' + (" ORDER BY layer, neuron" if name != "similar" else
                                                           " ORDER BY layer, neuron, cluster, rank"))
        layer = self._check_layer(layer)
        if name == "similar":
            return self.sql('SELECT * FROM "similar" WHERE layer = ?', [layer])
        return pd.read_parquet(self.path / _layer_file(name, layer))

    def _check_layer(self, layer: Any) -> int:
        layer = check_int_range("layer", layer, 0, self.n_layers - 1, what="for this model")
        if layer not in self.layers:
            fail("layer", f"be one of the atlas's layers {self.layers}", layer, "Build the atlas with that layer.")
        return layer

    def _check_neuron(self, neuron: Any) -> int:
        return check_int_range("neuron", neuron, 0, self.d_mlp - 1, what="for this model (d_mlp)")

    # ------------------------------------------------------------------ questions

    def most_polysemantic(self, n: int = 10, layer: int | None = None, *, min_examples: int = 10) -> pd.DataFrame:
        """The `n` neurons with the most effective clusters (ties: lower monosemanticity), of one layer or all,
        among neurons with at least `min_examples` examples."""
        n = check_int_range("n", n, 1, 10**9)
        min_examples = check_int_range("min_examples", min_examples, 0, 10**9)
        where, params = "n_examples >= ?", [min_examples]
        if layer is not None:
            where += " AND layer = ?"
            params.append(self._check_layer(layer))
        return self.sql(f"SELECT * FROM neurons WHERE {where} ORDER BY effective_clusters DESC, monosemanticity ASC, "
                        f"layer, neuron LIMIT {n}", params)

    def search(self, token: str | None = None, text: str | None = None, *, layer: int | None = None,
               limit: int = 20) -> pd.DataFrame:
        """Features whose activating tokens equal `token` (spaces around it ignored, any case) and/or whose
        examples' contexts contain `text` (any case), most matching examples first.

        Returns:
            `layer, neuron, cluster, size, label, matches` (examples of the feature that match), at most `limit`.
        """
        if token is None and text is None:
            fail("token", "be given (or `text`)", "neither", "Pass token='...' or text='...'.")
        for name, value in (("token", token), ("text", text)):
            if value is not None and (not isinstance(value, str) or not value):
                fail(name, "be a non-empty string", repr(value))
        limit = check_int_range("limit", limit, 1, 10**6)
        where, params = [], []
        if token is not None:
            where.append("lower(trim(e.token)) = lower(trim(?))")
            params.append(token)
        if text is not None:
            where.append("contains(lower(e.context), lower(?))")
            params.append(text)
        if layer is not None:
            where.append("e.layer = ?")
            params.append(self._check_layer(layer))
        return self.sql(
            "SELECT f.layer, f.neuron, f.cluster, f.size, f.label, count(*) AS matches "
            "FROM examples e JOIN features f USING (layer, neuron, cluster) "
            f"WHERE {' AND '.join(where)} GROUP BY ALL ORDER BY matches DESC, f.size DESC, f.layer, f.neuron, "
            f"f.cluster LIMIT {limit}", params)

    def neuron(self, layer: int, neuron: int) -> dict:
        """The `neurons` row of one neuron as a dict."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        rows = self.sql("SELECT * FROM neurons WHERE layer = ? AND neuron = ?", [layer, neuron])
        return rows.iloc[0].to_dict()

    def neuron_examples(self, layer: int, neuron: int) -> pd.DataFrame:
        """One neuron's `examples` rows, highest activation first."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        return self.sql("SELECT * FROM examples WHERE layer = ? AND neuron = ? ORDER BY act DESC, \"window\"",
                        [layer, neuron])

    def neuron_contexts(self, layer: int, neuron: int) -> pd.DataFrame:
        """One neuron's `contexts` rows (the shown examples' activations around the activating token)."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        return self.sql("SELECT \"window\", pos, start, acts FROM contexts WHERE layer = ? AND neuron = ?", [layer, neuron])

    def band_examples(self, layer: int, neuron: int, band: int | None = None) -> pd.DataFrame:
        """One neuron's sampled examples below the top (`bands` table), highest band first; one band or all.
        Empty when the atlas was built with `bands=0`."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        if not self.settings.bands:
            return pd.DataFrame(columns=["layer", "neuron", "band", "window", "pos", "act", "token", "start", "acts"])
        if band is None:
            return self.sql("SELECT * FROM bands WHERE layer = ? AND neuron = ? ORDER BY band DESC, act DESC",
                            [layer, neuron])
        band = check_int_range("band", band, 0, self.settings.bands - 1, what="(the atlas's bands)")
        return self.sql("SELECT * FROM bands WHERE layer = ? AND neuron = ? AND band = ? ORDER BY act DESC",
                        [layer, neuron, band])

    def similar_to(self, layer: int, neuron: int, cluster: int | None = None) -> pd.DataFrame:
        """Similar features of one neuron's features (one cluster, or all), most similar first."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        if cluster is None:
            return self.sql('SELECT * FROM "similar" WHERE layer = ? AND neuron = ? ORDER BY cluster, rank',
                            [layer, neuron])
        cluster = check_int_range("cluster", cluster, 0, 10**9)
        return self.sql('SELECT * FROM "similar" WHERE layer = ? AND neuron = ? AND cluster = ? ORDER BY rank',
                        [layer, neuron, cluster])

    # ------------------------------------------------------------------ windows and tokens

    @property
    def windows(self) -> Tensor:
        """The corpus windows `[n_windows, window]` the atlas was built on."""
        if self._windows is None:
            table = pd.read_parquet(self.path / "windows.parquet")
            self._windows = torch.as_tensor(np.stack(table["tokens"].to_numpy()).astype(np.int64))
        return self._windows

    @property
    def vocab(self) -> list[str]:
        """The text of every token id."""
        if self._vocab is None:
            self._vocab = pd.read_parquet(self.path / "vocab.parquet")["token"].tolist()
        return self._vocab

    def str_tokens(self, window: int) -> list[str]:
        """Token strings of one window."""
        window = check_int_range("window", window, 0, len(self.windows) - 1, what="(a window of this atlas)")
        vocab = self.vocab
        return [vocab[t] for t in self.windows[window].tolist()]

    @property
    def top(self) -> activations.TopActivations:
        """The collection (`activations.TopActivations`) as stored in the atlas."""
        if self._top is None:
            self._top = _read_top(_Folder(self.path, self.manifest))
        return self._top

    def polysemy(self, layer: int | None = None) -> pd.DataFrame:
        """The polysemy rows of `neurons` (`clustering.POLYSEMY_COLUMNS` plus `max_act, label`)."""
        if layer is None:
            return self.sql("SELECT * FROM neurons ORDER BY layer, neuron")
        return self.table("neurons", layer)

    # ------------------------------------------------------------------ the model, only when needed

    def check_model(self, model: Any) -> Any:
        """`model` if its weights are the ones the atlas was built from; else ValueError."""
        found = cache.model_fingerprint(model)
        if found != self.manifest["model"]["fingerprint"]:
            fail("model", "have the weights the atlas was built from", f"fingerprint {found[:12]} (atlas: "
                 f"{self.manifest['model']['fingerprint'][:12]})", "Load the model named in the atlas's manifest.")
        return model

    def load_model(self) -> Any:
        """The model the atlas was built from, loaded on first use (for token importance and live re-clustering)
        and checked against the atlas's fingerprint."""
        if self._model is None:
            from nbutils import models

            self._model = self.check_model(models.load_model(self.manifest["model"]["name"]))
        return self._model

    def info(self) -> str:
        """A few lines describing the atlas: model, corpus, settings, steps, sizes."""
        m, c, s = self.manifest["model"], self.manifest["corpus"], self.settings
        counts = self.sql('SELECT (SELECT count(*) FROM neurons) AS neurons, (SELECT count(*) FROM examples) AS '
                          'examples, (SELECT count(*) FROM features) AS features, (SELECT count(*) FROM "similar") AS '
                          'similar').iloc[0]
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        seconds = sum(step.get("seconds", 0.0) for step in self.manifest["steps"].values())
        return "\n".join([
            f"atlas     {self.path}",
            f"model     {m['name']} ({m['n_layers']} layers x {m['d_mlp']} neurons, d_model {m['d_model']}; "
            f"fingerprint {m['fingerprint'][:12]})",
            f"corpus    {c['source']}: {c['n_windows']} windows x {c['window']} tokens (fingerprint {c['fingerprint'][:12]})",
            f"settings  k={s.k} frac={s.frac} method={s.method} threshold={s.threshold} fold_ln={s.fold_ln} "
            f"min_size={s.min_size}",
            f"layers    {self.layers}",
            *([f"units     latents of {self.dictionary['saelens_hook']} ({self.dictionary['architecture']}, "
               f"d_sae {self.dictionary['d_sae']}; weights sha256 {self.dictionary['weights_hash'][:12]})"]
              if self.dictionary else []),
            f"tables    {counts['neurons']:,} neurons, {counts['examples']:,} examples, {counts['features']:,} "
            f"features, {counts['similar']:,} similar pairs",
            f"size      {size / 1e6:.1f} MB on disk; steps took {seconds:.1f} s",
        ])
