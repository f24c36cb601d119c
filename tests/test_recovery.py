"""Tests of nbutils.recovery: cases built from virtual neurons, scores on known clusters, held-out choice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nbutils import evaluation, recovery

LAYER = 1


@pytest.fixture(scope="module")
def top(model, windows):
    from nbutils import activations

    return activations.collect_top_activations(model, windows, k=16, frac=0.5, use_cache=False, progress=False)


def test_virtual_cases_agree_with_score_virtual_neurons(model, windows, top):
    virtual = evaluation.make_virtual_neurons(model, windows, top, LAYER, 4, min_examples=4, seed=0)
    ex = evaluation.collect_virtual_examples(model, windows, [virtual], k=12, frac=0.3, progress=False)
    cases = recovery.virtual_cases(model, windows, virtual, ex)
    reference = evaluation.score_virtual_neurons(model, windows, virtual, ex, {"local": [0.75]})
    reference = reference[reference.space == "embedding"].set_index("virtual")
    assert len(cases) == virtual.n_virtual
    for case in cases:
        rows = ex[(ex.layer == LAYER) & (ex.virtual == case.virtual)]
        assert case.h.shape == (len(rows), model.cfg.d_model)
        pre = case.h @ case.w + virtual.b[case.virtual]  # the virtual neuron's pre-activation from h and w
        np.testing.assert_allclose(evaluation.virtual_activations(model, virtual, case.h, case.virtual), rows.act,
                                   rtol=1e-4, atol=1e-5)
        assert np.all(pre > 0)
        assert (case.token == windows.numpy()[rows.window, rows.pos]).all()
        if case.virtual in reference.index:  # the same labels as the package's own scoring
            assert case.scored().sum() == reference.loc[case.virtual, "n_scored"]
            assert len(np.unique(case.truth[case.scored()])) == reference.loc[case.virtual, "n_present"]
        assert (case.scored(0.5) <= case.scored()).all()  # a stricter margin scores fewer examples


def _case(layer: int, virtual: int, seed: int) -> recovery.VirtualCase:
    """Three tight groups of h in orthogonal directions, one per source; each group's own token."""
    rng = np.random.default_rng(seed)
    truth = np.repeat([0, 1, 2], 10)
    h = 5.0 * np.eye(8)[truth] + 0.1 * rng.normal(size=(30, 8))  # [30, 8]
    return recovery.VirtualCase(layer=layer, virtual=virtual, h=h, w=np.ones(8), terms=h[:, :3] / 5.0,
                                token=np.repeat([7, 8, 9], 10))


def test_score_cases_on_known_groups():
    cases = [_case(0, v, v) for v in range(3)]
    scores = recovery.score_cases(cases, recovery.layer_spaces(), (("local", 0.75), ("leiden", 1.0)))
    assert set(scores.space) == {"token", "embedding", "h", "source_terms"} and len(scores) == 3 * (1 + 3 * 2)
    assert (cases[0].truth == np.repeat([0, 1, 2], 10)).all() and cases[0].scored(0.1).all()
    h = scores[scores.space == "h"]
    assert np.allclose(h[["v_measure", "homogeneity", "completeness", "ari", "knn_accuracy"]], 1.0)
    assert (h.clusters_per_source == 1).all() and (h.n_clusters == 3).all()
    assert np.allclose(scores[scores.space == "token"].v_measure, 1.0)  # one token per source here
    one_source = recovery.VirtualCase(**{**cases[0].__dict__, "terms": np.c_[np.ones(30), np.zeros(30)]})
    assert recovery.score_cases([one_source], recovery.layer_spaces()).empty  # nothing to tell apart


def test_held_out_choice_never_scores_a_choice_on_its_own_layer():
    rows = []
    for layer in range(4):
        for space in "ab":
            good = (space == "a") == (layer == 0)  # "a" is best on layer 0 only
            rows.append(dict(layer=layer, virtual=0, space=space, method="local", threshold=0.75, margin=0.9,
                             **{s: (0.9 if good else 0.3) for s in recovery.SCORES}))
    choice = recovery.held_out_choice(pd.DataFrame(rows)).set_index("layer")
    assert choice.loc[0, "space"] == "b" and choice.loc[0, "v_measure"] == pytest.approx(0.3)
    assert choice.loc[1, "space"] == "b" and choice.loc[1, "v_measure"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="`scores` must cover at least two layers"):
        recovery.held_out_choice(pd.DataFrame(rows[:2]))
    with pytest.raises(ValueError, match=r"`scores` must hold one margin"):
        recovery.held_out_choice(pd.DataFrame(rows).assign(margin=[0.5, 0.9] * 4))
    with pytest.raises(ValueError, match="`metric` must be one of"):
        recovery.held_out_choice(pd.DataFrame(rows), metric="speed")
