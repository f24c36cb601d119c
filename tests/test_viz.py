"""Tests for nbutils.viz: token colouring, the 2-D layout and the cluster map, the polysemy plot."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from nbutils import viz


def _blobs(n_per: int = 30, d: int = 32, n_blobs: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated directions (cosine metric) with small noise; labels 0..n_blobs-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, d)) * 3
    e = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres])
    return e, np.repeat(np.arange(n_blobs), n_per)


# ------------------------------------------------------------------------------------------ tokens


def _alphas(markup: str) -> list[float]:
    return [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([0-9.]+)\)", markup)]


def test_tokens_html_one_span_per_token_scaled_and_escaped():
    markup = viz.tokens_html(["a", "<b>", "\n", " d"], [1.0, 2.0, 0.0, -0.3], highlight=1)
    assert _alphas(markup) == [0.5, 1.0, 0.0, 0.0]  # value / max, negatives uncoloured
    assert "&lt;b&gt;" in markup and "<b>" not in markup  # token text is escaped
    assert "⏎" in markup  # a newline token stays visible
    outlined = re.findall(r'<span style="[^"]*outline[^"]*"[^>]*>([^<]*)</span>', markup)
    assert outlined == ["&lt;b&gt;"]  # only the highlighted token is outlined
    assert 'title="activation 2"' in markup


def test_tokens_html_importance_is_blue_on_a_fixed_unit_scale():
    markup = viz.tokens_html(["x", "y"], [0.25, 0.5], kind="importance")
    assert _alphas(markup) == [0.25, 0.5]  # scale is [0, 1], not the max
    assert "rgba(%d,%d,%d," % viz.COLOURS["importance"] in markup


def test_tokens_backends():
    plain = viz.tokens(["x", "y"], np.array([0.5, 1.0]), backend="html", highlight=0)
    assert plain.data == viz.tokens_html(["x", "y"], [0.5, 1.0], highlight=0)
    assert viz.tokens(["x", "y"], [0.5, 1.0]).data == plain.data.replace("outline:2px solid #000;font-weight:bold;", "")  # auto outside a kernel
    rich = viz.tokens(["hello", " world"], [0.1, 0.9], backend="circuitsvis")
    assert "ColoredTokens" in rich.data and '"hello"' in rich.data
    assert "unpkg.com" not in rich.data  # the offline bundle, never the CDN


def test_tokens_bad_input():
    with pytest.raises(ValueError, match="`tokens` and `values` must have the same length; got tokens=2, values=3"):
        viz.tokens(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="`tokens` must be a list of token strings"):
        viz.tokens("ab", [1.0, 2.0])
    with pytest.raises(ValueError, match="`values` must be finite; got 1 NaN or inf"):
        viz.tokens_html(["a", "b"], [1.0, np.nan])
    with pytest.raises(ValueError, match="`kind` must be one of 'activation', 'importance'"):
        viz.tokens_html(["a"], [1.0], kind="colour")
    with pytest.raises(ValueError, match="`backend` must be one of 'auto', 'circuitsvis', 'html'"):
        viz.tokens(["a"], [1.0], backend="svg")
    with pytest.raises(ValueError, match="`highlight` must be in 0..1"):
        viz.tokens_html(["a", "b"], [1.0, 2.0], highlight=2)


# ------------------------------------------------------------------------------------- 2-D layout


def test_layout_2d_umap_is_seeded_and_keeps_clusters_apart():
    e, labels = _blobs()
    first, again = viz.layout_2d(e, seed=3), viz.layout_2d(e, seed=3)
    assert first.method == "umap" and first.note == "" and first.coords.shape == (90, 2)
    np.testing.assert_array_equal(first.coords, again.coords)
    # nearest neighbour in the map has the same blob label: the map keeps the clusters apart
    d = np.linalg.norm(first.coords[:, None] - first.coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(axis=1)] == labels).mean() >= 0.95


def test_layout_2d_is_cosine_scale_invariant():
    e, _ = _blobs(n_per=10)
    scales = np.random.default_rng(1).uniform(0.1, 10.0, size=(len(e), 1))
    np.testing.assert_allclose(viz.layout_2d(e * scales).coords, viz.layout_2d(e).coords, atol=1e-6)


def test_layout_2d_falls_back_to_pca_for_few_points_and_says_so():
    e, _ = _blobs(n_per=2)  # 6 points
    layout = viz.layout_2d(e)
    assert layout.method == "pca" and layout.axis_names == ("PC 1", "PC 2")
    assert "too few examples for UMAP (6 < 10)" in layout.note
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    # PCA keeps the pairwise distances of the unit vectors as far as two components allow
    assert np.corrcoef(np.linalg.norm(u[:, None] - u[None], axis=-1).ravel(),
                       np.linalg.norm(layout.coords[:, None] - layout.coords[None], axis=-1).ravel())[0, 1] > 0.9
    single = viz.layout_2d(np.ones((1, 4)))
    np.testing.assert_array_equal(single.coords, np.zeros((1, 2)))


def test_layout_2d_bad_input():
    with pytest.raises(ValueError, match="`e` must have at least 1 rows; got 0"):
        viz.layout_2d(np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"`e` must be 2-D \[n, d\]"):
        viz.layout_2d(np.zeros(4))


# --------------------------------------------------------------------------------------- cluster map


def test_umap_plot_labels_title_and_central_stars():
    e, labels = _blobs()
    fig = viz.umap_plot(e, labels, central=[0, 30, 60], seed=0)
    ax = fig.axes[0]
    assert ax.get_title() == "UMAP of 90 example embeddings (cosine)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("UMAP 1", "UMAP 2")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["cluster 0 (30)", "cluster 1 (30)", "cluster 2 (30)", "central example"]
    stars = ax.collections[-2]  # the last collection is the legend's empty proxy
    assert len(stars.get_offsets()) == 3 and stars.get_paths()[0] is not None
    assert viz.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_umap_plot_fallback_and_singletons():
    e, _ = _blobs(n_per=2)
    labels = np.array([0, 0, 0, 1, 2, 3])  # one cluster of 3, three singletons
    fig = viz.umap_plot(e, labels)  # central computed by clustering.central_example
    ax = fig.axes[0]
    assert ax.get_title().startswith("PCA of 6 example embeddings (cosine)\nfallback: too few examples for UMAP")
    assert ax.get_xlabel() == "PC 1"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["other / singletons (3)", "cluster 0 (3)", "central example"]


def test_umap_plot_bad_input():
    e, labels = _blobs(n_per=4)
    with pytest.raises(ValueError, match="`e` and `labels` must have the same length; got e=12, labels=11"):
        viz.umap_plot(e, labels[:-1])
    with pytest.raises(ValueError, match="`labels` must hold cluster labels >= 0"):
        viz.umap_plot(e, labels - 1)
    with pytest.raises(ValueError, match=r"`central` must hold example indices in 0..11; got 12"):
        viz.umap_plot(e, labels, central=[0, 12])
    with pytest.raises(ValueError, match=r"`layout` must have coords of shape \(12, 2\)"):
        viz.umap_plot(e, labels, central=[0], layout=viz.Layout2D(np.zeros((3, 2)), "pca"))


def test_polysemy_plot():
    table = pd.DataFrame({"layer": [0, 0, 0, 1, 1], "neuron": [0, 1, 2, 0, 1], "n_examples": [5, 9, 0, 7, 3],
                          "effective_clusters": [1.0, 2.5, 0.0, 1.2, 0.0],
                          "monosemanticity": [0.8, 0.3, np.nan, 0.6, 0.1]})
    fig = viz.polysemy_plot(table)
    left, right = fig.axes
    assert fig._suptitle.get_text() == "Polysemy of 4 neurons (1 without examples left out)"
    assert left.get_xlabel().startswith("effective clusters") and right.get_xlabel() == "monosemanticity"
    assert left.get_ylabel() == right.get_ylabel() == "neurons"
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match=r"`table` must have the columns of `clustering.polysemy_table`; got missing \['monosemanticity'\]"):
        viz.polysemy_plot(table.drop(columns="monosemanticity"))


@pytest.mark.parametrize("n, d, rank", [(2, 5, 2), (3, 768, 3), (40, 16, 16), (128, 768, 128), (128, 768, 1)])
def test_pca_2d_equals_the_svd_components(n, d, rank):
    """The coordinates from the Gram matrix's eigenpairs are the SVD's `centred @ Vt[:2].T` (signs fixed the same
    way), also for fewer dimensions than rows and for rank-deficient data, where the missing component is zero."""
    rng = np.random.default_rng(n + d + rank)
    e = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) * rng.lognormal(0, 1, (n, 1))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    centred = u - u.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    want = np.zeros((n, 2))
    k = int(min(2, (s > 1e-9 * s[0]).sum()))
    want[:, :k] = centred @ vt[:k].T
    size = np.abs(want)
    first = (size >= size.max(axis=0) * (1 - 1e-9)).argmax(axis=0)  # the first largest: two rows are a tie
    want *= np.where(want[first, [0, 1]] < 0, -1.0, 1.0)
    got = viz.pca_2d(e.astype(np.float32))
    assert got.dtype == np.float32 and got.shape == (n, 2)
    np.testing.assert_allclose(got, want, atol=2e-6)
