"""Which representation and cut recover what a neuron reads: scored on virtual neurons, chosen on held-out layers.

Virtual neurons (`evaluation.make_virtual_neurons`) read 2-4 real monosemantic neurons of a layer, so each of
their top examples has a known source (`evaluation.score_virtual_neurons` labels it the same way). Here every
virtual neuron's examples are represented in several spaces (`nbutils.representations`), cut by several
clustering methods, and scored against the sources:

- `virtual_cases` reads, per virtual neuron, `h` at its examples, its weights `w_v`, the source labels and the
  activating tokens (one batched pass per layer).
- `layer_spaces` names the representations, each a function `(h, w) -> [n, dim]`; the dictionary ones need an
  SAE trained on that layer's `h` at ordinary tokens (`layer_tokens`, `representations.train_dictionary`).
- `score_cases` clusters each case in each space with each cut (`clustering` methods, any threshold) and
  scores it: ARI, homogeneity, completeness, V-measure, a 5-nearest-neighbour vote and clusters per source.
  Two reference spaces come with every case and are never chosen: `"token"` (one cluster per activating
  token, no cut) and `"source_terms"`, the scaled terms of the sources themselves `[n, n_sources]`, whose
  argmax *is* the label: what a cut could reach if a representation held exactly what tells the sources apart.
- `margin` decides which examples are scored: those whose second source adds less than `margin` times the
  first (`evaluation.AMBIGUOUS`, 0.9, by default). Most top examples of a virtual neuron are driven by several
  sources together, so the score at a strict margin (0.5) is also worth reading.
- `summary` averages per layer; `held_out_choice` picks the (space, cut) on all layers but one and scores it
  on that one, so no choice is scored on the layer it was made on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from nbutils import clustering, evaluation, representations
from nbutils._validation import check_float_range, check_int_range, fail
from nbutils.evaluation import virtual_neurons

__all__ = [
    "VirtualCase",
    "virtual_cases",
    "layer_tokens",
    "Space",
    "layer_spaces",
    "DEFAULT_CUTS",
    "SCORES",
    "REFERENCES",
    "score_cases",
    "summary",
    "held_out_choice",
]

Space = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (h [n, d_model], w [d_model]) -> [n, dim]
# the default cut, a finer one, and Leiden at two resolutions: the cuts measured in the README
DEFAULT_CUTS: tuple[tuple[str, float], ...] = (("local", 0.75), ("local", 0.9), ("leiden", 1.0), ("leiden", 2.0))
SCORES = ("v_measure", "homogeneity", "completeness", "ari", "knn_accuracy", "clusters_per_source")


@dataclass(frozen=True)
class VirtualCase:
    """One virtual neuron's examples with their ground truth.

    Attributes:
        layer, virtual: which virtual neuron.
        h: `[n, d_model]` float64 pre-MLP vectors at its examples (folded norm convention).
        w: `[d_model]` its input weights (gated: gate weights).
        terms: `[n, n_sources]` what each source adds on its own, scaled to 1 at its top example (plain MLP:
            `(h . w_i + b_i) / s_i`; gated: `act(g_i / s_i) * u_i / t_i`; `evaluation.VirtualNeurons`).
        token: `[n]` activating token ids.
    """

    layer: int
    virtual: int
    h: np.ndarray
    w: np.ndarray
    terms: np.ndarray
    token: np.ndarray

    @property
    def truth(self) -> np.ndarray:
        """`[n]` the source that adds most at each example (as `evaluation.score_virtual_neurons` labels it)."""
        return self.terms.argmax(axis=1)

    def scored(self, margin: float = evaluation.AMBIGUOUS) -> np.ndarray:
        """`[n]` bool: the second source adds less than `margin` times the first."""
        order = np.sort(self.terms, axis=1)
        return order[:, -2] < margin * order[:, -1]


def virtual_cases(model: Any, windows: Any, virtual: evaluation.VirtualNeurons, examples: pd.DataFrame) -> list[VirtualCase]:
    """The cases of one layer's virtual neurons from `evaluation.collect_virtual_examples` rows (other layers
    ignored); h is read once per distinct example."""
    ex = examples[examples.layer.to_numpy() == virtual.layer]
    n_pos = windows.shape[1]
    keys = ex.window.to_numpy() * n_pos + ex.pos.to_numpy()  # [n]
    unique, inverse = np.unique(keys, return_inverse=True)
    h_all = clustering._pre_mlp_vectors(model, windows, virtual.layer, unique // n_pos, unique % n_pos,
                                        fold_ln=True)  # [n_unique, d_model]
    tokens = windows.numpy()[ex.window.to_numpy(), ex.pos.to_numpy()]  # [n]
    W, src = virtual.W, virtual.sources
    cases = []
    for v, rows in ex.groupby("virtual").indices.items():
        h = h_all[inverse.reshape(-1)[rows]]  # [n, d_model]
        terms = virtual_neurons._source_terms(model, virtual, h, src.index[src.virtual == v])  # [n, n_sources]
        cases.append(VirtualCase(layer=virtual.layer, virtual=int(v), h=h, w=W[:, v], terms=terms, token=tokens[rows]))
    return cases


def layer_tokens(model: Any, windows: Any, layer: int, n_tokens: int = 20_000, *, seed: int = 0) -> np.ndarray:
    """`[n_tokens, d_model]` pre-MLP vectors of a layer at random (window, position) pairs: training data for
    a dictionary of what the layer reads in general, not only at top examples."""
    n_tokens = check_int_range("n_tokens", n_tokens, 2, windows.numel())
    rng = np.random.default_rng([seed, layer])
    flat = rng.choice(windows.numel(), n_tokens, replace=False)
    return clustering._pre_mlp_vectors(model, windows, layer, flat // windows.shape[1], flat % windows.shape[1],
                                       fold_ln=True)


def layer_spaces(dictionary: Any = None) -> dict[str, Space]:
    """The representations scored, by name: `"embedding"` (`h ⊙ w`), `"h"`, and with an SAE of the layer's h,
    `"dictionary_terms"` and `"dictionary_code"` (`nbutils.representations`)."""
    spaces: dict[str, Space] = {"embedding": representations.neuron_embedding, "h": lambda h, w: h}
    if dictionary is not None:
        spaces["dictionary_terms"] = lambda h, w: representations.dictionary_terms(h, w, dictionary)
        spaces["dictionary_code"] = lambda h, w: representations.dictionary_code(h, dictionary)
    return spaces


def _clusters_per_source(truth: np.ndarray, labels: np.ndarray) -> float:
    """Mean over sources of the number of clusters its examples fall in (1 when none is split)."""
    return float(np.mean([len(np.unique(labels[truth == s])) for s in np.unique(truth)]))


def _score(truth: np.ndarray, labels: np.ndarray, scored: np.ndarray) -> dict:
    scores = evaluation.score_labels(truth, labels, scored)
    del scores["whole"]
    return dict(scores, n_clusters=int(labels.max()) + 1,
                clusters_per_source=_clusters_per_source(truth[scored], labels[scored]))


def score_cases(
    cases: list[VirtualCase],
    spaces: dict[str, Space],
    cuts: tuple[tuple[str, float], ...] = DEFAULT_CUTS,
    *,
    margin: float = evaluation.AMBIGUOUS,
    neighbours: int = 5,
    min_sources: int = 2,
) -> pd.DataFrame:
    """Cluster every case in every space with every cut and score it against the sources.

    Args:
        cases: `virtual_cases` (of one or several layers; the spaces must suit every case's layer).
        spaces: `{name: (h, w) -> [n, dim]}` (`layer_spaces`).
        cuts: `(method, threshold)` pairs of `clustering.METHODS`.
        margin: score the examples whose second source adds less than `margin` times the first (all
            examples are clustered).
        neighbours: neighbours of the nearest-neighbour vote.
        min_sources: cases with fewer sources among their scored examples are skipped (one source cannot be
            told apart from anything).

    Returns:
        DataFrame, one row per (case, space, cut): `layer, virtual, n_examples, n_scored, n_present, space,
        method, threshold, n_clusters, ari, homogeneity, completeness, v_measure, clusters_per_source,
        knn_accuracy, majority, margin`. The reference space `"token"` (one cluster per activating token) has
        method `"token"` and no neighbour vote; `"source_terms"` is cut like the others.
    """
    from threadpoolctl import threadpool_limits

    cuts = tuple((m, clustering._check_threshold(m, t)) for m, t in cuts)
    neighbours = check_int_range("neighbours", neighbours, 1, 1000)
    margin = check_float_range("margin", margin, 0.0, 1.0, low_open=True)
    if not spaces:
        fail("spaces", "name at least one representation", "none")
    rows = []
    with threadpool_limits(1):
        for case in cases:
            scored = case.scored(margin)
            truth = np.unique(case.truth[scored], return_inverse=True)[1].reshape(-1)  # sources 0..m-1
            if len(np.unique(truth)) < min_sources or len(scored) < 3:
                continue
            full = np.zeros(len(scored), dtype=np.int64)
            full[scored] = truth  # unscored examples are clustered but never scored
            base = dict(layer=case.layer, virtual=case.virtual, n_examples=len(full), n_scored=int(scored.sum()),
                        n_present=int(truth.max()) + 1, margin=margin)
            majority = np.bincount(truth).max() / len(truth)
            token = np.unique(case.token, return_inverse=True)[1].reshape(-1)
            rows.append(dict(base, space="token", method="token", threshold=np.nan, **_score(full, token, scored),
                             knn_accuracy=np.nan, majority=majority))
            vectors = {name: space(case.h, case.w) for name, space in spaces.items()}
            for name, x in {**vectors, "source_terms": case.terms}.items():
                sim = clustering.cosine_similarity(x)
                knn = virtual_neurons._knn_accuracy(sim[np.ix_(scored, scored)], truth, neighbours)
                for method, t in cuts:
                    labels = clustering._labels_from_similarity(sim, method, t)
                    rows.append(dict(base, space=name, method=method, threshold=t, **_score(full, labels, scored),
                                     knn_accuracy=knn, majority=majority))
    return pd.DataFrame(rows)


def summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean scores per (margin, layer, space, method, threshold), with the number of virtual neurons `n`."""
    keys = ["margin", "layer", "space", "method", "threshold"]
    table = scores.fillna({"threshold": -1}).groupby(keys)[list(SCORES)].mean()
    return table.assign(n=scores.fillna({"threshold": -1}).groupby(keys).size()).reset_index()


REFERENCES = ("token", "source_terms")  # reference spaces of every case: never chosen


def held_out_choice(scores: pd.DataFrame, metric: str = "v_measure", *, exclude: tuple[str, ...] = REFERENCES) -> pd.DataFrame:
    """For each layer, the (space, method, threshold) with the best mean `metric` over the other layers'
    virtual neurons (each layer weighs alike), and its scores on the held-out layer.

    Returns:
        DataFrame, one row per held-out layer: `layer, space, method, threshold` (chosen without it) and the
        mean `SCORES` on it.
    """
    if metric not in SCORES:
        fail("metric", f"be one of {SCORES}", repr(metric))
    if scores.margin.nunique() > 1:
        fail("scores", "hold one margin (each margin scores other examples)", sorted(scores.margin.unique()))
    table = summary(scores[~scores.space.isin(exclude)])
    keys = ["space", "method", "threshold"]
    rows = []
    for layer in sorted(table.layer.unique()):
        others = table[table.layer != layer].groupby(keys)[metric].mean()
        if others.empty:
            fail("scores", "cover at least two layers (the choice is made on the others)", f"layer {layer} only")
        best = others.idxmax() if metric != "clusters_per_source" else others.idxmin()
        here = table[(table.layer == layer) & (table[keys].apply(tuple, axis=1) == best)]
        rows.append(dict(layer=layer, **dict(zip(keys, best)), **here[list(SCORES)].iloc[0].to_dict(),
                         n=int(here.n.iloc[0])))
    return pd.DataFrame(rows)
