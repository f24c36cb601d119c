"""Examples across activation bands: for every neuron, a deterministic sample of tokens at every level of
activation, not only the top.

The interval (0, max] of each neuron (`max` from the top-k collection, `top.max_act`) is cut into `bands` equal
widths; band b holds activations in `(b / bands * max, (b + 1) / bands * max]` (band `bands - 1` is the top;
an activation above `max`, from windows the max was not taken on, counts in the top band). Every token of
the corpus is a candidate in the band of its activation, and each (neuron, band) keeps the `per_band`
candidates with the lowest *priority*, a fixed 64-bit hash of the token's global (window id, position).
So the sample is a uniform random sample of the band's tokens, it does not depend on the order or the
grouping in which windows are read, and two shards of a corpus merge into exactly the sample of one pass
(`merge`, the same "keep the lowest priorities" step). Memory is O(n_layers x d_mlp x bands x per_band),
whatever the size of the corpus.

`BandSamples.table` columns: `layer, neuron, band, window, pos, act`, sorted by layer, neuron, band
(highest band first) and priority.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils._validation import check_int_range, fail
from nbutils.models import check_windows, hook_name

__all__ = ["BandSamples", "collect_band_samples", "merge", "priority", "band_clusters", "BAND_CLUSTER_COLUMNS"]

_NONE = torch.iinfo(torch.int64).max  # priority of an empty slot: above every real one
_POS_BITS = 20  # a token's key is (window << _POS_BITS) | pos


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _wrap(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def priority(window: Int[Tensor, "*shape"], pos: Int[Tensor, "*shape"]) -> Int[Tensor, "*shape"]:
    """The sampling priority of tokens: splitmix64's finaliser of `(window << 20) | pos`, an invertible mix
    of 64 bits, so distinct tokens never share a priority. Returned as int64 (compare as signed)."""
    x = (window.long() << _POS_BITS) | pos.long()
    x = x + _wrap(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _wrap(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _wrap(0x94D049BB133111EB)
    x = x ^ _shr(x, 31)
    return x.masked_fill(x == _NONE, _NONE - 1)  # keep the empty marker free


@dataclass(eq=False)
class BandSamples:
    """Per neuron and activation band, a sample of tokens (lowest priorities first).

    Attributes:
        priority, window, pos: `[n_layers, d_mlp, bands, per_band]` int64 (`window` -1 in empty slots).
        act: `[n_layers, d_mlp, bands, per_band]` float32 activations (NaN in empty slots).
        max_act: `[n_layers, d_mlp]` the maxima the bands were cut from.
        window_ranges: the window ids read, as half-open `(start, stop)` ranges.
    """

    priority: Int[Tensor, "n_layers d_mlp bands per_band"]
    window: Int[Tensor, "n_layers d_mlp bands per_band"]
    pos: Int[Tensor, "n_layers d_mlp bands per_band"]
    act: Float[Tensor, "n_layers d_mlp bands per_band"]
    max_act: Float[Tensor, "n_layers d_mlp"]
    window_ranges: tuple[tuple[int, int], ...]
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def bands(self) -> int:
        return int(self.window.shape[2])

    @property
    def per_band(self) -> int:
        return int(self.window.shape[3])

    @property
    def table(self) -> pd.DataFrame:
        """`layer, neuron, band, window, pos, act`: the filled slots, by layer, neuron, band desc, priority."""
        if "table" not in self._tables:
            flipped = lambda t: t.flip(2)  # noqa: E731  (highest band first)
            filled = flipped(self.window) >= 0
            layer, neuron, band, _ = torch.nonzero(filled, as_tuple=True)
            self._tables["table"] = pd.DataFrame({
                "layer": layer.numpy().astype(np.int64),
                "neuron": neuron.numpy().astype(np.int64),
                "band": (self.bands - 1 - band).numpy().astype(np.int64),
                "window": flipped(self.window)[filled].numpy(),
                "pos": flipped(self.pos)[filled].numpy(),
                "act": flipped(self.act)[filled].numpy(),
            })
        return self._tables["table"]


def _empty(shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.full(shape, _NONE, dtype=torch.long), torch.full(shape, -1, dtype=torch.long),
            torch.zeros(shape, dtype=torch.long), torch.full(shape, float("nan")))


def _keep_lowest(state: tuple[Tensor, ...], cand: tuple[Tensor, ...], per_band: int) -> tuple[Tensor, ...]:
    """Merge candidates into the state along the last axis, keeping the `per_band` lowest priorities."""
    both = [torch.cat([a, b], dim=-1) for a, b in zip(state, cand)]  # [..., per_band + n_cand] each
    prio, idx = torch.topk(both[0], k=per_band, dim=-1, largest=False, sorted=True)
    return (prio, *(t.gather(-1, idx) for t in both[1:]))


_FIRST_TOKENS = 512  # while most samples are empty, a batch's first tokens are sampled alone first (see below)


def _batch_candidates(
    act: Float[Tensor, "n_tok d_mlp"], prio: Int[Tensor, "n_tok"], window: Int[Tensor, "n_tok"],
    pos: Int[Tensor, "n_tok"], max_act: Float[Tensor, "d_mlp"], bands: int, per_band: int,
    threshold: Int[Tensor, "d_mlp bands"] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each (neuron, band), the `per_band` lowest-priority tokens of one batch in that band that can enter the
    running sample, whose highest kept priority per (neuron, band) is `threshold` (`_NONE` while not full; None: an
    empty sample). Merged into the sample (`_keep_lowest`), they give the sample of the tokens seen so far.

    Two cuts keep the work small: a cheap superset of the tokens that can enter is found by one pass over `act`
    (`_superset_bounds`), then the exact test runs on those only. While most neurons' lowest band is still open (the
    first batch), the first `_FIRST_TOKENS` tokens are sampled alone first, and their per-band thresholds cut the
    rest of the batch.

    Returns (priority, window, pos, act), each `[d_mlp, bands, per_band]`, lowest priority first.
    """
    n_tok, d_mlp = act.shape
    if threshold is None:
        threshold = torch.full((d_mlp, bands), _NONE)
    positive = max_act > 0
    if n_tok > 2 * _FIRST_TOKENS and (threshold[positive, 0] == _NONE).float().mean() > 0.5:
        cut = _FIRST_TOKENS
        first = _batch_candidates(act[:cut], prio[:cut], window[:cut], pos[:cut], max_act, bands, per_band, threshold)
        rest = _batch_candidates(act[cut:], prio[cut:], window[cut:], pos[cut:], max_act, bands, per_band,
                                 torch.minimum(threshold, first[0][..., -1]))
        return _keep_lowest(first, rest, per_band)
    floor, loosest = _superset_bounds(threshold, max_act, per_band)
    keep = (act > 0) & positive & ((prio[:, None] < loosest) | (act >= floor))  # [n_tok, d_mlp]
    tok, neuron = torch.nonzero(keep, as_tuple=True)
    value = act[tok, neuron]
    band = (torch.ceil(value * bands / max_act[neuron]) - 1).clamp(min=0, max=bands - 1).long()
    exact = prio[tok] < threshold[neuron, band]
    tok, neuron, value, band = tok[exact], neuron[exact], value[exact], band[exact]
    shape = (d_mlp, bands, per_band)
    if len(tok) == 0:
        return _empty(shape)
    rank = torch.empty(n_tok, dtype=torch.long)
    rank[torch.argsort(prio)] = torch.arange(n_tok)  # each token's place in priority order
    order, entries = torch.sort((neuron * bands + band) * n_tok + rank[tok])  # by (neuron, band), then priority
    group = order // n_tok
    groups = torch.arange(d_mlp * bands)
    places = torch.searchsorted(group, groups)[:, None] + torch.arange(per_band)  # [d_mlp * bands, per_band]
    place = places.clamp(max=len(group) - 1)
    valid = (places < len(group)) & (group[place] == groups[:, None])  # the group's first per_band places
    entry = entries[place]
    t = tok[entry]
    return (prio[t].masked_fill(~valid, _NONE).reshape(shape), window[t].masked_fill(~valid, -1).reshape(shape),
            pos[t].masked_fill(~valid, 0).reshape(shape), value[entry].masked_fill(~valid, float("nan")).reshape(shape))


