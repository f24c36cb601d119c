"""The paper's SAE question asked of a language model: a standard and a neuron-embedding SAE on one MLP layer's input.

Both SAEs read the vector `h` that the layer's (LayerNorm-folded) input weights multiply: the output of the norm
feeding the MLP before its scale and bias, SAELens's `blocks.{layer}.ln2.hook_normalized` (`models.hook_name(layer,
"ln_normalized")`). So a neuron's embedding `h ⊙ w_j` (`nbutils.embeddings`) and a latent's embedding
`(h - b_dec) ⊙ W_enc[:, k]` (`nbutils.dictionary`) live in the same space, and their polysemy is measured by the
same clustering on examples drawn from the same windows.

- `layer_saes` trains the SAEs with the package's trainer (`nbutils.sae.train_saes_on`) on every token of some
  windows and returns them as SAELens-format `dictionary.Dictionary` objects (`dictionary.save_dictionary` writes
  them; SAELens's `SAE.load_from_disk` reads them).
- `unit_polysemy` gives the polysemy table (`clustering.polysemy_table`) of the layer's neurons or of a dictionary's
  latents; `compare` puts FVU, L0, dead latents and the polysemy of both side by side.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils import activations, clustering, dictionary
from nbutils._validation import check_positive_int
from nbutils.models import check_layer, check_windows
from nbutils.sae import SAEConfig, train_saes_on

__all__ = ["HOOK", "saelens_name", "layer_inputs", "layer_saes", "unit_polysemy", "compare", "plot_polysemy"]

HOOK = "ln_normalized"  # the hook kind both SAEs read (`models.hook_name`)


def saelens_name(layer: int) -> str:
    """SAELens's name of the hook the SAEs read: `blocks.{layer}.ln2.hook_normalized`."""
    return f"blocks.{layer}.ln2.hook_normalized"


def layer_inputs(
    model: Any, windows: Int[Tensor, "n_windows window"], layer: int, *, batch_size: int = 64, progress: bool = False
) -> Float[Tensor, "n_tokens d_model"]:
    """Every token's MLP input `h` of `layer` (`[n_windows * window, d_model]`, window-major)."""
    layer = check_layer(model, layer)
    return dictionary.hook_activations(model, windows, layer, HOOK, batch_size=batch_size, progress=progress)


def layer_saes(
    model: Any,
    x: Float[Tensor, "n_tokens d_model"],
    layer: int,
    configs: Sequence[SAEConfig],
    *,
    model_name: str = "",
    workers: int | None = None,
    progress: bool = True,
) -> list[dictionary.Dictionary]:
    """Train one SAE per config on `x` (`layer_inputs`), one process per core, and return them as SAELens-format
    dictionaries reading `saelens_name(layer)`; each config's settings, training time and final losses are kept
    in its `cfg` (`nbutils_sae_config`, `nbutils_train_seconds`, `nbutils_final`)."""
    layer = check_layer(model, layer)
    saes = train_saes_on(x, configs, workers=workers, progress=progress)
    out = []
    for config, sae in zip(configs, saes):
        tail = {}
        for key, values in sae.history.items():  # mean of the last 100 steps (NaN: never computed, e.g. mono at 0)
            last = np.asarray(values[-100:], dtype=np.float64)
            tail[key] = float(last[~np.isnan(last)].mean()) if (~np.isnan(last)).any() else float("nan")
        extra = {"nbutils_sae_config": asdict(config), "nbutils_train_seconds": round(sae.train_seconds, 1),
                 "nbutils_final": tail}
        d = dictionary.from_sae(sae, saelens_name(layer), model_name=model_name, extra=extra)
        dictionary.attach(model, d)
        out.append(d)
    return out


