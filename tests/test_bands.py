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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_candidates_give_the_brute_force_sample(seed):
    """Batches large enough to be sampled in two parts at first, neurons of every kind (dead, mostly inactive,
    activations above the max, exact zeros): the running sample is the brute-force one after every batch."""
    gen = torch.Generator().manual_seed(seed)
    n_win, n_pos, d, n_bands, per_band = 40, 60, 30, 5, 4  # 2,400 tokens a batch
    max_act = torch.rand(d, generator=gen) * 3 + 0.1
    max_act[:3] = torch.tensor([-1.0, 0.0, -0.5])  # dead neurons: no samples
    state = bands._empty((d, n_bands, per_band))
    acts, prios = [], []
    for b in range(5):
        wid = torch.arange(b * n_win, (b + 1) * n_win).repeat_interleave(n_pos)
        pos = torch.arange(n_pos).repeat(n_win)
        act = torch.randn(len(wid), d, generator=gen) * max_act.abs() * 0.6  # some above the max
        act[:, 3] = torch.where(torch.rand(len(wid), generator=gen) < 0.01, act[:, 3].abs(), 0.0)  # rarely active
        prio = bands.priority(wid, pos)
        cand = bands._batch_candidates(act, prio, wid, pos, max_act, n_bands, per_band, threshold=state[0][..., -1])
        state = bands._keep_lowest(state, cand, per_band)
        acts.append(act)
        prios.append(prio)
        every, prio_all = torch.cat(acts), torch.cat(prios)
        band = (torch.ceil(every * n_bands / max_act) - 1).clamp(0, n_bands - 1)  # [n_tok, d]
        for n in range(d):
            for k in range(n_bands):
                inside = (every[:, n] > 0) & (band[:, n] == k) & (max_act[n] > 0)
                want = prio_all[inside].sort().values[:per_band]
                got = state[0][n, k]
                assert torch.equal(got[: len(want)], want) and (got[len(want):] == bands._NONE).all(), (b, n, k)


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
