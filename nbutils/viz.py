"""Static views of one neuron: a 2-D map of its example embeddings and tokens coloured by a value.

One thin function per visual, returning a matplotlib `Figure` or an HTML object; the caller displays it.
The interactive per-neuron explorer lives in `nbutils.explorer`, which uses these views (nothing here imports it).

- `layout_2d` / `umap_plot`: UMAP (umap-learn) of a neuron's example embeddings under the cosine metric,
  seeded. The exact cosine nearest neighbours are computed here with numpy and handed to UMAP
  (`precomputed_knn`), which is what UMAP itself does for small data, minus a numba compilation that
  costs ~10 s per process. Below `UMAP_MIN_POINTS` examples UMAP is not meaningful: the map falls back
  to PCA of the unit-normalised embeddings and says so in its title.
- `tokens`: tokens coloured by activation or importance through circuitsvis inside a notebook kernel
  (its offline bundle, inlined), plain HTML spans elsewhere (`tokens_html`). The explorer always uses
  the plain spans: one circuitsvis view inlines ~1.3 MB of JavaScript, and widgets' HTML runs no script.
"""

from __future__ import annotations

import html
import io
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from jaxtyping import Float, Int

from nbutils._validation import (check_choice, check_float_range, check_index_array, check_int_range, check_matrix,
                                 check_positive_float, check_positive_int, check_same_length, fail)

__all__ = [
    "UMAP_MIN_POINTS",
    "COLOURS",
    "Layout2D",
    "layout_2d",
    "pca_2d",
    "umap_plot",
    "figure_png",
    "polysemy_plot",
    "tokens_html",
    "tokens",
    "map_svg",
]

UMAP_MIN_POINTS = 10  # fewer examples than this: PCA instead of UMAP (the plot says so)
# Colour of a token at the top of the scale, per kind of value (RGB).
COLOURS: dict[str, tuple[int, int, int]] = {"activation": (230, 85, 13), "importance": (33, 113, 181)}
_CLUSTER_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # tab10 without its grey (C7)
_N_COLOURED = len(_CLUSTER_COLOURS)  # clusters with their own colour; the rest are grey


@dataclass(frozen=True)
class Layout2D:
    """2-D coordinates of n examples and how they were made.

    Attributes:
        coords: `[n, 2]` float64.
        method: `"umap"` or `"pca"` (the fallback for fewer than `UMAP_MIN_POINTS` examples).
        note: one sentence for the reader when the fallback was used, else `""`.
    """

    coords: np.ndarray
    method: str
    note: str = ""

    @property
    def axis_names(self) -> tuple[str, str]:
        return ("UMAP 1", "UMAP 2") if self.method == "umap" else ("PC 1", "PC 2")


