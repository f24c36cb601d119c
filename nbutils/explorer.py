"""The per-neuron explorer: one ipywidgets widget to read a neuron's feature clusters from a feature atlas.

Controls: layer and neuron pickers, "random polysemantic neuron", "back" (history of visited neurons),
clustering method and threshold, activation / importance colouring. Views: a summary line with the neuron's label,
the 2-D map of the neuron's examples and one tab per cluster (clusters of two or more examples, then one tab for
all singletons), each listing up to `max_examples` examples, central first, with `before` tokens of context before
the activating token and `after` after it, and the similar features of that cluster (in any layer) as buttons that
jump to their neuron.

Everything shown under the atlas's own clustering is read from the atlas (`nbutils.atlas`): examples, clusters,
the map, context activations, similar features. No forward pass runs on a neuron change. The model is loaded only
when it is needed, on first use: for token importance, and to re-cluster live with another method or threshold
(which needs the examples' embeddings).

Every callback is a module-level function taking the `Explorer` (`select_neuron`, `on_layer`, `on_neuron`,
`on_random`, `on_back`, `on_similar`, `on_method`, `on_threshold`, `on_mode`, `on_tab`); the widgets' observers only
call them, so tests drive the explorer without a browser.
"""

from __future__ import annotations

import html
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils import atlas as _atlas
from nbutils import clustering, embeddings, passes, viz
from nbutils._validation import check_choice, check_int_range, fail

__all__ = [
    "MODES",
    "ExplorerState",
    "NeuronData",
    "Explorer",
    "neuron_explorer",
    "select_neuron",
    "on_layer",
    "on_neuron",
    "on_random",
    "on_back",
    "on_similar",
    "on_method",
    "on_threshold",
    "on_mode",
    "on_tab",
    "on_band",
    "threshold_range",
    "examples_html",
    "POLYSEMANTIC_MIN",
    "N_SIMILAR",
]

MODES: tuple[str, ...] = ("activation", "importance")
POLYSEMANTIC_MIN = 1.5  # a neuron is polysemantic when its effective number of clusters is at least this
N_SIMILAR = 5  # similar-feature buttons per cluster


def threshold_range(method: str) -> tuple[float, float, float, float]:
    """Slider `(min, max, step, default)` of `threshold` for a clustering method (see `clustering.cluster`)."""
    method = check_choice("method", method, clustering.METHODS)
    default = float(clustering.DEFAULT_THRESHOLDS[method])
    if method == "hdbscan":  # min_cluster_size
        return 2.0, 30.0, 1.0, default
    if method == "adaptive":  # a multiple of the neuron's own neighbour similarity
        return 0.05, 2.0, 0.05, default
    if method == "local":  # a cut on the locally scaled similarity, in (0, 1]
        return 0.05, 1.0, 0.05, default
    if method == "leiden":  # the resolution: higher gives more, smaller clusters
        return 0.1, 5.0, 0.1, default
    return 0.0, 1.0, 0.01, default  # a cosine similarity


@dataclass
class ExplorerState:
    """What the explorer shows; callbacks change it, then render.

    Attributes:
        layer, neuron: the selected neuron.
        method, threshold: the clustering setting (`clustering.cluster`).
        mode: token colouring, one of `MODES`.
        history: visited `(layer, neuron)`, the current one last (`on_back` pops it).
        tab: index of the selected cluster tab.
        labels: cluster labels `[n_examples]` of the current neuron under the current setting.
        central: index of each cluster's central example `[n_clusters]`.
        message: the line shown instead of the map and tabs when there is nothing to show (dead neuron), else "".
        band: -1 for the top examples in their clusters, else the activation band whose sampled examples are listed.
    """

    layer: int
    neuron: int
    method: str
    threshold: float
    mode: str = "activation"
    history: list[tuple[int, int]] = field(default_factory=list)
    tab: int = 0
    labels: Int[np.ndarray, "n_examples"] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    central: Int[np.ndarray, "n_examples_or_clusters"] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    message: str = ""
    band: int = -1


@dataclass
class NeuronData:
    """One neuron as read from the atlas (cached per neuron), plus what live re-clustering adds.

    Attributes:
        row: the neuron's `neurons` row (dict).
        examples: its `examples` rows, highest activation first.
        contexts: `{(window, pos): (start, acts)}` of the examples the atlas shows.
        layout: the stored 2-D map (`viz.Layout2D`), None for a dead neuron.
        e, acts: neuron embeddings `[n, d_model]` and activations along each example's window `[n, window]`,
            filled on first live re-clustering or importance (they need the model), else None.
        similar: the atlas's similar features of all the neuron's clusters.
    """

    row: dict
    examples: pd.DataFrame
    contexts: dict[tuple[int, int], tuple[int, np.ndarray]]
    layout: viz.Layout2D | None
    e: Float[np.ndarray, "n_examples d_model"] | None = None
    acts: Float[np.ndarray, "n_examples window"] | None = None
    similar: pd.DataFrame | None = None


