"""Similar features across the neurons of a layer: nearest clusters by their central examples.

Every cluster (of at least `min_size` examples) of every live neuron of a layer is one *feature*,
represented by its central example (`clustering.central_example`) in two spaces:

- `"embedding"`: the central example's neuron embedding `h ⊙ w_neuron` (the paper's choice);
- `"h"`: the central example's plain pre-MLP vector `h` (the baseline).

Nearest neighbours by cosine similarity, among features of *other* neurons, come from pynndescent (the
approximate index that ships with umap-learn) or from an exact search. pynndescent compiles its code with
numba on first use in a process (about a minute on 2 CPU cores), so `backend="auto"` uses the exact
search, which is also faster, up to `EXACT_MAX` features and pynndescent above.

Each neighbour pair is scored against two things that need no labels:

- `shared_examples`: Jaccard overlap of the two features' example sets ((window, pos) pairs);
- `cross_act`: mean activation of the neighbour's neuron on this feature's examples, relative to that
  neuron's max activation (1 = the other neuron fires on these examples as hard as on its own best).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from nbutils import clustering, embeddings
from nbutils._validation import check_choice, check_int_range, check_matrix, check_positive_int

__all__ = ["SPACES", "BACKENDS", "EXACT_MAX", "LayerFeatures", "layer_features", "nearest_neighbours",
           "similar_features"]

SPACES = ("embedding", "h")
BACKENDS = ("auto", "exact", "pynndescent")
EXACT_MAX = 20_000  # features; the exact search holds a [chunk, n] similarity block at a time


@dataclass(frozen=True)
class LayerFeatures:
    """The features (clusters) of one layer and their central-example vectors.

    Attributes:
        table: one row per feature: `layer, neuron, cluster, size, window, pos, act` (the central example).
        vectors: `{space: [n_features, d_model]}` for each of `SPACES`.
        members: `[n_features]` list of int arrays, each feature's example keys `window * n_pos + pos`.
        cross_act: `[n_features, d_mlp]` mean activation of every neuron of the layer on each feature's
            examples, divided by that neuron's max activation over the corpus.
    """

    table: pd.DataFrame
    vectors: dict[str, np.ndarray]
    members: list[np.ndarray]
    cross_act: np.ndarray


def layer_features(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    *,
    method: str | None = None,
    threshold: float | int | None = None,
    min_size: int = 3,
    fold_ln: bool = True,
    batch_size: int = 64,
    examples: "clustering.LayerExamples | None" = None,
) -> LayerFeatures:
    """Cluster every live neuron of `layer` (one batched pass for h, as `clustering.polysemy_table`) and
    keep the clusters of at least `min_size` examples as features. `examples`: this layer's
    `clustering.layer_examples(...)`, if already read. Computed in memory: an interrupted call keeps nothing
    (call again; the feature atlas, `nbutils.atlas`, stores finished layers)."""
    from threadpoolctl import threadpool_limits

    min_size = check_int_range("min_size", min_size, 1, 10**9)
    batch_size = check_positive_int("batch_size", batch_size)
    method = check_choice("method", clustering.DEFAULT_METHOD if method is None else method, clustering.METHODS)
    t = clustering._check_threshold(method, threshold)
    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer, fold_ln=fold_ln,
                                                                         batch_size=batch_size)
    layer, ex, unique, inverse, bounds, n_pos = lx.layer, lx.examples, lx.keys, lx.inverse, lx.bounds, lx.n_pos
    h, W = lx.h, lx.W
    acts = embeddings.neuron_outputs(model, layer, h, fold_ln=fold_ln)  # [n_unique, d_mlp] every neuron, every example
    max_act = top.max_act[layer].numpy().astype(np.float64)  # [d_mlp]
    scale = np.where(max_act > 0, max_act, np.nan)
    acts_ex = ex["act"].to_numpy()
    rows, emb, hv, members, cross = [], [], [], [], []
    with threadpool_limits(1):
        for neuron in range(model.cfg.d_mlp):
            lo, hi = bounds[neuron], bounds[neuron + 1]
            if hi - lo < min_size:
                continue
            idx = inverse[lo:hi]
            e = h[idx] * W[:, neuron]  # [n, d_model]
            sim = clustering.cosine_similarity(e)
            labels = clustering._labels_from_similarity(sim, method, t)
            centres = clustering._central_from_similarity(sim, labels)
            sizes = np.bincount(labels)
            for c in np.flatnonzero(sizes >= min_size):
                centre = centres[c]
                mine = idx[labels == c]
                rows.append((layer, neuron, int(c), int(sizes[c]), int(unique[idx[centre]] // n_pos),
                             int(unique[idx[centre]] % n_pos), float(acts_ex[lo + centre])))
                emb.append(e[centre])
                hv.append(h[idx[centre]])
                members.append(unique[mine])
                cross.append(acts[mine].mean(axis=0) / scale)
    d = model.cfg.d_model
    table = pd.DataFrame(rows, columns=["layer", "neuron", "cluster", "size", "window", "pos", "act"])
    vectors = {"embedding": np.array(emb).reshape(-1, d), "h": np.array(hv).reshape(-1, d)}
    return LayerFeatures(table=table, vectors=vectors, members=members,
                         cross_act=np.array(cross).reshape(-1, model.cfg.d_mlp))


def nearest_neighbours(
    x: Float[np.ndarray, "n d"],
    k: int,
    *,
    backend: str = "auto",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest rows of each row of `x` by cosine similarity, itself excluded.

    Args:
        x: vectors `[n, d]`, at least two rows (a row is never its own neighbour).
        k: neighbours per row (at most n - 1).
        backend: `"exact"`, `"pynndescent"` or `"auto"` (exact up to `EXACT_MAX` rows).
        seed: pynndescent's `random_state`.

    Returns:
        `(indices [n, k], similarities [n, k])`, most similar first.
    """
    x = check_matrix("x", x, min_rows=2)
    backend = check_choice("backend", backend, BACKENDS)
    n = x.shape[0]
    k = check_int_range("k", k, 1, n - 1, what="(at most the number of rows - 1)")
    if backend == "pynndescent" or (backend == "auto" and n > EXACT_MAX):
        from pynndescent import NNDescent

        index = NNDescent(x.astype(np.float32), metric="cosine", n_neighbors=min(n - 1, k + 1), random_state=seed)
        ind, dist = index.neighbor_graph  # [n, k + 1], self first (distance 0) in the usual case
        ind, sim = ind.astype(np.int64), 1.0 - dist.astype(np.float64)
        rows = []
        for i in range(n):
            keep = ind[i] != i
            rows.append((ind[i][keep][:k], sim[i][keep][:k]))
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.where(norms > 0, norms, 1.0)  # [n, d]
    ind = np.zeros((n, k), dtype=np.int64)
    sim = np.zeros((n, k))
    for start in range(0, n, 2048):
        block = u[start : start + 2048] @ u.T  # [chunk, n]
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf  # not itself
        part = np.argpartition(-block, k - 1, axis=1)[:, :k]  # [chunk, k] unordered
        vals = np.take_along_axis(block, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        ind[start : start + len(block)] = np.take_along_axis(part, order, axis=1)
        sim[start : start + len(block)] = np.take_along_axis(vals, order, axis=1)
    return ind, sim


def similar_features(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    *,
    k: int = 5,
    spaces: tuple[str, ...] = SPACES,
    method: str | None = None,
    threshold: float | int | None = None,
    min_size: int = 3,
    backend: str = "auto",
    seed: int = 0,
    features: LayerFeatures | None = None,
) -> pd.DataFrame:
    """Nearest features of other neurons of the same layer, in neuron-embedding space and in h space.

    Args:
        model, windows, top: as in `clustering.polysemy_table`.
        layer: MLP layer.
        k: neighbours per feature.
        spaces: which of `SPACES` to search.
        method, threshold: clustering, as in `clustering.cluster`.
        min_size: smallest cluster that counts as a feature.
        backend: nearest-neighbour search (`nearest_neighbours`).
        seed: pynndescent's random state.
        features: precomputed `layer_features(...)` of this layer, to search several ways without
            clustering again.

    Returns:
        DataFrame, one row per (space, feature, rank): `space, layer, neuron, cluster, size, rank,
        other_neuron, other_cluster, other_size, similarity, shared_examples, cross_act` (module docstring).
        Empty, with `attrs["reason"]`, when the layer has fewer than two neurons with features.

    Computed in memory: an interrupted call keeps nothing and a new call starts again.
    """
    for space in spaces:
        check_choice("spaces", space, SPACES)
    k = check_int_range("k", k, 1, 10**6)
    if features is None:
        features = layer_features(model, windows, top, layer, method=method, threshold=threshold, min_size=min_size)
    table = features.table
    columns = ["space", "layer", "neuron", "cluster", "size", "rank", "other_neuron", "other_cluster",
               "other_size", "similarity", "shared_examples", "cross_act"]
    n = len(table)
    neuron_of = table["neuron"].to_numpy()
    if n == 0 or len(np.unique(neuron_of)) < 2:
        out = pd.DataFrame(columns=columns)
        out.attrs["reason"] = (f"layer {layer} has {len(np.unique(neuron_of))} neuron(s) with clusters of at least "
                               f"{min_size} examples; similar features need two or more.")
        return out
    per_neuron = int(np.bincount(neuron_of).max())  # neighbours of the same neuron are dropped below
    k_search = min(n - 1, k + per_neuron)
    rows = []
    for space in spaces:
        ind, sim = nearest_neighbours(features.vectors[space], k_search, backend=backend, seed=seed)
        for i in range(n):
            other = ind[i] >= 0
            other &= neuron_of[np.clip(ind[i], 0, None)] != neuron_of[i]
            for rank, (j, s) in enumerate(zip(ind[i][other][:k], sim[i][other][:k])):
                a, b = features.members[i], features.members[j]
                shared = len(np.intersect1d(a, b, assume_unique=True)) / len(np.union1d(a, b))
                rows.append((space, int(table.layer.iat[i]), int(neuron_of[i]), int(table.cluster.iat[i]),
                             int(table["size"].iat[i]), rank, int(neuron_of[j]), int(table.cluster.iat[j]),
                             int(table["size"].iat[j]), float(s), shared,
                             float(features.cross_act[i, neuron_of[j]])))
    return pd.DataFrame(rows, columns=columns)
