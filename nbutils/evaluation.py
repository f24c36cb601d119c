"""How well the clustering recovers what a neuron reads: ground truth, method choice, spaces, sweeps.

`clustering` clusters; this module measures it.

- Planted features (`make_planted_features`): synthetic examples of one neuron drawn from known features
  that share a common direction, with noise, outliers, unequal sizes and unequal strengths.
  `compare_methods` scores every method and threshold on one generator by the adjusted Rand index (ARI).
- Generator families (`FAMILIES`, `score_families`): five generators that differ in noise, shared
  component, spread of feature scales, outliers, dimension and cluster sizes, each with 1 to 6 features.
  `family_summary` scores a setting per family against `TARGET`; `leave_one_family_out` chooses the default
  without one family and scores it on that family.
- Virtual neurons (`make_virtual_neurons`, `collect_virtual_examples`, `score_virtual_neurons`): ground truth
  on the model's real activations. A virtual neuron reads 2-4 monosemantic neurons of a layer (plain or gated
  MLP; `VirtualNeurons` says how); each of its top examples is labelled by the source that drives it most,
  and clusters in three spaces (`SPACES`) are scored against those labels (ARI, homogeneity, completeness,
  V-measure) beside a nearest-neighbour vote. For a gated MLP the embedding space takes a `kind`
  (`embeddings.KINDS`), so the kinds can be compared on the same examples. `virtual_family_scores` turns
  them into a sixth family.
- A real model without ground truth: `threshold_sweep` (how a layer's clusters change with the threshold)
  and `compare_spaces` (the same examples clustered in three spaces, scored against tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from nbutils import clustering
from nbutils._validation import check_choice, check_float_range, check_int_range, fail

__all__ = [
    "PlantedFeatures",
    "make_planted_features",
    "DEFAULT_GRID",
    "compare_methods",
    "Family",
    "FAMILIES",
    "MAX_FEATURES",
    "WHOLE_SHARE",
    "TARGET",
    "family_draws",
    "score_labels",
    "score_families",
    "family_summary",
    "choose_default",
    "leave_one_family_out",
    "MONOSEMANTIC_CLUSTERS",
    "AMBIGUOUS",
    "VirtualNeurons",
    "make_virtual_neurons",
    "virtual_activations",
    "collect_virtual_examples",
    "score_virtual_neurons",
    "virtual_family_scores",
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
    concentration: float = 2.0,
    feature_scales: tuple[float, float] = (1.0, 1.0),
    seed: int | None = 0,
) -> PlantedFeatures:
    """Draw a neuron's examples from planted features that share a common direction (like `make_blobs`).

    Feature k has a unit centre `c_k = sqrt(shared) s + sqrt(1 - shared) f_k` with `s, f_1, ...`
    orthonormal, so any two centres have cosine `shared` (all examples of a neuron push it up alike).
    An example of feature k is `r (c_k + noise g)` with `g ~ N(0, I_d / d)` (norm about 1) and a random
    positive scale `r`; so two examples of one feature have cosine about `1 / (1 + noise^2)` and of two
    features about `shared / (1 + noise^2)`. Outliers use a fresh direction in place of `f_k`. Feature
    sizes are unequal (Dirichlet with `concentration`; small values give very unequal sizes), each at
    least `min_size`. With `feature_scales=(lo, hi)` feature k's centre is scaled by `a_k`, log-uniform in
    `[lo, hi]`, while the noise is not: weak features are noisier (`1 / (1 + noise^2 / a_k^2)` within).

    Args:
        n: examples; d: dimension (`d >= n_features + 2` so the directions fit, plus outliers).
        n_features: planted features (>= 1).
        shared: cosine between feature centres, in [0, 1).
        noise: within-feature noise norm relative to the centre, >= 0.
        outlier_frac: share of examples that are outliers, in [0, 0.5].
        min_size: smallest feature size.
        concentration: Dirichlet concentration of the feature sizes (> 0).
        feature_scales: range `(lo, hi)` of the features' scales, `0 < lo <= hi`.
        seed: random seed.

    Returns:
        `PlantedFeatures`.
    """
    n_features = check_int_range("n_features", n_features, 1, 1000)
    shared = check_float_range("shared", shared, 0.0, 1.0, high_open=True)
    noise = check_float_range("noise", noise, 0.0, 100.0)
    outlier_frac = check_float_range("outlier_frac", outlier_frac, 0.0, 0.5)
    min_size = check_int_range("min_size", min_size, 1, 10_000)
    concentration = check_float_range("concentration", concentration, 0.0, 1000.0, low_open=True)
    lo, hi = (check_float_range("feature_scales", v, 0.0, 1000.0, low_open=True) for v in feature_scales)
    if lo > hi:
        fail("feature_scales", "be a range (lo, hi) with lo <= hi", feature_scales)
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
    extra = rng.multinomial(spare, rng.dirichlet(np.full(n_features, concentration)))
    sizes = min_size + extra  # [n_features]
    labels = np.repeat(np.arange(n_features), sizes)
    mean = centres[:, labels].T  # [n - n_outliers, d]
    if n_outliers:
        out_centres = (np.sqrt(shared) * s[:, None] + np.sqrt(1 - shared) * o[:, :n_outliers]).T  # [n_outliers, d]
        mean = np.vstack([mean, out_centres])
        labels = np.concatenate([labels, n_features + np.arange(n_outliers)])
    g = noise * rng.standard_normal((n, d)) / np.sqrt(d)  # [n, d]
    r = rng.lognormal(0.0, 0.3, size=(n, 1))  # [n, 1] example scales (cosine does not see them)
    perm = rng.permutation(n)
    a = np.ones(n)  # [n] feature scale of each example (outliers 1)
    if (lo, hi) != (1.0, 1.0):
        a[labels < n_features] = np.exp(rng.uniform(np.log(lo), np.log(hi), n_features))[labels[labels < n_features]]
    x = (a[:, None] * mean + g) * r  # [n, d]
    settings = dict(n=n, d=d, n_features=n_features, shared=shared, noise=noise, outlier_frac=outlier_frac,
                    min_size=min_size, concentration=concentration, feature_scales=(lo, hi), seed=seed)
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
    "local": [0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9],
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
# Generator families: a default that holds on data it was not tuned on


@dataclass(frozen=True)
class Family:
    """Ranges of one generator family of planted features; a draw picks each setting in its range.

    Attributes:
        name: short name.
        n: range of the number of examples (at most `max_size` per feature plus outliers).
        d: range of the dimension (log-uniform).
        noise: range of the within-feature noise (`make_planted_features`).
        shared: range of the cosine between feature centres.
        outlier_frac: range of the share of outliers.
        feature_scales: range of the features' scales (`make_planted_features`).
        concentration: Dirichlet concentration of the feature sizes (small: imbalanced).
        min_size, max_size: smallest feature size; largest mean feature size (`n <= max_size * n_features`).
    """

    name: str
    n: tuple[int, int] = (64, 256)
    d: tuple[int, int] = (64, 128)
    noise: tuple[float, float] = (0.2, 0.6)
    shared: tuple[float, float] = (0.2, 0.5)
    outlier_frac: tuple[float, float] = (0.0, 0.05)
    feature_scales: tuple[float, float] = (1.0, 1.0)
    concentration: float = 2.0
    min_size: int = 5
    max_size: int = 200

    def settings(self, rng: np.random.Generator, n_features: int) -> dict:
        """One draw of `make_planted_features` arguments with `n_features` features."""
        low = max(self.n[0], n_features * self.min_size + int(np.ceil(self.outlier_frac[1] * self.n[1])) + 1)
        high = max(low, min(self.n[1], self.max_size * n_features))
        n = int(rng.integers(low, high + 1))
        d = int(round(np.exp(rng.uniform(np.log(self.d[0]), np.log(self.d[1])))))
        return dict(n=n, d=d, n_features=n_features, noise=float(rng.uniform(*self.noise)),
                    shared=float(rng.uniform(*self.shared)), outlier_frac=float(rng.uniform(*self.outlier_frac)),
                    feature_scales=self.feature_scales, concentration=self.concentration, min_size=self.min_size)


# Families that differ in noise, shared component, spread of scales, outliers, dimension and cluster sizes.
FAMILIES: tuple[Family, ...] = (
    Family("moderate"),
    Family("noisy", n=(128, 384), d=(64, 256), noise=(0.6, 0.9), shared=(0.3, 0.6), outlier_frac=(0.0, 0.1)),
    Family("wide", n=(128, 512), d=(512, 2048), noise=(0.2, 0.9), shared=(0.0, 0.6)),
    Family("imbalanced", n=(100, 600), d=(64, 256), noise=(0.3, 0.8), shared=(0.2, 0.6),
           outlier_frac=(0.05, 0.1), concentration=0.3, min_size=3),
    Family("scales", n=(128, 384), d=(64, 256), noise=(0.3, 0.7), shared=(0.0, 0.6), outlier_frac=(0.0, 0.1),
           feature_scales=(0.5, 2.0)),
)
MAX_FEATURES = 6  # draws have 1..MAX_FEATURES features
WHOLE_SHARE = 0.95  # a single feature is whole when this share of its members is in one cluster


def family_draws(family: Family, n_draws: int, *, seed: int = 0) -> list[PlantedFeatures]:
    """`n_draws` planted draws of one family; draw i has `i % MAX_FEATURES + 1` features (so one draw in
    six is a single, monosemantic feature)."""
    n_draws = check_int_range("n_draws", n_draws, 1, 100_000)
    rng = np.random.default_rng([seed, *map(ord, family.name)])
    draws = []
    for i in range(n_draws):
        kw = family.settings(rng, i % MAX_FEATURES + 1)
        draws.append(make_planted_features(**kw, seed=int(rng.integers(2**31))))
    return draws


def score_labels(truth: Any, labels: Any, keep: Any = None) -> dict:
    """Scores of predicted clusters against true labels on the examples `keep` (default all).

    Returns a dict: `ari` (adjusted Rand index), `homogeneity`, `completeness`, `v_measure` and `whole`
    (share of the largest true group's members that sit in one cluster).
    """
    from sklearn.metrics import adjusted_rand_score, homogeneity_completeness_v_measure

    truth, labels = np.asarray(truth), np.asarray(labels)
    if keep is not None:
        truth, labels = truth[np.asarray(keep)], labels[np.asarray(keep)]
    hom, com, v = homogeneity_completeness_v_measure(truth, labels)
    main = truth == np.bincount(truth).argmax()  # members of the largest true group
    whole = np.bincount(labels[main]).max() / main.sum() if main.any() else float("nan")
    return dict(ari=adjusted_rand_score(truth, labels), homogeneity=hom, completeness=com, v_measure=v,
                whole=float(whole))


def _grid_rows(e: np.ndarray, truth: np.ndarray, grid: dict[str, list[float]]) -> list[dict]:
    """Cluster one case with every (method, threshold) of `grid` (the similarity computed once) and score it."""
    sim = clustering.cosine_similarity(e)
    rows = []
    for method, thresholds in grid.items():
        for t in thresholds:
            labels = clustering._labels_from_similarity(sim, method, clustering._check_threshold(method, t))
            rows.append(dict(method=method, threshold=t, n_clusters=int(labels.max()) + 1,
                             **score_labels(truth, labels)))
    return rows


def score_families(
    grid: dict[str, list[float]] | None = None,
    *,
    families: tuple[Family, ...] = FAMILIES,
    n_draws: int = 36,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Score every (method, threshold) of `grid` on `n_draws` draws of every family.

    Returns:
        DataFrame, one row per (family, draw, method, threshold): `family, draw, n_features, method,
        threshold, n_clusters, ari, homogeneity, completeness, v_measure, whole` (`score_labels`; outliers
        count as their own labels).
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    grid = _check_grid(grid)
    rows = []
    with threadpool_limits(1):
        for family in families:
            for draw, p in enumerate(tqdm(family_draws(family, n_draws, seed=seed), desc=family.name,
                                          disable=not progress)):
                for row in _grid_rows(p.e, p.labels, grid):
                    rows.append(dict(family=family.name, draw=draw, n_features=p.n_features, **row))
    return pd.DataFrame(rows)


def _check_grid(grid: dict[str, list[float]] | None) -> dict[str, list[float]]:
    grid = DEFAULT_GRID if grid is None else grid
    for method, thresholds in grid.items():
        check_choice("method", method, clustering.METHODS)
        for t in thresholds:
            clustering._check_threshold(method, t)
    return grid


TARGET = dict(mean_ari=0.95, worst_ari=0.75, single_whole=0.90)  # the bar every family must clear


def family_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (family, method, threshold): `mean_ari` and `worst_ari` over draws with 2 or more features,
    `single_whole` (share of single-feature draws whose feature is whole, `WHOLE_SHARE`), `score` (the mean
    of `mean_ari` and `single_whole`) and `meets_target` (`TARGET`)."""
    keys = ["family", "method", "threshold"]
    multi = scores[scores.n_features >= 2].groupby(keys).ari.agg(mean_ari="mean", worst_ari="min")
    single = scores[scores.n_features == 1].groupby(keys).whole.apply(lambda w: (w >= WHOLE_SHARE).mean())
    out = multi.join(single.rename("single_whole"), how="outer")
    out["score"] = out[["mean_ari", "single_whole"]].mean(axis=1)
    out["meets_target"] = ((out.mean_ari >= TARGET["mean_ari"]) & (out.worst_ari >= TARGET["worst_ari"])
                           & (out.single_whole.fillna(1.0) >= TARGET["single_whole"]))
    return out.reset_index()


def choose_default(summary: pd.DataFrame) -> tuple[str, float]:
    """The (method, threshold) that meets `TARGET` on the most families of `summary` (`family_summary`),
    ties broken by the highest worst-family `score`."""
    per_setting = summary.groupby(["method", "threshold"]).agg(met=("meets_target", "sum"), worst=("score", "min"))
    method, threshold = per_setting.sort_values(["met", "worst"], ascending=False, kind="stable").index[0]
    return str(method), float(threshold)


def leave_one_family_out(scores: pd.DataFrame) -> pd.DataFrame:
    """Choose the default on all families but one (`choose_default`) and score it on the one held out.

    Args:
        scores: `score_families` rows, possibly with more families appended (e.g. `virtual_family_scores`).

    Returns:
        DataFrame, one row per held-out family: `held_out, method, threshold` (chosen without it),
        `mean_ari, worst_ari, single_whole, meets_target` on the held-out family.
    """
    summary = family_summary(scores)
    rows = []
    for family in summary.family.unique():
        method, t = choose_default(summary[summary.family != family])
        held = summary[(summary.family == family) & (summary.method == method) & (summary.threshold == t)].iloc[0]
        rows.append(dict(held_out=family, method=method, threshold=t, mean_ari=held.mean_ari,
                         worst_ari=held.worst_ari, single_whole=held.single_whole, meets_target=held.meets_target))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Virtual polysemantic neurons: ground truth on the model's own activations


MONOSEMANTIC_CLUSTERS = 1.2  # a source neuron has at most this many effective clusters
AMBIGUOUS = 0.9  # an example is ambiguous when its second source contributes >= this share of the first


@dataclass(frozen=True)
class VirtualNeurons:
    """Virtual polysemantic neurons of one layer, each reading 2-4 monosemantic source neurons.

    Plain MLP: virtual neuron v reads its sources i with `w_v = sum_i w_i / s_i` and `b_v = sum_i b_i / s_i`,
    where `s_i` is source i's pre-activation at its top example (there each source adds 1): a neuron in
    superposition made from real neurons, on the model's real `h`. Its activation is `act(h . w_v + b_v)`.

    Gated MLP: the gate and the up projection are combined alike, `w_v = sum_i w_gate_i / s_i` (`s_i`: source
    i's gate g_i at its top example) and `w_up_v = sum_i w_up_i / t_i` (`t_i`: its up value u_i there; sign
    included, though it is positive whenever `s_i > 0`, since `act(s_i) t_i` is the source's positive top
    activation), biases likewise; so each source's gate term and up term are 1 at its own top example. The
    virtual activation is `act(g_v) * u_v` with `g_v = h . w_v + b_v`, `u_v = h . w_up_v + b_up_v`. Unlike the
    plain sum, this product has cross terms (one source's gate opening another's up value), so an example can
    be driven by two sources together; its label is still the single source whose own term is largest.

    Weights are in the folded norm convention (`embeddings.mlp_in_weights`).

    Attributes:
        layer: the MLP layer.
        sources: DataFrame, one row per (virtual neuron, source): `virtual, neuron, scale, token` (the
            source's most common activating token id), plus `up_scale` (`t_i`) for a gated MLP.
        source_W: `[d_model, n_rows]` float64, `w_i / s_i` (gated: `w_gate_i / s_i`) of each row of `sources`.
        source_b: `[n_rows]` float64, `b_i / s_i` (gated: `b_gate_i / s_i`).
        source_W_up: `[d_model, n_rows]` float64 `w_up_i / t_i` for a gated MLP, else None.
        source_b_up: `[n_rows]` float64 `b_up_i / t_i` for a gated MLP, else None.
    """

    layer: int
    sources: pd.DataFrame
    source_W: np.ndarray
    source_b: np.ndarray
    source_W_up: np.ndarray | None = None
    source_b_up: np.ndarray | None = None

    @property
    def n_virtual(self) -> int:
        return int(self.sources.virtual.max()) + 1 if len(self.sources) else 0

    @property
    def gated(self) -> bool:
        return self.source_W_up is not None

    def _sum(self, per_row: np.ndarray) -> np.ndarray:
        """Sum per-row columns `[d, n_rows]` (or values `[n_rows]`) over each virtual neuron's sources."""
        out = np.zeros((*per_row.shape[:-1], self.n_virtual))
        np.add.at(out.T, self.sources.virtual.to_numpy(), per_row.T)
        return out

    @property
    def W(self) -> np.ndarray:
        """`[d_model, n_virtual]` input (gated: gate) weights of the virtual neurons."""
        return self._sum(self.source_W)

    @property
    def b(self) -> np.ndarray:
        """`[n_virtual]` biases (gated: gate biases) of the virtual neurons."""
        return self._sum(self.source_b)

    @property
    def W_up(self) -> np.ndarray | None:
        """`[d_model, n_virtual]` up weights of gated virtual neurons (None for a plain MLP)."""
        return None if self.source_W_up is None else self._sum(self.source_W_up)

    @property
    def b_up(self) -> np.ndarray | None:
        """`[n_virtual]` up biases of gated virtual neurons (None for a plain MLP)."""
        return None if self.source_b_up is None else self._sum(self.source_b_up)

    def source_weights(self, kind: str) -> np.ndarray:
        """`[d_in, n_rows]` per-source weights of one embedding kind (`embeddings.KINDS`): `"in"` (plain) or
        `"gate"`, `"up"`, `"both"` (gate rows then up rows, `d_in = 2 * d_model`) for a gated MLP."""
        check_choice("kind", kind, ("gate", "up", "both") if self.gated else ("in",))
        if kind == "up":
            return self.source_W_up
        return np.vstack([self.source_W, self.source_W_up]) if kind == "both" else self.source_W


def make_virtual_neurons(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    n_virtual: int = 100,
    *,
    n_sources: tuple[int, int] = (2, 4),
    min_examples: int = 10,
    seed: int = 0,
    examples: clustering.LayerExamples | None = None,
    table: pd.DataFrame | None = None,
) -> VirtualNeurons:
    """Pick monosemantic source neurons of one layer and combine them into virtual neurons.

    Sources are live neurons with at least `min_examples` examples and at most `MONOSEMANTIC_CLUSTERS`
    effective clusters (default clustering). The sources of one virtual neuron have different most common
    activating tokens and no example window in common. Virtual neuron v has `n_sources[0] + v % (span)`
    sources, so the counts 2, 3, 4 take turns; sources may serve several virtual neurons. A source's scale
    (and, gated, its up scale) is read at its top example and must be positive (`VirtualNeurons`); for a
    gated MLP the sources are chosen by the clusters of their default (gate) embeddings.

    Args:
        model, windows, top, layer: as in `clustering.polysemy_table`.
        n_virtual: virtual neurons to make (fewer when the layer has too few compatible sources).
        n_sources: inclusive range of sources per virtual neuron, within 2..8.
        min_examples: fewest examples of a source.
        seed: random seed of the choice.
        examples, table: this layer's `clustering.layer_examples` and `clustering.polysemy_table`, if at hand.

    Raises:
        ValueError: fewer than two compatible sources.
    """
    from nbutils import embeddings
    from nbutils.models import check_layer, is_gated

    layer = check_layer(model, layer)
    gated = is_gated(model)
    n_virtual = check_int_range("n_virtual", n_virtual, 1, 100_000)
    lo = check_int_range("n_sources", n_sources[0], 2, 8)
    hi = check_int_range("n_sources", n_sources[1], lo, 8)
    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer)
    table = table if table is not None else clustering.polysemy_table(model, windows, top, layer, examples=lx)
    mono = table[~table.dead & (table.n_examples >= min_examples) & (table.effective_clusters > 0)
                 & (table.effective_clusters <= MONOSEMANTIC_CLUSTERS)].neuron.to_numpy()
    window_col, pos_col, tokens = lx.examples.window.to_numpy(), lx.examples.pos.to_numpy(), windows.numpy()
    if gated:  # lx.W, lx.b are the gate's (the default kind); the up projection in the same convention
        W_up, b_up = (t.numpy().astype(np.float64) for t in embeddings.mlp_in_weights(model, layer, kind="up"))
    info = {}  # neuron -> (example windows, most common token, scale, up scale)
    for j in mono:
        rows = slice(lx.bounds[j], lx.bounds[j + 1])
        h_top = lx.h[lx.rows(j)[0]]  # [d_model] at its top example
        scale = float(h_top @ lx.W[:, j] + lx.b[j])  # pre-activation (gated: gate) at its top example
        up_scale = float(h_top @ W_up[:, j] + b_up[j]) if gated else 1.0
        if scale > 0 and up_scale > 0:
            info[j] = (set(window_col[rows].tolist()), int(np.bincount(tokens[window_col[rows], pos_col[rows]]).argmax()),
                       scale, up_scale)
    rng = np.random.default_rng([seed, layer])
    candidates, rows = np.array(sorted(info)), []
    for v in range(n_virtual):
        m, chosen = lo + v % (hi - lo + 1), []
        for j in rng.permutation(candidates):
            if all(info[j][1] != info[c][1] and not info[j][0] & info[c][0] for c in chosen):
                chosen.append(int(j))
                if len(chosen) == m:
                    break
        if len(chosen) >= 2:
            rows += [(len({r[0] for r in rows}), j, info[j][2], info[j][1], info[j][3]) for j in chosen]
    if not rows:
        fail("layer", "have at least two monosemantic neurons with different tokens and windows",
             f"{len(info)} monosemantic neurons in layer {layer}", "Collect over more windows.")
    sources = pd.DataFrame(rows, columns=["virtual", "neuron", "scale", "token", "up_scale"])
    neuron, scale, up_scale = sources.neuron.to_numpy(), sources.scale.to_numpy(), sources.up_scale.to_numpy()
    if not gated:
        return VirtualNeurons(layer=layer, sources=sources.drop(columns="up_scale"), source_W=lx.W[:, neuron] / scale,
                              source_b=lx.b[neuron] / scale)
    return VirtualNeurons(layer=layer, sources=sources, source_W=lx.W[:, neuron] / scale, source_b=lx.b[neuron] / scale,
                          source_W_up=W_up[:, neuron] / up_scale, source_b_up=b_up[neuron] / up_scale)