class Explorer:
    """Holds the atlas, caches, state and widgets; `widget` is what a notebook displays.

    Args:
        atlas: a finished `atlas.Atlas` (`atlas.build_atlas`, `atlas.load_or_build` or `Atlas.open`).
        layer: the first layer shown (default the atlas's first layer).
        neuron: the first neuron shown; default the layer's neuron with the most examples.
        method, threshold: the first clustering setting; default the atlas's own (read, not recomputed).
        model: the atlas's model, if already loaded (checked against the atlas); else loaded on first need.
        max_examples: examples listed per tab (at most the atlas's `shown`).
        before, after: tokens of context shown (at most the atlas's stored `before` / `after`).
        seed: seeds the random-neuron button.

    Raises:
        TypeError: `atlas` is not an Atlas. ValueError: layer, neuron, method or sizes out of range.
    """

    def __init__(
        self,
        atlas: Any,
        *,
        layer: int | None = None,
        neuron: int | None = None,
        method: str | None = None,
        threshold: float | None = None,
        model: Any = None,
        max_examples: int = 20,
        before: int = 20,
        after: int = 10,
        seed: int = 0,
    ) -> None:
        import ipywidgets as w

        if not isinstance(atlas, _atlas.Atlas):
            raise TypeError(f"`atlas` must be an atlas.Atlas (`atlas.build_atlas`, `atlas.load_or_build` or "
                            f"`atlas.Atlas.open`); got {type(atlas).__name__}.")
        self.atlas = atlas
        s = atlas.settings
        self.max_examples = check_int_range("max_examples", max_examples, 1, s.shown, what="(the atlas's `shown`)")
        self.before = check_int_range("before", before, 0, s.before, what="(the context the atlas stores)")
        self.after = check_int_range("after", after, 0, s.after, what="(the context the atlas stores)")
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        if model is not None:
            atlas._model = atlas.check_model(model)
        self._neurons: dict[tuple[int, int], NeuronData] = {}
        self._importance: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._layers: dict[int, dict[str, pd.DataFrame]] = {}
        self._syncing = False
        self._groups: list[tuple[str, np.ndarray]] = []
        layer = atlas.layers[0] if layer is None else atlas._check_layer(layer)
        method = check_choice("method", s.method if method is None else method, clustering.METHODS)
        low, high, step, default = threshold_range(method)
        if threshold is None:
            threshold = s.threshold if method == s.method else default
        neuron = _busiest_neuron(atlas, layer) if neuron is None else atlas._check_neuron(neuron)
        self.state = ExplorerState(layer=layer, neuron=neuron, method=method, threshold=float(threshold))

        self.layer_picker = w.Dropdown(options=list(atlas.layers), value=layer, description="layer",
                                       layout=w.Layout(width="130px"), style={"description_width": "40px"})
        self.neuron_picker = w.BoundedIntText(value=neuron, min=0, max=atlas.d_mlp - 1, description="neuron",
                                              layout=w.Layout(width="160px"), style={"description_width": "50px"})
        self.random_button = w.Button(description="random polysemantic neuron", layout=w.Layout(width="220px"))
        self.back_button = w.Button(description="back", layout=w.Layout(width="70px"), disabled=True)
        self.method_picker = w.Dropdown(options=list(clustering.METHODS), value=method, description="method",
                                        layout=w.Layout(width="230px"), style={"description_width": "60px"})
        self.threshold_slider = w.FloatSlider(value=float(threshold), min=min(low, threshold), max=max(high, threshold),
                                              step=step, description="threshold", continuous_update=False,
                                              readout_format=".2f", layout=w.Layout(width="320px"))
        self.mode_toggle = w.ToggleButtons(options=list(MODES), value="activation", description="colour by",
                                           style={"button_width": "90px"})
        n_bands = s.bands
        self.band_picker = w.Dropdown(
            options=[("top examples, by cluster", -1)] + [
                (f"band {b}: {100 * b // n_bands}-{100 * (b + 1) // n_bands}% of max", b) for b in reversed(range(n_bands))],
            value=-1, description="examples", disabled=n_bands == 0, layout=w.Layout(width="300px"),
            style={"description_width": "65px"})
        self.summary = w.HTML()
        self.history_line = w.HTML()
        self.image = w.Image(format="svg+xml", layout=w.Layout(width="480px"))
        self.tabs = w.Tab(layout=w.Layout(width="100%"))
        self.body = w.HBox([self.image, self.tabs], layout=w.Layout(align_items="flex-start"))
        for widget, name in [(self.random_button, "ne-random"), (self.back_button, "ne-back"),
                             (self.summary, "ne-summary"), (self.tabs, "ne-tabs"), (self.image, "ne-umap"),
                             (self.history_line, "ne-history"), (self.layer_picker, "ne-layer"),
                             (self.neuron_picker, "ne-neuron"), (self.band_picker, "ne-band")]:
            widget.add_class(name)  # stable hooks for the browser test
        self.widget = w.VBox([
            w.HBox([self.layer_picker, self.neuron_picker, self.random_button, self.back_button, self.band_picker]),
            w.HBox([self.method_picker, self.threshold_slider, self.mode_toggle]),
            self.summary, self.history_line, self.body,
        ])
        self.widget.explorer = self
        self._wire()
        select_neuron(self, self.state.layer, self.state.neuron)

    def _wire(self) -> None:
        def observe(widget: Any, callback: Any) -> None:
            def handler(change: dict) -> None:
                if not self._syncing:
                    callback(self, change["new"])

            widget.observe(handler, names="value")

        observe(self.layer_picker, on_layer)
        observe(self.neuron_picker, on_neuron)
        observe(self.method_picker, on_method)
        observe(self.threshold_slider, on_threshold)
        observe(self.mode_toggle, on_mode)
        observe(self.band_picker, on_band)
        self.tabs.observe(lambda change: None if self._syncing else on_tab(self, change["new"]), names="selected_index")
        self.random_button.on_click(lambda _: on_random(self))
        self.back_button.on_click(lambda _: on_back(self))

    @contextmanager
    def syncing(self) -> Iterator[None]:
        """Set widget values without firing their callbacks."""
        previous, self._syncing = self._syncing, True
        try:
            yield
        finally:
            self._syncing = previous

    @property
    def live(self) -> bool:
        """True when the clustering setting differs from the atlas's (clusters are computed, with the model)."""
        s = self.atlas.settings
        return (self.state.method, float(self.state.threshold)) != (s.method, float(s.threshold))

    @property
    def model(self) -> Any:
        """The atlas's model, loaded on first use. An atlas of a dictionary's latents has none to offer here: live
        re-clustering and token importance read MLP neurons, so they raise instead of answering for a neuron."""
        sparse = getattr(self.atlas, "dictionary", None)
        if sparse:
            fail("atlas", "be an atlas of MLP neurons for live re-clustering and token importance",
                 f"an atlas of the latents of {sparse['saelens_hook']}",
                 "Its stored clusters, contexts and similar features are shown without the model.")
        return self.atlas.load_model()

    # ------------------------------------------------------------------------------- static views

    def figure(self) -> Any:
        """The current neuron's map (`viz.umap_plot` on the stored layout) as a Figure; None for a dead neuron."""
        s = self.state
        data = self.neuron_data(s.layer, s.neuron)
        if s.message or data.layout is None:
            return None
        title = f"Layer {s.layer}, neuron {s.neuron}: {len(data.examples)} examples by cluster"
        return viz.umap_plot(data.layout.coords, s.labels, central=s.central, layout=data.layout, title=title,
                             figsize=(5.6, 4.4))

    def report_html(self, *, mode: str = "activation") -> str:
        """Static HTML of what the widget shows: the summary line and every tab's examples (for readers of an
        executed notebook without a kernel)."""
        mode = check_choice("mode", mode, MODES)
        blocks = [self.summary.value]
        if not self.state.message:
            blocks += [examples_html(self, title, clusters, mode=mode) for title, clusters in _tab_groups(self.state.labels)]
        return "".join(f'<div style="margin:8px 0">{b}</div>' for b in blocks)

    # ---------------------------------------------------------------------------------------- caches

    def layer_tables(self, layer: int) -> dict[str, pd.DataFrame]:
        """The atlas's tables of one layer (`neurons`, `examples`, `contexts`, `similar`), read once per layer so
        that a neuron change only slices them."""
        if layer not in self._layers:
            tables = {name: self.atlas.table(name, layer) for name in ("neurons", "examples", "contexts")}
            tables["similar"] = self.atlas.table("similar", layer).sort_values(["neuron", "cluster", "rank"],
                                                                              kind="stable").reset_index(drop=True)
            self._layers[layer] = tables
        return self._layers[layer]

    def neuron_data(self, layer: int, neuron: int) -> NeuronData:
        """The neuron's row, examples, stored contexts and map, read from the atlas (once per neuron)."""
        key = (layer, neuron)
        if key not in self._neurons:
            tables = self.layer_tables(layer)

            def rows(name: str) -> pd.DataFrame:  # every table is sorted by neuron
                lo, hi = np.searchsorted(tables[name]["neuron"].to_numpy(), [neuron, neuron + 1])
                return tables[name].iloc[lo:hi].reset_index(drop=True)

            row = tables["neurons"].iloc[neuron].to_dict()
            examples = rows("examples")
            contexts = {(int(w), int(p)): (int(st), np.asarray(a, dtype=np.float64)) for w, p, st, a in
                        rows("contexts")[["window", "pos", "start", "acts"]].itertuples(index=False, name=None)}
            layout = None
            if len(examples):
                coords = examples[["x", "y"]].to_numpy(np.float64)
                layout = viz.Layout2D(coords, "pca", f"PCA of the examples' unit vectors in the atlas's space, "
                                                    f"{clustering.SPACE_NAMES[self.atlas.settings.space]}")
            self._neurons[key] = NeuronData(row, examples, contexts, layout, similar=rows("similar"))
        return self._neurons[key]

    def live_data(self, layer: int, neuron: int) -> NeuronData:
        """`neuron_data` with the embeddings and window activations filled by one forward pass (needs the model)."""
        data = self.neuron_data(layer, neuron)
        if data.e is None and len(data.examples):
            windows = self.atlas.windows
            wid = data.examples["window"].to_numpy(np.int64).copy()
            pos = data.examples["pos"].to_numpy(np.int64).copy()
            h, acts = _neuron_pass(self.model, windows[torch.as_tensor(wid)], layer, neuron, pos,
                                   fold_ln=self.atlas.settings.fold_ln, batch_size=self.atlas.settings.batch_size)
            if self.atlas.settings.space == "embedding":
                W, _ = embeddings.mlp_in_weights(self.model, layer, fold_ln=self.atlas.settings.fold_ln)
                h = embeddings.embed(h, W, neuron)
            data.e = h.numpy().astype(np.float64)  # [n, d_model], in the atlas's space
            data.acts = acts
        return data

    def importance_of(self, layer: int, neuron: int, window: int, pos: int) -> Float[np.ndarray, "pos_plus_1"]:
        """Token importance `[pos + 1]` of one example (`importance.token_importance`, cached; needs the model)."""
        key = (layer, neuron, window, pos)
        if key not in self._importance:
            from nbutils import importance

            self._importance[key] = np.asarray(
                importance.token_importance(self.model, self.atlas.windows[window], pos, layer, neuron), dtype=np.float64)
        return self._importance[key]

    def polysemy(self, layer: int) -> pd.DataFrame:
        """The `neurons` rows of a layer (read from the atlas, cached)."""
        return self.layer_tables(layer)["neurons"]

    def similar_to(self, layer: int, neuron: int, row: int, k: int = N_SIMILAR) -> pd.DataFrame:
        """Features of other neurons (any layer) most similar to the atlas feature that holds example `row` of
        `neuron` (a cluster's centre): `layer, neuron, cluster, size, similarity`, one row per neuron."""
        data = self.neuron_data(layer, neuron)
        cluster = int(data.examples["cluster"].iat[row])  # the atlas's cluster of that example
        table = data.similar[data.similar["cluster"].to_numpy() == cluster]
        table = table.rename(columns={"layer": "from_layer", "neuron": "from_neuron", "cluster": "from_cluster"})
        table = table.rename(columns={"other_layer": "layer", "other_neuron": "neuron", "other_cluster": "cluster",
                                      "other_size": "size"})
        return table.drop_duplicates(["layer", "neuron"]).head(k)[["layer", "neuron", "cluster", "size", "similarity"]]


