"""Feature clusters: cluster a neuron's example embeddings, find central examples, measure polysemy.

All methods read the cosine similarity `cos(e_a, e_b)` of a neuron's example embeddings (distance
`1 - cos`). One API, six methods (`METHODS`):

- `"threshold"` (the paper's): a graph with an edge where `cos >= threshold`; clusters = connected
  components. `threshold` is a cosine similarity in [-1, 1].
- `"agglomerative"`: average linkage on cosine distance, merging while the mean similarity between two
  clusters is `>= threshold` (distance threshold `1 - threshold`). `threshold` in [-1, 1].
- `"hdbscan"`: scikit-learn's HDBSCAN on the precomputed cosine distance; `threshold` is its
  `min_cluster_size` (an integer >= 2).
- `"adaptive"`: average linkage as `"agglomerative"`, with the cut relative to the neuron's own
  scale: merge while the mean similarity between two clusters is `>= threshold * ref`, where `ref` is the
  median over examples of the mean similarity to their `ADAPTIVE_NEIGHBOURS` nearest neighbours (how
  similar members of one feature are for this neuron). `threshold` in (0, 2]. When `ref <= 0` there is
  no structure to cluster and every example is a singleton.
- `"local"` (default): average linkage on the locally scaled similarity `cos(e_a, e_b) / sqrt(ref_a ref_b)`
  (clipped to [-1, 1]), where `ref_a` is example a's mean similarity to its `ADAPTIVE_NEIGHBOURS` nearest
  neighbours: merge while the mean scaled similarity between two clusters is `>= threshold`, in (0, 1].
  The scale is measured per example rather than per neuron, so a weak, noisy feature and a strong, tight
  one of the same neuron are each held to their own scale.
- `"leiden"`: community detection on the k-nearest-neighbour graph (`ADAPTIVE_NEIGHBOURS` neighbours per
  example, by cosine similarity; an edge where either end counts the other among its nearest) with the Leiden
  algorithm (`leidenalg`, modularity with resolution `threshold` > 0, fixed seed). It reads only who is
  near whom, never a similarity value, so it needs no scale; a higher resolution gives more, smaller clusters.

Label convention: 0 is the largest cluster, 1 the next, ... (ties by first member); points a method
calls noise become singleton clusters, so -1 never appears.

The default (`DEFAULT_METHOD`, `DEFAULT_THRESHOLDS`) is chosen by measurement on planted features
(`nbutils.evaluation`, which holds every measurement of the clustering): every top example of a
neuron pushes its pre-activation up, so all of them share a common direction, and a fixed-threshold
graph chains distinct features into one component through a few bridging pairs. Average linkage needs whole clusters to be similar on
average, which a few bridges cannot fake; but any fixed similarity cut suits only one noise level, and
how similar the examples of one feature are differs from neuron to neuron and layer to layer (the paper
sets its threshold per layer). HDBSCAN is scale-free but splits single features (monosemantic neurons)
into pieces. The adaptive cut measures one scale per neuron; it fails when one neuron has a tight feature
and a loose one (a weak feature is a noisy one), where it shatters the loose one. The local cut measures
the scale per example: at thresholds 0.65 to 0.75 it was the only method to meet the target (mean ARI
>= 0.95, worst draw >= 0.75 on 2-6 features, >= 90 % of single features whole) on all five planted
generator families (`evaluation.FAMILIES`), best at 0.75; notebook 02 shows the measurement, held out
family by family, and on virtual neurons made from the model's own neurons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from nbutils._validation import (check_choice, check_float_range, check_index_array, check_int_range, check_matrix,
                                 check_same_length, fail)

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_THRESHOLDS",
    "PAPER_THRESHOLDS_GPT2",
    "ADAPTIVE_NEIGHBOURS",
    "cosine_similarity",
    "neighbour_similarity",
    "local_similarity",
    "cluster",
    "knn_leiden",
    "canonical_labels",
    "central_example",
    "effective_n_clusters",
    "monosemanticity",
    "example_text",
    "neuron_clusters",
    "polysemy_table",
    "POLYSEMY_COLUMNS",
    "LayerExamples",
    "layer_examples",
    "SPACES",
    "SPACE_NAMES",
]

METHODS: tuple[str, ...] = ("adaptive", "local", "agglomerative", "threshold", "hdbscan", "leiden")
DEFAULT_METHOD = "local"
# Default `threshold` of each method (see module docstring for what it means per method): for "local", the
# setting chosen across generator families (`evaluation.choose_default`); for the others, the best mean
# adjusted Rand index of each method on one planted generator (`evaluation.compare_methods`).
DEFAULT_THRESHOLDS: dict[str, float] = {"adaptive": 0.7, "local": 0.75, "agglomerative": 0.5, "threshold": 0.7,
                                         "hdbscan": 3, "leiden": 1.0}
ADAPTIVE_NEIGHBOURS = 10
# What a neuron's examples are clustered as (`LayerExamples.vectors`): the neuron embedding `h ⊙ w` (the default),
# or the plain pre-MLP vector `h` (the same for every neuron of the layer; what is measured against it:
# `nbutils.recovery` and the README's recovery table).
SPACES: tuple[str, ...] = ("embedding", "h")
SPACE_NAMES = {"embedding": "h ⊙ w", "h": "h"}  # how a space is written for a reader
# The paper's thresholds for GPT-2 small by layer (reference only; not our defaults).
PAPER_THRESHOLDS_GPT2: dict[int, float] = {0: 0.5, 1: 0.2, 2: 0.2, 3: 0.1, 4: 0.1, **{i: 0.05 for i in range(5, 12)}}


def cosine_similarity(e: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n n"]:
    """Pairwise cosine similarity of the rows of `e` (a zero row has similarity 0 to everything else, 1 to
    itself), clipped to [-1, 1]."""
    e = check_matrix("e", e)
    norms = np.linalg.norm(e, axis=1, keepdims=True)  # [n, 1]
    u = e / np.where(norms > 0, norms, 1.0)  # [n, d]
    sim = np.clip(u @ u.T, -1.0, 1.0)  # [n, n]
    np.fill_diagonal(sim, 1.0)
    return sim


def canonical_labels(labels: Int[np.ndarray, "n"]) -> Int[np.ndarray, "n"]:
    """Relabel clusters by size: 0 = largest, ties broken by first member; -1 (noise) become singletons."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    labels = labels.copy()
    noise = labels < 0
    if noise.any():
        labels[noise] = labels.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # clusters by size desc, then first member
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int64)


