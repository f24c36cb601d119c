"""Virtual polysemantic neurons: ground truth on the model's own activations. A virtual neuron reads 2-4
monosemantic neurons of a layer; each of its top examples is labelled by the source that drives it most, and its
clusters are scored against those labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from nbutils import clustering, embeddings, topk
from nbutils._validation import check_choice, check_float_range, check_int_range, fail

from nbutils.evaluation.method_choice import _check_grid, score_labels

__all__ = ["MONOSEMANTIC_CLUSTERS", "AMBIGUOUS", "VirtualNeurons", "make_virtual_neurons", "virtual_activations",
           "collect_virtual_examples", "score_virtual_neurons", "virtual_family_scores"]


MONOSEMANTIC_CLUSTERS = 1.2  # a source neuron has at most this many effective clusters
AMBIGUOUS = 0.9  # an example is ambiguous when its second source contributes >= this share of the first


@dataclass(frozen=True)
class VirtualNeurons:
    """Virtual polysemantic neurons of one layer, each reading 2-4 monosemantic source neurons.

    Plain MLP: virtual neuron v reads its sources i with `w_v = sum_i w_i / s_i` and `b_v = sum_i b_i / s_i`,
    where `s_i` is source i's pre-activation at its top example (there each source adds 1): a neuron in
    superposition made from real neurons, on the model's real `h`. Its activation is `act(h . w_v + b_v)`.

    Gated MLP: the gate and the up projection are combined alike, `w_v = sum_i w_gate_i / s_i` (`s_i`: source
    i's gate g_i at its top example) and `w_up_v = sum_i w_up_i / t_i` (`t_i`: its up value u_i there; sign
    included, though it is positive whenever `s_i > 0`, since `act(s_i) t_i` is the source's positive top
    activation), biases likewise; so each source's gate term and up term are 1 at its own top example. The
    virtual activation is `act(g_v) * u_v` with `g_v = h . w_v + b_v`, `u_v = h . w_up_v + b_up_v`. Unlike the
    plain sum, this product has cross terms (one source's gate opening another's up value), so an example can
    be driven by two sources together; its label is still the single source whose own term is largest.

    Weights are in the folded norm convention (`embeddings.mlp_in_weights`).

    Attributes:
        layer: the MLP layer.
        sources: DataFrame, one row per (virtual neuron, source): `virtual, neuron, scale, token` (the
            source's most common activating token id), plus `up_scale` (`t_i`) for a gated MLP.
        source_W: `[d_model, n_rows]` float64, `w_i / s_i` (gated: `w_gate_i / s_i`) of each row of `sources`.
        source_b: `[n_rows]` float64, `b_i / s_i` (gated: `b_gate_i / s_i`).
        source_W_up: `[d_model, n_rows]` float64 `w_up_i / t_i` for a gated MLP, else None.
        source_b_up: `[n_rows]` float64 `b_up_i / t_i` for a gated MLP, else None.
    """

    layer: int
    sources: pd.DataFrame
    source_W: np.ndarray
    source_b: np.ndarray
    source_W_up: np.ndarray | None = None
    source_b_up: np.ndarray | None = None

    @property
    def n_virtual(self) -> int:
        return int(self.sources.virtual.max()) + 1 if len(self.sources) else 0

    @property
    def gated(self) -> bool:
        return self.source_W_up is not None

    def _sum(self, per_row: np.ndarray) -> np.ndarray:
        """Sum per-row columns `[d, n_rows]` (or values `[n_rows]`) over each virtual neuron's sources."""
        out = np.zeros((*per_row.shape[:-1], self.n_virtual))
        np.add.at(out.T, self.sources.virtual.to_numpy(), per_row.T)
        return out

    @property
    def W(self) -> np.ndarray:
        """`[d_model, n_virtual]` input (gated: gate) weights of the virtual neurons."""
        return self._sum(self.source_W)

    @property
    def b(self) -> np.ndarray:
        """`[n_virtual]` biases (gated: gate biases) of the virtual neurons."""
        return self._sum(self.source_b)

    @property
    def W_up(self) -> np.ndarray | None:
        """`[d_model, n_virtual]` up weights of gated virtual neurons (None for a plain MLP)."""
        return None if self.source_W_up is None else self._sum(self.source_W_up)

    @property
    def b_up(self) -> np.ndarray | None:
        """`[n_virtual]` up biases of gated virtual neurons (None for a plain MLP)."""
        return None if self.source_b_up is None else self._sum(self.source_b_up)

    def source_weights(self, kind: str) -> np.ndarray:
        """`[d_in, n_rows]` per-source weights of one embedding kind (`embeddings.KINDS`): `"in"` (plain) or
        `"gate"`, `"up"`, `"both"` (gate rows then up rows, `d_in = 2 * d_model`) for a gated MLP."""
        check_choice("kind", kind, ("gate", "up", "both") if self.gated else ("in",))
        if kind == "up":
            return self.source_W_up
        return np.vstack([self.source_W, self.source_W_up]) if kind == "both" else self.source_W


def make_virtual_neurons(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    n_virtual: int = 100,
    *,
    n_sources: tuple[int, int] = (2, 4),
    min_examples: int = 10,
    seed: int = 0,
    examples: clustering.LayerExamples | None = None,
    table: pd.DataFrame | None = None,
) -> VirtualNeurons:
    """Pick monosemantic source neurons of one layer and combine them into virtual neurons.

    Sources are live neurons with at least `min_examples` examples and at most `MONOSEMANTIC_CLUSTERS`
    effective clusters (default clustering). The sources of one virtual neuron have different most common
    activating tokens and no example window in common. Virtual neuron v has `n_sources[0] + v % (span)`
    sources, so the counts 2, 3, 4 take turns; sources may serve several virtual neurons. A source's scale
    (and, gated, its up scale) is read at its top example and must be positive (`VirtualNeurons`); for a
    gated MLP the sources are chosen by the clusters of their default (gate) embeddings.

    Args:
        model, windows, top, layer: as in `clustering.polysemy_table`.
        n_virtual: virtual neurons to make (fewer when the layer has too few compatible sources).
        n_sources: inclusive range of sources per virtual neuron, within 2..8.
        min_examples: fewest examples of a source.
        seed: random seed of the choice.
        examples, table: this layer's `clustering.layer_examples` and `clustering.polysemy_table`, if at hand.

    Raises:
        ValueError: fewer than two compatible sources.
    """
    from nbutils.models import check_layer, is_gated

    layer = check_layer(model, layer)
    gated = is_gated(model)
    n_virtual = check_int_range("n_virtual", n_virtual, 1, 100_000)
    lo = check_int_range("n_sources", n_sources[0], 2, 8)
    hi = check_int_range("n_sources", n_sources[1], lo, 8)
    if examples is None and table is None:
        examples = clustering.layer_examples(model, windows, top, layer)
    table = table if table is not None else clustering.polysemy_table(model, windows, top, layer, examples=examples)
    mono = table[~table.dead & (table.n_examples >= min_examples) & (table.effective_clusters > 0)
                 & (table.effective_clusters <= MONOSEMANTIC_CLUSTERS)].neuron.to_numpy()
    info, (W, b), up = _source_candidates(model, windows, top, layer, mono, examples)
    rows = _draw_sources(info, n_virtual, lo, hi, np.random.default_rng([seed, layer]))
    if not rows:
        fail("layer", "have at least two monosemantic neurons with different tokens and windows",
             f"{len(info)} monosemantic neurons in layer {layer}", "Collect over more windows.")
    sources = pd.DataFrame(rows, columns=["virtual", "neuron", "scale", "token", "up_scale"])
    neuron, scale, up_scale = sources.neuron.to_numpy(), sources.scale.to_numpy(), sources.up_scale.to_numpy()
    if not gated:
        return VirtualNeurons(layer=layer, sources=sources.drop(columns="up_scale"), source_W=W[:, neuron] / scale,
                              source_b=b[neuron] / scale)
    W_up, b_up = up
    return VirtualNeurons(layer=layer, sources=sources, source_W=W[:, neuron] / scale, source_b=b[neuron] / scale,
                          source_W_up=W_up[:, neuron] / up_scale, source_b_up=b_up[neuron] / up_scale)


def _source_candidates(model: Any, windows: Any, top: Any, layer: int, mono: np.ndarray,
                       examples: clustering.LayerExamples | None) -> tuple[dict, tuple, tuple | None]:
    """The usable sources among the monosemantic neurons `mono`: `{neuron: (example windows, most common token,
    scale, up scale)}` for those whose (gate and up) pre-activation at their top example is positive, with the
    layer's `(W, b)` and, gated, the up projection's `(W_up, b_up)` (float64, folded norm)."""
    from nbutils.models import check_windows, is_gated

    if examples is not None:
        ex, bounds, W, b = examples.examples, examples.bounds, examples.W, examples.b
        h_top = examples.h[examples.inverse[bounds[mono]]]  # [n_mono, d_model] at each one's top example
    else:  # with the polysemy at hand, only the sources' top examples are read (each window up to that position)
        clustering._check_top(model, top)
        windows = check_windows(model, windows)
        ex = clustering._layer_examples(top, windows, layer)
        bounds = np.searchsorted(ex["neuron"].to_numpy(), np.arange(model.cfg.d_mlp + 1))
        first = bounds[mono][bounds[mono] < bounds[mono + 1]]  # top example rows of the candidates with examples
        mono = mono[bounds[mono] < bounds[mono + 1]]
        h_top = clustering._pre_mlp_vectors(model, windows, layer, ex["window"].to_numpy()[first],
                                            ex["pos"].to_numpy()[first], fold_ln=True)  # [n_mono, d_model]
        W, b = (t.numpy().astype(np.float64) for t in embeddings.mlp_in_weights(model, layer))
    window_col, pos_col, tokens = ex.window.to_numpy(), ex.pos.to_numpy(), windows.numpy()
    up = None
    if is_gated(model):  # W, b are the gate's (the default kind); the up projection in the same convention
        up = tuple(t.numpy().astype(np.float64) for t in embeddings.mlp_in_weights(model, layer, kind="up"))
    info = {}
    for j, h in zip(mono, h_top):
        rows = slice(bounds[j], bounds[j + 1])
        scale = float(h @ W[:, j] + b[j])  # pre-activation (gated: gate) at its top example
        up_scale = float(h @ up[0][:, j] + up[1][j]) if up is not None else 1.0
        if scale > 0 and up_scale > 0:
            info[j] = (set(window_col[rows].tolist()), int(np.bincount(tokens[window_col[rows], pos_col[rows]]).argmax()),
                       scale, up_scale)
    return info, (W, b), up


def _draw_sources(info: dict, n_virtual: int, lo: int, hi: int, rng: np.random.Generator) -> list[tuple]:
    """Rows `(virtual, neuron, scale, token, up_scale)`: virtual neuron v draws `lo + v % (hi - lo + 1)` sources in
    a random order, each with a token and windows that no source already chosen has; one with fewer than two is
    dropped (the numbering stays dense)."""
    candidates, rows = np.array(sorted(info)), []
    for v in range(n_virtual):
        m, chosen = lo + v % (hi - lo + 1), []
        for j in rng.permutation(candidates):
            if all(info[j][1] != info[c][1] and not info[j][0] & info[c][0] for c in chosen):
                chosen.append(int(j))
                if len(chosen) == m:
                    break
        if len(chosen) >= 2:
            rows += [(len({r[0] for r in rows}), j, info[j][2], info[j][1], info[j][3]) for j in chosen]
    return rows


def virtual_activations(model: Any, virtual: VirtualNeurons, h: Any, neurons: Any = None) -> np.ndarray:
    """Activations of virtual neurons from pre-MLP vectors `h [..., d_model]` (folded convention): `act(h . w_v
    + b_v)` (plain) or `act(g_v) * u_v` (gated), as `VirtualNeurons` defines them.

    Args:
        neurons: virtual neuron ids (an int gives that neuron alone, without the last axis); default all.

    Returns:
        `[..., n_neurons]` (`[...]` for an int) float64.
    """
    idx = slice(None) if neurons is None else neurons
    h = np.asarray(h, dtype=np.float64)
    pre = h @ virtual.W[:, idx] + virtual.b[idx]
    if not virtual.gated:
        return embeddings.mlp_activation(model, pre)
    return embeddings.mlp_activation(model, pre, h @ virtual.W_up[:, idx] + virtual.b_up[idx])


def _check_virtual_of(model: Any, virtual: VirtualNeurons) -> None:
    """Virtual neurons must be of the model's kind of MLP (plain or gated)."""
    from nbutils.models import is_gated

    gated = is_gated(model)
    if virtual.gated != gated:
        fail("virtual", f"be made from this model ({'a gated' if gated else 'a plain'} MLP)",
             "virtual neurons of the other kind of MLP", "Make them with `make_virtual_neurons(model, ...)`.")


def _source_terms(model: Any, virtual: VirtualNeurons, h: np.ndarray, rows: Any) -> np.ndarray:
    """What each source of `rows` (rows of `virtual.sources`) adds on its own at `h [n, d_model]`, `[n, m]`:
    its scaled pre-activation `h . w_i / s_i + b_i / s_i` (plain) or its scaled activation
    `act(g_i / s_i) * u_i / t_i` (gated). Each is 1 (gated: `act(1)`) at the source's own top example."""
    pre = h @ virtual.source_W[:, rows] + virtual.source_b[rows]  # [n, m]
    if not virtual.gated:
        return pre
    return embeddings.mlp_activation(model, pre, h @ virtual.source_W_up[:, rows] + virtual.source_b_up[rows])


def collect_virtual_examples(
    model: Any,
    windows: Any,
    virtual: list[VirtualNeurons],
    *,
    k: int = 128,
    frac: float = 0.75,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Top examples of the virtual neurons of several layers in one streaming pass over `windows`.

    Per batch, h of each layer is read once and the pre-activations of all its virtual neurons are one
    product `h @ W + b` `[batch, pos, n_virtual]` (gated: `act(h @ W + b) * (h @ W_up + b_up)`, ranked as
    such); the running top-k merges as in `activations.collect_top_activations` (memory O(n_virtual x k),
    whatever the corpus size).

    Returns:
        DataFrame `layer, virtual, window, pos, act` (act: `virtual_activations`, the model's activation
        function of the pre-activation, or `act(g_v) * u_v` for a gated MLP), sorted by layer, virtual, act
        desc; an example per (virtual neuron, window) at its highest position, kept when `act >= frac * max`.
    """
    import torch
    from tqdm.auto import tqdm

    from nbutils.embeddings import activation_fn
    from nbutils.models import check_windows, hook_name, is_gated

    windows = check_windows(model, windows)
    k = check_int_range("k", k, 1, 100_000)
    frac = check_float_range("frac", frac, 0.0, 1.0, low_open=True)
    if len({v.layer for v in virtual}) != len(virtual):
        fail("virtual", "hold one VirtualNeurons per layer", [v.layer for v in virtual])
    gated = is_gated(model)
    for v in virtual:
        _check_virtual_of(model, v)
    names = [hook_name(v.layer, "ln_normalized", model) for v in virtual]
    weights = [[torch.tensor(x, dtype=torch.float32) for x in ((v.W, v.b, v.W_up, v.b_up) if gated else (v.W, v.b))]
               for v in virtual]
    act_fn = activation_fn(model)

    def scores(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *up: torch.Tensor) -> torch.Tensor:
        """`[batch, pos, n_virtual]`: pre-activations (plain; the activation is applied after the top-k) or
        activations `act(g) * u` (gated)."""
        return h @ W + b if not up else act_fn(h @ W + b) * (h @ up[0] + up[1])

    total = sum(v.n_virtual for v in virtual)
    state = topk.empty_state(total, k, "cpu")
    stop = max(v.layer for v in virtual) + 1
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="virtual neurons", disable=not progress):
            batch = windows[start : start + batch_size]  # [batch, window]
            _, cache = model.run_with_cache(batch, names_filter=names, stop_at_layer=stop)
            best = [scores(cache[name].float().cpu(), *w).max(dim=1) for name, w in zip(names, weights)]
            pre = torch.cat([m.values for m in best], dim=1).T.contiguous()  # [total, batch]
            pos = torch.cat([m.indices for m in best], dim=1).T.to(torch.int32)  # [total, batch]
            ids = torch.arange(start, start + batch.shape[0]).expand_as(pre)
            state = topk.merge_topk(state, (topk.order_key(pre, ids), pos.contiguous()), k)
    pre, window, pos = (t[0].numpy() for t in topk.sorted_state(*state, 1))  # [total, k] each
    act = (pre.astype(np.float64) if gated  # [total, k]
           else embeddings.mlp_activation(model, np.where(window >= 0, pre, 0.0)))
    top = np.where(window >= 0, act, -np.inf).max(axis=1, keepdims=True)
    keep = (window >= 0) & (top > 0) & (act >= frac * top)
    layer = np.repeat([v.layer for v in virtual], [v.n_virtual for v in virtual])  # [total]
    vid = np.concatenate([np.arange(v.n_virtual) for v in virtual])  # [total]
    row, col = np.nonzero(keep)
    return pd.DataFrame({"layer": layer[row], "virtual": vid[row], "window": window[row, col],
                         "pos": pos[row, col], "act": act[row, col]})


def _knn_accuracy(sim: np.ndarray, truth: np.ndarray, neighbours: int) -> float:
    """Share of examples whose `neighbours` most similar others hold their label most often."""
    n = len(truth)
    if n < 2:
        return float("nan")
    kk = min(neighbours, n - 1)
    others = sim - 3.0 * np.eye(n)
    nearest = np.argsort(-others, axis=1, kind="stable")[:, :kk]  # [n, kk]
    votes = np.zeros((n, truth.max() + 1))
    np.add.at(votes, (np.repeat(np.arange(n), kk), truth[nearest].reshape(-1)), 1.0)
    return float((votes.argmax(axis=1) == truth).mean())


def score_virtual_neurons(
    model: Any,
    windows: Any,
    virtual: VirtualNeurons,
    examples: pd.DataFrame,
    grid: dict[str, list[float]] | None = None,
    *,
    pattern: int = 8,
    neighbours: int = 5,
    chunk: int = 16,
    progress: bool = False,
    kind: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Cluster each virtual neuron's examples in three spaces (`real_model.SPACES`) and score them against the sources.

    Each example is labelled by the source that adds most on its own (`_source_terms`): the largest scaled
    pre-activation `(h . w_i + b_i) / s_i` (plain MLP) or scaled activation `act(g_i / s_i) * u_i / t_i`
    (gated; `VirtualNeurons`); examples whose second source reaches `AMBIGUOUS` of the first are clustered
    but not scored. The labels do not depend on `kind`. Spaces: the virtual neuron embedding `h ⊙ w_v` of
    the embedding `kind` (gated: `h ⊙ w_v` of the gate, `h ⊙ w_up_v`, or both concatenated; its sum plus
    the bias is `g_v`, `u_v` or `g_v + u_v`), plain `h`, and its activation (`virtual_activations`) at the
    `pattern` positions ending at the example (zero before the window starts).

    Args:
        model, windows: as in `collect_virtual_examples`.
        virtual: one layer's virtual neurons.
        examples: `collect_virtual_examples` rows (other layers are ignored).
        grid: `{method: [thresholds]}`; default `{method: [default threshold]}` for every method.
        pattern: positions in the activation pattern.
        neighbours: neighbours of the nearest-neighbour accuracy.
        chunk: virtual neurons whose vectors are read together (memory vs. passes over their windows).
        progress: tqdm bar over virtual neurons.
        kind: embedding kind of the `"embedding"` space (`embeddings.embedding_kind`; default the model's:
            `"in"` plain, `"gate"` gated); the other spaces do not depend on it. A sequence of kinds scores each
            from one read of h (one pass over the examples' windows for all of them).

    Returns:
        DataFrame, one row per (virtual neuron, space, method, threshold): `layer, virtual, n_sources,
        n_examples, n_scored, n_present` (sources among the scored examples), `own_share` (mean share of
        `|e_v|^2` in the labelled source's own term `h ⊙ w_i / s_i` of that kind; 1 / n_sources if every
        term weighed the same), `kind, space, method, threshold,
        n_clusters, ari, homogeneity, completeness, v_measure, whole` (`score_labels` on the scored examples),
        `knn_accuracy` (`neighbours`-nearest-neighbour vote in that space) and `majority` (share of the
        commonest source: the accuracy of always guessing it).
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from nbutils.embeddings import embedding_kind

    grid = _check_grid(grid if grid is not None else {m: [clustering.DEFAULT_THRESHOLDS[m]] for m in clustering.METHODS})
    pattern = check_int_range("pattern", pattern, 1, 10_000)
    kinds = [embedding_kind(model, k) for k in ([kind] if kind is None or isinstance(kind, str) else kind)]
    _check_virtual_of(model, virtual)
    ex = examples[examples.layer.to_numpy() == virtual.layer]
    n_pos = windows.shape[1]
    source_W = {k: virtual.source_weights(k) for k in kinds}  # [d_in, n_rows] of each embedding kind
    W_kind = {k: virtual._sum(source_W[k]) for k in kinds}  # [d_in, n_virtual]
    offsets = np.arange(-pattern + 1, 1)  # [pattern]
    rows = []
    bar = tqdm(total=virtual.n_virtual, desc=f"layer {virtual.layer} virtual neurons", disable=not progress)
    for first in range(0, virtual.n_virtual, chunk):
        part = ex[(ex.virtual >= first) & (ex.virtual < first + chunk)]
        pos = part.pos.to_numpy()[:, None] + offsets  # [n, pattern]
        keys = part.window.to_numpy()[:, None] * n_pos + np.maximum(pos, 0)  # [n, pattern]
        unique, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(keys.shape)
        h = clustering._pre_mlp_vectors(model, windows, virtual.layer, unique // n_pos, unique % n_pos,
                                        fold_ln=True)  # [n_unique, d_model]
        with threadpool_limits(1):
            for v, rows_v in part.groupby("virtual").indices.items():
                bar.update(1)
                h_v = h[inverse[rows_v, -1]]  # [n, d_model] at the examples
                acts = virtual_activations(model, virtual, h[inverse[rows_v]], v)  # [n, pattern]
                for k in kinds:
                    rows += _score_virtual(model, virtual, v, h_v, np.where(pos[rows_v] >= 0, acts, 0.0), k,
                                           source_W[k], W_kind[k][:, v], grid, neighbours)
    bar.close()
    return pd.DataFrame(rows)


def _score_virtual(model: Any, virtual: VirtualNeurons, v: int, h_v: np.ndarray, pattern_acts: np.ndarray, kind: str,
                   source_W: np.ndarray, w_v: np.ndarray, grid: dict[str, list[float]], neighbours: int) -> list[dict]:
    """The rows of `score_virtual_neurons` of virtual neuron `v`, from h at its examples `h_v` `[n, d_model]` and
    its activations before them `pattern_acts` `[n, pattern]`; `w_v` `[d_in]` is its weight of the `kind`."""
    s = virtual.sources[virtual.sources.virtual == v]
    contrib = _source_terms(model, virtual, h_v, s.index)  # [n, m]
    order = np.sort(contrib, axis=1)
    truth, scored = contrib.argmax(axis=1), order[:, -2] < AMBIGUOUS * order[:, -1]
    h_k = np.hstack([h_v, h_v]) if kind == "both" else h_v  # [n, d_in]
    spaces = {"embedding": h_k * w_v, "h": h_v, "pattern": pattern_acts}
    parts = (h_k[:, :, None] * source_W[:, s.index][None]) ** 2  # [n, d_in, m]
    power = parts.sum(axis=1)  # [n, m] squared norm of each source's term h ⊙ w_i / s_i
    own = power[np.arange(len(truth)), truth] / power.sum(axis=1)  # [n]
    base = dict(layer=virtual.layer, virtual=v, n_sources=len(s), n_examples=len(h_v),
                n_scored=int(scored.sum()), n_present=len(np.unique(truth[scored])),
                own_share=float(own[scored].mean()) if scored.any() else float("nan"))
    if scored.sum() < 2:
        return []
    t_scored = np.unique(truth[scored], return_inverse=True)[1].reshape(-1)
    majority = np.bincount(t_scored).max() / len(t_scored)
    rows = []
    for space, x in spaces.items():
        sim = clustering.cosine_similarity(x)
        knn = _knn_accuracy(sim[np.ix_(scored, scored)], t_scored, neighbours)
        for method, thresholds in grid.items():
            for t in thresholds:
                labels = clustering._labels_from_similarity(sim, method, clustering._check_threshold(method, t))
                rows.append(dict(base, kind=kind, space=space, method=method, threshold=t,
                                 n_clusters=int(labels.max()) + 1, **score_labels(truth, labels, scored),
                                 knn_accuracy=knn, majority=majority))
    return rows


def virtual_family_scores(scores: pd.DataFrame, *, space: str = "embedding") -> pd.DataFrame:
    """`score_virtual_neurons` rows of one space as a generator family named "virtual" (`score_families`
    columns; `n_features` = sources present among the scored examples), for `leave_one_family_out`."""
    part = scores[scores.space == space]
    out = part.assign(family="virtual", draw=part.layer * 100_000 + part.virtual, n_features=part.n_present)
    return out[["family", "draw", "n_features", "method", "threshold", "n_clusters", "ari", "homogeneity",
                "completeness", "v_measure", "whole"]].reset_index(drop=True)