def _busiest_neuron(atlas: Any, layer: int) -> int:
    """The neuron of `layer` with the most examples (the first if several)."""
    rows = atlas.table("neurons", layer)
    return int(rows.sort_values(["n_examples", "neuron"], ascending=[False, True]).iloc[0]["neuron"])


@torch.inference_mode()
def _neuron_pass(
    model: Any, windows: Int[Tensor, "n window"], layer: int, neuron: int, pos: Int[np.ndarray, "n"], *,
    fold_ln: bool = True, batch_size: int = 64,
) -> tuple[Float[Tensor, "n d_model"], Float[np.ndarray, "n window"]]:
    """One forward pass over a neuron's example windows `[n, window]` (each example its own window): h at each
    example's activating position `[n, d_model]` (as `embeddings.pre_mlp_vectors` reads it) and the neuron's
    activation at every position `[n, window]`."""
    kind = "ln_normalized" if fold_ln else "mlp_in"
    h_parts, act_parts = [], []

    def on_layer(_: int, read: dict[str, Tensor], lo: int, hi: int) -> None:  # read: [batch, window, d] each
        h_parts.append(read[kind][torch.arange(hi - lo), torch.as_tensor(pos[lo:hi])].float().cpu())
        act_parts.append(read["post"][:, :, neuron].float().cpu())  # [batch, window]

    passes.read_layers(model, windows, [layer], (kind, "post"), on_layer, batch_size=batch_size)
    return torch.cat(h_parts), torch.cat(act_parts).numpy().astype(np.float64)