def _superset_bounds(threshold: Int[Tensor, "d_mlp bands"], max_act: Float[Tensor, "d_mlp"], per_band: int
                     ) -> tuple[Tensor, Tensor]:
    """Per neuron, a split band `s` and its bounds (floor, loosest) `[d_mlp]` each: a token can enter the sample
    only if `act >= floor` (it is in band `s` or above) or `prio < loosest` (the highest threshold of the bands
    below `s`, which must all be full). Any `s` up to the lowest open band is exact; the one chosen is the one
    that lets the fewest tokens through, estimated from the thresholds (a full band of threshold quantile q has
    seen about `per_band / q` tokens)."""
    d_mlp, bands = threshold.shape
    full = threshold < _NONE
    quantile = torch.where(full, (threshold.double() + 2.0**63) / 2.0**64, 1.0)  # priorities are uniform int64
    seen = torch.where(full, per_band / quantile.clamp(min=1e-300), float(per_band))  # [d_mlp, bands]
    zero = torch.zeros(d_mlp, 1, dtype=torch.float64)
    below = torch.cat([zero, seen.cumsum(1)], 1)  # [d_mlp, bands + 1]: tokens in the bands below s
    through = (below[:, -1:] - below) + torch.cat([zero, quantile.cummax(1).values], 1) * below
    lowest_open = torch.where(full, bands, torch.arange(bands)).amin(dim=1)  # [d_mlp]
    split = through.masked_fill(torch.arange(bands + 1) > lowest_open[:, None], float("inf")).argmin(1)  # [d_mlp]
    highest = torch.where(full, threshold, torch.iinfo(torch.int64).min).cummax(1).values
    loosest = torch.cat([torch.full((d_mlp, 1), torch.iinfo(torch.int64).min), highest], 1).gather(1, split[:, None])
    floor = torch.where(split < bands, split / bands * max_act, torch.inf) * (1 - 1e-6)  # below band s by rounding
    return floor, loosest[:, 0]


