"""The metrics of an SAE on its MLP (one row of the comparison table), and digit purity of clusters."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from nbutils._validation import check_int_range
from nbutils.mnist.data import N_CLASSES, _check_images, _check_labels
from nbutils.mnist.mlp import MLP
from nbutils.mnist.training import _check_pair
from nbutils.sae import SAE, batch_monosemanticity, one_thread

__all__ = ["sae_metrics", "cluster_purity"]


@torch.no_grad()
@one_thread
def sae_metrics(
    mlp: MLP, sae: SAE, X: Float[np.ndarray, "n 784"], y: Int[np.ndarray, "n"], *, top_k: int = 20
) -> dict[str, float]:
    """Reconstruction, sparsity and interpretability of an SAE on images `X` with digit labels `y`.

    Keys (h = hidden activations, ĥ = the SAE's reconstruction, f = latent activations):
        mse: mean over inputs and dimensions of (h - ĥ)².
        fve: fraction of variance explained, 1 - Σ|h - ĥ|² / Σ|h - mean(h)|².
        spliced_acc: accuracy of the MLP with ĥ in place of h.
        l0: mean number of active latents (f > 0) per input.
        dead_frac: share of latents never active on `X`.
        mono: mean over latents active on at least two inputs of the activation-weighted mean pairwise
            cosine similarity of their SAE neuron embeddings on the inputs where they are active.
        purity: mean over the same latents of the share of the most common digit among the latent's
            top `top_k` inputs (by activation, active inputs only; a single input would be trivially pure).
    """
    _check_pair(mlp, sae)
    X = _check_images("X", X, mlp.d_in)
    y = _check_labels("y", y, X.shape[0])
    check_int_range("top_k", top_k, 1, 1 << 20)
    h = mlp.hidden(X)  # [n, d_mlp]
    f = sae.encode(h)  # [n, n_latents]
    recon = sae.decode(f)  # [n, d_mlp]
    err = ((h - recon) ** 2).sum()
    var = ((h - h.mean(0)) ** 2).sum()
    active = f > 0
    n_active = active.sum(0)  # [n_latents]
    mono_k = batch_monosemanticity(sae, h, f)  # NaN where fewer than two active inputs
    live = n_active >= 2
    k = min(top_k, X.shape[0])
    vals, idx = f.topk(k, dim=0)  # [k, n_latents]
    digits = F.one_hot(y[idx], N_CLASSES).float() * (vals > 0)[..., None]  # [k, n_latents, 10]
    counts = digits.sum(0)  # [n_latents, 10]
    purity_k = counts.max(-1).values / counts.sum(-1).clamp_min(1)
    return {
        "mse": float(err / h.numel()),
        "fve": float(1 - err / var.clamp_min(1e-12)),
        "spliced_acc": float((mlp.logits(recon).argmax(-1) == y).float().mean()),
        "l0": float(active.float().sum(-1).mean()),
        "dead_frac": float((n_active == 0).float().mean()),
        "mono": float(mono_k[live].mean()) if live.any() else float("nan"),
        "purity": float(purity_k[live].mean()) if live.any() else float("nan"),
    }


def cluster_purity(clusters: Int[np.ndarray, "n"], y: Int[np.ndarray, "n"], *, min_size: int = 2) -> float:
    """Digit purity of a clustering: over the examples in clusters of at least `min_size` members, the
    share whose digit is their cluster's most common digit (NaN if no cluster is that large).

    Singletons are left out by default because a cluster of one is trivially pure.
    """
    clusters = np.asarray(clusters).reshape(-1)
    y = _check_labels("y", y, len(clusters)).numpy()
    check_int_range("min_size", min_size, 1, 1 << 30)
    hits, total = 0, 0
    for c in np.unique(clusters):
        members = y[clusters == c]
        if len(members) >= min_size:
            hits += np.bincount(members, minlength=N_CLASSES).max()
            total += len(members)
    return hits / total if total else float("nan")