# -------------------------------------------------------------------------------------------- callbacks


def select_neuron(ex: Explorer, layer: int, neuron: int, *, record: bool = True) -> None:
    """Show neuron `neuron` of layer `layer`: read (cached), cluster if live, render; push it on the history.

    Raises:
        ValueError: layer or neuron out of range for the atlas.
    """
    layer, neuron = ex.atlas._check_layer(layer), ex.atlas._check_neuron(neuron)
    ex.state.layer, ex.state.neuron, ex.state.tab = layer, neuron, 0
    if record and (not ex.state.history or ex.state.history[-1] != (layer, neuron)):
        ex.state.history.append((layer, neuron))
    with ex.syncing():
        ex.layer_picker.value = layer
        ex.neuron_picker.value = neuron
    _recluster(ex)
    _render(ex)


def on_layer(ex: Explorer, layer: int) -> None:
    """Layer picker: same neuron index in the new layer."""
    select_neuron(ex, layer, ex.state.neuron)


def on_neuron(ex: Explorer, neuron: int) -> None:
    """Neuron picker."""
    select_neuron(ex, ex.state.layer, neuron)


def on_random(ex: Explorer) -> None:
    """Jump to a random polysemantic neuron of the current layer (effective clusters >= `POLYSEMANTIC_MIN`);
    the most polysemantic one when none reaches it. Uses the explorer's seeded generator."""
    table = ex.polysemy(ex.state.layer)
    table = table[(table["n_examples"] > 0) & (table["neuron"] != ex.state.neuron)]
    if table.empty:
        ex.history_line.value += f" · layer {ex.state.layer} has no other neuron with examples"
        return
    pool = table[table["effective_clusters"] >= POLYSEMANTIC_MIN]
    if pool.empty:
        pool = table.sort_values("effective_clusters", ascending=False).head(1)
    neuron = int(pool["neuron"].to_numpy()[ex.rng.integers(len(pool))])
    select_neuron(ex, ex.state.layer, neuron)