def _check_threshold(method: str, threshold: Any) -> float:
    if threshold is None:
        return DEFAULT_THRESHOLDS[method]
    if method == "hdbscan":
        return check_int_range("threshold", threshold, 2, 10**9, what="(HDBSCAN's min_cluster_size)")
    if method == "adaptive":
        return check_float_range("threshold", threshold, 0.0, 2.0, low_open=True)
    if method == "local":
        return check_float_range("threshold", threshold, 0.0, 1.0, low_open=True)
    if method == "leiden":
        return check_float_range("threshold", threshold, 0.0, 100.0, low_open=True)  # the resolution
    return check_float_range("threshold", threshold, -1.0, 1.0)


def _average_linkage_cut(sim: np.ndarray, t: float) -> np.ndarray:
    """Average-linkage clusters of a similarity matrix, merging while mean similarity >= t."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    dist = np.clip(squareform(1.0 - sim, checks=False), 0.0, 2.0)  # condensed [n (n - 1) / 2]
    tree = linkage(dist, method="average")
    return _cut_tree_at(tree, 1.0 - t)  # merges with height <= 1 - t, i.e. mean similarity >= t


def _cut_tree_at(tree: np.ndarray, height: float) -> Int[np.ndarray, "n"]:
    """The partition of scipy's `fcluster(tree, height, criterion="distance")` for a linkage matrix `[n - 1, 4]`
    (leaves under a highest node whose subtree merges nothing above `height` are one cluster), without its
    validation of the tree, which costs more than the cut for the small trees of one neuron."""
    n, merges = len(tree) + 1, tree[:, :2].astype(np.int64).tolist()
    highest = [0.0] * (n - 1)  # the highest merge in each node's subtree
    for i, ((a, b), h) in enumerate(zip(merges, tree[:, 2].tolist())):
        highest[i] = max(h, highest[a - n] if a >= n else h, highest[b - n] if b >= n else h)
    label = list(range(2 * n - 1))  # each node's cluster: its own until a kept ancestor's reaches it
    for i in range(n - 2, -1, -1):  # from the root down
        if highest[i] <= height:
            label[merges[i][0]] = label[merges[i][1]] = label[n + i]
    return np.asarray(label[:n], dtype=np.int64)


def neighbour_similarity(sim: Float[np.ndarray, "n n"], k: int = ADAPTIVE_NEIGHBOURS) -> float:
    """The adaptive method's scale: median over rows of the mean similarity to the `k` nearest others."""
    n = sim.shape[0]
    k = max(1, min(k, n - 1))
    others = sim - 3.0 * np.eye(n)  # push the diagonal below every real similarity
    nearest = np.partition(others, n - k, axis=1)[:, n - k :]  # [n, k]
    return float(np.median(nearest.mean(axis=1)))


