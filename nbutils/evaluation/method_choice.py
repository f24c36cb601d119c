"""Scoring clusters against ground truth and choosing the default method: the grid of methods and thresholds,
scores per planted family, and the default chosen leave one family out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from nbutils import clustering
from nbutils._validation import check_choice, check_int_range

from nbutils.evaluation.planted import FAMILIES, WHOLE_SHARE, Family, _random_settings, family_draws, \
    make_planted_features

__all__ = ["DEFAULT_GRID", "compare_methods", "TARGET", "score_labels", "score_families", "family_summary",
           "choose_default", "leave_one_family_out"]

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


PARALLEL_MIN_DRAWS = 60  # fewer draws in all are scored in process unless `workers` is given: workers take seconds to start


def score_families(
    grid: dict[str, list[float]] | None = None,
    *,
    families: tuple[Family, ...] = FAMILIES,
    n_draws: int = 36,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = None,
) -> pd.DataFrame:
    """Score every (method, threshold) of `grid` on `n_draws` draws of every family.

    `workers` processes (default: one per core from `PARALLEL_MIN_DRAWS` draws in all, else 1) take the draws;
    each is clustered on one thread, so the table does not depend on the number of workers.

    Returns:
        DataFrame, one row per (family, draw, method, threshold): `family, draw, n_features, method,
        threshold, n_clusters, ari, homogeneity, completeness, v_measure, whole` (`score_labels`; outliers
        count as their own labels).
    """
    from tqdm.auto import tqdm

    from nbutils._env import available_cores

    grid = _check_grid(grid)
    draws = [(family.name, draw, p) for family in families for draw, p in enumerate(family_draws(family, n_draws, seed=seed))]
    if workers is None:
        workers = available_cores() if len(draws) >= PARALLEL_MIN_DRAWS else 1
    workers = check_int_range("workers", workers, 1, 1024)
    bar = tqdm(total=len(draws), desc="planted draws", disable=not progress)
    if workers == 1:
        per_draw = []
        for _, _, p in draws:
            per_draw.append(_draw_rows(p.e, p.labels, grid))
            bar.update()
    else:
        from joblib import Parallel, delayed

        per_draw = Parallel(n_jobs=workers, backend="loky")(delayed(_draw_rows)(p.e, p.labels, grid) for _, _, p in draws)
        bar.update(len(draws))
    bar.close()
    return pd.DataFrame([dict(family=name, draw=draw, n_features=p.n_features, **row)
                         for (name, draw, p), rows in zip(draws, per_draw) for row in rows])


def _draw_rows(e: np.ndarray, truth: np.ndarray, grid: dict[str, list[float]]) -> list[dict]:
    """`_grid_rows` on one thread (a worker of `score_families`)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _grid_rows(e, truth, grid)


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