def virtual_activations(model: Any, virtual: VirtualNeurons, h: Any, neurons: Any = None) -> np.ndarray:
    """Activations of virtual neurons from pre-MLP vectors `h [..., d_model]` (folded convention): `act(h . w_v
    + b_v)` (plain) or `act(g_v) * u_v` (gated), as `VirtualNeurons` defines them.

    Args:
        neurons: virtual neuron ids (an int gives that neuron alone, without the last axis); default all.

    Returns:
        `[..., n_neurons]` (`[...]` for an int) float64.
    """
    idx = slice(None) if neurons is None else neurons
    h = np.asarray(h, dtype=np.float64)
    pre = h @ virtual.W[:, idx] + virtual.b[idx]
    if not virtual.gated:
        return clustering.mlp_activation(model, pre)
    return clustering.mlp_activation(model, pre, h @ virtual.W_up[:, idx] + virtual.b_up[idx])


def _check_virtual_of(model: Any, virtual: VirtualNeurons) -> None:
    """Virtual neurons must be of the model's kind of MLP (plain or gated)."""
    from nbutils.models import is_gated

    gated = is_gated(model)
    if virtual.gated != gated:
        fail("virtual", f"be made from this model ({'a gated' if gated else 'a plain'} MLP)",
             "virtual neurons of the other kind of MLP", "Make them with `make_virtual_neurons(model, ...)`.")