def local_similarity(sim: Float[np.ndarray, "n n"], k: int = ADAPTIVE_NEIGHBOURS) -> Float[np.ndarray, "n n"]:
    """The `"local"` method's similarity: `sim[a, b] / sqrt(ref[a] ref[b])`, clipped to [-1, 1], where `ref[a]`
    is example a's mean similarity to its `k` nearest others (at least 1e-3): each pair is measured against
    how close the two examples' own neighbourhoods are (local scaling, Zelnik-Manor and Perona 2004)."""
    n = sim.shape[0]
    k = max(1, min(k, n - 1))
    others = sim - 3.0 * np.eye(n)  # push the diagonal below every real similarity
    ref = np.maximum(np.partition(others, n - k, axis=1)[:, n - k :].mean(axis=1), 1e-3)  # [n]
    scaled = np.clip(sim / np.sqrt(ref[:, None] * ref[None, :]), -1.0, 1.0)  # [n, n]
    np.fill_diagonal(scaled, 1.0)
    return scaled


def knn_leiden(sim: Float[np.ndarray, "n n"], resolution: float = 1.0, k: int = ADAPTIVE_NEIGHBOURS, *,
               seed: int = 0) -> Int[np.ndarray, "n"]:
    """The `"leiden"` method on a similarity matrix: Leiden communities (modularity at `resolution`) of the
    undirected, unweighted graph joining each row to its `k` most similar others. Labels `[n]`, not canonical."""
    import igraph
    import leidenalg

    n = sim.shape[0]
    k = max(1, min(k, n - 1))
    others = sim - 3.0 * np.eye(n)  # push the diagonal below every real similarity
    nearest = np.argpartition(-others, k - 1, axis=1)[:, :k]  # [n, k]
    pairs = np.sort(np.stack([np.repeat(np.arange(n), k), nearest.reshape(-1)], axis=1), axis=1)  # [n k, 2]
    graph = igraph.Graph(n=n, edges=np.unique(pairs, axis=0).tolist())
    partition = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition,
                                         resolution_parameter=resolution, seed=seed)
    return np.asarray(partition.membership, dtype=np.int64)


def cluster(
    e: Float[np.ndarray, "n d"],
    method: str | None = None,
    threshold: float | int | None = None,
) -> Int[np.ndarray, "n"]:
    """Cluster embeddings by cosine similarity.

    Args:
        e: embeddings `[n, d]` (numpy or torch), finite.
        method: one of `METHODS`; `None` for `DEFAULT_METHOD`.
        threshold: the method's setting: a cosine similarity in [-1, 1] for `"threshold"` and
            `"agglomerative"`, a factor in (0, 2] of the neuron's neighbour similarity for `"adaptive"`, a
            locally scaled similarity in (0, 1] for `"local"`, a resolution > 0 for `"leiden"`,
            `min_cluster_size >= 2` for `"hdbscan"`; `None` for `DEFAULT_THRESHOLDS[method]`.

    Returns:
        int64 labels `[n]`: 0 = largest cluster, noise as singletons, never -1.

    Raises:
        ValueError: `e` not 2-D or not finite, unknown method, threshold out of range.
    """
    e = check_matrix("e", e)
    method = check_choice("method", DEFAULT_METHOD if method is None else method, METHODS)
    n = e.shape[0]
    t = _check_threshold(method, threshold)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    return _labels_from_similarity(cosine_similarity(e), method, t)


