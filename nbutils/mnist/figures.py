"""Figures: one unit's weights, mean input, feature and logit effects; its clusters as image grids; the trade-off
of the SAEs against λm; purity per representation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from nbutils._validation import check_int_range, fail
from nbutils.mnist.data import N_CLASSES
from nbutils.mnist.units import UnitView

__all__ = ["plot_unit", "plot_unit_clusters", "plot_tradeoff", "plot_representation_purity"]


def _image(ax, img: np.ndarray, title: str, *, diverging: bool) -> None:
    img = np.asarray(img).reshape(28, 28)
    if diverging:
        lim = float(np.abs(img).max()) or 1.0
        im = ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(img, cmap="gray_r")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("pixel column")
    ax.set_ylabel("pixel row")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_unit(view: UnitView):
    """Figure of one unit: input weights, mean top input, feature (28×28), logit effects, activation histogram."""
    import matplotlib.pyplot as plt

    name = f"MLP neuron {view.unit}" if view.kind == "neuron" else f"SAE latent {view.unit}"
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    wname = "input weights" if view.kind == "neuron" else "input weights (W_in @ W_e[k])"
    _image(axes[0], view.weights, wname, diverging=True)
    _image(axes[1], view.mean_input, f"mean of top {len(view.top)} inputs", diverging=False)
    _image(axes[2], view.feature, "feature = mean input ⊙ weights", diverging=True)
    colors = ["tab:red" if v < 0 else "tab:blue" for v in view.logit_effects]
    axes[3].bar(range(N_CLASSES), view.logit_effects, color=colors)
    axes[3].set_xticks(range(N_CLASSES))
    axes[3].set(title="direct logit effects", xlabel="digit", ylabel="logit change per unit activation")
    active = view.acts[view.acts > 0]
    axes[4].hist(active, bins=40, color="tab:gray")
    axes[4].set(title=f"activations (active on {len(active)} of {len(view.acts)} images)", xlabel="activation", ylabel="images")
    fig.suptitle(name)
    fig.tight_layout()
    return fig


def plot_unit_clusters(view: UnitView, *, max_clusters: int = 4, per_cluster: int = 8):
    """Image grid of a unit's largest feature clusters: per row the cluster's mean image, then members
    (highest activation first), titled with size and digit make-up."""
    import matplotlib.pyplot as plt

    check_int_range("max_clusters", max_clusters, 1, 100)
    check_int_range("per_cluster", per_cluster, 1, 100)
    table = view.cluster_table()
    table = table[table["size"] >= 2].head(max_clusters)
    n_rows = max(len(table), 1)
    fig, axes = plt.subplots(n_rows, per_cluster + 1, figsize=(1.5 * (per_cluster + 1), 1.9 * n_rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    name = f"MLP neuron {view.unit}" if view.kind == "neuron" else f"SAE latent {view.unit}"
    if table.empty:
        axes[0, 0].set_title("no cluster with 2+ members", fontsize=9, loc="left")
    for row, rec in enumerate(table.itertuples()):
        members = np.flatnonzero(view.clusters == rec.cluster)  # already in activation order
        mix = ", ".join(f"{d}:{n}" for d, n in sorted(rec.digits.items(), key=lambda kv: -kv[1]))
        axes[row, 0].imshow(view.images[members].mean(0).reshape(28, 28), cmap="gray_r")
        axes[row, 0].set_title(f"cluster {rec.cluster} mean\nn={rec.size}", fontsize=8)
        axes[row, 1].set_title(f"digits {mix}", fontsize=8, loc="left")
        for col, m in enumerate(members[:per_cluster], start=1):
            axes[row, col].imshow(view.images[m].reshape(28, 28), cmap="gray_r")
            axes[row, col].text(0, 27, f"{view.digits[m]}  a={view.acts[view.top[m]]:.1f}", fontsize=7, color="tab:red")
    fig.suptitle(f"{name}: feature clusters of its top examples (rows: clusters; first image: cluster mean)")
    fig.tight_layout()
    return fig

def plot_tradeoff(results: pd.DataFrame, *, metrics: tuple[str, ...] = ("dead_frac", "mono", "l0", "fve", "purity", "spliced_acc")):
    """One panel per metric against the monosemanticity coefficient λm, one line per form of the term.

    Args:
        results: one row per trained SAE with columns `form, mono_coef` and the metrics; rows with
            `mono_coef == 0` (the standard SAE) are drawn as the start of every line.
    """
    import matplotlib.pyplot as plt

    missing = {"form", "mono_coef", *metrics} - set(results.columns)
    if missing:
        fail("results", f"have columns form, mono_coef, {', '.join(metrics)}", f"missing {sorted(missing)}")
    base = results[results["mono_coef"] == 0]
    n_cols = 3
    n_rows = -(-len(metrics) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 3.6 * n_rows), squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics):
        for form, part in results[results["mono_coef"] > 0].groupby("form", sort=False):
            part = pd.concat([base.assign(form=form), part]).groupby("mono_coef")[metric].mean()
            ax.plot(part.index, part.values, marker="o", label=form)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set(title=metric, xlabel="monosemanticity coefficient λm (0 = standard SAE)", ylabel=metric)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    axes[0, 0].legend(title="form of the term")
    fig.suptitle("SAE metrics on the test digits as λm grows, per batch form of the monosemanticity term")
    fig.tight_layout()
    return fig


def plot_representation_purity(results: pd.DataFrame):
    """Mean digit purity of MLP-neuron clusters against the mean number of clusters per neuron, one line per
    representation (points: clustering thresholds). Input: `representation_purity` rows with a `threshold`."""
    import matplotlib.pyplot as plt

    if not {"representation", "threshold", "n_clusters", "cluster_purity"} <= set(results.columns):
        fail("results", "have columns representation, threshold, n_clusters, cluster_purity", sorted(results.columns))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for rep, part in results.groupby("representation", sort=False):
        mean = part.groupby("threshold")[["n_clusters", "cluster_purity"]].mean()
        ax.plot(mean["n_clusters"], mean["cluster_purity"], marker="o", label=rep)
        for t, row in mean.iterrows():
            ax.annotate(f"{t:g}", (row["n_clusters"], row["cluster_purity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title="Digit purity of MLP-neuron feature clusters by representation",
           xlabel="mean clusters (2+ members) per neuron", ylabel="mean digit purity of the clusters")
    ax.legend(title="clustered on")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