def collect_band_samples(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    max_act: Float[Tensor, "n_layers d_mlp"],
    *,
    bands: int = 10,
    per_band: int = 8,
    batch_size: int = 64,
    window_offset: int = 0,
    progress: bool = True,
) -> BandSamples:
    """Sample `per_band` tokens per (neuron, activation band) of every layer in one streaming pass.

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: token windows `[n_windows, window]`.
        max_act: `[n_layers, d_mlp]` each neuron's max activation (`top.max_act`); neurons with max <= 0
            get no samples.
        bands: equal-width bands of (0, max].
        per_band: tokens kept per (neuron, band).
        batch_size: windows per forward pass.
        window_offset: id of the first window, to sample one shard of a larger corpus (`merge`).
        progress: show a tqdm bar.

    Returns:
        `BandSamples`; `.table` is `layer, neuron, band, window, pos, act`.
    """
    from tqdm.auto import tqdm

    windows = check_windows(model, windows)
    bands = check_int_range("bands", bands, 1, 1000)
    per_band = check_int_range("per_band", per_band, 1, 100_000)
    batch_size = check_int_range("batch_size", batch_size, 1, 2**31 - 1)
    window_offset = check_int_range("window_offset", window_offset, 0, 2**40)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    max_act = torch.as_tensor(max_act, dtype=torch.float32).cpu()
    if tuple(max_act.shape) != (n_layers, d_mlp):
        fail("max_act", f"have shape [n_layers, d_mlp] = [{n_layers}, {d_mlp}] (`top.max_act`)", tuple(max_act.shape))
    n_windows, n_pos = windows.shape
    if n_pos >= 1 << _POS_BITS:
        fail("windows", f"be shorter than {1 << _POS_BITS} tokens", n_pos)
    state = _empty((n_layers, d_mlp, bands, per_band))
    names = [hook_name(layer, "post", model) for layer in range(n_layers)]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in tqdm(range(0, n_windows, batch_size), desc="band samples", disable=not progress):
            batch = windows[start : start + batch_size]  # [batch, window]
            _, cache = model.run_with_cache(batch.to(device), names_filter=names, stop_at_layer=n_layers)
            wid = torch.arange(start, start + len(batch)).repeat_interleave(n_pos) + window_offset  # [n_tok]
            pos = torch.arange(n_pos).repeat(len(batch))  # [n_tok]
            prio = priority(wid, pos)
            cand = [_batch_candidates(cache[name].float().cpu().reshape(-1, d_mlp), prio, wid, pos, max_act[layer],
                                      bands, per_band, threshold=state[0][layer, :, :, -1])
                    for layer, name in enumerate(names)]
            cand = tuple(torch.stack(parts) for parts in zip(*cand))  # [n_layers, d_mlp, bands, per_band] each
            state = _keep_lowest(state, cand, per_band)
    return BandSamples(*state, max_act=max_act,
                       window_ranges=((window_offset, window_offset + n_windows),))