def _labels_from_similarity(sim: Float[np.ndarray, "n n"], method: str, t: float) -> Int[np.ndarray, "n"]:
    """`cluster` on a precomputed cosine similarity matrix (method and threshold already checked)."""
    n = sim.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    if method == "threshold":
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import connected_components

        _, labels = connected_components(csr_matrix(sim >= t), directed=False)
    elif method == "agglomerative":
        labels = _average_linkage_cut(sim, t)
    elif method == "adaptive":
        ref = neighbour_similarity(sim)
        labels = _average_linkage_cut(sim, t * ref) if ref > 0 else np.arange(n)
    elif method == "local":
        labels = _average_linkage_cut(local_similarity(sim), t)
    elif method == "leiden":
        labels = knn_leiden(sim, t)
    else:
        from sklearn.cluster import HDBSCAN

        if n <= int(t):
            labels = np.full(n, -1)  # too few points for one cluster of min_cluster_size
        else:
            dist = np.clip(1.0 - sim, 0.0, 2.0)  # [n, n]
            labels = HDBSCAN(min_cluster_size=int(t), metric="precomputed", copy=True).fit_predict(dist)
    return canonical_labels(labels)


def _check_labels(labels: Any, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        fail("labels", "be 1-D [n]", f"shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        fail("labels", "hold non-negative integer cluster labels (as `cluster` returns)", f"dtype {labels.dtype}, min {labels.min()}")
    if n is not None and len(labels) != n:
        fail("labels", f"have one label per row of `e` ({n})", len(labels))
    return labels.astype(np.int64)


def central_example(e: Float[np.ndarray, "n d"], labels: Int[np.ndarray, "n"]) -> Int[np.ndarray, "n_clusters"]:
    """Index of the central member of cluster 0, 1, ...: the member with the highest mean cosine
    similarity to the other members (a singleton is its own centre; ties go to the first member).

    Args:
        e: embeddings `[n, d]`.
        labels: cluster labels `[n]` in 0..n_clusters-1 (as `cluster` returns).

    Returns:
        `[n_clusters]` row indices into `e`; a label with no member gets -1.
    """
    e = check_matrix("e", e)
    labels = _check_labels(labels, e.shape[0])
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    return _central_from_similarity(cosine_similarity(e), labels)


def _central_from_similarity(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    n_clusters = int(labels.max()) + 1
    same = labels[:, None] == labels[None, :]  # [n, n]
    sizes = np.bincount(labels, minlength=n_clusters)  # [n_clusters]
    score = ((sim * same).sum(axis=1) - 1.0) / np.maximum(sizes[labels] - 1, 1)  # [n] mean sim to the others
    order = np.lexsort((np.arange(len(labels)), -score, labels))  # by cluster, best score, first member
    first = np.searchsorted(labels[order], np.arange(n_clusters))  # first row of each cluster in `order`
    centres = np.full(n_clusters, -1, dtype=np.int64)
    present = sizes > 0
    centres[present] = order[first[present]]
    return centres


def effective_n_clusters(labels: Int[np.ndarray, "n"]) -> float:
    """Effective number of clusters: `exp(entropy)` of the size shares of the non-singleton clusters.

    Equal-sized clusters give their count; one dominant cluster gives about 1; 0.0 when every example is
    a singleton (no cluster at all).
    """
    labels = _check_labels(labels)
    sizes = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    sizes = sizes[sizes >= 2]
    if sizes.size == 0:
        return 0.0
    p = sizes / sizes.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def monosemanticity(e: Float[np.ndarray, "n d"]) -> float:
    """Mean pairwise cosine similarity of the rows of `e` (pairs a != b); NaN for fewer than 2 rows."""
    e = check_matrix("e", e)
    n = e.shape[0]
    if n < 2:
        return float("nan")
    return _mono_from_similarity(cosine_similarity(e))


def _mono_from_similarity(sim: np.ndarray) -> float:
    n = sim.shape[0]
    return float((sim.sum() - n) / (n * (n - 1))) if n >= 2 else float("nan")


# --------------------------------------------------------------------------------------------------
# Neurons of a model: one neuron's clusters, the polysemy table of a layer


def _layer_examples(top: Any, windows: Any, layer: int) -> pd.DataFrame:
    """The rows of `top.examples` of one layer, checked against `windows`."""
    table = top.examples
    ex = table[table["layer"].to_numpy() == layer]
    if len(ex) and int(ex["window"].max()) >= windows.shape[0]:
        fail("windows", f"hold every window that `top` refers to (ids up to {int(ex['window'].max())})",
             f"{windows.shape[0]} windows", "Pass the windows `top` was collected on.")
    return ex


def _check_top(model: Any, top: Any) -> None:
    if not hasattr(top, "examples") or not hasattr(top, "neuron_examples"):
        raise TypeError(f"`top` must be a TopActivations (`activations.collect_top_activations`); got {type(top).__name__}.")
    if (top.n_layers, top.d_mlp) != (model.cfg.n_layers, model.cfg.d_mlp):
        fail("top", f"come from this model ({model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons)",
             f"{top.n_layers} x {top.d_mlp}")


def _dead_error(top: Any, layer: int, neuron: int) -> None:
    max_act = float(top.max_act[layer, neuron])
    fail("neuron", "have examples to cluster",
         f"neuron {neuron} of layer {layer}, which is dead (its highest activation over the corpus is {max_act:.3g} <= 0)",
         "Pick a live neuron: `top.neurons` lists them with `dead == False`.")


def example_text(model: Any, windows: Any, window_ids: Any, positions: Any, *, context: int = 12) -> list[str]:
    """Text of each example: up to `context` tokens ending at (and including) the activating token."""
    from nbutils.models import check_windows

    windows = check_windows(model, windows)
    context = check_int_range("context", context, 1, 2**31 - 1, what="(tokens of text per example)")
    window_ids = check_index_array("window_ids", window_ids, windows.shape[0])
    positions = check_index_array("positions", positions, windows.shape[1])
    check_same_length(window_ids=window_ids, positions=positions)
    return [model.tokenizer.decode(windows[int(w), max(0, int(p) - context + 1) : int(p) + 1].tolist())
            for w, p in zip(window_ids, positions)]


def neuron_clusters(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    neuron: int,
    *,
    method: str | None = None,
    threshold: float | int | None = None,
    fold_ln: bool = True,
    context: int = 12,
) -> pd.DataFrame:
    """Cluster one neuron's top examples by their neuron embeddings.

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: the token windows `[n_windows, window]` that `top` was collected on.
        top: `TopActivations` (`activations.collect_top_activations`).
        layer, neuron: the neuron.
        method, threshold: as in `cluster` (`None`: the measured default).
        fold_ln: LayerNorm convention of the embeddings (`embeddings` module).
        context: tokens of text shown per example, ending at the activating token.

    Returns:
        DataFrame, one row per example, highest activation first: `window, pos, act, cluster,
        is_central, text, token` (`token` is the activating token's text).

    Raises:
        ValueError: layer or neuron out of range, a dead neuron (no examples), bad method or threshold.
    """

    from nbutils import embeddings
    from nbutils.models import check_layer, check_neuron, check_windows

    layer, neuron = check_layer(model, layer), check_neuron(model, neuron)
    context = check_int_range("context", context, 1, 2**31 - 1, what="(tokens of text per example)")
    _check_top(model, top)
    method = check_choice("method", DEFAULT_METHOD if method is None else method, METHODS)
    ex = top.neuron_examples(layer, neuron)
    t = _check_threshold(method, threshold)
    if len(ex) == 0:
        _dead_error(top, layer, neuron)
    _layer_examples(top, windows, layer)
    windows = check_windows(model, windows)
    W, _ = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln)
    h = _pre_mlp_vectors(model, windows, layer, ex["window"].to_numpy(), ex["pos"].to_numpy(), fold_ln=fold_ln)
    e = h * W[:, neuron].numpy().astype(np.float64)  # [n, d_model] neuron embeddings
    sim = cosine_similarity(e)  # [n, n]
    labels = _labels_from_similarity(sim, method, t)
    centres = _central_from_similarity(sim, labels)
    is_central = np.zeros(len(ex), dtype=bool)
    is_central[centres] = True
    tokens = windows[np.array(ex["window"], dtype=np.int64), np.array(ex["pos"], dtype=np.int64)].tolist()
    return pd.DataFrame({
        "window": ex["window"].to_numpy(),
        "pos": ex["pos"].to_numpy(),
        "act": ex["act"].to_numpy(),
        "cluster": labels,
        "is_central": is_central,
        "text": example_text(model, windows, ex["window"], ex["pos"], context=context),
        "token": [model.tokenizer.decode([tok]) for tok in tokens],
    })


_LENGTH_STEP = 8  # windows run only up to their last needed position, rounded up to a multiple of this


def _pre_mlp_vectors(
    model: Any, windows: Any, layer: int, window_ids: np.ndarray, positions: np.ndarray, *, fold_ln: bool,
    batch_size: int = 64,
) -> Float[np.ndarray, "n d_model"]:
    """`embeddings.pre_mlp_vectors` at (window_ids[i], positions[i]), running each window only up to the
    last position needed from it: the model is causal, so later tokens cannot change h. Windows are grouped
    by that length (in steps of `_LENGTH_STEP`), one batched pass per group; each window runs once."""
    from nbutils import embeddings

    window_ids, positions = np.asarray(window_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    out = np.zeros((len(window_ids), model.cfg.d_model), dtype=np.float64)  # [n, d_model]
    if len(window_ids) == 0:
        return out
    unique, inverse = np.unique(window_ids, return_inverse=True)
    need = np.zeros(len(unique), dtype=np.int64)
    np.maximum.at(need, inverse, positions + 1)  # tokens needed from each window
    length = np.minimum(-(-need // _LENGTH_STEP) * _LENGTH_STEP, windows.shape[1])  # [n_unique]
    for L in np.unique(length):
        group = np.flatnonzero(length == L)  # unique windows of this length
        rows = np.flatnonzero(np.isin(inverse, group))  # examples from them
        local = np.searchsorted(group, inverse[rows])  # their row in the sub-batch
        sub = windows[unique[group], : int(L)]  # [n_group, L]
        h = embeddings.pre_mlp_vectors(model, sub, layer, local, positions[rows], fold_ln=fold_ln,
                                       batch_size=batch_size)
        out[rows] = h.numpy()
    return out


POLYSEMY_COLUMNS = ("layer", "neuron", "n_examples", "n_clusters", "n_singletons", "effective_clusters",
                    "monosemanticity", "largest_cluster", "dead")


@dataclass(frozen=True)
class LayerExamples:
    """The examples of every neuron of one layer with their pre-MLP vectors, read in one batched pass.

    Attributes:
        layer: the MLP layer.
        examples: the layer's rows of `top.examples` (sorted by neuron, act desc).
        keys: `[n_unique]` sorted example keys `window * n_pos + pos` (an example shared by several neurons
            is read once).
        h: `[n_unique, d_model]` float64 pre-MLP vectors of `keys`.
        inverse: `[len(examples)]` row of `h` of each example.
        bounds: `[d_mlp + 1]`; the examples of neuron j are rows `bounds[j]:bounds[j + 1]` of `examples`.
        W: `[d_model, d_mlp]` float64 input weights (same LayerNorm convention as h); b: `[d_mlp]` bias.
        n_pos: window length.
    """

    layer: int
    examples: Any
    keys: np.ndarray
    h: np.ndarray
    inverse: np.ndarray
    bounds: np.ndarray
    W: np.ndarray
    b: np.ndarray
    n_pos: int

    def rows(self, neuron: int) -> np.ndarray:
        """Rows of `h` of one neuron's examples, highest activation first."""
        return self.inverse[self.bounds[neuron] : self.bounds[neuron + 1]]

    def embeddings(self, neuron: int) -> Float[np.ndarray, "n d_model"]:
        """Neuron embeddings `h ⊙ w` of one neuron's examples `[n, d_model]`."""
        return self.h[self.rows(neuron)] * self.W[:, neuron]

    def vectors(self, neuron: int, space: str = "embedding") -> Float[np.ndarray, "n d_model"]:
        """One neuron's examples in `space` (`SPACES`): `embeddings(neuron)`, or their rows of `h`."""
        return self.embeddings(neuron) if space == "embedding" else self.h[self.rows(neuron)]


def layer_examples(
    model: Any, windows: Any, top: Any, layer: int, *, fold_ln: bool = True, batch_size: int = 64
) -> LayerExamples:
    """Read the pre-MLP vectors of all the examples of one layer in one batched pass (each needed window
    runs once, only up to its last needed position)."""
    from nbutils import embeddings
    from nbutils.models import check_layer, check_windows

    layer = check_layer(model, layer)
    _check_top(model, top)
    windows = check_windows(model, windows)
    ex = _layer_examples(top, windows, layer)
    n_pos = windows.shape[1]
    key = ex["window"].to_numpy() * n_pos + ex["pos"].to_numpy()  # one key per (window, pos)
    unique, inverse = np.unique(key, return_inverse=True)
    h = _pre_mlp_vectors(model, windows, layer, unique // n_pos, unique % n_pos, fold_ln=fold_ln,
                         batch_size=batch_size)  # [n_unique, d_model]
    W, b = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln)
    bounds = np.searchsorted(ex["neuron"].to_numpy(), np.arange(model.cfg.d_mlp + 1))
    return LayerExamples(layer=layer, examples=ex, keys=unique, h=h, inverse=inverse.reshape(-1), bounds=bounds,
                         W=W.numpy().astype(np.float64), b=b.numpy().astype(np.float64), n_pos=n_pos)


def polysemy_table(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    *,
    method: str | None = None,
    threshold: float | int | None = None,
    fold_ln: bool = True,
    batch_size: int = 64,
    progress: bool = False,
    examples: LayerExamples | None = None,
) -> pd.DataFrame:
    """Polysemy of every neuron of one layer, from the clusters of its neuron embeddings.

    The pre-MLP vectors h of all the layer's examples are read in one batched pass over the windows they
    come from (each window runs once, up to `layer`); each neuron's embeddings are then `h ⊙ w_neuron`.

    Args:
        model, windows, top: as in `neuron_clusters`.
        layer: MLP layer.
        method, threshold: as in `cluster`.
        fold_ln: LayerNorm convention of the embeddings.
        batch_size: windows per forward pass.
        progress: show a tqdm bar over neurons.
        examples: this layer's `layer_examples(...)`, if already read (skips the pass over the windows); or a
            dictionary's `dictionary.latent_examples(...)`, whose rows are then the latents.

    Returns:
        DataFrame, one row per neuron of the layer: `layer, neuron, n_examples, n_clusters, n_singletons,
        effective_clusters` (`effective_n_clusters`), `monosemanticity` (mean pairwise cosine; NaN with
        fewer than 2 examples), `largest_cluster` (size of cluster 0) and `dead` (no examples: counts 0,
        effective_clusters 0.0, monosemanticity NaN).

    Computed in memory: an interrupted call keeps nothing and a new call starts again. The feature atlas
    (`nbutils.atlas`) stores the tables of finished layers and resumes where it stopped.
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    method = check_choice("method", DEFAULT_METHOD if method is None else method, METHODS)
    t = _check_threshold(method, threshold)
    lx = examples if examples is not None else layer_examples(model, windows, top, layer, fold_ln=fold_ln,
                                                              batch_size=batch_size)
    layer = lx.layer
    h, W, inverse, bounds = lx.h, lx.W, lx.inverse, lx.bounds
    d_mlp = len(bounds) - 1  # units of the layer: neurons, or a dictionary's latents (`nbutils.dictionary`)
    rows = []
    with threadpool_limits(1):  # tiny matrices: BLAS threads only add overhead
        for neuron in tqdm(range(d_mlp), desc=f"layer {layer} clusters", disable=not progress):
            idx = inverse[bounds[neuron] : bounds[neuron + 1]]
            n = len(idx)
            if n == 0:
                rows.append((layer, neuron, 0, 0, 0, 0.0, float("nan"), 0, True))
                continue
            e = h[idx] * W[:, neuron]  # [n, d_model]
            sim = cosine_similarity(e)
            labels = _labels_from_similarity(sim, method, t)
            sizes = np.bincount(labels)
            rows.append((layer, neuron, n, len(sizes), int((sizes == 1).sum()), effective_n_clusters(labels),
                         _mono_from_similarity(sim), int(sizes[0]), False))
    return pd.DataFrame(rows, columns=list(POLYSEMY_COLUMNS))
