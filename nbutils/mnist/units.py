"""MLP neurons and SAE latents as units: activations, embeddings, weights, the view of one unit (top examples
and their feature clusters), a table over all units, and which representation separates digits best."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from nbutils._validation import check_int_range
from nbutils.mnist.data import N_CLASSES, _check_images, _check_labels
from nbutils.mnist.metrics import cluster_purity
from nbutils.mnist.mlp import MLP, _check_mlp, hidden_activations
from nbutils.mnist.training import _check_pair
from nbutils.sae import SAE, encoder_participation, one_thread, single_thread

__all__ = ["unit_activations", "unit_embeddings", "unit_weights", "UnitView", "unit_view", "unit_table",
           "REPRESENTATIONS", "representation_purity", "sae_diagnostics"]


def _check_unit(mlp: MLP, unit: int, sae: SAE | None) -> int:
    if sae is None:
        return check_int_range("unit", unit, 0, mlp.d_mlp - 1, what=f"(MLP neurons of this {mlp.d_mlp}-neuron MLP)")
    _check_pair(mlp, sae)
    return check_int_range("unit", unit, 0, sae.n_latents - 1, what=f"(latents of this {sae.n_latents}-latent SAE)")


@torch.no_grad()
@one_thread
def unit_activations(
    mlp: MLP, X: Float[np.ndarray, "n 784"], *, sae: SAE | None = None
) -> Float[Tensor, "n n_units"]:
    """Activations of every MLP neuron (`sae=None`, `[n, d_mlp]`) or every SAE latent (`[n, n_latents]`)."""
    h = hidden_activations(mlp, X)
    if sae is None:
        return h
    _check_pair(mlp, sae)
    return sae.encode(h)


@torch.no_grad()
@one_thread
def unit_embeddings(
    mlp: MLP, X: Float[np.ndarray, "n 784"], unit: int, *, sae: SAE | None = None
) -> Float[Tensor, "n d"]:
    """Neuron embeddings of one MLP neuron or SAE latent on images `X`.

    MLP neuron j: `X ⊙ W_in[:, j]` `[n, 784]`, so `e.sum(-1) + b_in[j]` is its pre-activation.
    SAE latent k: `(h - b_d) ⊙ W_e[k]` `[n, d_mlp]` on the hidden activations h, so `e.sum(-1) + b_e[k]`
    is the latent's pre-activation.
    """
    mlp = _check_mlp(mlp)
    unit = _check_unit(mlp, unit, sae)
    X = _check_images("X", X, mlp.d_in)
    return _embeddings(mlp, X, None if sae is None else mlp.hidden(X), unit, sae)


def _embeddings(mlp: MLP, X: Tensor, h: Tensor | None, unit: int, sae: SAE | None) -> Tensor:
    """`unit_embeddings` on checked inputs; `h` = the hidden activations of `X` (read only for a latent)."""
    return X * mlp.W_in[:, unit] if sae is None else (h - sae.b_d) * sae.W_e[unit]


@torch.no_grad()
@one_thread
def unit_weights(mlp: MLP, unit: int, *, sae: SAE | None = None) -> tuple[Float[Tensor, "d_in"], Float[Tensor, "n_classes"]]:
    """Input weights in pixel space `[784]` and direct logit effects `[10]` of a neuron or latent.

    MLP neuron j: `W_in[:, j]` and `W_out[j]`. SAE latent k (linear read-through that ignores the MLP's
    ReLU): `W_in @ W_e[k]` and `W_d[:, k] @ W_out`.
    """
    mlp = _check_mlp(mlp)
    unit = _check_unit(mlp, unit, sae)
    if sae is None:
        return mlp.W_in[:, unit].clone(), mlp.W_out[unit].clone()
    return mlp.W_in @ sae.W_e[unit], sae.W_d[:, unit] @ mlp.W_out


@dataclass
class UnitView:
    """Everything the per-unit figures show for one MLP neuron or SAE latent.

    Attributes:
        kind: `"neuron"` (MLP neuron) or `"latent"` (SAE latent).
        unit: its index.
        weights: input weights in pixel space `[784]` (`unit_weights`).
        logit_effects: direct effect on the 10 logits `[10]`.
        acts: its activation on every image of `X` `[n]`.
        top: indices into `X` of its top examples, highest activation first `[k]`.
        images: those images `[k, 784]`. digits: their labels `[k]`.
        mean_input: mean of `images` `[784]`. feature: `mean_input ⊙ weights` `[784]`.
        clusters: feature-cluster label of each top example (clusters of its neuron embeddings) `[k]`.
    """

    kind: str
    unit: int
    weights: np.ndarray
    logit_effects: np.ndarray
    acts: np.ndarray
    top: np.ndarray
    images: np.ndarray
    digits: np.ndarray
    mean_input: np.ndarray
    feature: np.ndarray
    clusters: np.ndarray

    def cluster_table(self) -> pd.DataFrame:
        """One row per feature cluster: `cluster, size, top_digit, purity, digits` (digit → count)."""
        rows = []
        for c in np.unique(self.clusters):
            d = self.digits[self.clusters == c]
            counts = np.bincount(d, minlength=N_CLASSES)
            rows.append({"cluster": int(c), "size": len(d), "top_digit": int(counts.argmax()),
                         "purity": counts.max() / len(d),
                         "digits": {int(k): int(v) for k, v in enumerate(counts) if v}})
        return pd.DataFrame(rows, columns=["cluster", "size", "top_digit", "purity", "digits"])


def _top_examples(acts: Tensor, top_k: int) -> np.ndarray:
    k = min(top_k, int((acts > 0).sum()))
    return acts.topk(k).indices.numpy() if k else np.zeros(0, dtype=np.int64)


def _cluster_labels(e: Tensor, method: str | None, threshold: float | None) -> np.ndarray:
    from nbutils.clustering import cluster

    with single_thread():
        return np.asarray(cluster(e.double().numpy(), method=method, threshold=threshold), dtype=np.int64)


@torch.no_grad()
@one_thread
def unit_view(
    mlp: MLP,
    X: Float[np.ndarray, "n 784"],
    y: Int[np.ndarray, "n"],
    unit: int,
    *,
    sae: SAE | None = None,
    top_k: int = 64,
    method: str | None = None,
    threshold: float | None = None,
) -> UnitView:
    """Compute the per-unit view of MLP neuron `unit` (`sae=None`) or of latent `unit` of `sae`.

    Top examples are the `top_k` images of `X` with the highest activation (active ones only). Their
    neuron embeddings (`unit_embeddings`) are clustered with `nbutils.clustering.cluster(e, method,
    threshold)`.
    """
    mlp = _check_mlp(mlp)
    unit = _check_unit(mlp, unit, sae)
    X = _check_images("X", X, mlp.d_in)
    y = _check_labels("y", y, X.shape[0])
    check_int_range("top_k", top_k, 1, 1 << 20)
    acts = unit_activations(mlp, X, sae=sae)[:, unit]  # [n]
    top = _top_examples(acts, top_k)
    weights, logit_effects = unit_weights(mlp, unit, sae=sae)
    images = X[top]  # [k, 784]
    mean_input = images.mean(0) if len(top) else torch.zeros(X.shape[1])
    e = unit_embeddings(mlp, images, unit, sae=sae) if len(top) else torch.zeros(0, 1)
    return UnitView(
        kind="neuron" if sae is None else "latent",
        unit=unit,
        weights=weights.numpy(),
        logit_effects=logit_effects.numpy(),
        acts=acts.numpy(),
        top=top,
        images=images.numpy(),
        digits=y[top].numpy(),
        mean_input=mean_input.numpy(),
        feature=(mean_input * weights).numpy(),
        clusters=_cluster_labels(e, method, threshold) if len(top) else np.zeros(0, dtype=np.int64),
    )


@torch.no_grad()
@one_thread
def unit_table(
    mlp: MLP,
    X: Float[np.ndarray, "n 784"],
    y: Int[np.ndarray, "n"],
    *,
    sae: SAE | None = None,
    top_k: int = 64,
    method: str | None = None,
    threshold: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per live MLP neuron (or SAE latent) with at least two top examples.

    Columns: `unit, n_examples, n_clusters` (clusters with ≥ 2 members), `n_singletons, purity` (share of
    the most common digit among the top examples), `cluster_purity` (`cluster_purity` of its feature
    clusters), `top_digits` (digits with ≥ 10% of the top examples, most common first).
    """
    mlp = _check_mlp(mlp)
    X = _check_images("X", X, mlp.d_in)
    y = _check_labels("y", y, X.shape[0])
    h = mlp.hidden(X)  # [n, d_mlp]
    if sae is not None:
        _check_pair(mlp, sae)
    acts = h if sae is None else sae.encode(h)  # [n, n_units]
    rows = []
    for unit in tqdm(range(acts.shape[1]), desc="units", disable=not progress):
        top = _top_examples(acts[:, unit], top_k)
        if len(top) < 2:
            continue
        labels = _cluster_labels(_embeddings(mlp, X[top], h[top], unit, sae), method, threshold)
        digits = y[top].numpy()
        sizes = np.bincount(labels)
        counts = np.bincount(digits, minlength=N_CLASSES)
        order = np.argsort(-counts, kind="stable")
        rows.append({
            "unit": unit,
            "n_examples": len(top),
            "n_clusters": int((sizes >= 2).sum()),
            "n_singletons": int((sizes == 1).sum()),
            "purity": counts.max() / len(top),
            "cluster_purity": cluster_purity(labels, digits),
            "top_digits": [int(d) for d in order if counts[d] >= 0.1 * len(top)],
        })
    columns = ["unit", "n_examples", "n_clusters", "n_singletons", "purity", "cluster_purity", "top_digits"]
    return pd.DataFrame(rows, columns=columns)


