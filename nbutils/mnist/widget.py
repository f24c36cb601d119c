"""The unit explorer: an ipywidgets picker over the MLP's neurons and the SAEs' latents; its callback `render_unit`."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int

from nbutils._validation import fail
from nbutils.mnist.figures import plot_unit, plot_unit_clusters
from nbutils.mnist.mlp import MLP
from nbutils.mnist.training import _check_pair
from nbutils.mnist.units import unit_view
from nbutils.sae import SAE, one_thread

__all__ = ["render_unit", "unit_explorer"]


@one_thread
def render_unit(
    mlp: MLP,
    X: Float[np.ndarray, "n 784"],
    y: Int[np.ndarray, "n"],
    source: str,
    unit: int,
    *,
    saes: dict[str, SAE] | None = None,
    top_k: int = 64,
):
    """Widget callback: the two figures (`plot_unit`, `plot_unit_clusters`) of `unit` from `source`
    (`"MLP"` or a key of `saes`)."""
    saes = saes or {}
    if source != "MLP" and source not in saes:
        fail("source", f"be 'MLP' or one of {', '.join(repr(k) for k in saes)}", repr(source))
    view = unit_view(mlp, X, y, unit, sae=saes.get(source), top_k=top_k)
    return plot_unit(view), plot_unit_clusters(view)


def unit_explorer(
    mlp: MLP, X: Float[np.ndarray, "n 784"], y: Int[np.ndarray, "n"], *, saes: dict[str, SAE] | None = None, top_k: int = 64
):
    """An ipywidgets picker: choose the MLP or an SAE and a neuron / latent index; shows `render_unit`."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    saes = saes or {}
    for sae in saes.values():
        _check_pair(mlp, sae)
    source = widgets.Dropdown(options=["MLP", *saes], value="MLP", description="units of")
    unit = widgets.BoundedIntText(value=0, min=0, max=mlp.d_mlp - 1, description="index")
    out = widgets.Output()

    def _show(*_):
        unit.max = mlp.d_mlp - 1 if source.value == "MLP" else saes[source.value].n_latents - 1
        out.clear_output(wait=True)
        with out:
            for fig in render_unit(mlp, X, y, source.value, min(unit.value, unit.max), saes=saes, top_k=top_k):
                display(fig)
                plt.close(fig)

    source.observe(_show, names="value")
    unit.observe(_show, names="value")
    _show()
    return widgets.VBox([widgets.HBox([source, unit]), out])