def unit_polysemy(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    layer: int,
    dictionary_: dictionary.Dictionary | None = None,
    *,
    top: activations.TopActivations | None = None,
    k: int = 64,
    frac: float = 0.75,
    batch_size: int = 64,
    progress: bool = False,
    inputs: Float[Tensor, "n_windows window d_model"] | None = None,
) -> pd.DataFrame:
    """Polysemy of every unit (`clustering.polysemy_table`, default method): the layer's MLP neurons when
    `dictionary_` is None, else the dictionary's latents, each from its top-`k` examples over `windows`
    (activation `>= frac * max`). Pass `top` (the neurons' `collect_top_activations` with the same k and frac) to
    reuse a collection, and `inputs` (the layer's `h` at every token of `windows`) to find the latents' examples
    without running the model."""
    layer = check_layer(model, layer)
    windows = check_windows(model, windows)
    if dictionary_ is None:
        if top is None:
            top = activations.collect_top_activations(model, windows, k=k, frac=frac, batch_size=batch_size,
                                                      progress=progress)
        return clustering.polysemy_table(model, windows, top, layer, batch_size=batch_size, progress=progress)
    top = dictionary.collect_latent_top(model, windows, dictionary_, k=k, frac=frac, batch_size=batch_size,
                                        progress=progress, inputs=inputs)
    lx = dictionary.latent_examples(model, windows, dictionary_, top, batch_size=batch_size, inputs=inputs)
    return clustering.polysemy_table(model, windows, top, layer, examples=lx, progress=progress)


def compare(
    units: dict[str, pd.DataFrame], dictionaries: dict[str, dictionary.Dictionary],
    x_heldout: Float[Tensor, "n d_model"], *, min_examples: int = 10,
) -> pd.DataFrame:
    """One row per kind of unit: reconstruction (`dictionary.reconstruction_metrics` on held-out tokens: `fvu`,
    `l0`, `dead_frac`; NaN for neurons) and polysemy (`units`: `unit_polysemy` tables).

    Polysemy is averaged over the units with at least `min_examples` top examples (`measured`): a unit with one or
    two examples has no clusters to count (its effective clusters are 0), so sparse units would otherwise look
    monosemantic. Columns: `n_units`, `live` (any example), `measured`, mean `n_examples` of live units, mean
    `effective_clusters` and `n_clusters`, `polysemantic_frac` (share with effective clusters >= 1.5) and mean
    `monosemanticity` (mean pairwise cosine of the embeddings).
    """
    min_examples = check_positive_int("min_examples", min_examples)
    rows = []
    for name, table in units.items():
        live = table[~table["dead"]]
        measured = live[live["n_examples"] >= min_examples]
        row = {"units": name, "n_units": len(table), "live": len(live), "measured": len(measured),
               "n_examples": live["n_examples"].mean(),
               "effective_clusters": measured["effective_clusters"].mean(), "n_clusters": measured["n_clusters"].mean(),
               "polysemantic_frac": float((measured["effective_clusters"] >= 1.5).mean()),
               "monosemanticity": measured["monosemanticity"].mean()}
        metrics = (dictionary.reconstruction_metrics(dictionaries[name], x_heldout) if name in dictionaries
                   else {"fvu": float("nan"), "mse": float("nan"), "l0": float("nan"), "dead_frac": float("nan")})
        rows.append({**row, **metrics})
    return pd.DataFrame(rows)


def plot_polysemy(units: dict[str, pd.DataFrame], *, min_examples: int = 10, title: str = "") -> Any:
    """Histograms of effective clusters per unit with at least `min_examples` examples, one line per kind of unit
    (`unit_polysemy` tables)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    live = {name: t.loc[~t["dead"] & (t["n_examples"] >= min_examples), "effective_clusters"].to_numpy()
            for name, t in units.items()}
    top = max((float(v.max()) for v in live.values() if len(v)), default=1.0)
    bins = np.linspace(0, max(top, 1.0) + 0.5, 30)
    for name, values in live.items():
        ax.hist(values, bins=bins, histtype="step", density=True, linewidth=1.5,
                label=f"{name} (mean {values.mean():.2f}, {len(values)} units)")
    ax.set_xlabel("effective clusters of a unit's top examples")
    ax.set_ylabel(f"share of units with >= {min_examples} examples")
    ax.set_title(title or "Polysemy of MLP neurons and SAE latents, same clustering, same windows")
    ax.legend()
    fig.tight_layout()
    return fig