def merge(a: BandSamples, b: BandSamples) -> BandSamples:
    """Combine the samples of two disjoint shards of a corpus; identical to one pass over their union.

    Both must use the same maxima, bands and per_band; collect each shard with `window_offset` set to its
    first window's id in the whole corpus.

    Raises:
        ValueError: different maxima or settings, or overlapping window ids.
    """
    if a.window.shape != b.window.shape:
        fail("shards", "have the same layers, neurons, bands and per_band",
             f"shapes {tuple(a.window.shape)} and {tuple(b.window.shape)}")
    if not torch.equal(a.max_act, b.max_act):
        fail("shards", "be cut from the same maxima (`max_act`)", "different maxima",
             "Pass the same `top.max_act` to every shard.")
    for lo, hi in a.window_ranges:
        for lo2, hi2 in b.window_ranges:
            if lo < hi2 and lo2 < hi:
                fail("shards", "cover disjoint window ids", f"overlap of [{lo}, {hi}) and [{lo2}, {hi2})",
                     "Collect each shard with `window_offset` = its first window's id in the whole corpus.")
    state = _keep_lowest((a.priority, a.window, a.pos, a.act), (b.priority, b.window, b.pos, b.act), a.per_band)
    return BandSamples(*state, max_act=a.max_act, window_ranges=tuple(sorted(a.window_ranges + b.window_ranges)))


BAND_CLUSTER_COLUMNS = ("layer", "neuron", "band", "n_examples", "n_clusters", "effective_clusters", "top_clusters",
                        "fit")


def band_clusters(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    top: Any,
    sample: BandSamples,
    layer: int,
    neurons: Any,
    *,
    method: str | None = None,
    threshold: float | int | None = None,
    min_size: int = 3,
    examples: Any = None,
) -> pd.DataFrame:
    """Do a neuron's top clusters persist, split or vanish below the top? Cluster each band's sample of each
    neuron on its own, and match every band example to the nearest top cluster.

    The top clusters are the clusters of the neuron's top examples (`clustering.cluster` of their neuron
    embeddings, those of at least `min_size` examples); each is represented by the mean direction of its
    members' unit embeddings. The band examples of all `neurons` are read in one batched pass.

    Args:
        model, windows, top: as in `clustering.polysemy_table`; `sample` from `collect_band_samples`.
        layer: MLP layer; neurons: live neurons of it.
        method, threshold: as in `clustering.cluster`.
        min_size: smallest top cluster that counts.
        examples: this layer's `clustering.layer_examples(...)`, if already read.

    Returns:
        DataFrame, one row per (neuron, band) with examples: `layer, neuron, band, n_examples, n_clusters,
        effective_clusters` (of the band's own clusters), `top_clusters` (how many top clusters are the
        nearest one of at least `min_size` band examples) and `fit` (mean cosine of the band examples to their
        nearest top cluster over the same for the top examples themselves: 1 = as close as the top examples).
    """
    from nbutils import clustering
    from nbutils.models import check_neuron

    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer)
    neurons = [check_neuron(model, n) for n in np.atleast_1d(np.asarray(neurons))]
    table = sample.table
    table = table[(table.layer == lx.layer) & table.neuron.isin(neurons)]
    h = clustering._pre_mlp_vectors(model, windows, lx.layer, table.window.to_numpy(), table.pos.to_numpy(),
                                    fold_ln=True)  # [n_rows, d_model]
    rows = []
    for neuron in neurons:
        e_top = lx.embeddings(neuron)  # [n_top, d_model]
        if len(e_top) == 0:
            continue
        top_labels = clustering.cluster(e_top, method=method, threshold=threshold)
        big = np.flatnonzero(np.bincount(top_labels) >= min_size)
        if big.size == 0:
            continue
        u_top = _unit(e_top)
        centres = _unit(np.stack([u_top[top_labels == c].mean(axis=0) for c in big]))  # [n_big, d_model]
        own = (u_top[np.isin(top_labels, big)] @ centres.T).max(axis=1).mean()  # top examples to their centre
        mine = (table.neuron == neuron).to_numpy()
        for band, part in table[mine].groupby("band").indices.items():
            u = _unit(h[np.flatnonzero(mine)[part]] * lx.W[:, neuron])  # [n_band, d_model]
            labels = clustering.cluster(u, method=method, threshold=threshold)
            cos = u @ centres.T  # [n_band, n_big]
            nearest = np.bincount(cos.argmax(axis=1), minlength=len(big))
            rows.append((lx.layer, neuron, int(band), len(part), int(labels.max()) + 1,
                         clustering.effective_n_clusters(labels), int((nearest >= min_size).sum()),
                         float(cos.max(axis=1).mean() / own)))
    return pd.DataFrame(rows, columns=list(BAND_CLUSTER_COLUMNS))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