def on_back(ex: Explorer) -> None:
    """Go back to the previously visited neuron (no-op at the start of the history)."""
    if len(ex.state.history) < 2:
        return
    ex.state.history.pop()
    layer, neuron = ex.state.history[-1]
    select_neuron(ex, layer, neuron, record=False)


def on_similar(ex: Explorer, layer: int, neuron: int) -> None:
    """A similar-feature button: jump to that neuron (in its own layer)."""
    select_neuron(ex, layer, neuron)


def on_method(ex: Explorer, method: str) -> None:
    """Clustering method: set the slider to the method's range and default (the atlas's for its method),
    re-cluster."""
    method = check_choice("method", method, clustering.METHODS)
    low, high, step, default = threshold_range(method)
    if method == ex.atlas.settings.method:
        default = float(ex.atlas.settings.threshold)
    ex.state.method, ex.state.threshold = method, default
    with ex.syncing():
        ex.method_picker.value = method
        slider = ex.threshold_slider
        slider.min, slider.max = min(low, slider.min), max(high, slider.max)  # widen first: value stays valid
        slider.value, slider.step = default, step
        slider.min, slider.max = low, high
    _recluster(ex)
    _render(ex)


def on_threshold(ex: Explorer, threshold: float) -> None:
    """Threshold slider: re-cluster with the new value."""
    ex.state.threshold = float(threshold)
    with ex.syncing():
        ex.threshold_slider.value = float(threshold)
    _recluster(ex)
    _render(ex)


def on_mode(ex: Explorer, mode: str) -> None:
    """Colour tokens by activation or by importance."""
    ex.state.mode = check_choice("mode", mode, MODES)
    with ex.syncing():
        ex.mode_toggle.value = ex.state.mode
    _render_tabs(ex)


