"""The `similar` step: every feature's nearest features of other neurons, scored by shared examples and by cross
activation (the other neuron run on this feature's top examples)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from nbutils.atlas.settings import CROSS_MEMBERS, AtlasSettings
from nbutils.atlas.units import NEURONS, Units
from nbutils.cache import CacheError
from nbutils.passes import read_layers

__all__ = ["EXAMPLE_COLUMNS", "similar_table"]

EXAMPLE_COLUMNS = ["layer", "neuron", "cluster", "window", "pos", "act"]  # what the similar step reads of `examples`


# The nearest search ranks candidates in bfloat16 (8 significant bits) and proves them in float32: every row keeps
# the `k + CANDIDATE_EXTRA` best columns by the bfloat16 product, and is re-searched in float32 when those cannot be
# shown to hold its exact k best (`_outside_bound`).
CANDIDATE_EXTRA = 27
_BF16_EPS = 2.0**-8  # unit roundoff of bfloat16


def _nearest_other(u: np.ndarray, owner: np.ndarray, k: int, chunk_bytes: int = 1 << 28, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows by cosine among rows of *other* owners (neurons). `u` unit rows `[n, d]` float32.
    Returns (indices `[n, k]`, -1 where fewer exist; similarities `[n, k]` float32), most similar first, equal
    similarities by index.

    Blocks of rows are multiplied with all rows in bfloat16, which is several times faster than float32 on CPUs
    and GPUs with bfloat16 units; each row keeps its `k + CANDIDATE_EXTRA` best candidates, re-ranked exactly in
    float32. A row is proven when its k-th best exact similarity beats the most any column outside its candidates
    can reach given the bfloat16 rounding (`_outside_bound`, a worst-case bound, not an estimate); the few rows that
    are not are searched again in float32 against every row. So the result is the exact search's."""
    from tqdm.auto import tqdm

    n = len(u)
    kk = min(k, n)
    order = np.argsort(owner, kind="stable")  # an owner's rows are contiguous: its mask is one band per block
    in_order = bool((order == np.arange(n)).all())  # as `similar_table` gives them: no copy
    u32 = torch.from_numpy(np.ascontiguousarray(u if in_order else u[order], dtype=np.float32))  # [n, d]
    own = torch.from_numpy(np.asarray(owner)[order])
    own_from, own_to = torch.searchsorted(own, own), torch.searchsorted(own, own, right=True)  # [n] each
    u16 = u32.bfloat16()
    bound = _outside_bound(u32, u16)  # [n] slack to add to a row's bfloat16 similarities
    n_cand = min(n, kk + CANDIDATE_EXTRA)
    step = max(1, chunk_bytes // max(1, 2 * n))
    best = torch.full((n, kk), float("-inf"))  # [n, kk] exact similarities, best first
    where = torch.full((n, kk), -1, dtype=torch.int64)
    unproven = []
    for lo in tqdm(range(0, n, step), desc="nearest features", unit="block", disable=not progress):
        hi = min(lo + step, n)
        block = u16[lo:hi] @ u16.T  # [hi - lo, n] bfloat16
        a, b = int(own_from[lo]), int(own_to[hi - 1])  # the block's own-owner columns lie in [a, b)
        block[:, a:b].masked_fill_(own[lo:hi, None] == own[None, a:b], float("-inf"))
        approx, cand = torch.topk(block, n_cand, dim=1)  # [hi - lo, n_cand]
        del block
        exact = torch.einsum("rcd,rd->rc", u32[cand], u32[lo:hi]).masked_fill_(approx.isinf(), float("-inf"))
        vals, at = torch.topk(exact, kk, dim=1)
        best[lo:hi], where[lo:hi] = vals, torch.gather(cand, 1, at).masked_fill_(vals.isinf(), -1)
        floor = approx[:, -1].double()  # the most a column outside the candidates has in bfloat16
        reach = floor + _BF16_EPS * floor.abs() / (1 - _BF16_EPS) + bound[lo:hi]
        unproven.append(lo + torch.nonzero(~(vals[:, -1].double() > reach) & ~floor.isinf()).flatten())
    rows = torch.cat(unproven)
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        best[r], where[r] = _exact_rows(u32, own, r, kk)
    back = np.asarray(order)
    vals, part = np.empty((n, kk), dtype=np.float32), np.empty((n, kk), dtype=np.int64)
    vals[back], part[back] = best.numpy(), np.where(where.numpy() >= 0, back[where.numpy().clip(0)], -1)
    part = np.where(np.isfinite(vals), part, np.iinfo(np.int64).max)  # missing neighbours sort last
    ordered = np.lexsort((part, -vals), axis=1)  # by similarity desc, then index
    part, vals = np.take_along_axis(part, ordered, axis=1), np.take_along_axis(vals, ordered, axis=1)
    valid = np.isfinite(vals)
    ind = np.full((n, k), -1, dtype=np.int64)
    sim = np.full((n, k), np.nan, dtype=np.float32)
    ind[:, :kk] = np.where(valid, part, -1)
    sim[:, :kk] = np.where(valid, vals, np.nan)
    return ind, sim


def _exact_rows(u32: Tensor, own: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The float32 search of `rows` against every row: (similarities, indices) `[len(rows), k]`, -1 where none."""
    block = u32[rows] @ u32.T  # [len(rows), n]
    block.masked_fill_(own[rows, None] == own[None, :], float("-inf"))
    vals, at = torch.topk(block, k, dim=1)
    return vals, at.masked_fill_(vals.isinf(), -1)


def _outside_bound(u32: Tensor, u16: Tensor) -> Tensor:
    """`[n]` float64: the most `u32[i] @ u32[j]` can exceed the bfloat16 product `u16[i] @ u16[j]` (before its own
    rounding to bfloat16) for any j. With `r = u32 - u16`, the exact product differs by `r_i · u_j + u16_i · r_j`
    (Cauchy-Schwarz bounds each term), and products of bfloat16 numbers are exact in float32, so the float32
    accumulation over d terms adds at most `d 2^-24 / (1 - d 2^-24) |u16_i| |u16_j|` (taken twice, for kernels
    that add pairs first)."""
    d = u32.shape[1]
    r, n32, n16 = (torch.empty(len(u32), dtype=torch.float64) for _ in range(3))  # [n] each
    for lo in range(0, len(u32), 4096):  # in float64, a block of rows at a time
        rows = slice(lo, lo + 4096)
        a, b = u32[rows].double(), u16[rows].double()
        r[rows], n32[rows], n16[rows] = (a - b).norm(dim=1), a.norm(dim=1), b.norm(dim=1)
    gamma = 2 * d * 2.0**-24 / (1 - d * 2.0**-24)
    return r * n32.max() + n16 * r.max() + gamma * n16 * n16.max() + 1e-12


def _cross_acts(model: Any, windows: Tensor, window: np.ndarray, pos: np.ndarray, layer: np.ndarray,
                neuron: np.ndarray, batch_size: int, progress: bool = False, units: Units = NEURONS) -> np.ndarray:
    """Activation of unit (`layer[i]`, `neuron[i]`) at (`window[i]`, `pos[i]`) for every request i `[n]`, from
    one pass over the distinct windows in batches of `batch_size` (`passes.read_layers`)."""
    act_kind = units.kinds(model, True)[1]
    values = np.zeros(len(window), dtype=np.float32)
    if len(window) == 0:
        return values
    order = np.argsort(window, kind="stable")  # requests by window
    unique, starts = np.unique(window[order], return_index=True)
    starts = np.append(starts, len(order))

    def on_layer(l: int, read: dict[str, Tensor], lo: int, hi: int) -> None:
        rows = order[starts[lo] : starts[hi]]  # the requests of these windows
        rows = rows[layer[rows] == l]
        local = np.searchsorted(unique[lo:hi], window[rows])  # [rows] window's row in the batch
        acts = units.act(read[act_kind])  # [batch, pos, n_units]
        values[rows] = acts[torch.as_tensor(local), torch.as_tensor(pos[rows].astype(np.int64)),
                            torch.as_tensor(neuron[rows].astype(np.int64))].float().cpu().numpy()

    read_layers(model, windows[torch.as_tensor(unique)], np.unique(layer).tolist(), (act_kind,), on_layer,
                batch_size=batch_size, progress=progress, desc="cross activations")
    return values


@torch.inference_mode()
def _stored_cross_acts(model: Any, residuals: Any, window: np.ndarray, pos: np.ndarray, layer: np.ndarray,
                       neuron: np.ndarray, chunk: int = 1 << 11) -> np.ndarray:
    """`_cross_acts` of MLP neurons from a usable `residuals.ResidualStore`: per layer, each requested token's stored
    row runs once through the layer's norm, then each request is one dot product with its neuron's input weights
    (the unfolded convention, `embeddings.mlp_in_weights(fold_ln=False)`) and the activation function. No forward
    pass; equal to one to float rounding (tested). `chunk` requests are computed at a time: small enough that their
    gathered rows stay in the CPU's cache (at GPT-2-small shape 2,048 took a quarter of the time of 32,768)."""
    from nbutils import embeddings, mlp_forward
    from nbutils.models import is_gated
    from nbutils.residuals import replay_modules

    forward = mlp_forward.mlp_forward(model, True)
    device = next(model.parameters()).device
    values = np.zeros(len(window), dtype=np.float32)
    n_pos = residuals.shape[1]
    plan = replay_modules(forward, np.unique(layer).tolist())
    for l, (norm, _) in plan.items():
        weights = [embeddings.mlp_in_weights(model, l, fold_ln=False, kind=kind)
                   for kind in (("gate", "up") if is_gated(model) else (None,))]
        weights = [(W.T.contiguous().to(device), b.to(device)) for W, b in weights]  # [d_mlp, d_model], [d_mlp]
        req = np.flatnonzero(layer == l)
        unique, inverse = np.unique(window[req].astype(np.int64) * n_pos + pos[req], return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")  # requests by token
        for index, rows in residuals.read_tokens(l, unique // n_pos, unique % n_pos):  # contiguous runs of tokens
            x = norm(rows.to(device)).float()  # [n_tokens, d_model], what the MLP's in-projection reads
            first, last = np.searchsorted(inverse[order], [index[0], index[-1] + 1])
            for a in range(first, last, chunk):
                r = order[a : min(a + chunk, last)]  # requests of these tokens
                xs = x[torch.as_tensor(inverse[r] - index[0])]
                js = torch.as_tensor(neuron[req[r]].astype(np.int64), device=device)
                pres = [(Wt[js].mul_(xs).sum(-1) + b[js]).double().cpu().numpy() for Wt, b in weights]  # one [n, d]
                values[req[r]] = embeddings.mlp_activation(model, *pres).astype(np.float32)
    return values


def similar_table(model: Any, windows: Tensor, features: pd.DataFrame, vectors: Callable[[int], pd.DataFrame],
                  examples: Callable[[int], pd.DataFrame], max_act: np.ndarray, settings: AtlasSettings,
                  n_pos: int, progress: bool = False, units: Units = NEURONS, residuals: Any = None) -> pd.DataFrame:
    """The `similar` step: for every feature, its `n_similar` nearest features of other neurons (any layer).

    Args:
        features: the `features` rows of all layers; vectors: layer -> the central embeddings of that layer's
            features (`layer, neuron, cluster, vector`); examples: layer -> that layer's `examples` table
            (`EXAMPLE_COLUMNS` are enough); max_act: `[n_layers, n_units]`, indexed by layer; units: neurons or
            a dictionary's latents (`Units`), whose activations the cross activation reads; residuals: a usable
            `residuals.ResidualStore` of these windows, from which the cross activations of neurons are computed
            without running the model (`_stored_cross_acts`).

    Memory: the unit feature vectors (`[n_features, d_model]` float32, filled a layer at a time), one layer's
    examples at a time, every feature's example keys (int64, one per example of a feature), and
    `n_features * n_similar * CROSS_MEMBERS` cross-activation requests (a few int32 arrays), in plain numpy.
    """
    columns = ["layer", "neuron", "cluster", "rank", "other_layer", "other_neuron", "other_cluster", "other_size",
               "similarity", "shared_examples", "cross_act"]
    feats = _Features.of(features, int(max_act.shape[1]))
    if feats.n < 2:
        return pd.DataFrame(columns=columns)
    u = _unit_vectors(feats, vectors)
    ind, sim = _nearest_other(u, feats.owner, settings.n_similar, progress=progress)
    del u
    i_idx, rank = np.nonzero(ind >= 0)
    j_idx = ind[i_idx, rank]
    pairs = pd.DataFrame({  # one row per (feature, rank)
        "layer": feats.layer[i_idx], "neuron": feats.neuron[i_idx], "cluster": feats.cluster[i_idx],
        "rank": rank.astype(np.int64), "other_layer": feats.layer[j_idx], "other_neuron": feats.neuron[j_idx],
        "other_cluster": feats.cluster[j_idx], "other_size": feats.size[j_idx],
        "similarity": sim[i_idx, rank].astype(np.float32),
    })
    members, tops = _example_keys(feats, examples, n_pos)
    pairs["shared_examples"] = _jaccard(members, i_idx, j_idx)
    del members
    pairs["cross_act"] = _mean_cross_act(model, windows, feats, tops, i_idx, j_idx, max_act, settings, n_pos, progress,
                                         units, residuals)
    return pairs[columns].sort_values(["layer", "neuron", "cluster", "rank"]).reset_index(drop=True)


@dataclass
class _Features:
    """The features sorted by `(layer, neuron, cluster)` as flat arrays `[n]`; `owner` is the neuron's id."""

    layer: np.ndarray
    neuron: np.ndarray
    cluster: np.ndarray
    size: np.ndarray
    d_mlp: int

    @classmethod
    def of(cls, features: pd.DataFrame, d_mlp: int) -> "_Features":
        keys = ["layer", "neuron", "cluster"]
        feats = features[keys + ["size"]].sort_values(keys)
        return cls(*(feats[c].to_numpy(np.int64) for c in keys + ["size"]), d_mlp=d_mlp)

    @property
    def n(self) -> int:
        return len(self.layer)

    @property
    def owner(self) -> np.ndarray:
        return self.layer * self.d_mlp + self.neuron

    def index(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Each row's feature (index into these arrays) and whether it has one (clusters too small to be features
        don't)."""
        code = self.owner << 32 | self.cluster  # sorted, as the features are
        row_code = (table["layer"].to_numpy(np.int64) * self.d_mlp + table["neuron"].to_numpy(np.int64)) << 32 \
            | table["cluster"].to_numpy(np.int64)
        fid = np.minimum(np.searchsorted(code, row_code), self.n - 1)
        return fid, code[fid] == row_code


def _unit_vectors(feats: _Features, vectors: Callable[[int], pd.DataFrame]) -> np.ndarray:
    """Every feature's central embedding as a unit row `[n_features, d_model]` float32, read a layer at a time."""
    u, found = None, np.zeros(feats.n, dtype=bool)
    for layer in np.unique(feats.layer):
        v = vectors(int(layer))
        if v.empty:
            continue  # its features are reported missing below
        fid, ok = feats.index(v)
        if u is None:
            u = np.zeros((feats.n, len(v["vector"].iloc[0])), dtype=np.float32)  # [n_features, d_model]
        if ok.any():
            u[fid[ok]] = np.stack(v["vector"].to_numpy()[ok])
        found[fid[ok]] = True
        del v
    if not found.all():
        raise CacheError(f"{int((~found).sum())} features have no stored central embedding; rebuild the atlas.")
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), np.finfo(np.float32).tiny)  # unit rows, in place
    return u


Ragged = tuple[np.ndarray, np.ndarray]  # (values, offsets [n_features + 1]): feature i's are values[off[i]:off[i+1]]


def _example_keys(feats: _Features, examples: Callable[[int], pd.DataFrame], n_pos: int) -> tuple[Ragged, Ragged]:
    """Every feature's example keys `window * n_pos + pos`, sorted (for the overlap), and its `CROSS_MEMBERS`
    highest examples' keys (the examples a similar feature's neuron is run on); one layer's examples at a time."""
    member_parts, member_feat, top_parts = [], [], []
    for layer in np.unique(feats.layer):
        ex = examples(int(layer))
        fid, keep = feats.index(ex)
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
    ends = np.arange(feats.n + 1)
    members = (np.concatenate(member_parts), np.searchsorted(np.concatenate(member_feat), ends))
    tops = (np.concatenate([t[1] for t in top_parts]), np.searchsorted(np.concatenate([t[0] for t in top_parts]), ends))
    return members, tops


def _jaccard(members: Ragged, i_idx: np.ndarray, j_idx: np.ndarray) -> np.ndarray:
    """Jaccard overlap of the example sets of features `i_idx[r]` and `j_idx[r]`, for every pair r `[n_pairs]`."""
    key, off = members
    shared = np.zeros(len(i_idx), dtype=np.float32)
    for r, (i, j) in enumerate(zip(i_idx.tolist(), j_idx.tolist())):
        a, b = key[off[i] : off[i + 1]], key[off[j] : off[j + 1]]
        inter = len(np.intersect1d(a, b, assume_unique=True))
        shared[r] = inter / (len(a) + len(b) - inter)
    return shared


def _mean_cross_act(model: Any, windows: Tensor, feats: _Features, tops: Ragged, i_idx: np.ndarray,
                    j_idx: np.ndarray, max_act: np.ndarray, settings: AtlasSettings, n_pos: int, progress: bool,
                    units: Units = NEURONS, residuals: Any = None) -> np.ndarray:
    """Per pair `[n_pairs]`: mean activation of feature `j_idx[r]`'s neuron on feature `i_idx[r]`'s top examples,
    over that neuron's max activation; the requests are flat int32 arrays."""
    tm_key, tm_offsets = tops
    counts = (tm_offsets[1:] - tm_offsets[:-1])[i_idx]  # [n_pairs] requests of each pair
    pair = np.repeat(np.arange(len(i_idx), dtype=np.int64), counts)  # [n_requests]
    member = np.repeat(tm_offsets[:-1][i_idx], counts) + (np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts,
                                                                                            counts))
    req_key = tm_key[member]
    del member
    other_layer, other_neuron = feats.layer[j_idx][pair], feats.neuron[j_idx][pair]
    request = ((req_key // n_pos).astype(np.int32), (req_key % n_pos).astype(np.int32), other_layer.astype(np.int32),
               other_neuron.astype(np.int32))
    if residuals is not None and residuals.usable and units.dictionary is None:
        vals = _stored_cross_acts(model, residuals, *request)
    else:
        vals = _cross_acts(model, windows, *request, settings.batch_size, progress, units)
    del req_key
    scale = max_act[other_layer, other_neuron].astype(np.float64)
    rel = np.where(scale > 0, vals / np.where(scale > 0, scale, 1.0), np.nan)
    sums = np.bincount(pair, weights=rel, minlength=len(i_idx))
    return (sums / np.maximum(counts, 1)).astype(np.float32)
