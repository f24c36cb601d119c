"""Ground truth for the clustering: planted features, method comparison, space comparison, threshold sweep.

`clustering` clusters; this module measures how well it does. Planted features (`make_planted_features`) are
synthetic examples of one neuron drawn from known features; `compare_methods` scores every method and
threshold on them by the adjusted Rand index. On a real model, `threshold_sweep` shows how the clusters of a
whole layer change with the threshold and `compare_spaces` clusters the same examples in three spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from nbutils import clustering
from nbutils._validation import check_choice, check_float_range, check_int_range

__all__ = [
    "PlantedFeatures",
    "make_planted_features",
    "DEFAULT_GRID",
    "compare_methods",
    "threshold_sweep",
    "SPACES",
    "compare_spaces",
]


# --------------------------------------------------------------------------------------------------
# Planted features: the ground truth the default is chosen on


@dataclass(frozen=True)
class PlantedFeatures:
    """Synthetic examples of one neuron drawn from known features.

    Attributes:
        e: embeddings `[n, d]`.
        labels: true labels `[n]`: features 0..n_features-1, then one label per outlier.
        n_features: number of planted features.
        is_outlier: `[n]` bool.
        settings: the generator's arguments.
    """

    e: np.ndarray
    labels: np.ndarray
    n_features: int
    is_outlier: np.ndarray
    settings: dict = field(default_factory=dict)


def make_planted_features(
    n: int = 128,
    d: int = 64,
    n_features: int = 3,
    *,
    shared: float = 0.5,
    noise: float = 0.5,
    outlier_frac: float = 0.05,
    min_size: int = 5,
    seed: int | None = 0,
) -> PlantedFeatures:
    """Draw a neuron's examples from planted features that share a common direction (like `make_blobs`).

    Feature k has a unit centre `c_k = sqrt(shared) s + sqrt(1 - shared) f_k` with `s, f_1, ...`
    orthonormal, so any two centres have cosine `shared` (all examples of a neuron push it up alike).
    An example of feature k is `r (c_k + noise g)` with `g ~ N(0, I_d / d)` (norm about 1) and a random
    positive scale `r`; so two examples of one feature have cosine about `1 / (1 + noise^2)` and of two
    features about `shared / (1 + noise^2)`. Outliers use a fresh direction in place of `f_k`. Feature
    sizes are unequal (Dirichlet), each at least `min_size`.

    Args:
        n: examples; d: dimension (`d >= n_features + 2` so the directions fit, plus outliers).
        n_features: planted features (>= 1).
        shared: cosine between feature centres, in [0, 1).
        noise: within-feature noise norm relative to the centre, >= 0.
        outlier_frac: share of examples that are outliers, in [0, 0.5].
        min_size: smallest feature size.
        seed: random seed.

    Returns:
        `PlantedFeatures`.
    """
    n_features = check_int_range("n_features", n_features, 1, 1000)
    shared = check_float_range("shared", shared, 0.0, 1.0, high_open=True)
    noise = check_float_range("noise", noise, 0.0, 100.0)
    outlier_frac = check_float_range("outlier_frac", outlier_frac, 0.0, 0.5)
    min_size = check_int_range("min_size", min_size, 1, 10_000)
    n_outliers = int(round(outlier_frac * n))
    n = check_int_range("n", n, n_features * min_size + n_outliers, 1_000_000,
                        what=f"(n_features * min_size + outliers)")
    d = check_int_range("d", d, n_features + 1 + max(1, n_outliers), 100_000, what="(room for the directions)")
    rng = np.random.default_rng(seed)
    n_dirs = 1 + n_features + n_outliers
    basis, _ = np.linalg.qr(rng.standard_normal((d, n_dirs)))  # [d, n_dirs] orthonormal columns
    s, f, o = basis[:, 0], basis[:, 1 : 1 + n_features], basis[:, 1 + n_features :]
    centres = np.sqrt(shared) * s[:, None] + np.sqrt(1 - shared) * f  # [d, n_features]
    spare = n - n_outliers - n_features * min_size
    extra = rng.multinomial(spare, rng.dirichlet(np.full(n_features, 2.0)))
    sizes = min_size + extra  # [n_features]
    labels = np.repeat(np.arange(n_features), sizes)
    mean = centres[:, labels].T  # [n - n_outliers, d]
    if n_outliers:
        out_centres = (np.sqrt(shared) * s[:, None] + np.sqrt(1 - shared) * o[:, :n_outliers]).T  # [n_outliers, d]
        mean = np.vstack([mean, out_centres])
        labels = np.concatenate([labels, n_features + np.arange(n_outliers)])
    x = mean + noise * rng.standard_normal((n, d)) / np.sqrt(d)  # [n, d]
    x *= rng.lognormal(0.0, 0.3, size=(n, 1))
    perm = rng.permutation(n)
    settings = dict(n=n, d=d, n_features=n_features, shared=shared, noise=noise, outlier_frac=outlier_frac,
                    min_size=min_size, seed=seed)
    return PlantedFeatures(e=x[perm], labels=labels[perm], n_features=n_features,
                           is_outlier=(labels >= n_features)[perm], settings=settings)


def _random_settings(rng: np.random.Generator, n_features: tuple[int, int], noise: tuple[float, float]) -> dict:
    """One draw of planted-feature settings (see `compare_methods`)."""
    return dict(
        n=int(rng.choice([64, 128, 256])),
        d=int(rng.choice([32, 64, 128])),
        n_features=int(rng.integers(n_features[0], n_features[1] + 1)),
        shared=float(rng.uniform(0.2, 0.7)),
        noise=float(rng.uniform(*noise)),
        outlier_frac=float(rng.uniform(0.0, 0.1)),
    )


DEFAULT_GRID: dict[str, list[float]] = {
    "adaptive": [0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9],
    "agglomerative": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "threshold": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "hdbscan": [2, 3, 5, 8],
}


def compare_methods(
    grid: dict[str, list[float]] | None = None,
    *,
    n_draws: int = 50,
    n_features: tuple[int, int] = (2, 5),
    noise: tuple[float, float] = (0.3, 1.0),
    seed: int = 0,
) -> pd.DataFrame:
    """Adjusted Rand index of each (method, threshold) against planted features over random draws.

    Each draw picks n in {64, 128, 256}, d in {32, 64, 128}, a number of features in `n_features`,
    shared in [0.2, 0.7], noise in `noise` (so two examples of one feature have cosine about
    1 / (1 + noise^2): 0.5 to 0.92 by default) and 0-10% outliers; every (method, threshold) clusters the
    same draws.

    Args:
        grid: `{method: [thresholds]}`; default `DEFAULT_GRID` (all `clustering.METHODS`).
        n_draws: number of random draws.
        n_features: inclusive range of planted features per draw.
        noise: range of the within-feature noise.
        seed: seed of the draws.

    Returns:
        DataFrame, one row per (method, threshold, draw): `method, threshold, draw, ari, n_clusters` plus
        the draw's settings.
    """
    from sklearn.metrics import adjusted_rand_score

    grid = DEFAULT_GRID if grid is None else grid
    for method in grid:
        check_choice("method", method, clustering.METHODS)
    n_draws = check_int_range("n_draws", n_draws, 1, 100_000)
    rng = np.random.default_rng(seed)
    rows = []
    for draw in range(n_draws):
        kw = _random_settings(rng, n_features, noise)
        planted = make_planted_features(**kw, seed=int(rng.integers(2**31)))
        for method, thresholds in grid.items():
            for t in thresholds:
                labels = clustering.cluster(planted.e, method=method, threshold=t)
                rows.append(dict(method=method, threshold=t, draw=draw,
                                 ari=adjusted_rand_score(planted.labels, labels),
                                 n_clusters=int(labels.max()) + 1, **kw))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# A real model: threshold sweep and space comparison


def threshold_sweep(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    grid: dict[str, list[float]] | None = None,
    *,
    examples: LayerExamples | None = None,
) -> pd.DataFrame:
    """How the clusters of a whole layer change with the method's threshold (h is read once).

    Args:
        model, windows, top, layer: as in `clustering.polysemy_table`.
        grid: `{method: [thresholds]}`; default `DEFAULT_GRID`.
        examples: this layer's `layer_examples(...)`, if already read.

    Returns:
        DataFrame, one row per (method, threshold): `method, threshold, n_neurons` (live),
        `mean_clusters, mean_effective_clusters, singleton_share` (share of examples alone in their cluster),
        `largest_share` (mean share of a neuron's examples in its largest cluster), `monosemantic_share`
        (share of neurons with effective_clusters <= 1.5).
    """

    grid = DEFAULT_GRID if grid is None else grid
    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer)
    rows = []
    for method, thresholds in grid.items():
        check_choice("method", method, clustering.METHODS)
        for t in thresholds:
            table = clustering.polysemy_table(model, windows, top, lx.layer, method=method, threshold=t, examples=lx)
            live = table[~table.dead]
            rows.append(dict(
                method=method, threshold=t, n_neurons=len(live),
                mean_clusters=live.n_clusters.mean(),
                mean_effective_clusters=live.effective_clusters.mean(),
                singleton_share=live.n_singletons.sum() / max(1, live.n_examples.sum()),
                largest_share=(live.largest_cluster / live.n_examples).mean(),
                monosemantic_share=(live.effective_clusters <= 1.5).mean(),
            ))
    return pd.DataFrame(rows)


SPACES = ("embedding", "h", "pattern")


def compare_spaces(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    neurons: Any,
    *,
    method: str | None = None,
    threshold: float | int | None = None,
    pattern: int = 8,
    examples: LayerExamples | None = None,
) -> pd.DataFrame:
    """Cluster the same examples of each neuron in three spaces and score the clusters against tokens.

    Spaces (`SPACES`): `"embedding"` (neuron embeddings `h ⊙ w`), `"h"` (the plain pre-MLP vectors) and
    `"pattern"` (the neuron's activation at the `pattern` positions ending at the activating token, zero
    before the window starts). The same method clusters all three (`clustering.cluster`; the default is scale-free).

    Args:
        model, windows, top, layer: as in `clustering.polysemy_table`.
        neurons: neurons of `layer` to compare (dead ones are skipped).
        method, threshold: as in `clustering.cluster`.
        pattern: positions in the activation pattern.
        examples: this layer's `layer_examples(...)`, if already read.

    Returns:
        DataFrame, one row per (neuron, space): `neuron, space, n_examples, n_clusters, effective_clusters,
        ami_token` (adjusted mutual information between clusters and the activating token) and
        `ami_prev_token` (the same for the token before it).
    """
    from sklearn.metrics import adjusted_mutual_info_score

    from nbutils import embeddings
    from nbutils.models import check_neuron

    method = check_choice("method", clustering.DEFAULT_METHOD if method is None else method, clustering.METHODS)
    t = clustering._check_threshold(method, threshold)
    pattern = check_int_range("pattern", pattern, 1, 10_000)
    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer)
    neurons = [check_neuron(model, n) for n in np.atleast_1d(np.asarray(neurons))]
    neurons = [n for n in neurons if lx.bounds[n + 1] > lx.bounds[n]]
    windows_np = windows.numpy()
    rows = []
    for neuron in neurons:
        ex = lx.examples.iloc[lx.bounds[neuron] : lx.bounds[neuron + 1]]
        w, p = ex["window"].to_numpy(), ex["pos"].to_numpy()
        offsets = np.arange(-pattern + 1, 1)  # [pattern]
        pos = p[:, None] + offsets  # [n, pattern]
        valid = pos >= 0
        pre = embeddings.pre_activations(model, windows, lx.layer, np.repeat(w, pattern)[valid.reshape(-1)],
                                         pos[valid])[:, neuron].numpy()  # [n_valid]
        acts = np.zeros(pos.shape)
        acts[valid] = clustering.mlp_activation(model, pre)
        spaces = {"embedding": lx.embeddings(neuron), "h": lx.h[lx.rows(neuron)], "pattern": acts}
        token = windows_np[w, p]
        prev = np.where(p > 0, windows_np[w, np.maximum(p - 1, 0)], -1)
        for space, x in spaces.items():
            labels = clustering._labels_from_similarity(clustering.cosine_similarity(x), method, t)
            rows.append(dict(neuron=neuron, space=space, n_examples=len(ex), n_clusters=int(labels.max()) + 1,
                             effective_clusters=clustering.effective_n_clusters(labels),
                             ami_token=adjusted_mutual_info_score(token, labels),
                             ami_prev_token=adjusted_mutual_info_score(prev, labels)))
    return pd.DataFrame(rows)