def on_band(ex: Explorer, band: int) -> None:
    """Examples picker: -1 lists the top examples by cluster; a band lists the neuron's sampled examples whose
    activation lies in that band of (0, max] (read from the atlas), highest first."""
    bands = ex.atlas.settings.bands
    ex.state.band = check_int_range("band", band, -1, bands - 1, what="(-1: the top examples; else a band)")
    with ex.syncing():
        ex.band_picker.value = ex.state.band
    _render_tabs(ex)


def on_tab(ex: Explorer, index: int | None) -> None:
    """A cluster tab was selected (importance is computed for the examples of the shown tab only)."""
    if index is None:
        return
    ex.state.tab = int(index)
    if ex.state.mode == "importance":
        _fill_tab(ex, ex.state.tab)


# ------------------------------------------------------------------------------------------- compute


def _recluster(ex: Explorer) -> None:
    s = ex.state
    data = ex.neuron_data(s.layer, s.neuron)
    n = len(data.examples)
    if n == 0:
        s.labels, s.central = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        s.message = (f"Neuron {s.neuron} of layer {s.layer} is dead: its highest activation over the corpus is at "
                     "most 0, so it has no examples to cluster.")
        return
    s.message = ""
    if not ex.live:
        s.labels = data.examples["cluster"].to_numpy(np.int64)
        centres = np.flatnonzero(data.examples["is_central"].to_numpy())
        s.central = centres[np.argsort(s.labels[centres], kind="stable")]
        return
    data = ex.live_data(s.layer, s.neuron)
    threshold: float | int = s.threshold
    if s.method == "hdbscan":
        threshold = int(round(min(threshold, max(2, n))))
    s.labels = clustering.cluster(data.e, method=s.method, threshold=threshold)
    s.central = clustering.central_example(data.e, s.labels)


