"""Tests of nbutils.evaluation: planted features, method comparison, threshold sweep, space comparison."""

from __future__ import annotations

import numpy as np
import pytest

from nbutils import clustering, evaluation


# ------------------------------------------------------------------------------------------------
# planted features: generator and the measured default


def test_make_planted_features_geometry():
    p = evaluation.make_planted_features(n=400, d=256, n_features=3, shared=0.5, noise=0.0, outlier_frac=0.05, seed=1)
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
        evaluation.make_planted_features(shared=1.0)
    with pytest.raises(ValueError, match=r"`n` must be in 26..1000000 \(n_features \* min_size \+ outliers\); got 20"):
        evaluation.make_planted_features(n=20, n_features=5, outlier_frac=0.05)


def test_default_recovers_planted_features():
    """The default `cluster` recovers 2-5 planted features (shared component, noise, outliers, d in
    {32, 64, 128}) with mean adjusted Rand index >= 0.95 over 40 draws; every method's number is printed."""
    grid = {m: [clustering.DEFAULT_THRESHOLDS[m]] for m in clustering.METHODS}
    df = evaluation.compare_methods(grid, n_draws=40, seed=1)
    means = df.groupby("method").ari.mean()
    print("\nmean ARI over 40 planted draws:", means.round(3).to_dict())
    assert means[clustering.DEFAULT_METHOD] >= 0.95  # measured 0.98 (100 draws, seed 0)
    assert means[clustering.DEFAULT_METHOD] == means.max()  # the default is the best method
    assert means["threshold"] < 0.8  # the paper's graph chains features that share a direction


def test_default_keeps_single_feature_together():
    # a monosemantic neuron: one feature, no outliers, must stay (nearly) one cluster
    fractions = []
    for seed in range(10):
        p = evaluation.make_planted_features(n=128, d=64, n_features=1, noise=0.7, outlier_frac=0.0, seed=seed)
        fractions.append(np.mean(clustering.cluster(p.e) == 0))
    assert np.mean(fractions) >= 0.95  # measured 1.0


# ------------------------------------------------------------------------------------------------
# a real model: threshold sweep and space comparison


LAYER = 1


@pytest.fixture(scope="module")
def top(model, windows):
    from nbutils import activations

    return activations.collect_top_activations(model, windows, k=16, frac=0.5, use_cache=False, progress=False)


def _live_neurons(top, layer, n=4):
    neurons = top.neurons
    live = neurons[(neurons.layer == layer) & (neurons.n_examples >= 5)]
    return live.neuron.to_numpy()[:n]


def test_threshold_sweep_monotone(model, windows, top):
    lx = clustering.layer_examples(model, windows, top, LAYER)
    sweep = evaluation.threshold_sweep(model, windows, top, LAYER, {"adaptive": [0.5, 0.7, 0.9], "threshold": [0.3, 0.6]},
                                       examples=lx)
    assert len(sweep) == 5 and sweep.n_neurons.nunique() == 1
    for _, part in sweep.groupby("method"):
        # a higher threshold only splits clusters: more clusters, a smaller largest cluster
        assert part.mean_clusters.is_monotonic_increasing and part.largest_share.is_monotonic_decreasing
    table = clustering.polysemy_table(model, windows, top, LAYER, method="adaptive", threshold=0.7, examples=lx)
    row = sweep[(sweep.method == "adaptive") & (sweep.threshold == 0.7)].iloc[0]
    assert row.mean_clusters == pytest.approx(table[~table.dead].n_clusters.mean())


def test_compare_spaces(model, windows, top):
    neurons = _live_neurons(top, LAYER, n=3)
    out = evaluation.compare_spaces(model, windows, top, LAYER, neurons)
    assert len(out) == 3 * len(neurons) and set(out.space) == set(evaluation.SPACES)
    assert (out.n_clusters >= 1).all() and out.ami_token.le(1 + 1e-9).all()
    embedding = out[out.space == "embedding"].set_index("neuron")
    table = clustering.polysemy_table(model, windows, top, LAYER).set_index("neuron")
    assert (embedding.n_clusters == table.loc[embedding.index, "n_clusters"]).all()  # same clusters as the table
