"""Planted features: synthetic examples of one neuron drawn from known features, and five families of generators
that differ in noise, shared component, spread of feature scales, outliers, dimension and cluster sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nbutils._validation import check_float_range, check_int_range, fail

__all__ = ["PlantedFeatures", "make_planted_features", "Family", "FAMILIES", "MAX_FEATURES", "WHOLE_SHARE",
           "family_draws"]

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

