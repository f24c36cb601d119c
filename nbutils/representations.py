"""Representations of a neuron's examples: the vectors that the clustering reads.

A neuron with input weights `w` `[d_model]` and bias `b` reads the pre-MLP vector `h` of an example. Each
representation here is a function of `h` `[n_examples, d_model]` (and `w`) that returns one row per example.
Where a representation splits the pre-activation into terms, the terms sum exactly to `h . w` (tested):

- `neuron_embedding(h, w)`: `h ⊙ w` `[n, d_model]`, the split over the residual stream's coordinates (the
  package's default space; `embeddings.neuron_embeddings` computes it from the model).
- `h` itself: the plain pre-MLP vector (no function needed).
- `dictionary_terms(h, w, sae)`: the split over a sparse dictionary of `h`. With an SAE trained on the layer's
  input, `h = Σ_k f_k d_k + b_d + r` (code `f`, unit decoder columns `d_k`, residual `r`), so
  `h . w = Σ_k f_k (d_k . w) + (b_d + r) . w`: one term per latent plus a last column for the rest
  `[n, n_latents + 1]`. Unlike `h ⊙ w`, a term is zero wherever the latent is off, so examples that read
  different features share few non-zero terms.
- `dictionary_code(h, sae)`: the code `f` itself `[n, n_latents]` (what is present, whatever the neuron reads).

`train_dictionary` trains the SAE on a layer's `h` with `sae.train_sae_on`; `nbutils.recovery` measures which
representation recovers known features.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float

from nbutils import sae as sae_module
from nbutils._validation import check_float_range, check_int_range, check_matrix, fail

__all__ = [
    "neuron_embedding",
    "dictionary_terms",
    "dictionary_code",
    "train_dictionary",
    "train_dictionaries",
    "DICTIONARY_EXPANSION",
    "DICTIONARY_L1",
    "dictionary_l1",
]

DICTIONARY_EXPANSION = 8  # latents per input dimension
DICTIONARY_L1 = 0.01  # L1 weight at a reference h: d_model 128, unit RMS once centred (`dictionary_l1`)
_REFERENCE_D = 128


def _check_h_w(h: Any, w: Any) -> tuple[np.ndarray, np.ndarray]:
    h = check_matrix("h", h)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (h.shape[1],):
        fail("w", f"be one weight per column of `h`, shape ({h.shape[1]},)", f"shape {w.shape}")
    return h.astype(np.float64), w


def neuron_embedding(h: Float[np.ndarray, "n d_model"], w: Float[np.ndarray, "d_model"]) -> Float[np.ndarray, "n d_model"]:
    """`h ⊙ w` `[n, d_model]`; each row sums to `h . w`."""
    h, w = _check_h_w(h, w)
    return h * w


def _check_dictionary(h: np.ndarray, sae: sae_module.SAE) -> None:
    if not isinstance(sae, sae_module.SAE):
        raise TypeError(f"`sae` must be an nbutils.sae.SAE; got {type(sae).__name__}.")
    if sae.d_in != h.shape[1]:
        fail("sae", f"read vectors of the width of `h` ({h.shape[1]})", f"an SAE of d_in {sae.d_in}",
             "Train it on this layer's h (`train_dictionary`).")


def dictionary_code(h: Float[np.ndarray, "n d_model"], sae: sae_module.SAE) -> Float[np.ndarray, "n n_latents"]:
    """The SAE code `f = relu(W_e (h - b_d) + b_e)` `[n, n_latents]` as float64."""
    h = check_matrix("h", h).astype(np.float64)
    _check_dictionary(h, sae)
    with torch.no_grad():
        return sae.encode(torch.as_tensor(h, dtype=torch.float32)).double().numpy()


def dictionary_terms(
    h: Float[np.ndarray, "n d_model"], w: Float[np.ndarray, "d_model"], sae: sae_module.SAE
) -> Float[np.ndarray, "n n_latents+1"]:
    """The pre-activation split over the SAE's latents: `f_k (d_k . w)` per latent, then the rest
    `(b_d + r) . w` in the last column `[n, n_latents + 1]`; each row sums to `h . w` (float64)."""
    h, w = _check_h_w(h, w)
    code = dictionary_code(h, sae)  # [n, n_latents]
    reads = sae.W_d.detach().double().numpy().T @ w  # [n_latents] d_k . w
    terms = code * reads  # [n, n_latents]
    rest = h @ w - terms.sum(axis=1)  # [n] (b_d + r) . w
    return np.hstack([terms, rest[:, None]])


def dictionary_l1(h: Float[np.ndarray, "n d_model"]) -> float:
    """The L1 weight that asks of a dictionary of `h` `[n, d_model]` what `DICTIONARY_L1` asks at the reference.

    The SAE loss is the squared error averaged over the `d_model` dimensions plus `l1_coef · Σ_k f_k`; scaling `h`
    by `s` scales the code by `s`, so the same dictionary (up to scale) needs `l1_coef ∝ s / d_model`. Here `s` is
    the RMS of `h` centred per dimension: `DICTIONARY_L1 · s · 128 / d_model`. The tiny model's folded `h` gives
    about 0.0094 (s 0.92-0.96 at d_model 128); SmolLM2-135M's 0.0013-0.0016 (s 0.6-0.7 at 576: most of its unit RMS
    is a mean offset), where `DICTIONARY_L1` itself left the dictionary almost empty (L0 1.4 of 4,608 latents).
    """
    h = check_matrix("h", h)
    s = float(np.sqrt(((h - h.mean(0)) ** 2).mean()))
    return DICTIONARY_L1 * s * _REFERENCE_D / h.shape[1]


def train_dictionary(
    h: Float[np.ndarray, "n d_model"],
    *,
    expansion: int = DICTIONARY_EXPANSION,
    l1_coef: float | None = None,
    steps: int = 3000,
    seed: int = 0,
    progress: bool = False,
) -> sae_module.SAE:
    """Train a sparse dictionary of a layer's pre-MLP vectors `h` (many tokens, not only top examples).

    Args:
        h: `[n, d_model]` pre-MLP vectors, finite.
        expansion: latents per input dimension.
        l1_coef: the L1 weight (`sae.SAEConfig.l1_coef`); `None`: `dictionary_l1(h)`, scaled to `h`.
        steps, seed, progress: as in `sae.SAEConfig` and `sae.train_sae_on`.

    Returns:
        The trained `sae.SAE`.
    """
    h = check_matrix("h", h)
    expansion = check_int_range("expansion", expansion, 1, 1024)
    l1_coef = _l1_of(h, l1_coef)
    config = sae_module.SAEConfig(n_latents=expansion * h.shape[1], l1_coef=l1_coef, steps=steps, seed=seed)
    return sae_module.train_sae_on(torch.as_tensor(h, dtype=torch.float32), config, progress=progress)


def _l1_of(h: np.ndarray, l1_coef: float | None) -> float:
    if l1_coef is None:
        return dictionary_l1(h)
    return check_float_range("l1_coef", l1_coef, 0.0, float("inf"), high_open=True)


def train_dictionaries(
    hs: Sequence[Float[np.ndarray, "n d_model"]],
    *,
    expansion: int = DICTIONARY_EXPANSION,
    l1_coef: float | None = None,
    steps: int = 3000,
    seed: int = 0,
    workers: int | None = None,
) -> list[sae_module.SAE]:
    """`train_dictionary` on each of several matrices (e.g. one per layer), `workers` at a time in separate
    processes (`sae.train_saes_on`; `None`: one per core). Each run is seeded and single-threaded, so every
    dictionary is the one `train_dictionary(hs[i], ...)` gives."""
    hs = [check_matrix(f"hs[{i}]", h) for i, h in enumerate(hs)]
    expansion = check_int_range("expansion", expansion, 1, 1024)
    configs = [sae_module.SAEConfig(n_latents=expansion * h.shape[1], l1_coef=_l1_of(h, l1_coef), steps=steps,
                                    seed=seed) for h in hs]
    return sae_module.train_saes_on([torch.as_tensor(h, dtype=torch.float32) for h in hs], configs, workers=workers,
                                    progress=False)
