"""Tests for nbutils.explorer: the per-neuron widget on a feature atlas, driven through its callbacks and widgets."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import traitlets

from nbutils import activations, atlas, clustering, embeddings, explorer


@pytest.fixture(scope="module")
def top(model, windows):
    return activations.collect_top_activations(model, windows, k=32, use_cache=False, progress=False)


@pytest.fixture(scope="module")
def at(model, windows, top, tmp_path_factory):
    return atlas.build_atlas(model, windows, k=32, top=top, out=tmp_path_factory.mktemp("explorer") / "a",
                             progress=False)


@pytest.fixture(scope="module")
def busy(at) -> tuple[int, int]:
    """The most polysemantic neuron of layer 1 with enough examples."""
    return 1, int(at.most_polysemantic(1, layer=1, min_examples=10)["neuron"].iloc[0])


@pytest.fixture
def ex(at, busy):
    fresh = atlas.Atlas.open(at.path)  # no model loaded
    return explorer.Explorer(fresh, layer=busy[0], neuron=busy[1], seed=0)


def _expected_titles(labels: np.ndarray) -> list[str]:
    sizes = np.bincount(labels)
    titles = [f"{c} ({sizes[c]})" for c in range(len(sizes)) if sizes[c] >= 2]
    singles = int((sizes == 1).sum())
    return titles + ([f"singletons ({singles})"] if singles else [])


def _embeddings(model, windows, top, layer, neuron) -> np.ndarray:
    rows = top.neuron_examples(layer, neuron)
    wid, pos = np.array(rows["window"], dtype=np.int64), np.array(rows["pos"], dtype=np.int64)
    return embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos).numpy()


def test_explorer_reads_the_atlas_without_the_model(ex, model, windows, top, busy):
    layer, neuron = busy
    e = _embeddings(model, windows, top, layer, neuron)
    labels = clustering.cluster(e)  # the default method and threshold, from independent embeddings
    np.testing.assert_array_equal(ex.state.labels, labels)
    np.testing.assert_array_equal(ex.state.central, clustering.central_example(e, labels))
    assert list(ex.tabs.titles) == _expected_titles(labels)  # one tab per cluster, singletons together
    assert len(ex.tabs.children) == len(ex.tabs.titles)
    summary = ex.summary.value
    assert f"Layer {layer}, neuron {neuron}</b> · {len(e)} examples · {labels.max() + 1} clusters" in summary
    assert f"effective clusters {clustering.effective_n_clusters(labels):.2f}" in summary
    assert f"monosemanticity {clustering.monosemanticity(e):.2f}" in summary
    assert "top tokens: " in summary
    svg = bytes(ex.image.value)
    assert svg.startswith(b"<svg") and ex.image.layout.display is None
    assert svg.count(b"<circle") >= len(e) and svg.count(b"<polygon") == labels.max() + 1  # a star per cluster
    assert ex.state.history == [(layer, neuron)] and ex.back_button.disabled
    assert ex.widget.explorer is ex
    explorer.on_neuron(ex, (neuron + 1) % 512)
    explorer.on_layer(ex, 3)
    assert ex.atlas._model is None  # every view so far came from the atlas: no model, no forward pass


def test_tab_lists_central_first_with_context_and_outlined_token(ex, model, windows):
    first = ex.tabs.children[0].children[-1].value
    centre = int(ex.state.central[0])
    data = ex.neuron_data(ex.state.layer, ex.state.neuron)
    row = data.examples.iloc[centre]
    heads = re.findall(r"(★ central · )?cluster (\d+) · act ([0-9.-]+) · window (\d+), token (\d+)", first)
    assert heads[0][0] and (int(heads[0][3]), int(heads[0][4])) == (int(row["window"]), int(row["pos"]))
    assert all(int(h[1]) == 0 for h in heads)  # tab 0 holds cluster 0 only
    assert len(heads) == min(ex.max_examples, int((ex.state.labels == 0).sum()))
    acts = [float(h[2]) for h in heads[1:]]
    assert acts == sorted(acts, reverse=True)  # after the central example, highest activation first
    block = first.split("★ central")[1].split('<div style="margin:4px 0">')[0]
    values = [float(v) for v in re.findall(r'title="activation ([-0-9.e+]+)"', block)]
    pos, window = int(row["pos"]), int(row["window"])
    assert len(values) == min(pos, ex.before) + 1 + min(windows.shape[1] - 1 - pos, ex.after)
    assert block.count("outline:2px") == 1
    truth = activations.neuron_activations(model, windows, ex.state.layer, ex.state.neuron, [window])[0].numpy()
    np.testing.assert_allclose(values, truth[max(0, pos - ex.before) : pos + ex.after + 1], rtol=2e-3, atol=2e-3)


def test_layer_and_neuron_pickers(ex, model):
    layer, neuron = ex.state.layer, ex.state.neuron
    ex.layer_picker.value = 2  # same neuron index, new layer
    assert (ex.state.layer, ex.state.neuron) == (2, neuron)
    ex.neuron_picker.value = 7
    assert (ex.state.layer, ex.state.neuron) == (2, 7)
    assert ex.state.history == [(layer, neuron), (2, neuron), (2, 7)]
    assert "L2/N7" in ex.history_line.value and not ex.back_button.disabled
    ex.neuron_picker.value = 10**6  # the neuron box clamps, the layer list rejects
    assert ex.state.neuron == model.cfg.d_mlp - 1
    with pytest.raises(traitlets.TraitError):
        ex.layer_picker.value = model.cfg.n_layers
    assert ex.state.layer == 2
    with pytest.raises(ValueError, match=r"`layer` must be in 0..3 for this model; got 9"):
        explorer.on_layer(ex, 9)
    with pytest.raises(ValueError, match=r"`neuron` must be in 0..511 for this model \(d_mlp\); got -1"):
        explorer.on_neuron(ex, -1)


def test_random_button_and_back(ex, at):
    start = (ex.state.layer, ex.state.neuron)
    ex.random_button.click()
    polysemy = at.table("neurons", start[0])
    picked = polysemy[polysemy["neuron"] == ex.state.neuron].iloc[0]
    assert ex.state.neuron != start[1] and ex.state.layer == start[0]
    assert picked["effective_clusters"] >= explorer.POLYSEMANTIC_MIN
    assert len(ex.tabs.children) == len(_expected_titles(ex.state.labels))
    second = (ex.state.layer, ex.state.neuron)
    explorer.on_random(ex)
    assert ex.state.history == [start, second, (ex.state.layer, ex.state.neuron)]
    ex.back_button.click()
    assert (ex.state.layer, ex.state.neuron) == second and ex.state.history == [start, second]
    explorer.on_back(ex)
    assert (ex.state.layer, ex.state.neuron) == start and ex.state.history == [start]
    assert ex.back_button.disabled
    explorer.on_back(ex)  # nothing before the start
    assert ex.state.history == [start]
    assert (ex.layer_picker.value, ex.neuron_picker.value) == start  # pickers follow the state


def test_random_is_seeded(at, busy):
    picks = []
    for _ in range(2):
        ex = explorer.Explorer(at, layer=busy[0], neuron=busy[1], seed=5)
        explorer.on_random(ex)
        picks.append(ex.state.neuron)
    assert picks[0] == picks[1]


def test_method_and_threshold_recluster_live_with_the_model_loaded_lazily(ex, model, windows, top):
    e = _embeddings(model, windows, top, ex.state.layer, ex.state.neuron)
    assert ex.atlas._model is None
    ex.method_picker.value = "threshold"
    assert ex.atlas._model is not None and ex.live
    low, high, step, default = explorer.threshold_range("threshold")
    slider = ex.threshold_slider
    assert (slider.min, slider.max, slider.step, slider.value) == (low, high, step, default)
    np.testing.assert_array_equal(ex.state.labels, clustering.cluster(e, "threshold", default))
    n_before = int(ex.state.labels.max()) + 1
    slider.value = 0.99  # a stricter cosine threshold: at least as many components
    np.testing.assert_array_equal(ex.state.labels, clustering.cluster(e, "threshold", 0.99))
    assert int(ex.state.labels.max()) + 1 >= n_before
    assert list(ex.tabs.titles) == _expected_titles(ex.state.labels)
    assert "threshold at 0.99 (live) · space h ⊙ w" in ex.summary.value
    explorer.on_method(ex, "hdbscan")
    assert slider.step == 1.0 and slider.value == explorer.threshold_range("hdbscan")[3]
    np.testing.assert_array_equal(ex.state.labels, clustering.cluster(e, "hdbscan", int(slider.value)))
    explorer.on_threshold(ex, 4)
    np.testing.assert_array_equal(ex.state.labels, clustering.cluster(e, "hdbscan", 4))
    explorer.on_neuron(ex, ex.state.neuron + 1)  # the setting stays when the neuron changes
    assert (ex.state.method, ex.state.threshold) == ("hdbscan", 4.0)
    explorer.on_method(ex, ex.atlas.settings.method)  # back to the atlas's own clustering: read again
    assert not ex.live and "(live)" not in ex.summary.value
    with pytest.raises(ValueError, match="`method` must be one of 'adaptive'"):
        explorer.on_method(ex, "kmeans")


def test_importance_toggle_colours_the_open_tab(ex, model, windows):
    from nbutils import importance

    ex.mode_toggle.value = "importance"
    html = ex.tabs.children[0].children[-1].value
    assert "tokens coloured by importance" in html and "title=\"importance" in html
    shown = len(re.findall(r"window (\d+), token (\d+)", html))
    assert len(ex._importance) == shown  # computed for the open tab only, then cached
    if len(ex.tabs.children) > 1:
        assert "computed when this tab is opened" in ex.tabs.children[1].children[0].value
        ex.tabs.selected_index = 1
        assert "title=\"importance" in ex.tabs.children[1].children[-1].value
    window, pos = map(int, re.search(r"window (\d+), token (\d+)", html).groups())
    expected = importance.token_importance(model, windows[window], pos, ex.state.layer, ex.state.neuron)
    np.testing.assert_allclose(ex.importance_of(ex.state.layer, ex.state.neuron, window, pos), expected)
    ex.mode_toggle.value = "activation"
    assert "title=\"activation" in ex.tabs.children[0].children[-1].value


def test_similar_feature_buttons_follow_the_atlas_across_layers(ex, at):
    buttons = [b for b in ex.tabs.children[0].children[0].children if hasattr(b, "click")]
    start = (ex.state.layer, ex.state.neuron)
    cluster = int(ex.neuron_data(*start).examples["cluster"].iat[int(ex.state.central[0])])
    expected = at.similar_to(*start, cluster).drop_duplicates(["other_layer", "other_neuron"]).head(explorer.N_SIMILAR)
    assert [b.description for b in buttons] == [f"L{r.other_layer}/N{r.other_neuron} ({r.similarity:.2f})"
                                                for r in expected.itertuples()]
    buttons[0].click()
    first = expected.iloc[0]
    assert (ex.state.layer, ex.state.neuron) == (int(first.other_layer), int(first.other_neuron))
    assert ex.state.history == [start, (ex.state.layer, ex.state.neuron)]
    # following features into other layers is possible from the atlas alone
    sim = at.table("similar")
    assert (sim["layer"] != sim["other_layer"]).any()


def test_dead_neuron_shows_a_message(model, windows, top, busy, tmp_path):
    layer, neuron = busy
    act = top.act.clone()
    act[layer, neuron] = -0.5  # highest activation <= 0: dead
    dead_top = dataclasses.replace(top, act=act, _tables={})
    dead = atlas.build_atlas(model, windows, k=32, top=dead_top, layers=[layer], out=tmp_path / "dead", progress=False)
    ex = explorer.Explorer(dead, layer=layer, neuron=neuron)
    assert f"Neuron {neuron} of layer {layer} is dead" in ex.summary.value
    assert len(ex.tabs.children) == 0 and ex.image.layout.display == "none" and bytes(ex.image.value) == b""
    assert ex.figure() is None
    explorer.on_neuron(ex, (neuron + 1) % model.cfg.d_mlp)  # a live neuron clears the message
    assert "dead" not in ex.summary.value and len(ex.tabs.children) > 0


def test_static_views(ex):
    report = ex.report_html()
    assert report.startswith('<div style="margin:8px 0"><b>Layer')
    assert report.count("<b>Cluster ") == len(ex.tabs.children)
    fig = ex.figure()
    assert fig.axes[0].get_title().startswith(f"Layer {ex.state.layer}, neuron {ex.state.neuron}: ")
    assert fig.axes[0].get_xlabel() == "PC 1"
    with pytest.raises(ValueError, match="`mode` must be one of 'activation', 'importance'"):
        ex.report_html(mode="size")


def test_model_windows_and_top_still_work_and_must_belong_together(model, windows, top):
    widget = explorer.neuron_explorer(model, windows, top, layer=2)
    assert widget.explorer.state.layer == 2 and widget.explorer.atlas._model is model
    with pytest.raises(ValueError, match="`top` must cover exactly the windows"):
        explorer.neuron_explorer(model, windows[:10], top)
    with pytest.raises(TypeError, match="`top` must be an activations.TopActivations; got DataFrame"):
        explorer.neuron_explorer(model, windows, top.examples)
    with pytest.raises(ValueError, match="`windows` must hold integer token ids"):
        explorer.neuron_explorer(model, windows.float(), top)


def test_explorer_bad_input(at, top, model):
    with pytest.raises(TypeError, match="`atlas` must be an atlas.Atlas"):
        explorer.Explorer(top)
    with pytest.raises(TypeError, match="`atlas` must be an atlas.Atlas"):
        explorer.neuron_explorer(top.examples)
    with pytest.raises(ValueError, match=r"`max_examples` must be in 1..20 \(the atlas's `shown`\); got 0"):
        explorer.Explorer(at, max_examples=0)
    with pytest.raises(ValueError, match=r"`neuron` must be in 0..511"):
        explorer.neuron_explorer(at, neuron=512)
    with pytest.raises(ValueError, match=r"`before` must be in 0..20"):
        explorer.Explorer(at, before=50)
    import torch

    from nbutils import models

    edited = models.load_model()
    with torch.no_grad():
        next(edited.original_model.parameters()).add_(1.0)  # same sizes, other weights
    with pytest.raises(ValueError, match="`model` must have the weights the atlas was built from"):
        explorer.Explorer(at, model=edited)


def test_band_picker_lists_the_sampled_examples_below_the_top(ex, at, model, windows):
    layer, neuron = ex.state.layer, ex.state.neuron
    table = at.band_examples(layer, neuron)
    band = int(table["band"].iloc[-1])  # the lowest band with a sample
    ex.band_picker.value = band
    assert ex.state.band == band and list(ex.tabs.titles) == [f"band {band} ({int((table.band == band).sum())})"]
    html = ex.tabs.children[0].children[0].value
    heads = re.findall(r"band (\d+) · act ([0-9.-]+) \(\d+% of max\) · window (\d+), token (\d+)", html)
    rows = table[table.band == band].head(ex.max_examples)
    assert [(int(w), int(p)) for _, _, w, p in heads] == list(zip(rows.window, rows.pos))
    max_act = float(at.neuron(layer, neuron)["max_act"])
    for _, act, w, p in heads:  # every listed activation lies in its band
        assert band / at.settings.bands * max_act < float(act) + 0.006 and float(act) <= (band + 1) / at.settings.bands * max_act + 0.006
    w, p = int(heads[0][2]), int(heads[0][3])
    truth = activations.neuron_activations(model, windows, layer, neuron, [w])[0].numpy()
    block = html.split("window")[2]
    values = [float(v) for v in re.findall(r'title="activation ([-0-9.e+]+)"', html.split('<div style="margin:4px 0">')[1])]
    np.testing.assert_allclose(values, truth[max(0, p - ex.before) : p + ex.after + 1], rtol=2e-3, atol=2e-3)
    ex.band_picker.value = -1  # back to the clusters
    assert list(ex.tabs.titles) == _expected_titles(ex.state.labels)
    with pytest.raises(ValueError, match="`band` must be in -1.."):
        explorer.on_band(ex, at.settings.bands)
