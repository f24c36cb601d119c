"""One place for input checks. Every message has one form: what must hold, what was given, the fix.

    `layer` must be in 0..3 for this model; got 7.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np
import torch

__all__ = [
    "check_int_range",
    "check_float_range",
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
