"""Tests of nbutils.similar: exact and approximate neighbours, similar features of a layer."""

from __future__ import annotations

import numpy as np
import pytest

from nbutils import activations, clustering, similar

LAYER = 1


@pytest.fixture(scope="module")
def top(model, windows):
    return activations.collect_top_activations(model, windows, k=16, frac=0.5, use_cache=False, progress=False)


@pytest.fixture(scope="module")
def features(model, windows, top):
    return similar.layer_features(model, windows, top, LAYER)


def test_nearest_neighbours_hand_case():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    ind, sim = similar.nearest_neighbours(x, 2, backend="exact")
    assert ind[:, 0].tolist() == [1, 0, 3, 2, 2]  # itself never counts
    assert sim[0, 0] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    assert (np.diff(sim, axis=1) <= 0).all()  # most similar first


def test_pynndescent_agrees_with_exact():
    x = np.random.default_rng(0).standard_normal((300, 16))
    exact, _ = similar.nearest_neighbours(x, 5, backend="exact")
    approx, sim = similar.nearest_neighbours(x, 5, backend="pynndescent")
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, approx)])
    assert recall >= 0.9  # approximate search; measured 1.0 on this set
    assert (approx != np.arange(300)[:, None]).all()


def test_layer_features(model, top, features):
    table = features.table
    assert len(table) == len(features.members) == len(features.vectors["h"]) == len(features.vectors["embedding"])
    assert (table["size"] >= 3).all()
    assert [len(m) for m in features.members] == table["size"].tolist()
    # a feature's own neuron on its own examples: the activation rebuilt from h (invariant) equals the
    # collected activations of those examples
    ex = top.examples[top.examples.layer == LAYER]
    n_pos = 32
    acts = dict(zip(ex.neuron.to_numpy() * 10**9 + ex.window.to_numpy() * n_pos + ex.pos.to_numpy(), ex.act))
    max_act = top.max_act[LAYER].numpy()
    for i in range(min(len(table), 20)):
        neuron = int(table.neuron.iat[i])
        own = np.mean([acts[neuron * 10**9 + key] for key in features.members[i]]) / max_act[neuron]
        assert features.cross_act[i, neuron] == pytest.approx(own, abs=1e-4)


def test_similar_features_table(model, windows, top, features):
    out = similar.similar_features(model, windows, top, LAYER, k=3, features=features)
    assert set(out.space) == {"embedding", "h"}
    assert (out.neuron != out.other_neuron).all()  # only features of other neurons
    assert out.groupby(["space", "neuron", "cluster"]).size().max() <= 3
    assert out.shared_examples.between(0, 1).all()
    first = out[out["rank"] == 0]
    table = features.table.set_index(["neuron", "cluster"])
    for _, row in first.head(10).iterrows():
        a = table.index.get_loc((row.neuron, row.cluster))
        b = table.index.get_loc((row.other_neuron, row.other_cluster))
        x = features.vectors[row.space]
        cos = x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b])
        assert row.similarity == pytest.approx(cos, abs=1e-6)
        # rank 0 is the most similar feature of any other neuron
        others = table.index.get_level_values(0) != row.neuron
        sims = x[others] @ x[a] / np.linalg.norm(x[others], axis=1) / np.linalg.norm(x[a])
        assert row.similarity == pytest.approx(sims.max(), abs=1e-6)


def test_similar_features_empty_says_why(model, windows, top):
    out = similar.similar_features(model, windows, top, LAYER, min_size=1000)
    assert out.empty and "need two or more" in out.attrs["reason"]


def test_similar_errors(model, windows, top, features):
    with pytest.raises(ValueError, match="`spaces` must be one of 'embedding', 'h'; got 'logits'"):
        similar.similar_features(model, windows, top, LAYER, spaces=("logits",), features=features)
    with pytest.raises(ValueError, match="`backend` must be one of 'auto', 'exact', 'pynndescent'"):
        similar.nearest_neighbours(np.eye(3), 1, backend="faiss")
    with pytest.raises(ValueError, match=r"`k` must be in 1..2 \(at most the number of rows - 1\); got 3"):
        similar.nearest_neighbours(np.eye(3), 3)
    with pytest.raises(ValueError, match=r"`layer` must be in 0..3 for this model; got 9"):
        similar.similar_features(model, windows, top, 9)
