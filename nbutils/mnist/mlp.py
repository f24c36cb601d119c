"""The 784 → 64 → 10 MLP whose hidden layer the SAEs read: model, training, accuracy, hidden activations."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from nbutils._validation import check_float_range, check_int_range
from nbutils.mnist.data import N_CLASSES, N_PIXELS, _check_images, _check_labels
from nbutils.sae import one_thread, single_thread

__all__ = ["MLP", "train_mlp", "mlp_accuracy", "hidden_activations"]


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

