"""A real model without ground truth: how a layer's clusters change with the threshold, and the same examples
clustered in three spaces, scored against tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from nbutils import clustering, embeddings
from nbutils._validation import check_choice, check_int_range

from nbutils.evaluation.method_choice import DEFAULT_GRID

__all__ = ["threshold_sweep", "SPACES", "compare_spaces"]



def threshold_sweep(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    grid: dict[str, list[float]] | None = None,
    *,
    examples: LayerExamples | None = None,
) -> pd.DataFrame:
    """How the clusters of a whole layer change with the method's threshold (h is read once).

    Args:
        model, windows, top, layer: as in `clustering.polysemy_table`.
        grid: `{method: [thresholds]}`; default `DEFAULT_GRID`.
        examples: this layer's `layer_examples(...)`, if already read.

    Returns:
        DataFrame, one row per (method, threshold): `method, threshold, n_neurons` (live),
        `mean_clusters, mean_effective_clusters, singleton_share` (share of examples alone in their cluster),
        `largest_share` (mean share of a neuron's examples in its largest cluster), `monosemantic_share`
        (share of neurons with effective_clusters <= 1.5).
    """

    grid = DEFAULT_GRID if grid is None else grid
    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer)
    rows = []
    for method, thresholds in grid.items():
        check_choice("method", method, clustering.METHODS)
        for t in thresholds:
            table = clustering.polysemy_table(model, windows, top, lx.layer, method=method, threshold=t, examples=lx)
            live = table[~table.dead]
            rows.append(dict(
                method=method, threshold=t, n_neurons=len(live),
                mean_clusters=live.n_clusters.mean(),
                mean_effective_clusters=live.effective_clusters.mean(),
                singleton_share=live.n_singletons.sum() / max(1, live.n_examples.sum()),
                largest_share=(live.largest_cluster / live.n_examples).mean(),
                monosemantic_share=(live.effective_clusters <= 1.5).mean(),
            ))
    return pd.DataFrame(rows)




SPACES = ("embedding", "h", "pattern")


def compare_spaces(
    model: Any,
    windows: Any,
    top: Any,
    layer: int,
    neurons: Any,
    *,
    method: str | None = None,
    threshold: float | int | None = None,
    pattern: int = 8,
    examples: LayerExamples | None = None,
) -> pd.DataFrame:
    """Cluster the same examples of each neuron in three spaces and score the clusters against tokens.

    Spaces (`SPACES`): `"embedding"` (neuron embeddings `h ⊙ w`), `"h"` (the plain pre-MLP vectors) and
    `"pattern"` (the neuron's activation at the `pattern` positions ending at the activating token, zero
    before the window starts). The same method clusters all three (`clustering.cluster`; the default is scale-free).

    Args:
        model, windows, top, layer: as in `clustering.polysemy_table`.
        neurons: neurons of `layer` to compare (dead ones are skipped).
        method, threshold: as in `clustering.cluster`.
        pattern: positions in the activation pattern.
        examples: this layer's `layer_examples(...)`, if already read.

    Returns:
        DataFrame, one row per (neuron, space): `neuron, space, n_examples, n_clusters, effective_clusters,
        ami_token` (adjusted mutual information between clusters and the activating token) and
        `ami_prev_token` (the same for the token before it).
    """
    from sklearn.metrics import adjusted_mutual_info_score

    from nbutils.models import check_neuron

    method = check_choice("method", clustering.DEFAULT_METHOD if method is None else method, clustering.METHODS)
    t = clustering._check_threshold(method, threshold)
    pattern = check_int_range("pattern", pattern, 1, 10_000)
    lx = examples if examples is not None else clustering.layer_examples(model, windows, top, layer)
    neurons = [check_neuron(model, n) for n in np.atleast_1d(np.asarray(neurons))]
    neurons = [n for n in neurons if lx.bounds[n + 1] > lx.bounds[n]]
    windows_np = windows.numpy()
    rows = []
    for neuron in neurons:
        ex = lx.examples.iloc[lx.bounds[neuron] : lx.bounds[neuron + 1]]
        w, p = ex["window"].to_numpy(), ex["pos"].to_numpy()
        offsets = np.arange(-pattern + 1, 1)  # [pattern]
        pos = p[:, None] + offsets  # [n, pattern]
        valid = pos >= 0
        pre = embeddings.pre_activations(model, windows, lx.layer, np.repeat(w, pattern)[valid.reshape(-1)],
                                         pos[valid])[:, neuron].numpy()  # [n_valid]
        acts = np.zeros(pos.shape)
        acts[valid] = embeddings.mlp_activation(model, pre)
        spaces = {"embedding": lx.embeddings(neuron), "h": lx.h[lx.rows(neuron)], "pattern": acts}
        token = windows_np[w, p]
        prev = np.where(p > 0, windows_np[w, np.maximum(p - 1, 0)], -1)
        for space, x in spaces.items():
            labels = clustering._labels_from_similarity(clustering.cosine_similarity(x), method, t)
            rows.append(dict(neuron=neuron, space=space, n_examples=len(ex), n_clusters=int(labels.max()) + 1,
                             effective_clusters=clustering.effective_n_clusters(labels),
                             ami_token=adjusted_mutual_info_score(token, labels),
                             ami_prev_token=adjusted_mutual_info_score(prev, labels)))
    return pd.DataFrame(rows)