def _unit_rows(e: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(e, axis=1, keepdims=True)  # [n, 1]
    return e / np.where(norms > 0, norms, 1.0)  # [n, d]


def pca_2d(e: Float[np.ndarray, "n d"]) -> np.ndarray:
    """`[n, 2]` float32: the first two principal components of the unit rows of `e`, signs fixed (each
    component's largest coordinate positive, the first of equal ones) so the same rows always give the same map;
    zeros below 2 rows."""
    n = len(e)
    if n < 2:
        return np.zeros((n, 2), dtype=np.float32)
    from scipy.linalg import eigh

    u = _unit_rows(np.asarray(e, dtype=np.float64))
    centred = u - u.mean(axis=0)  # [n, d]
    # the components' coordinates are the Gram matrix's top eigenvectors times the roots of their eigenvalues
    # (centred = U S Vt, so centred @ Vt.T = U S and centred @ centred.T = U S² Ut): an [n, n] problem for two
    # eigenpairs, an order of magnitude faster than the SVD of [n, d] when d is in the hundreds
    gram = centred @ centred.T  # [n, n]
    value, vector = eigh(gram, subset_by_index=[n - 2, n - 1], driver="evr")  # ascending
    value = np.where(value > n * np.finfo(float).eps * max(value[-1], 0.0), value, 0.0)  # rounding is no component
    coords = (vector * np.sqrt(value))[:, ::-1]  # [n, 2]
    size = np.abs(coords)
    first = (size >= size.max(axis=0) * (1 - 1e-9)).argmax(axis=0)  # the first of the largest, rounding aside
    flip = np.sign(coords[first, np.arange(2)])
    return (coords * np.where(flip == 0, 1.0, flip)).astype(np.float32)


def _cosine_knn(u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of unit rows under cosine distance, each point first in its own list."""
    dist = np.clip(1.0 - u @ u.T, 0.0, 2.0)  # [n, n]
    np.fill_diagonal(dist, -1.0)  # self sorts first even among duplicates
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]  # [n, k]
    knn_dist = np.take_along_axis(dist, idx, axis=1)  # [n, k]
    knn_dist[:, 0] = 0.0
    return idx.astype(np.int32), knn_dist.astype(np.float32)


def layout_2d(
    e: Float[np.ndarray, "n_examples d_model"],
    *,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> Layout2D:
    """2-D layout of example embeddings: UMAP with the cosine metric, or PCA when there are too few.

    Args:
        e: example embeddings `[n_examples, d_model]` (numpy or torch), at least one row.
        seed: UMAP's `random_state` (same seed, same coordinates).
        n_neighbors: UMAP's neighbourhood size, capped at `n_examples - 1`.
        min_dist: UMAP's `min_dist`.

    Returns:
        `Layout2D` with coords `[n_examples, 2]`; `method == "pca"` below `UMAP_MIN_POINTS` rows.
    """
    e = check_matrix("e", e, min_rows=1)
    n_neighbors = check_int_range("n_neighbors", n_neighbors, 2, 200)
    min_dist = check_float_range("min_dist", min_dist, 0.0, 100.0)
    u = _unit_rows(e)  # [n, d]
    n = len(u)
    if n < UMAP_MIN_POINTS:
        coords = pca_2d(u).astype(np.float64)
        note = f"fallback: too few examples for UMAP ({n} < {UMAP_MIN_POINTS}), PCA shown"
        return Layout2D(coords, "pca", note)
    import umap  # slow import (~4 s): only when a map is drawn

    k = min(n_neighbors, n - 1)
    knn = _cosine_knn(u, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", "no search index", ...
        reducer = umap.UMAP(
            n_components=2, n_neighbors=k, min_dist=min_dist, metric="cosine", random_state=seed,
            precomputed_knn=knn, n_jobs=1,
        )
        coords = reducer.fit_transform(u)  # [n, 2]
    return Layout2D(np.asarray(coords, dtype=np.float64), "umap")


def umap_plot(
    e: Float[np.ndarray, "n_examples d_model"],
    labels: Int[np.ndarray, "n_examples"],
    *,
    central: Sequence[int] | np.ndarray | None = None,
    layout: Layout2D | None = None,
    seed: int = 0,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 4.6),
) -> Any:
    """Scatter plot of one neuron's examples in 2-D, coloured by cluster, central examples as stars.

    The nine largest clusters of two or more examples get their own colour (legend gives size); other
    clusters and singletons are grey. When there are fewer than `UMAP_MIN_POINTS` examples the map is a
    PCA and the title says so.

    Args:
        e: example embeddings `[n_examples, d_model]`.
        labels: cluster labels `[n_examples]` (0 = largest, as `clustering.cluster` returns).
        central: index of each cluster's central example (`clustering.central_example`); computed when None.
        layout: precomputed `layout_2d(e)` (the explorer caches it per neuron); computed when None.
        seed: UMAP seed when `layout` is None.
        title: first title line; default "UMAP of n example embeddings (cosine)".
        figsize: inches.

    Returns:
        a matplotlib `Figure` (not attached to pyplot, so it is shown only where the caller displays it).
    """
    from matplotlib.figure import Figure

    e = check_matrix("e", e, min_rows=1)
    labels = np.asarray(labels)
    check_same_length(e=e, labels=labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        fail("labels", "hold cluster labels >= 0 (as `clustering.cluster` returns)", f"min {labels.min()}")
    if central is None:
        from nbutils.clustering import central_example

        central = central_example(e, labels)
    central = check_index_array("central", central, len(e), what=f"example indices in 0..{len(e) - 1}")
    layout = layout if layout is not None else layout_2d(e, seed=seed)
    if layout.coords.shape != (len(e), 2):
        fail("layout", f"have coords of shape ({len(e)}, 2)", f"shape {layout.coords.shape}")
    xy = layout.coords
    sizes = np.bincount(labels)
    colours = list(_CLUSTER_COLOURS)
    fig = Figure(figsize=figsize)  # fixed margins: a constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.86 if layout.note else 0.91)
    ax = fig.add_subplot()
    grey = np.isin(labels, [c for c in range(len(sizes)) if c >= _N_COLOURED or sizes[c] < 2])
    if grey.any():
        ax.scatter(xy[grey, 0], xy[grey, 1], s=14, c="0.7", label=f"other / singletons ({int(grey.sum())})")
    for c in range(min(_N_COLOURED, len(sizes))):
        if sizes[c] >= 2:
            member = labels == c
            ax.scatter(xy[member, 0], xy[member, 1], s=18, c=colours[c], label=f"cluster {c} ({sizes[c]})")
    if central.size:
        star_colours = [colours[labels[i]] if labels[i] < _N_COLOURED and sizes[labels[i]] >= 2 else "0.7" for i in central]
        ax.scatter(xy[central, 0], xy[central, 1], s=150, marker="*", c=star_colours, edgecolors="black",
                   linewidths=0.8, zorder=3)
        ax.scatter([], [], s=150, marker="*", c="white", edgecolors="black", linewidths=0.8, label="central example")
    name = "UMAP" if layout.method == "umap" else "PCA"
    heading = title or f"{name} of {len(e)} example embeddings (cosine)"
    ax.set_title(heading + (f"\n{layout.note}" if layout.note else ""), fontsize=10)
    ax.set_xlabel(layout.axis_names[0])
    ax.set_ylabel(layout.axis_names[1])
    ax.legend(fontsize=7, loc="best", markerscale=0.8, framealpha=0.8)
    return fig


def polysemy_plot(table: Any, *, figsize: tuple[float, float] = (10.0, 3.8)) -> Any:
    """Distribution of polysemy over neurons, one line per layer: effective number of clusters (left) and
    monosemanticity (right). Neurons without examples (dead) are left out and counted in the title.

    Args:
        table: `clustering.polysemy_table` rows of one or more layers (`layer, effective_clusters,
            monosemanticity, n_examples`).
        figsize: inches.

    Returns:
        a matplotlib `Figure`.
    """
    from matplotlib.figure import Figure

    missing = {"layer", "effective_clusters", "monosemanticity", "n_examples"} - set(table.columns)
    if missing:
        fail("table", "have the columns of `clustering.polysemy_table`", f"missing {sorted(missing)}")
    alive = table[table["n_examples"] > 0]
    fig = Figure(figsize=figsize)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.85, wspace=0.22)
    ax_eff, ax_mono = fig.subplots(1, 2)
    top_eff = max(2.0, float(np.ceil(alive["effective_clusters"].max()))) if len(alive) else 2.0
    eff_bins = np.arange(0.0, top_eff + 0.25, 0.25)
    mono_bins = np.linspace(-0.2, 1.0, 25)
    for layer, rows in alive.groupby("layer"):
        ax_eff.hist(rows["effective_clusters"], bins=eff_bins, histtype="step", linewidth=1.5, label=f"layer {layer}")
        ax_mono.hist(rows["monosemanticity"].dropna(), bins=mono_bins, histtype="step", linewidth=1.5,
                     label=f"layer {layer}")
    dead = len(table) - len(alive)
    fig.suptitle(f"Polysemy of {len(alive)} neurons" + (f" ({dead} without examples left out)" if dead else ""),
                 fontsize=11)
    ax_eff.set_title("effective number of clusters (exp entropy)", fontsize=10)
    ax_eff.set_xlabel("effective clusters (0 = only singletons)")
    ax_eff.set_ylabel("neurons")
    ax_mono.set_title("monosemanticity (mean pairwise cosine)", fontsize=10)
    ax_mono.set_xlabel("monosemanticity")
    ax_mono.set_ylabel("neurons")
    ax_eff.legend(fontsize=8)
    return fig


def figure_png(fig: Any, *, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure (for an `ipywidgets.Image`, which needs no plotting backend)."""
    dpi = check_positive_int("dpi", dpi)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _check_tokens(tokens: Sequence[str], values: Any) -> np.ndarray:
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("`tokens` must be a list of token strings (e.g. `model.to_str_tokens(ids)`).")
    values = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).reshape(-1)
    check_same_length(tokens=tokens, values=values)
    if not np.isfinite(values).all():
        fail("values", "be finite", f"{int((~np.isfinite(values)).sum())} NaN or inf")
    return values


def _colour_scale(values: np.ndarray, kind: str, max_value: Any) -> float:
    """The value of the full colour: `max_value` (a finite number > 0) when given, else 1 for importance, else
    the largest value (0 when none is positive: nothing is coloured)."""
    if max_value is not None:
        return check_positive_float("max_value", max_value)
    return 1.0 if kind == "importance" else float(values.max(initial=0.0))


def _show_token(token: str) -> str:
    return html.escape(token.replace("\n", "⏎").replace("\t", "⇥"))


def tokens_html(
    tokens: Sequence[str],
    values: Sequence[float] | np.ndarray,
    *,
    kind: str = "activation",
    max_value: float | None = None,
    highlight: int | None = None,
) -> str:
    """Tokens as inline HTML spans whose background deepens with the value (plain HTML, no script).

    Args:
        tokens: token strings `[n_tokens]`.
        values: one value per token `[n_tokens]`; values <= 0 are uncoloured.
        kind: `"activation"` (orange) or `"importance"` (blue); see `COLOURS`.
        max_value: value of the full colour; default the largest value (importance: 1).
        highlight: index of a token to outline (the activating token).

    Returns:
        an HTML string: one `<span>` per token, the value in its tooltip.
    """
    values = _check_tokens(tokens, values)
    kind = check_choice("kind", kind, tuple(COLOURS))
    if highlight is not None:
        highlight = check_int_range("highlight", highlight, 0, len(tokens) - 1)
    top = _colour_scale(values, kind, max_value)
    r, g, b = COLOURS[kind]
    spans = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        alpha = float(np.clip(value / top, 0.0, 1.0)) if top > 0 else 0.0
        style = f"background-color:rgba({r},{g},{b},{alpha:.2f});white-space:pre;border-radius:2px;"
        if i == highlight:
            style += "outline:2px solid #000;font-weight:bold;"
        spans.append(f'<span style="{style}" title="{kind} {value:.3g}">{_show_token(token)}</span>')
    return '<span style="font-family:monospace;font-size:12px;line-height:1.9;">' + "".join(spans) + "</span>"


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def tokens(
    tokens: Sequence[str],
    values: Sequence[float] | np.ndarray,
    *,
    kind: str = "activation",
    max_value: float | None = None,
    highlight: int | None = None,
    backend: str = "auto",
) -> Any:
    """Tokens coloured by activation or importance, as an HTML object to display.

    Args:
        tokens: token strings `[n_tokens]`.
        values: one value per token `[n_tokens]`.
        kind: `"activation"` or `"importance"` (colour and, for importance, the scale [0, 1]).
        max_value: value of the full colour; default the largest value (importance: 1).
        highlight: index of the token to outline (plain HTML only).
        backend: `"circuitsvis"` (interactive, inlines the offline circuitsvis bundle), `"html"` (plain
            spans), or `"auto"`: circuitsvis inside a notebook kernel, plain HTML elsewhere.

    Returns:
        `IPython.display.HTML`; its `.data` is the HTML source.
    """
    from IPython.display import HTML

    values = _check_tokens(tokens, values)
    backend = check_choice("backend", backend, ("auto", "circuitsvis", "html"))
    if backend == "auto":
        backend = "circuitsvis" if _in_kernel() else "html"
    if backend == "html":
        return HTML(tokens_html(tokens, values, kind=kind, max_value=max_value, highlight=highlight))
    kind = check_choice("kind", kind, tuple(COLOURS))
    from circuitsvis.tokens import colored_tokens

    top = _colour_scale(values, kind, max_value)
    rendered = colored_tokens(
        list(tokens), values.tolist(), min_value=0.0, max_value=top if top > 0 else 1.0,
        positive_color="#%02x%02x%02x" % COLOURS[kind],
    )
    return HTML(rendered.local_src)  # offline bundle: never the CDN


_SVG_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def map_svg(
    coords: Float[np.ndarray, "n_examples 2"],
    labels: Int[np.ndarray, "n_examples"],
    *,
    central: Sequence[int] | np.ndarray = (),
    title: str = "",
    axis_names: tuple[str, str] = ("PC 1", "PC 2"),
    size: tuple[int, int] = (480, 380),
) -> bytes:
    """The explorer's map as a small SVG (no plotting library: drawn in about a millisecond): one dot per example
    at `coords`, coloured by cluster as `umap_plot` colours them (the nine largest clusters of two or more examples,
    the rest grey), central examples as outlined stars, a legend with cluster sizes.

    Returns:
        UTF-8 SVG bytes with explicit width and height (for an `ipywidgets.Image` of format "svg+xml").
    """
    xy = check_matrix("coords", coords)
    if xy.shape[1] != 2:
        fail("coords", "be [n, 2]", f"shape {xy.shape}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    check_same_length(coords=xy, labels=labels)
    width, height = size
    left, right, top, bottom = 44, 150, 30 if title else 12, 34
    span = np.ptp(xy, axis=0) if len(xy) else np.ones(2)
    span = np.where(span > 0, span, 1.0)
    low = xy.min(axis=0) if len(xy) else np.zeros(2)
    px = left + (xy[:, 0] - low[0]) / span[0] * (width - left - right)
    py = height - bottom - (xy[:, 1] - low[1]) / span[1] * (height - top - bottom)
    sizes = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)

    def colour(c: int) -> str:
        return _SVG_COLOURS[c] if c < len(_SVG_COLOURS) and sizes[c] >= 2 else "#b3b3b3"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#444" stroke-width="0.8"/>']
    if title:
        parts.append(f'<text x="{left}" y="{top - 10}" font-size="12">{html.escape(title)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
                 f'{html.escape(axis_names[0])}</text>')
    parts.append(f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{html.escape(axis_names[1])}</text>')
    order = np.argsort([0 if colour(int(c)) == "#b3b3b3" else 1 for c in labels], kind="stable")  # grey below
    for i in order:
        parts.append(f'<circle cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="3.2" fill="{colour(int(labels[i]))}" '
                     'fill-opacity="0.85"/>')
    for i in np.asarray(central, dtype=np.int64).reshape(-1):
        if 0 <= i < len(xy):
            points = " ".join(f"{px[i] + r * np.sin(a):.1f},{py[i] - r * np.cos(a):.1f}"
                              for k, a in enumerate(np.arange(10) * np.pi / 5) for r in [7.5 if k % 2 == 0 else 3.2])
            parts.append(f'<polygon points="{points}" fill="{colour(int(labels[i]))}" stroke="black" '
                         'stroke-width="0.9"/>')
    y = top + 6
    legend = [(colour(c), f"cluster {c} ({sizes[c]})") for c in range(min(len(_SVG_COLOURS), len(sizes)))
              if sizes[c] >= 2]
    grey = int(np.isin(labels, [c for c in range(len(sizes)) if colour(c) == "#b3b3b3"]).sum())
    if grey:
        legend.append(("#b3b3b3", f"other / singletons ({grey})"))
    for fill, text in legend:
        parts.append(f'<circle cx="{width - right + 14}" cy="{y}" r="4" fill="{fill}"/>'
                     f'<text x="{width - right + 24}" y="{y + 4}">{html.escape(text)}</text>')
        y += 16
    parts.append(f'<text x="{width - right + 8}" y="{y + 4}">★ central example</text>')
    parts.append("</svg>")
    return "".join(parts).encode()