def _tab_groups(labels: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(title, member clusters) per tab: one per cluster of >= 2 examples, then one for all singletons."""
    sizes = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    groups = [(f"{c} ({sizes[c]})", np.array([c])) for c in range(len(sizes)) if sizes[c] >= 2]
    singles = np.flatnonzero(sizes == 1)
    if singles.size:
        groups.append((f"singletons ({singles.size})", singles))
    return groups


def _tab_rows(ex: Explorer, clusters: np.ndarray) -> np.ndarray:
    """Example rows of a tab: each cluster's central example first, then by activation; at most `max_examples`."""
    labels, central = ex.state.labels, ex.state.central
    centres = [int(central[c]) for c in clusters if central[c] >= 0]
    first = set(centres)
    rest = [int(i) for i in np.flatnonzero(np.isin(labels, clusters)) if i not in first]
    return np.array(centres + rest, dtype=np.int64)[: ex.max_examples]


def _context(ex: Explorer, data: NeuronData, i: int) -> tuple[int, np.ndarray]:
    """(start, activations) of example `i` around its activating token: stored in the atlas, else (live
    clustering listing another example) from the forward pass."""
    window, pos = int(data.examples["window"].iat[i]), int(data.examples["pos"].iat[i])
    found = data.contexts.get((window, pos))
    if found is None:
        data = ex.live_data(ex.state.layer, ex.state.neuron)
        start = max(0, pos - ex.atlas.settings.before)
        found = (start, data.acts[i, start : pos + ex.atlas.settings.after + 1])
    return found


# -------------------------------------------------------------------------------------------- render


def _render(ex: Explorer) -> None:
    """Map, tabs, then the summary line: when the summary names the new neuron, the rest is drawn."""
    s = ex.state
    data = ex.neuron_data(s.layer, s.neuron)
    if s.message or data.layout is None:
        ex.image.value = b""
        ex.image.layout.display = "none"
    else:
        title = f"Layer {s.layer}, neuron {s.neuron}: {len(data.examples)} examples by cluster"
        ex.image.value = viz.map_svg(data.layout.coords, s.labels, central=s.central, title=title)
        ex.image.layout.display = None
    _render_tabs(ex)
    _render_summary(ex)


def _render_summary(ex: Explorer) -> None:
    s = ex.state
    head = f"<b>Layer {s.layer}, neuron {s.neuron}</b>"
    if s.message:
        ex.summary.value = f'{head} · <span style="color:#b00">{html.escape(s.message)}</span>'
    else:
        data = ex.neuron_data(s.layer, s.neuron)
        sizes = np.bincount(s.labels)
        n_single = int((sizes == 1).sum())
        mono = clustering.monosemanticity(data.e) if ex.live else float(data.row["monosemanticity"])
        eff = clustering.effective_n_clusters(s.labels)
        label = html.escape(str(data.row.get("label", "")))
        ex.summary.value = (
            f"{head} · {len(data.examples)} examples · {len(sizes)} clusters ({n_single} singletons) · "
            f"effective clusters {eff:.2f} · monosemanticity {'n/a' if np.isnan(mono) else f'{mono:.2f}'} · "
            f"{html.escape(s.method)} at {s.threshold:g}{' (live)' if ex.live else ''} · "
            f"space {clustering.SPACE_NAMES[ex.atlas.settings.space]}"
            f'<br><span style="color:#555;font-size:90%">top tokens: {label}</span>'
        )
    trail = " → ".join(f"L{l}/N{n}" for l, n in s.history[-8:])
    ex.history_line.value = f'<span style="color:#555;font-size:90%">history: {trail}</span>'
    ex.back_button.disabled = len(s.history) < 2


def _render_tabs(ex: Explorer) -> None:
    import ipywidgets as w

    if ex.state.band >= 0 and not ex.state.message:
        rows = ex.atlas.band_examples(ex.state.layer, ex.state.neuron, ex.state.band)
        with ex.syncing():
            ex.tabs.children = [w.VBox([w.HTML(band_html(ex, rows, mode=ex.state.mode))])]
            ex.tabs.titles = (f"band {ex.state.band} ({len(rows)})",)
            ex.tabs.selected_index = 0
        ex._groups = []
        return
    groups = [] if ex.state.message else _tab_groups(ex.state.labels)
    children = [w.VBox() for _ in groups]
    with ex.syncing():
        ex.tabs.children = children
        ex.tabs.titles = tuple(title for title, _ in groups)
        ex.tabs.selected_index = min(ex.state.tab, len(groups) - 1) if groups else None
    ex.state.tab = ex.tabs.selected_index or 0
    ex._groups = groups
    for i in range(len(groups)):
        if ex.state.mode == "activation" or i == ex.state.tab:
            _fill_tab(ex, i)
        else:
            children[i].children = [w.HTML("<i>importance is computed when this tab is opened</i>")]


def _fill_tab(ex: Explorer, index: int) -> None:
    """Build tab `index`: similar-feature buttons, then the examples with coloured tokens."""
    import ipywidgets as w

    if index >= len(ex.tabs.children):
        return
    title, clusters = ex._groups[index]
    examples = w.HTML(examples_html(ex, title, clusters, mode=ex.state.mode))
    buttons = _similar_buttons(ex, clusters) if len(clusters) == 1 else []
    label = w.HTML("<span style='font-size:90%'>similar features:</span>") if buttons else w.HTML()
    ex.tabs.children[index].children = [w.HBox([label, *buttons]), examples]


def _example_html(ex: Explorer, head: str, window: int, pos: int, first: int, acts: np.ndarray, *, mode: str,
                  top_act: float) -> str:
    """One example: a header line, then `before`/`after` tokens around the outlined token at `pos`, coloured by the
    neuron's activation (`acts` on tokens `first..` of the window) or by token importance."""
    s = ex.state
    start, stop = max(first, pos - ex.before), min(first + len(acts), pos + ex.after + 1)
    tokens = ex.atlas.str_tokens(window)[start:stop]
    if mode == "importance":
        values = np.zeros(stop - start)
        values[: pos + 1 - start] = ex.importance_of(s.layer, s.neuron, window, pos)[start : pos + 1]
    else:
        values = acts[start - first : stop - first]
    return (f'<div style="font-size:85%;color:#555">{html.escape(head)}</div>'
            + viz.tokens_html(tokens, values, kind=mode, max_value=None if mode == "importance" else top_act,
                              highlight=pos - start))


def examples_html(ex: Explorer, title: str, clusters: np.ndarray, *, mode: str = "activation") -> str:
    """HTML of one tab's examples: central first, at most `max_examples`, `before`/`after` tokens of context
    around the activating token (outlined), tokens coloured by activation or by importance."""
    s = ex.state
    data = ex.neuron_data(s.layer, s.neuron)
    rows = _tab_rows(ex, clusters)
    central = set(s.central.tolist())
    top_act = float(data.row["max_act"]) if float(data.row["max_act"]) > 0 else 1.0
    parts = []
    windows_, positions, example_acts = (data.examples[c].to_numpy() for c in ("window", "pos", "act"))
    for i in rows:
        window, pos = int(windows_[i]), int(positions[i])
        first, acts = _context(ex, data, int(i))
        star = "★ central · " if i in central else ""
        head = f"{star}cluster {s.labels[i]} · act {float(example_acts[i]):.2f} · window {window}, token {pos}"
        parts.append(_example_html(ex, head, window, pos, first, acts, mode=mode, top_act=top_act))
    shown = f"{len(rows)} of {int(np.isin(s.labels, clusters).sum())} examples"
    intro = (f"<div><b>Cluster {html.escape(title)}</b> · {shown}, central first · tokens coloured by "
             f"{mode}{' for the outlined token' if mode == 'importance' else ''}</div>")
    return intro + "".join(f'<div style="margin:4px 0">{p}</div>' for p in parts)


def band_html(ex: Explorer, rows: pd.DataFrame, *, mode: str = "activation") -> str:
    """HTML of a neuron's sampled examples in one activation band: the same view as a cluster tab (context around
    the outlined activating token, coloured by activation or importance), highest activation first."""
    s = ex.state
    data = ex.neuron_data(s.layer, s.neuron)
    top_act = float(data.row["max_act"]) if float(data.row["max_act"]) > 0 else 1.0
    bands = ex.atlas.settings.bands
    parts = []
    for r in rows.head(ex.max_examples).itertuples():
        window, pos = int(r.window), int(r.pos)
        head = (f"band {int(r.band)} · act {float(r.act):.2f} ({100 * float(r.act) / top_act:.0f}% of max) · "
                f"window {window}, token {pos}")
        parts.append(_example_html(ex, head, window, pos, int(r.start), np.asarray(r.acts, dtype=np.float64),
                                   mode=mode, top_act=top_act))
    low, high = 100 * s.band // bands, 100 * (s.band + 1) // bands
    intro = (f"<div><b>Band {s.band}</b> · activations in {low}-{high}% of the neuron's max · "
             f"{min(len(rows), ex.max_examples)} of {len(rows)} sampled examples (a fixed random sample of the corpus's "
             f"tokens in this band), highest first · tokens coloured by {mode}</div>")
    if rows.empty:
        intro += "<div><i>no token of the corpus falls in this band for this neuron</i></div>"
    return intro + "".join(f'<div style="margin:4px 0">{p}</div>' for p in parts)


def _similar_buttons(ex: Explorer, clusters: np.ndarray) -> list:
    import ipywidgets as w

    s = ex.state
    centre = int(s.central[int(clusters[0])])
    table = ex.similar_to(s.layer, s.neuron, centre)
    buttons = []
    for row in table.itertuples():
        button = w.Button(description=f"L{row.layer}/N{row.neuron} ({row.similarity:.2f})",
                          tooltip=f"cluster {row.cluster} ({row.size} examples) of neuron {row.neuron} of layer "
                                  f"{row.layer}, cosine {row.similarity:.2f}",
                          layout=w.Layout(width="auto"))
        button.add_class("ne-similar")
        button.on_click(lambda _, l=int(row.layer), n=int(row.neuron): on_similar(ex, l, n))
        buttons.append(button)
    return buttons


def neuron_explorer(atlas: Any, windows: Any = None, top: Any = None, **kwargs: Any) -> Any:
    """The per-neuron explorer as one ipywidgets widget (`Explorer.widget`; `.explorer` gives the state).

    Args:
        atlas: a finished `atlas.Atlas`. For a quick look without a prebuilt atlas, pass a model, its windows
            and `activations.collect_top_activations(model, windows)` instead: the atlas is built first (in the
            cache, keyed by content) from exactly those, after checking that they belong together.
        **kwargs: `layer`, `neuron`, `method`, `threshold`, `max_examples`, `before`, `after`, `seed`; see
            `Explorer`.

    Returns:
        `ipywidgets.VBox`.
    """
    if not isinstance(atlas, _atlas.Atlas) and hasattr(atlas, "cfg") and (windows is not None or top is not None):
        model = atlas
        if windows is None or top is None:
            raise TypeError("Pass `windows` and `top` with a model (or pass an atlas.Atlas alone).")
        if not hasattr(top, "window_ranges"):
            raise TypeError(f"`top` must be an activations.TopActivations; got {type(top).__name__}.")
        atlas = _atlas.build_atlas(model, windows, k=top.k, frac=top.frac, top=top, progress=False)
        kwargs.setdefault("model", model)
    elif windows is not None or top is not None:
        raise TypeError("`windows` and `top` go with a model; with an atlas.Atlas pass it alone.")
    return Explorer(atlas, **kwargs).widget
