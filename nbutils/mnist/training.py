"""Training SAEs on the MLP's hidden activations (`nbutils.sae` holds the SAE itself); a trained SAE remembers
its MLP, so that it is never evaluated against another one."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
from jaxtyping import Float

from nbutils._validation import fail
from nbutils.mnist.mlp import MLP, _check_mlp, hidden_activations
from nbutils.sae import SAE, SAEConfig, train_sae_on, train_saes_on

__all__ = ["NE_SAE_MONO_COEF", "train_sae", "train_saes"]


NE_SAE_MONO_COEF = 3.0  # λm of the neuron-embedding SAE (soft_mass form), chosen by the sweep in notebook 04


def train_sae(
    mlp: MLP,
    X: Float[np.ndarray, "n 784"],
    mono_coef: float = 0.0,
    n_latents: int = 512,
    l1_coef: float = SAEConfig.l1_coef,
    *,
    mono_form: str = SAEConfig.mono_form,
    steps: int = SAEConfig.steps,
    seed: int = 0,
    progress: bool = True,
    **config,
) -> SAE:
    """Train an SAE on the MLP's hidden activations of images `X` (settings: `nbutils.sae.SAEConfig`).

    `mono_coef=0` is the standard SAE; `mono_coef=NE_SAE_MONO_COEF` the neuron-embedding SAE of notebook 04.
    The batch form of the monosemanticity term is `mono_form` (default `"soft_mass"`, see `nbutils.sae`):
    softplus-weighted pairwise cosine similarity of each latent's embeddings `(h - b_d) ⊙ W_e[k]` over the
    batch, divided by the number of pairs. Unlike a mean over the inputs where a latent is active, it also
    reaches latents that are inactive on the batch, and it rewards activation on inputs whose embeddings agree.

    Args:
        mlp: the MLP (`train_mlp`); the SAE reads its hidden activations and remembers its fingerprint.
        X: training images `[n, 784]`.
        mono_coef: λm ≥ 0, weight of `1 - mono`.
        n_latents: dictionary size. l1_coef: λ1.
        mono_form: one of `nbutils.sae.MONO_FORMS`.
        steps, seed: training steps and seed. progress: show a tqdm bar.
        **config: other `SAEConfig` fields (`lr`, `batch_size`, `mono_start`, `mono_topk`).

    Returns:
        The trained `SAE`, with `config`, `history`, `train_seconds` and `source` (the MLP's fingerprint).

    Raises:
        ValueError: `mono_coef < 0`, bad images, other bad settings.
    """
    mlp = _check_mlp(mlp)
    cfg = _sae_config(dict(mono_coef=mono_coef, n_latents=n_latents, l1_coef=l1_coef, mono_form=mono_form,
                           steps=steps, seed=seed, **config))
    sae = train_sae_on(hidden_activations(mlp, X), cfg, progress=progress)
    sae.source = mlp.fingerprint()
    return sae


def _sae_config(settings: dict) -> SAEConfig:
    """The `SAEConfig` of `train_sae` keyword arguments (`SAEConfig` holds the defaults); unknown names raise."""
    unknown = sorted(set(settings) - {f.name for f in fields(SAEConfig)})
    if unknown:
        raise TypeError(f"Unknown SAE settings {unknown}; the settings are the fields of nbutils.sae.SAEConfig.")
    return SAEConfig(**settings)


def train_saes(
    mlp: MLP, X: Float[np.ndarray, "n 784"], settings: list[dict], *, workers: int | None = None, progress: bool = True
) -> list[SAE]:
    """Train one SAE per dict of `train_sae` keyword arguments on the hidden activations of images `X`,
    in parallel processes (`nbutils.sae.train_saes_on`: one per core; each SAE is the one `train_sae` gives).

    Args:
        mlp: the MLP (`train_mlp`). X: training images `[n, 784]`.
        settings: e.g. `[{"mono_coef": 0.0, "seed": 0}, {"mono_coef": 3.0, "mono_form": "active", "steps": 800}]`.
        workers: processes (`None`: one per core; 1: in this process). progress: a bar over finished SAEs.

    Returns:
        The SAEs in the order of `settings`, each with `source` = the MLP's fingerprint.

    Raises:
        TypeError: a setting is no dict or names an unknown argument. ValueError: bad values (as `train_sae`).
    """
    mlp = _check_mlp(mlp)
    configs = []
    for i, kwargs in enumerate(settings):
        if not isinstance(kwargs, dict):
            raise TypeError(f"`settings` must hold dicts of train_sae keyword arguments; got {type(kwargs).__name__} at position {i}.")
        configs.append(_sae_config(kwargs))
    saes = train_saes_on(hidden_activations(mlp, X), configs, workers=workers, progress=progress)
    source = mlp.fingerprint()
    for sae in saes:
        sae.source = source
    return saes


def _check_pair(mlp: MLP, sae: SAE) -> None:
    _check_mlp(mlp)
    if not isinstance(sae, SAE):
        raise TypeError(f"`sae` must be an nbutils.sae.SAE (from train_sae); got {type(sae).__name__}.")
    if sae.d_in != mlp.d_mlp:
        fail("sae", f"read the MLP's {mlp.d_mlp} hidden neurons", f"an SAE for {sae.d_in}-d inputs")
    if sae.source and sae.source != mlp.fingerprint():
        fail("sae", "be trained on this MLP's activations", f"an SAE trained for MLP {sae.source} (this is {mlp.fingerprint()})",
             "Train it with train_sae(mlp, X) on this MLP.")

