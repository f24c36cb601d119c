"""Tests of nbutils.bands: the sample against brute force, shards merged == one pass, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbutils import activations, bands, models

BANDS, PER_BAND = 5, 3


@pytest.fixture(scope="module")
def top(model, windows):
    return activations.collect_top_activations(model, windows, k=8, use_cache=False, progress=False)


@pytest.fixture(scope="module")
def sample(model, windows, top):
    return bands.collect_band_samples(model, windows, top.max_act, bands=BANDS, per_band=PER_BAND, batch_size=16,
                                      progress=False)


def test_priority_is_a_bijection_on_tokens():
    window = torch.arange(2000).repeat_interleave(64)
    pos = torch.arange(64).repeat(2000)
    prio = bands.priority(window, pos)
    assert len(torch.unique(prio)) == len(prio)  # distinct tokens never tie
    assert torch.equal(prio, bands.priority(window, pos))  # deterministic


def test_sample_matches_brute_force(model, windows, top, sample):
    """For a few neurons of every layer: every band holds the PER_BAND lowest-priority tokens whose
    activation falls in it, computed here from the full activations."""
    n_windows, n_pos = windows.shape
    prio = bands.priority(torch.arange(n_windows).repeat_interleave(n_pos), torch.arange(n_pos).repeat(n_windows))
    table = sample.table
    names = [models.hook_name(layer, "post") for layer in range(model.cfg.n_layers)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(windows, names_filter=names)
    for layer, name in enumerate(names):
        for neuron in (0, 7, 100):
            act = cache[name][..., neuron].float().reshape(-1)  # [n_tok]
            top_act = float(top.max_act[layer, neuron])
            got = table[(table.layer == layer) & (table.neuron == neuron)]
            for band in range(BANDS):
                lo, hi = band / BANDS * top_act, (band + 1) / BANDS * top_act
                inside = (act > lo) & ((act <= hi) | (band == BANDS - 1)) & (act > 0)
                idx = torch.nonzero(inside).reshape(-1)
                want = idx[torch.argsort(prio[idx])][:PER_BAND]
                rows = got[got.band == band]
                assert (rows.window * n_pos + rows.pos).tolist() == want.tolist(), (layer, neuron, band)
                np.testing.assert_allclose(rows.act, act[want].numpy(), rtol=1e-4, atol=1e-5)


def test_table_columns_and_order(sample):
    table = sample.table
    assert list(table.columns) == ["layer", "neuron", "band", "window", "pos", "act"]
    assert (table.groupby(["layer", "neuron", "band"]).size() <= PER_BAND).all()
    keys = table[["layer", "neuron"]].to_numpy()
    assert (np.diff(keys[:, 0] * 10**6 + keys[:, 1]) >= 0).all()  # by layer, neuron
    assert (table.act > 0).all()


def test_shards_merged_equal_one_pass(model, windows, top, sample):
    a = bands.collect_band_samples(model, windows[:16], top.max_act, bands=BANDS, per_band=PER_BAND, batch_size=16,
                                   progress=False)
    b = bands.collect_band_samples(model, windows[16:], top.max_act, bands=BANDS, per_band=PER_BAND, batch_size=16,
                                   window_offset=16, progress=False)
    for merged in (bands.merge(a, b), bands.merge(b, a)):
        for name in ("priority", "window", "pos"):
            assert torch.equal(getattr(merged, name), getattr(sample, name)), name
        assert torch.equal(merged.act.nan_to_num(-1.0), sample.act.nan_to_num(-1.0))  # bit-identical
    assert merged.table.equals(sample.table)


def test_errors(model, windows, top, sample):
    with pytest.raises(ValueError, match=r"`max_act` must have shape \[n_layers, d_mlp\] = \[4, 512\]"):
        bands.collect_band_samples(model, windows, top.max_act[0], progress=False)
    with pytest.raises(ValueError, match=r"`bands` must be in 1..1000; got 0"):
        bands.collect_band_samples(model, windows, top.max_act, bands=0, progress=False)
    with pytest.raises(ValueError, match=r"`shards` must cover disjoint window ids"):
        bands.merge(sample, sample)
    other = bands.collect_band_samples(model, windows[:4], top.max_act * 2, bands=BANDS, per_band=PER_BAND,
                                       window_offset=1000, progress=False)
    with pytest.raises(ValueError, match=r"`shards` must be cut from the same maxima"):
        bands.merge(sample, other)


def test_band_clusters(model, windows, top, sample):
    neurons = top.neurons
    live = neurons[(neurons.layer == 1) & (neurons.n_examples >= 5)].neuron.to_numpy()[:2]
    out = bands.band_clusters(model, windows, top, sample, 1, live)
    assert list(out.columns) == list(bands.BAND_CLUSTER_COLUMNS) and set(out.neuron) <= set(live)
    table = sample.table
    counts = table[(table.layer == 1) & table.neuron.isin(live)].groupby(["neuron", "band"]).size()
    assert out.set_index(["neuron", "band"]).n_examples.equals(counts.loc[out.set_index(["neuron", "band"]).index])
    assert (out.n_clusters >= 1).all() and (out.n_clusters <= out.n_examples).all() and (out.fit <= 1.5).all()
    top_band = out[out.band == BANDS - 1]
    assert (top_band.fit > 0.7).all()  # the top band holds examples like the top clusters' own
