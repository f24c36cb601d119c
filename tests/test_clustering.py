"""Tests of nbutils.clustering: labels, central examples, polysemy measures, planted features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nbutils import clustering


# ------------------------------------------------------------------------------------------------
# cluster: label convention and methods on hand-made cases


def _two_groups() -> np.ndarray:
    # three vectors near x, two near y, one alone near z
    return np.array(
        [[1.0, 0.05, 0.0], [1.0, -0.05, 0.0], [1.0, 0.0, 0.05], [0.0, 1.0, 0.0], [0.05, 1.0, 0.0], [0.0, 0.0, 1.0]]
    )


@pytest.mark.parametrize("method,threshold", [("threshold", 0.9), ("agglomerative", 0.9), ("adaptive", 0.7)])
def test_cluster_hand_case(method, threshold):
    labels = clustering.cluster(_two_groups(), method=method, threshold=threshold)
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]  # 0 = largest, then by size, singleton last


def test_cluster_hdbscan_noise_becomes_singletons():
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0, 0, 0]) + 0.01 * rng.standard_normal((10, 4))
    b = np.array([0, 1.0, 0, 0]) + 0.01 * rng.standard_normal((6, 4))
    e = np.vstack([a, b, [[0, 0, 1.0, 0]], [[0, 0, 0, 1.0]]])
    labels = clustering.cluster(e, method="hdbscan", threshold=3)
    assert labels.min() >= 0  # -1 never appears
    assert (labels[:10] == 0).all() and (labels[10:16] == 1).all()
    assert labels[16] != labels[17] and set(labels[16:]).isdisjoint({0, 1})


def test_threshold_chains_through_a_bridge_but_average_linkage_does_not():
    # two tight groups plus one bridging point similar (cos 0.87) to both: the threshold graph chains
    e = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5 + [[1.0, 1.0]])
    e = np.hstack([e, np.zeros((11, 1))])
    assert clustering.cluster(e, method="threshold", threshold=0.7).max() == 0  # one component
    agg = clustering.cluster(e, method="agglomerative", threshold=0.7)
    assert agg[:5].tolist() == [agg[0]] * 5 and agg[5:10].tolist() == [agg[5]] * 5 and agg[0] != agg[5]


def test_canonical_labels_orders_by_size_then_first_member():
    assert clustering.canonical_labels(np.array([5, 7, 7, -1, 5, 9, -1])).tolist() == [0, 1, 1, 2, 0, 3, 4]


def test_cluster_accepts_torch_and_small_inputs():
    e = torch.tensor(_two_groups(), dtype=torch.float32)
    assert clustering.cluster(e).tolist() == [0, 0, 0, 1, 1, 2]
    assert clustering.cluster(np.zeros((0, 3))).shape == (0,)
    assert clustering.cluster(np.ones((1, 3))).tolist() == [0]


def test_adaptive_without_structure_gives_singletons():
    e = np.eye(4)  # mutually orthogonal: neighbour similarity 0
    assert sorted(clustering.cluster(e, method="adaptive").tolist()) == [0, 1, 2, 3]


def test_cluster_errors():
    good = _two_groups()
    with pytest.raises(ValueError, match=r"`e` must be 2-D \[n, d\]; got shape \(6,\)"):
        clustering.cluster(good[:, 0])
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="`e` must be finite; got 1 rows with NaN or inf"):
        clustering.cluster(bad)
    with pytest.raises(ValueError, match="`method` must be one of 'adaptive', 'agglomerative', 'threshold', 'hdbscan'; got 'kmeans'"):
        clustering.cluster(good, method="kmeans")
    with pytest.raises(ValueError, match=r"`threshold` must be in \[-1.0, 1.0\]; got 1.5"):
        clustering.cluster(good, method="threshold", threshold=1.5)
    with pytest.raises(ValueError, match=r"`threshold` must be in \(0.0, 2.0\]; got 0.0"):
        clustering.cluster(good, method="adaptive", threshold=0.0)
    with pytest.raises(ValueError, match=r"`threshold` must be in 2..6 \(HDBSCAN's min_cluster_size"):
        clustering.cluster(good, method="hdbscan", threshold=1)
    with pytest.raises(TypeError, match="`threshold` must be an integer"):
        clustering.cluster(good, method="hdbscan", threshold=0.5)


# ------------------------------------------------------------------------------------------------
# central example, effective number of clusters, monosemanticity: hand-computed


def test_central_example_hand_case():
    # cluster 0: a, b, c with cos(a,b)=0.8, cos(a,c)=0.6, cos(b,c)=0 -> means a: 0.7, b: 0.4, c: 0.3
    a, b, c = [1.0, 0.0], [0.8, 0.6], [0.6, -0.8]
    e = np.array([b, c, a, [0.0, 5.0]])
    centres = clustering.central_example(e, np.array([0, 0, 0, 1]))
    assert centres.tolist() == [2, 3]  # a is central; the singleton is its own centre


def test_central_example_errors():
    with pytest.raises(ValueError, match=r"`labels` must have one label per row of `e` \(3\); got 2"):
        clustering.central_example(np.eye(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="`labels` must hold non-negative integer cluster labels"):
        clustering.central_example(np.eye(3), np.array([0, -1, 1]))


def test_effective_n_clusters_hand_cases():
    assert clustering.effective_n_clusters(np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(3.0)
    # sizes 3, 1, 1: the two singletons are left out, so one cluster
    assert clustering.effective_n_clusters(np.array([0, 0, 0, 1, 2])) == pytest.approx(1.0)
    # sizes 2 and 6: p = (0.25, 0.75), H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert clustering.effective_n_clusters(np.array([0] * 6 + [1] * 2 + [2])) == pytest.approx(math.exp(h))
    assert clustering.effective_n_clusters(np.array([0, 1, 2])) == 0.0  # all singletons: no cluster


def test_monosemanticity_hand_cases():
    # pairwise cosines: (x, x)=1, (x, y)=0, (x, y)=0 -> mean 1/3
    assert clustering.monosemanticity(np.array([[1.0, 0], [2.0, 0], [0, 3.0]])) == pytest.approx(1 / 3)
    assert clustering.monosemanticity(np.array([[1.0, 1.0], [-1.0, -1.0]])) == pytest.approx(-1.0)
    assert math.isnan(clustering.monosemanticity(np.ones((1, 4))))


# ------------------------------------------------------------------------------------------------
# planted features: generator and the measured default


def test_make_planted_features_geometry():
    p = clustering.make_planted_features(n=400, d=256, n_features=3, shared=0.5, noise=0.0, outlier_frac=0.05, seed=1)
    assert p.e.shape == (400, 256) and p.labels.shape == (400,)
    assert p.is_outlier.sum() == 20 and (p.labels[p.is_outlier] >= 3).all()
    assert len(np.unique(p.labels[p.is_outlier])) == 20  # each outlier its own label
    sim = clustering.cosine_similarity(p.e)
    same = p.labels[:, None] == p.labels[None, :]
    assert np.allclose(sim[same], 1.0)  # no noise: one direction per feature
    assert np.allclose(sim[~same], 0.5)  # every pair of centres (and outliers) shares `shared`
    assert (np.bincount(p.labels)[:3] >= 5).all()


def test_make_planted_features_errors():
    with pytest.raises(ValueError, match=r"`shared` must be in \[0.0, 1.0\)"):
        clustering.make_planted_features(shared=1.0)
    with pytest.raises(ValueError, match=r"`n` must be in 26..1000000 \(n_features \* min_size \+ outliers\); got 20"):
        clustering.make_planted_features(n=20, n_features=5, outlier_frac=0.05)


def test_default_recovers_planted_features():
    """The default `cluster` recovers 2-5 planted features (shared component, noise, outliers, d in
    {32, 64, 128}) with mean adjusted Rand index >= 0.95 over 40 draws; every method's number is printed."""
    grid = {m: [clustering.DEFAULT_THRESHOLDS[m]] for m in clustering.METHODS}
    df = clustering.compare_methods(grid, n_draws=40, seed=1)
    means = df.groupby("method").ari.mean()
    print("\nmean ARI over 40 planted draws:", means.round(3).to_dict())
    assert means[clustering.DEFAULT_METHOD] >= 0.95  # measured 0.98 (100 draws, seed 0)
    assert means[clustering.DEFAULT_METHOD] == means.max()  # the default is the best method
    assert means["threshold"] < 0.8  # the paper's graph chains features that share a direction


def test_default_keeps_single_feature_together():
    # a monosemantic neuron: one feature, no outliers, must stay (nearly) one cluster
    fractions = []
    for seed in range(10):
        p = clustering.make_planted_features(n=128, d=64, n_features=1, noise=0.7, outlier_frac=0.0, seed=seed)
        fractions.append(np.mean(clustering.cluster(p.e) == 0))
    assert np.mean(fractions) >= 0.95  # measured 1.0
