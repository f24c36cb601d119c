"""The per-neuron explorer: one ipywidgets widget to read a neuron's feature clusters.

Controls: layer and neuron pickers, "random polysemantic neuron", "back" (history of visited neurons),
clustering method and threshold (re-cluster live), activation / importance colouring. Views: a summary
line, the UMAP map of the neuron's examples and one tab per cluster (clusters of two or more examples, then
one tab for all singletons), each listing up to `max_examples` examples, central first, with
`before` tokens of context before the activating token and `after` after it, and the similar features of
that cluster as buttons that jump to their neuron.

Every callback is a module-level function taking the `Explorer` (`select_neuron`, `on_layer`, `on_neuron`,
`on_random`, `on_back`, `on_similar`, `on_method`, `on_threshold`, `on_mode`, `on_tab`); the widgets'
observers only call them, so tests drive the explorer without a browser. Slow steps are cached in the
explorer: per neuron the examples' embeddings, activations, token strings and 2-D layout; per example the
token importance; per layer the polysemy table and the similar-features index.
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

from nbutils import clustering, embeddings, viz
from nbutils._validation import check_choice, check_int_range
from nbutils.models import check_layer, check_neuron, check_windows, hook_name

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
    """

    layer: int
    neuron: int
    method: str
    threshold: float
    mode: str = "activation"
    history: list[tuple[int, int]] = field(default_factory=list)
    tab: int = 0
    labels: Int[np.ndarray, "n_examples"] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    central: Int[np.ndarray, "n_clusters"] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    message: str = ""


@dataclass
class NeuronData:
    """Everything about one neuron that does not depend on the clustering setting (cached per neuron).

    Attributes:
        examples: the neuron's rows of `top.examples` (`window, pos, act`), highest first.
        h: pre-MLP vectors `[n_examples, d_model]` at the activating tokens (`embeddings.pre_mlp_vectors`).
        e: neuron embeddings `h ⊙ w` `[n_examples, d_model]`.
        acts: the neuron's activation at every position of each example's window `[n_examples, window]`.
        str_tokens: token strings of each example's window.
        layout: 2-D layout of `e` (`viz.layout_2d`), None for a dead neuron.
    """

    examples: pd.DataFrame
    h: Float[np.ndarray, "n_examples d_model"]
    e: Float[np.ndarray, "n_examples d_model"]
    acts: Float[np.ndarray, "n_examples window"]
    str_tokens: list[list[str]]
    layout: viz.Layout2D | None


