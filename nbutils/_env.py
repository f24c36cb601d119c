"""Paths and environment switches shared by the whole package.

`NBUTILS_CACHE` moves the cache folder (default `cache/` beside `nbutils/`, ignored by git), `NBUTILS_SMALL=1` asks notebooks to run at
a small size (CI), `NBUTILS_MODEL` / `NBUTILS_SOURCE` select a hub model or web-text corpus when online.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR", "DEFAULT_MODEL_DIR", "cache_dir", "is_small", "hub_reachable"]

REPO_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_DIR / "data"
DEFAULT_MODEL_DIR = DATA_DIR / "tiny-gpt2"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: `override`, else `$NBUTILS_CACHE`, else `cache/` in the project folder. Created if missing."""
    path = Path(override or os.environ.get("NBUTILS_CACHE") or REPO_DIR / "cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_small() -> bool:
    """True when `NBUTILS_SMALL` is set to a true value (1, true, yes): notebooks run at CI size."""
    return os.environ.get("NBUTILS_SMALL", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection (False at once when `HF_HUB_OFFLINE` is set)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False