def _source_terms(model: Any, virtual: VirtualNeurons, h: np.ndarray, rows: Any) -> np.ndarray:
    """What each source of `rows` (rows of `virtual.sources`) adds on its own at `h [n, d_model]`, `[n, m]`:
    its scaled pre-activation `h . w_i / s_i + b_i / s_i` (plain) or its scaled activation
    `act(g_i / s_i) * u_i / t_i` (gated). Each is 1 (gated: `act(1)`) at the source's own top example."""
    pre = h @ virtual.source_W[:, rows] + virtual.source_b[rows]  # [n, m]
    if not virtual.gated:
        return pre
    return clustering.mlp_activation(model, pre, h @ virtual.source_W_up[:, rows] + virtual.source_b_up[rows])


def collect_virtual_examples(
    model: Any,
    windows: Any,
    virtual: list[VirtualNeurons],
    *,
    k: int = 128,
    frac: float = 0.75,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Top examples of the virtual neurons of several layers in one streaming pass over `windows`.

    Per batch, h of each layer is read once and the pre-activations of all its virtual neurons are one
    product `h @ W + b` `[batch, pos, n_virtual]` (gated: `act(h @ W + b) * (h @ W_up + b_up)`, ranked as
    such); the running top-k merges as in `activations.collect_top_activations` (memory O(n_virtual x k),
    whatever the corpus size).

    Returns:
        DataFrame `layer, virtual, window, pos, act` (act: `virtual_activations`, the model's activation
        function of the pre-activation, or `act(g_v) * u_v` for a gated MLP), sorted by layer, virtual, act
        desc; an example per (virtual neuron, window) at its highest position, kept when `act >= frac * max`.
    """
    import torch
    from tqdm.auto import tqdm

    from nbutils.activations import _empty_state, _merge_topk, _order_key, _sorted_state
    from nbutils.embeddings import activation_fn
    from nbutils.models import check_windows, hook_name, is_gated

    windows = check_windows(model, windows)
    k = check_int_range("k", k, 1, 100_000)
    frac = check_float_range("frac", frac, 0.0, 1.0, low_open=True)
    if len({v.layer for v in virtual}) != len(virtual):
        fail("virtual", "hold one VirtualNeurons per layer", [v.layer for v in virtual])
    gated = is_gated(model)
    for v in virtual:
        _check_virtual_of(model, v)
    names = [hook_name(v.layer, "ln_normalized", model) for v in virtual]
    weights = [[torch.tensor(x, dtype=torch.float32) for x in ((v.W, v.b, v.W_up, v.b_up) if gated else (v.W, v.b))]
               for v in virtual]
    act_fn = activation_fn(model)

    def scores(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *up: torch.Tensor) -> torch.Tensor:
        """`[batch, pos, n_virtual]`: pre-activations (plain; the activation is applied after the top-k) or
        activations `act(g) * u` (gated)."""
        return h @ W + b if not up else act_fn(h @ W + b) * (h @ up[0] + up[1])

    total = sum(v.n_virtual for v in virtual)
    state = _empty_state(total, k, "cpu")
    stop = max(v.layer for v in virtual) + 1
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="virtual neurons", disable=not progress):
            batch = windows[start : start + batch_size]  # [batch, window]
            _, cache = model.run_with_cache(batch, names_filter=names, stop_at_layer=stop)
            best = [scores(cache[name].float().cpu(), *w).max(dim=1) for name, w in zip(names, weights)]
            pre = torch.cat([m.values for m in best], dim=1).T.contiguous()  # [total, batch]
            pos = torch.cat([m.indices for m in best], dim=1).T.to(torch.int32)  # [total, batch]
            ids = torch.arange(start, start + batch.shape[0]).expand_as(pre)
            state = _merge_topk(state, (_order_key(pre, ids), pos.contiguous()), k)
    pre, window, pos = (t[0].numpy() for t in _sorted_state(*state, 1))  # [total, k] each
    act = (pre.astype(np.float64) if gated  # [total, k]
           else clustering.mlp_activation(model, np.where(window >= 0, pre, 0.0)))
    top = np.where(window >= 0, act, -np.inf).max(axis=1, keepdims=True)
    keep = (window >= 0) & (top > 0) & (act >= frac * top)
    layer = np.repeat([v.layer for v in virtual], [v.n_virtual for v in virtual])  # [total]
    vid = np.concatenate([np.arange(v.n_virtual) for v in virtual])  # [total]
    row, col = np.nonzero(keep)
    return pd.DataFrame({"layer": layer[row], "virtual": vid[row], "window": window[row, col],
                         "pos": pos[row, col], "act": act[row, col]})


def _knn_accuracy(sim: np.ndarray, truth: np.ndarray, neighbours: int) -> float:
    """Share of examples whose `neighbours` most similar others hold their label most often."""
    n = len(truth)
    if n < 2:
        return float("nan")
    kk = min(neighbours, n - 1)
    others = sim - 3.0 * np.eye(n)
    nearest = np.argsort(-others, axis=1, kind="stable")[:, :kk]  # [n, kk]
    votes = np.zeros((n, truth.max() + 1))
    np.add.at(votes, (np.repeat(np.arange(n), kk), truth[nearest].reshape(-1)), 1.0)
    return float((votes.argmax(axis=1) == truth).mean())


def score_virtual_neurons(
    model: Any,
    windows: Any,
    virtual: VirtualNeurons,
    examples: pd.DataFrame,
    grid: dict[str, list[float]] | None = None,
    *,
    pattern: int = 8,
    neighbours: int = 5,
    chunk: int = 16,
    progress: bool = False,
    kind: str | None = None,
) -> pd.DataFrame:
    """Cluster each virtual neuron's examples in three spaces (`SPACES`) and score them against the sources.

    Each example is labelled by the source that adds most on its own (`_source_terms`): the largest scaled
    pre-activation `(h . w_i + b_i) / s_i` (plain MLP) or scaled activation `act(g_i / s_i) * u_i / t_i`
    (gated; `VirtualNeurons`); examples whose second source reaches `AMBIGUOUS` of the first are clustered
    but not scored. The labels do not depend on `kind`. Spaces: the virtual neuron embedding `h ⊙ w_v` of
    the embedding `kind` (gated: `h ⊙ w_v` of the gate, `h ⊙ w_up_v`, or both concatenated; its sum plus
    the bias is `g_v`, `u_v` or `g_v + u_v`), plain `h`, and its activation (`virtual_activations`) at the
    `pattern` positions ending at the example (zero before the window starts).

    Args:
        model, windows: as in `collect_virtual_examples`.
        virtual: one layer's virtual neurons.
        examples: `collect_virtual_examples` rows (other layers are ignored).
        grid: `{method: [thresholds]}`; default `{method: [default threshold]}` for every method.
        pattern: positions in the activation pattern.
        neighbours: neighbours of the nearest-neighbour accuracy.
        chunk: virtual neurons whose vectors are read together (memory vs. passes over their windows).
        progress: tqdm bar over virtual neurons.
        kind: embedding kind of the `"embedding"` space (`embeddings.embedding_kind`; default the model's:
            `"in"` plain, `"gate"` gated); the other spaces do not depend on it.

    Returns:
        DataFrame, one row per (virtual neuron, space, method, threshold): `layer, virtual, n_sources,
        n_examples, n_scored, n_present` (sources among the scored examples), `own_share` (mean share of
        `|e_v|^2` in the labelled source's own term `h ⊙ w_i / s_i` of that kind; 1 / n_sources if every
        term weighed the same), `kind, space, method, threshold,
        n_clusters, ari, homogeneity, completeness, v_measure, whole` (`score_labels` on the scored examples),
        `knn_accuracy` (`neighbours`-nearest-neighbour vote in that space) and `majority` (share of the
        commonest source: the accuracy of always guessing it).
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from nbutils.embeddings import embedding_kind

    grid = _check_grid(grid if grid is not None else {m: [clustering.DEFAULT_THRESHOLDS[m]] for m in clustering.METHODS})
    pattern = check_int_range("pattern", pattern, 1, 10_000)
    kind = embedding_kind(model, kind)
    _check_virtual_of(model, virtual)
    ex = examples[examples.layer.to_numpy() == virtual.layer]
    n_pos = windows.shape[1]
    source_W = virtual.source_weights(kind)  # [d_in, n_rows] of the embedding kind
    W_kind = virtual._sum(source_W)  # [d_in, n_virtual]
    src = virtual.sources
    offsets = np.arange(-pattern + 1, 1)  # [pattern]
    rows = []
    bar = tqdm(total=virtual.n_virtual, desc=f"layer {virtual.layer} virtual neurons", disable=not progress)
    for first in range(0, virtual.n_virtual, chunk):
        part = ex[(ex.virtual >= first) & (ex.virtual < first + chunk)]
        pos = part.pos.to_numpy()[:, None] + offsets  # [n, pattern]
        keys = part.window.to_numpy()[:, None] * n_pos + np.maximum(pos, 0)  # [n, pattern]
        unique, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(keys.shape)
        h = clustering._pre_mlp_vectors(model, windows, virtual.layer, unique // n_pos, unique % n_pos,
                                        fold_ln=True)  # [n_unique, d_model]
        with threadpool_limits(1):
            for v, rows_v in part.groupby("virtual").indices.items():
                bar.update(1)
                s = src[src.virtual == v]
                h_v = h[inverse[rows_v, -1]]  # [n, d_model] at the examples
                contrib = _source_terms(model, virtual, h_v, s.index)  # [n, m]
                order = np.sort(contrib, axis=1)
                truth, scored = contrib.argmax(axis=1), order[:, -2] < AMBIGUOUS * order[:, -1]
                acts = virtual_activations(model, virtual, h[inverse[rows_v]], v)  # [n, pattern]
                h_k = np.hstack([h_v, h_v]) if kind == "both" else h_v  # [n, d_in]
                spaces = {"embedding": h_k * W_kind[:, v], "h": h_v, "pattern": np.where(pos[rows_v] >= 0, acts, 0.0)}
                parts = (h_k[:, :, None] * source_W[:, s.index][None]) ** 2  # [n, d_in, m]
                power = parts.sum(axis=1)  # [n, m] squared norm of each source's term h ⊙ w_i / s_i
                own = power[np.arange(len(truth)), truth] / power.sum(axis=1)  # [n]
                base = dict(layer=virtual.layer, virtual=v, n_sources=len(s), n_examples=len(rows_v),
                            n_scored=int(scored.sum()), n_present=len(np.unique(truth[scored])),
                            own_share=float(own[scored].mean()) if scored.any() else float("nan"))
                if scored.sum() < 2:
                    continue
                t_scored = np.unique(truth[scored], return_inverse=True)[1].reshape(-1)
                majority = np.bincount(t_scored).max() / len(t_scored)
                for space, x in spaces.items():
                    sim = clustering.cosine_similarity(x)
                    knn = _knn_accuracy(sim[np.ix_(scored, scored)], t_scored, neighbours)
                    for method, thresholds in grid.items():
                        for t in thresholds:
                            labels = clustering._labels_from_similarity(sim, method, clustering._check_threshold(method, t))
                            rows.append(dict(base, kind=kind, space=space, method=method, threshold=t,
                                             n_clusters=int(labels.max()) + 1,
                                             **score_labels(truth, labels, scored), knn_accuracy=knn,
                                             majority=majority))
    bar.close()
    return pd.DataFrame(rows)


def virtual_family_scores(scores: pd.DataFrame, *, space: str = "embedding") -> pd.DataFrame:
    """`score_virtual_neurons` rows of one space as a generator family named "virtual" (`score_families`
    columns; `n_features` = sources present among the scored examples), for `leave_one_family_out`."""
    part = scores[scores.space == space]
    out = part.assign(family="virtual", draw=part.layer * 100_000 + part.virtual, n_features=part.n_present)
    return out[["family", "draw", "n_features", "method", "threshold", "n_clusters", "ari", "homogeneity",
                "completeness", "v_measure", "whole"]].reset_index(drop=True)


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
