"""One place for input checks. Every message has one form: what must hold, what was given, the fix.

    `layer` must be in 0..3 for this model; got 7.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

__all__ = [
    "check_int_range",
    "check_positive_int",
    "check_float_range",
    "check_positive_float",
    "check_index_array",
    "check_path",
    "check_folder",
    "check_choice",
    "check_matrix",
    "check_same_length",
    "fail",
]


def fail(name: str, must: str, got: Any, fix: str | None = None) -> NoReturn:
    """Raise `ValueError` in the package's one message form."""
    message = f"`{name}` must {must}; got {got}."
    if fix:
        message += f" {fix}"
    raise ValueError(message)


def check_int_range(name: str, value: Any, low: int, high: int, *, what: str = "") -> int:
    """Check `low <= value <= high` for an integer (inclusive) and return it as `int`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        else:
            raise TypeError(f"`{name}` must be an integer; got {type(value).__name__} {value!r}.")
    value = int(value)
    if not low <= value <= high:
        fail(name, f"be in {low}..{high}{' ' + what if what else ''}", value)
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Check an integer >= 1 (a batch size, a count) and return it as `int`."""
    value = check_int_range(name, value, -(2**63), 2**63 - 1)
    if value < 1:
        fail(name, "be an integer >= 1", value)
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Check a finite number > 0 (a scale) and return it as `float`."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number; got bool {value!r}.")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number; got {type(value).__name__} {value!r}.") from None
    if not (np.isfinite(value) and value > 0):
        fail(name, "be a finite number > 0", value)
    return value


def check_index_array(name: str, values: Any, high: int, *, what: str | None = None) -> np.ndarray:
    """Check indices into something of length `high` and return them as int64 `[n]`.

    Integer arrays, lists and tensors pass; floats pass only when every value is a whole number (never
    rounded or truncated), so `[0.5, 1]` is an error. Booleans (a mask) and strings are errors.
    `what` says what the values must be in the message (default "values in 0..high-1").
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a 1-D array of integer indices; got {type(values).__name__}.") from err
    if arr.ndim > 1:
        fail(name, "be 1-D [n]", f"shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.dtype == bool:
        raise TypeError(f"`{name}` must hold integer indices; got booleans. For a mask, pass `np.flatnonzero(mask)`.")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if not whole.all():
            raise TypeError(f"`{name}` must hold integers; got {float(arr[~whole][0])!r} (floats are never rounded). "
                            "Pass integer indices.")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer indices; got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= high)
    if bad.any():
        fail(name, f"hold {what or f'values in 0..{high - 1}'}", int(arr[bad][0]))
    return arr


def check_path(name: str, value: Any, *, what: str = "a path") -> Path:
    """Check a file-system path (a non-empty `str` or `os.PathLike`) and return it as a `Path`."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or value == "":
        raise TypeError(f"`{name}` must be {what} (str or pathlib.Path); got {type(value).__name__} {value!r}.")
    return Path(value).expanduser()


def check_folder(name: str, value: Any) -> Path:
    """Check that `value` names a folder that is or can be made (not a file, not under one); create it."""
    path = check_path(name, value)
    if path.exists() and not path.is_dir():
        fail(name, "be a folder", f"the existing file {path}", "Pass a folder, or remove that file.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        fail(name, "be a folder that can be created", f"{path}, which lies under the file {parent}",
             "Pass a folder outside that file.")
    return path


def check_float_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """Check a float lies in the interval, with `(`/`[` ends as asked, and return it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number; got {type(value).__name__} {value!r}.") from None
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high) or not np.isfinite(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        fail(name, f"be in {interval}", value)
    return value


def check_choice(name: str, value: Any, choices: list[str] | tuple[str, ...]) -> str:
    """Check `value` is one of `choices`."""
    if value not in choices:
        fail(name, f"be one of {', '.join(repr(c) for c in choices)}", repr(value))
    return value


def check_matrix(name: str, x: Any, *, finite: bool = True, min_rows: int = 0) -> np.ndarray:
    """Return `x` as a float64 2-D numpy array `[n, d]`, checking shape and finiteness."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        fail(name, "be 2-D [n, d]", f"shape {tuple(x.shape)}", "Stack one row per example.")
    if x.shape[0] < min_rows:
        fail(name, f"have at least {min_rows} rows", f"{x.shape[0]}")
    if finite and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        fail(name, "be finite", f"{bad} rows with NaN or inf", "Drop or fix those rows first.")
    return x


def check_same_length(**arrays: Any) -> int:
    """Check that all given sequences have the same length and return it."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        names = " and ".join(f"`{n}`" for n in lengths)
        got = ", ".join(f"{n}={length}" for n, length in lengths.items())
        raise ValueError(f"{names} must have the same length; got {got}.")
    return next(iter(lengths.values()), 0)
