"""Paths and environment switches shared by the whole package.

`NBUTILS_CACHE` moves the cache folder (default `cache/` beside `nbutils/`, ignored by git), `NBUTILS_SMALL=1` asks notebooks to run at
a small size (CI), `NBUTILS_MODEL` / `NBUTILS_SOURCE` / `NBUTILS_MNIST` select a hub model, a web-text corpus or
full MNIST when online (`switch`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DATA_DIR", "DEFAULT_MODEL_DIR", "cache_dir", "is_small", "hub_reachable", "switch"]

REPO_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_DIR / "data"
DEFAULT_MODEL_DIR = DATA_DIR / "tiny-gpt2"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: `override`, else `$NBUTILS_CACHE`, else `cache/` in the project folder. Created if missing.

    Raises:
        TypeError: `override` is not a path; ValueError: it (or `$NBUTILS_CACHE`) is a file or lies under one.
    """
    from nbutils._validation import check_folder

    if override is not None:
        return check_folder("cache_dir", override)
    if os.environ.get("NBUTILS_CACHE"):
        return check_folder("NBUTILS_CACHE", os.environ["NBUTILS_CACHE"])
    return check_folder("cache_dir", REPO_DIR / "cache")


def switch(value: str | None, variable: str, default: str) -> str:
    """`value` when given, else the environment variable `variable` when set, else `default` (the offline one)."""
    return value if value is not None else os.environ.get(variable) or default


def _flag(variable: str) -> bool:
    """True when the environment variable is set to a true value (1, true, yes, on)."""
    return os.environ.get(variable, "").strip().lower() in {"1", "true", "yes", "on"}


def is_small() -> bool:
    """True when `NBUTILS_SMALL` is set to a true value (1, true, yes): notebooks run at CI size."""
    return _flag("NBUTILS_SMALL")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection (False at once when `HF_HUB_OFFLINE` is set)."""
    import socket

    if _flag("HF_HUB_OFFLINE"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; `os.cpu_count()` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc's `malloc_trim`), so the resident size falls
    after a step that held large tables instead of staying at its high-water mark; does nothing without glibc."""
    import gc

    gc.collect()
    _malloc_trim()


def _glibc() -> Any:
    """The C library when it is glibc (with `malloc_trim` and `mallopt`), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _malloc_trim() -> None:
    """glibc's `malloc_trim(0)`: free heap pages go back to the system; does nothing without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_AFTER_POOL = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}  # glibc's largest dynamic values


@contextmanager
def pooled_memory() -> Iterator[None]:
    """Within the block, freed heap memory is kept for the next allocation instead of returned to the system.

    A pass over a corpus allocates and frees the same large activations every batch (`[tokens, d_mlp]` float32 is
    50 MB for 4,096 tokens of GPT-2 small). glibc maps each allocation above its mmap threshold (at most 32 MB unless
    set) afresh and unmaps it on free, so every batch faults its pages in again: a quarter of a collection's time on
    2 CPUs. Here the thresholds are raised for the block; after it, the freed memory goes back to the system
    (`malloc_trim`) and the thresholds are left at glibc's own largest dynamic values (mmap 32 MB, trim
    64 MB). Does nothing without glibc."""
    libc = _glibc()
    params = (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD) if libc is not None else ()
    set_ = [param for param in params if libc.mallopt(param, 1 << 30) == 1]
    try:
        yield
    finally:
        for param in set_:
            libc.mallopt(param, _AFTER_POOL[param])
        if set_:
            libc.malloc_trim(0)