REPRESENTATIONS = ("embedding", "pixels", "hidden")


@torch.no_grad()
@one_thread
def representation_purity(
    mlp: MLP,
    X: Float[np.ndarray, "n 784"],
    y: Int[np.ndarray, "n"],
    *,
    top_k: int = 64,
    method: str | None = None,
    threshold: float | None = None,
) -> pd.DataFrame:
    """Digit purity of each MLP neuron's clusters when its top examples are clustered on three representations.

    `"embedding"`: neuron embeddings `X ⊙ W_in[:, j]`; `"pixels"`: raw images `X`; `"hidden"`: the MLP's
    hidden activations `h` (all 64 neurons). Same top examples, same clustering call for all three.

    Returns:
        DataFrame `neuron, representation, n_examples, n_clusters, n_singletons, cluster_purity`.
    """
    mlp = _check_mlp(mlp)
    X = _check_images("X", X, mlp.d_in)
    y = _check_labels("y", y, X.shape[0])
    h = mlp.hidden(X)  # [n, d_mlp]
    rows = []
    for neuron in range(mlp.d_mlp):
        top = _top_examples(h[:, neuron], top_k)
        if len(top) < 2:
            continue
        reps = {"embedding": X[top] * mlp.W_in[:, neuron], "pixels": X[top], "hidden": h[top]}
        for name in REPRESENTATIONS:
            labels = _cluster_labels(reps[name], method, threshold)
            sizes = np.bincount(labels)
            rows.append({"neuron": neuron, "representation": name, "n_examples": len(top),
                         "n_clusters": int((sizes >= 2).sum()), "n_singletons": int((sizes == 1).sum()),
                         "cluster_purity": cluster_purity(labels, y[top].numpy())})
    return pd.DataFrame(rows, columns=["neuron", "representation", "n_examples", "n_clusters", "n_singletons", "cluster_purity"])


@one_thread
def sae_diagnostics(
    mlp: MLP,
    sae: SAE,
    X: Float[np.ndarray, "n 784"],
    y: Int[np.ndarray, "n"],
    *,
    top_k: int = 64,
    method: str | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """Numbers beside `sae_metrics` that explain it.

    Keys:
        clusters_per_latent: mean over live latents of the feature clusters (2+ members) of their top
            `top_k` examples (`unit_table`).
        encoder_width: mean over live latents of `nbutils.sae.encoder_participation` (how many MLP neurons
            a latent reads; a latent reading few has alike embeddings whatever the input).
        train_s: training time in seconds.
    """
    _check_pair(mlp, sae)
    table = unit_table(mlp, X, y, sae=sae, top_k=top_k, method=method, threshold=threshold, progress=False)
    width = encoder_participation(sae)[torch.tensor(np.array(table["unit"], dtype=np.int64))]
    return {
        "clusters_per_latent": float(table["n_clusters"].mean()) if len(table) else float("nan"),
        "encoder_width": float(width.mean()) if len(table) else float("nan"),
        "train_s": float(sae.train_seconds),
    }