class Explorer:
    """Holds the model, data, caches, state and widgets; `widget` is what a notebook displays.

    `neuron_explorer(...)` builds one and returns its `widget` (an `ipywidgets.VBox` whose `explorer`
    attribute points back here). `figure()` and `report_html()` give static views of the current neuron.

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: the token windows `[n_windows, window]` that `top` was collected on.
        top: `TopActivations` (`activations.collect_top_activations`).
        layer: the first layer shown.
        neuron: the first neuron shown; default the layer's neuron with the most examples.
        method, threshold: the first clustering setting (`clustering.cluster`; None: the defaults).
        max_examples: examples listed per tab.
        before, after: tokens of context shown before and after the activating token.
        seed: seeds UMAP and the random-neuron button.
        polysemy: precomputed `clustering.polysemy_table` rows (any layers) for the random button.
        similar_space: vectors compared for similar features, "embedding" (h ⊙ w) or "h" (`similar`).

    Raises:
        ValueError: layer or neuron out of range, bad method, windows or sizes.
    """

    def __init__(
        self,
        model: Any,
        windows: Int[Tensor, "n_windows window"],
        top: Any,
        *,
        layer: int = 0,
        neuron: int | None = None,
        method: str | None = None,
        threshold: float | None = None,
        max_examples: int = 20,
        before: int = 20,
        after: int = 10,
        seed: int = 0,
        polysemy: pd.DataFrame | None = None,
        similar_space: str = "embedding",
    ) -> None:
        import ipywidgets as w

        self.model = model
        self.windows = check_windows(model, windows)
        self.top = top
        self.max_examples = check_int_range("max_examples", max_examples, 1, 1000)
        self.before = check_int_range("before", before, 0, 10_000)
        self.after = check_int_range("after", after, 0, 10_000)
        self.seed = seed
        self.similar_space = check_choice("similar_space", similar_space, ("embedding", "h"))
        self.rng = np.random.default_rng(seed)
        self._neurons: dict[tuple[int, int], NeuronData] = {}
        self._importance: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._polysemy: dict[int, pd.DataFrame] = {}
        if polysemy is not None:  # tables already computed (e.g. by the notebook): the random button reuses them
            for layer_id, rows in polysemy.groupby("layer"):
                self._polysemy[int(layer_id)] = rows.reset_index(drop=True)
        self._similar: dict[int, Any] = {}
        self._str_tokens: dict[int, list[str]] = {}
        self._syncing = False
        self._groups: list[tuple[str, np.ndarray]] = []
        layer = check_layer(model, layer)
        method = check_choice("method", clustering.DEFAULT_METHOD if method is None else method, clustering.METHODS)
        low, high, step, default = threshold_range(method)
        threshold = default if threshold is None else threshold
        if neuron is None:
            neuron = _busiest_neuron(top, layer)
        self.state = ExplorerState(layer=layer, neuron=check_neuron(model, neuron), method=method,
                                   threshold=float(threshold))

        n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
        self.layer_picker = w.Dropdown(options=list(range(n_layers)), value=layer, description="layer",
                                       layout=w.Layout(width="130px"), style={"description_width": "40px"})
        self.neuron_picker = w.BoundedIntText(value=self.state.neuron, min=0, max=d_mlp - 1, description="neuron",
                                              layout=w.Layout(width="160px"), style={"description_width": "50px"})
        self.random_button = w.Button(description="random polysemantic neuron", layout=w.Layout(width="220px"))
        self.back_button = w.Button(description="back", layout=w.Layout(width="70px"), disabled=True)
        self.method_picker = w.Dropdown(options=list(clustering.METHODS), value=method, description="method",
                                        layout=w.Layout(width="230px"), style={"description_width": "60px"})
        self.threshold_slider = w.FloatSlider(value=float(threshold), min=low, max=high, step=step,
                                              description="threshold", continuous_update=False,
                                              readout_format=".2f", layout=w.Layout(width="320px"))
        self.mode_toggle = w.ToggleButtons(options=list(MODES), value="activation", description="colour by",
                                           style={"button_width": "90px"})
        self.summary = w.HTML()
        self.history_line = w.HTML()
        self.image = w.Image(format="png", layout=w.Layout(width="480px"))
        self.tabs = w.Tab(layout=w.Layout(width="100%"))
        self.body = w.HBox([self.image, self.tabs], layout=w.Layout(align_items="flex-start"))
        for widget, name in [(self.random_button, "ne-random"), (self.back_button, "ne-back"),
                             (self.summary, "ne-summary"), (self.tabs, "ne-tabs"), (self.image, "ne-umap"),
                             (self.history_line, "ne-history"), (self.layer_picker, "ne-layer"),
                             (self.neuron_picker, "ne-neuron")]:
            widget.add_class(name)  # stable hooks for the browser test
        self.widget = w.VBox([
            w.HBox([self.layer_picker, self.neuron_picker, self.random_button, self.back_button]),
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

    # ------------------------------------------------------------------------------- static views

    def figure(self) -> Any:
        """The current neuron's map (`viz.umap_plot`) as a matplotlib Figure; None for a dead neuron."""
        s = self.state
        data = self.neuron_data(s.layer, s.neuron)
        if s.message or data.layout is None:
            return None
        title = f"Layer {s.layer}, neuron {s.neuron}: {len(data.e)} examples by cluster"
        return viz.umap_plot(data.e, s.labels, central=s.central, layout=data.layout, title=title,
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

    def neuron_data(self, layer: int, neuron: int) -> NeuronData:
        """The neuron's examples, embeddings, activations, token strings and layout (computed once)."""
        key = (layer, neuron)
        if key not in self._neurons:
            examples = self.top.neuron_examples(layer, neuron)[["window", "pos", "act"]].reset_index(drop=True)
            wid = np.array(examples["window"], dtype=np.int64)  # writable copies for torch
            pos = np.array(examples["pos"], dtype=np.int64)
            width = self.windows.shape[1]
            if len(examples) == 0:
                h = e = np.zeros((0, self.model.cfg.d_model))
                acts = np.zeros((0, width))
                layout = None
            else:
                h_t, acts = _neuron_pass(self.model, self.windows[torch.as_tensor(wid)], layer, neuron, pos)
                W, _ = embeddings.mlp_in_weights(self.model, layer)
                h, e = h_t.numpy(), embeddings.embed(h_t, W, neuron).numpy()  # [n, d_model] each
                layout = viz.layout_2d(e, seed=self.seed)
            str_tokens = [self.tokens_of(int(i)) for i in wid]
            self._neurons[key] = NeuronData(examples, h.astype(np.float64), e.astype(np.float64), acts, str_tokens,
                                            layout)
        return self._neurons[key]

    def tokens_of(self, window: int) -> list[str]:
        """Token strings of one window (cached)."""
        if window not in self._str_tokens:
            self._str_tokens[window] = list(self.model.to_str_tokens(self.windows[window]))
        return self._str_tokens[window]

    def importance_of(self, layer: int, neuron: int, window: int, pos: int) -> Float[np.ndarray, "pos_plus_1"]:
        """Token importance `[pos + 1]` of one example (`importance.token_importance`, cached)."""
        key = (layer, neuron, window, pos)
        if key not in self._importance:
            from nbutils import importance

            self._importance[key] = np.asarray(
                importance.token_importance(self.model, self.windows[window], pos, layer, neuron), dtype=np.float64)
        return self._importance[key]

    def polysemy(self, layer: int) -> pd.DataFrame:
        """The polysemy table of a layer (`clustering.polysemy_table`, cached)."""
        if layer not in self._polysemy:
            self._polysemy[layer] = clustering.polysemy_table(self.model, self.windows, self.top, layer)
        return self._polysemy[layer]

    def similar_to(self, layer: int, neuron: int, row: int, k: int = N_SIMILAR) -> pd.DataFrame:
        """Features of other neurons of `layer` nearest to example `row` of `neuron` (a cluster's centre).

        Features are `similar.layer_features` of the layer (clusters of at least 3 examples under the
        default clustering, computed once per layer), compared by cosine similarity of their central
        example's vector in `similar_space` ("embedding": h ⊙ w, or "h") with the example's vector in
        the same space. Returns `layer, neuron, cluster, size, similarity`, most similar first, one row per
        neuron (its most similar feature).
        """
        from nbutils import similar

        if layer not in self._similar:
            self._similar[layer] = similar.layer_features(self.model, self.windows, self.top, layer)
        features = self._similar[layer]
        data = self.neuron_data(layer, neuron)
        query = (data.e if self.similar_space == "embedding" else data.h)[row]  # [d_model]
        table = features.table[["layer", "neuron", "cluster", "size"]]
        vectors = features.vectors[self.similar_space]  # [n_features, d_model]
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        sims = vectors @ query / np.where(norms > 0, norms, 1.0)  # [n_features]
        other = np.flatnonzero(table["neuron"].to_numpy() != neuron)
        order = other[np.argsort(-sims[other], kind="stable")]
        ranked = table.iloc[order].assign(similarity=sims[order])
        return ranked.drop_duplicates("neuron").head(k).reset_index(drop=True)  # a button per neuron


def _busiest_neuron(top: Any, layer: int) -> int:
    """The neuron of `layer` with the most examples (the first if several)."""
    table = top.neurons
    rows = table[table["layer"] == layer]
    return int(rows.sort_values(["n_examples", "neuron"], ascending=[False, True]).iloc[0]["neuron"])


@torch.inference_mode()
def _neuron_pass(
    model: Any, windows: Int[Tensor, "n window"], layer: int, neuron: int, pos: Int[np.ndarray, "n"],
    batch_size: int = 64,
) -> tuple[Float[Tensor, "n d_model"], Float[np.ndarray, "n window"]]:
    """One forward pass over a neuron's example windows `[n, window]` (each example its own window).

    Returns h at each example's activating position `[n, d_model]` (the folded-LayerNorm h of
    `embeddings.pre_mlp_vectors`, which `embeddings.embed` turns into neuron embeddings) and the neuron's
    activation at every position `[n, window]`. One pass instead of two keeps a neuron change fast.
    """
    names = [hook_name(layer, "ln_normalized"), hook_name(layer, "post")]
    h_parts, act_parts = [], []
    for start in range(0, len(windows), batch_size):
        _, cache = model.run_with_cache(windows[start : start + batch_size], names_filter=names,
                                        stop_at_layer=layer + 1)
        rows = torch.arange(len(cache[names[0]]))
        h_parts.append(cache[names[0]][rows, torch.as_tensor(pos[start : start + batch_size])].float().cpu())
        act_parts.append(cache[names[1]][:, :, neuron].float().cpu())  # [batch, window]
    return torch.cat(h_parts), torch.cat(act_parts).numpy().astype(np.float64)


# -------------------------------------------------------------------------------------------- callbacks


def select_neuron(ex: Explorer, layer: int, neuron: int, *, record: bool = True) -> None:
    """Show neuron `neuron` of layer `layer`: compute (cached), cluster, render; push it on the history.

    Raises:
        ValueError: layer or neuron out of range for the model.
    """
    layer, neuron = check_layer(ex.model, layer), check_neuron(ex.model, neuron)
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
    """A similar-feature button: jump to that neuron."""
    select_neuron(ex, layer, neuron)


def on_method(ex: Explorer, method: str) -> None:
    """Clustering method: set the slider to the method's range and default, re-cluster."""
    method = check_choice("method", method, clustering.METHODS)
    low, high, step, default = threshold_range(method)
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


def on_tab(ex: Explorer, index: int | None) -> None:
    """A cluster tab was selected (importance is computed for the examples of the shown tab only)."""
    if index is None:
        return
    ex.state.tab = int(index)
    if ex.state.mode == "importance":
        _fill_tab(ex, ex.state.tab)


# ------------------------------------------------------------------------------------------- compute


def _recluster(ex: Explorer) -> None:
    data = ex.neuron_data(ex.state.layer, ex.state.neuron)
    n = len(data.examples)
    if n == 0:
        ex.state.labels, ex.state.central = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ex.state.message = (f"Neuron {ex.state.neuron} of layer {ex.state.layer} is dead: its highest activation "
                            "over the corpus is at most 0, so it has no examples to cluster.")
        return
    threshold: float | int = ex.state.threshold
    if ex.state.method == "hdbscan":
        threshold = int(round(min(threshold, max(2, n))))
    ex.state.labels = clustering.cluster(data.e, method=ex.state.method, threshold=threshold)
    ex.state.central = clustering.central_example(data.e, ex.state.labels)
    ex.state.message = ""


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


# -------------------------------------------------------------------------------------------- render


def _render(ex: Explorer) -> None:
    """Map, tabs, then the summary line: when the summary names the new neuron, the rest is drawn."""
    fig = ex.figure()
    if fig is None:
        ex.image.value = b""
        ex.image.layout.display = "none"
    else:
        ex.image.value = viz.figure_png(fig)
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
        mono = clustering.monosemanticity(data.e)
        eff = clustering.effective_n_clusters(s.labels)
        note = f" · map: {data.layout.note}" if data.layout is not None and data.layout.note else ""
        ex.summary.value = (
            f"{head} · {len(data.e)} examples · {len(sizes)} clusters ({n_single} singletons) · "
            f"effective clusters {eff:.2f} · monosemanticity {'n/a' if np.isnan(mono) else f'{mono:.2f}'} · "
            f"{html.escape(s.method)} at {s.threshold:g}{html.escape(note)}"
        )
    trail = " → ".join(f"L{l}/N{n}" for l, n in s.history[-8:])
    ex.history_line.value = f'<span style="color:#555;font-size:90%">history: {trail}</span>'
    ex.back_button.disabled = len(s.history) < 2


def _render_tabs(ex: Explorer) -> None:
    import ipywidgets as w

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


def examples_html(ex: Explorer, title: str, clusters: np.ndarray, *, mode: str = "activation") -> str:
    """HTML of one tab's examples: central first, at most `max_examples`, `before`/`after` tokens of context
    around the activating token (outlined), tokens coloured by activation or by importance."""
    s = ex.state
    data = ex.neuron_data(s.layer, s.neuron)
    rows = _tab_rows(ex, clusters)
    central = set(s.central.tolist())
    top_act = float(data.acts.max()) if data.acts.size else 1.0
    parts = []
    for i in rows:
        window, pos = int(data.examples.at[i, "window"]), int(data.examples.at[i, "pos"])
        start, stop = max(0, pos - ex.before), min(len(data.str_tokens[i]), pos + ex.after + 1)
        if mode == "importance":
            values = np.zeros(stop - start)
            values[: pos + 1 - start] = ex.importance_of(s.layer, s.neuron, window, pos)[start : pos + 1]
        else:
            values = data.acts[i, start:stop]
        star = "★ central · " if i in central else ""
        head = (f'<div style="font-size:85%;color:#555">{star}cluster {s.labels[i]} · '
                f'act {float(data.examples.at[i, "act"]):.2f} · window {window}, token {pos}</div>')
        parts.append(head + viz.tokens_html(data.str_tokens[i][start:stop], values, kind=mode,
                                            max_value=None if mode == "importance" else top_act,
                                            highlight=pos - start))
    shown = f"{len(rows)} of {int(np.isin(s.labels, clusters).sum())} examples"
    intro = (f"<div><b>Cluster {html.escape(title)}</b> · {shown}, central first · tokens coloured by "
             f"{mode}{' for the outlined token' if mode == 'importance' else ''}</div>")
    return intro + "".join(f'<div style="margin:4px 0">{p}</div>' for p in parts)


def _similar_buttons(ex: Explorer, clusters: np.ndarray) -> list:
    import ipywidgets as w

    s = ex.state
    centre = int(s.central[int(clusters[0])])
    table = ex.similar_to(s.layer, s.neuron, centre)
    buttons = []
    for row in table.itertuples():
        button = w.Button(description=f"L{row.layer}/N{row.neuron} ({row.similarity:.2f})",
                          tooltip=f"cluster {row.cluster} ({row.size} examples) of neuron {row.neuron}, "
                                  f"cosine {row.similarity:.2f}",
                          layout=w.Layout(width="auto"))
        button.add_class("ne-similar")
        button.on_click(lambda _, l=int(row.layer), n=int(row.neuron): on_similar(ex, l, n))
        buttons.append(button)
    return buttons


def neuron_explorer(model: Any, windows: Int[Tensor, "n_windows window"], top: Any, **kwargs: Any) -> Any:
    """The per-neuron explorer as one ipywidgets widget (`Explorer.widget`; `.explorer` gives the state).

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: the token windows `[n_windows, window]` the collection ran on.
        top: `activations.collect_top_activations(model, windows)`.
        **kwargs: `layer`, `neuron` (default: the layer's neuron with most examples), `method`, `threshold`,
            `max_examples` (20), `before` (20), `after` (10), `seed` (0), `polysemy` (precomputed
            `clustering.polysemy_table` rows for the random button); see `Explorer`.

    Returns:
        `ipywidgets.VBox`.
    """
    return Explorer(model, windows, top, **kwargs).widget
