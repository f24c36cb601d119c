"""The cache folder: one sub-folder per (model, corpus, settings), written atomically, never reused by others.

Layout of a run folder `<cache>/<kind>/<hash>/` (`<cache>` is `_env.cache_dir`: a `cache_dir` argument,
else `$NBUTILS_CACHE`, else `cache/`; `<hash>` is the SHA-256 of the run's key: fingerprints of the model
and corpus plus every setting that changes the result):

- `meta.json`: the key, and `status` `"running"` or `"complete"`.
- `checkpoint.parquet`: the state of an unfinished run; its progress is stored inside the same file (parquet
  metadata), so state and progress are replaced together.
- `result.parquet`: the finished result, written before `meta.json` says `"complete"`.
- `<name>.parquet`: any further table of the run (`Run.save_table` / `Run.load_table`).

Every file a run reads back is tied to that run: `meta.json` holds the key itself, and every parquet file holds
the key's hash in its schema metadata (`nbutils_run_key`). A file copied in from another run (another model,
corpus or settings), or written by an older version without that record, raises `CacheError` when read; it is
never used as an input. The key also holds `CACHE_FORMAT`, so folders of an older layout are simply not found.

Every file is written to a temporary name in the same folder and renamed into place, so a crash leaves the
previous version intact. A file that cannot be read raises `CacheError` naming it; nothing finished is ever
deleted by the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from torch import Tensor

from nbutils import _env

__all__ = ["CACHE_FORMAT", "CacheError", "Run", "file_fingerprint", "model_fingerprint", "process_running",
           "scratch_folder", "tensor_fingerprint", "text_fingerprint"]

CACHE_FORMAT = 2  # part of every run's key; bump when the layout of a run folder changes
_PROGRESS_KEY = b"nbutils_progress"
_RUN_KEY = b"nbutils_run_key"  # parquet schema metadata: the SHA-256 of the run's key


class CacheError(RuntimeError):
    """A cache file that cannot be used: unreadable, half-written or written by other settings."""


def text_fingerprint(text: str) -> str:
    """SHA-256 hex digest of a string."""
    return hashlib.sha256(text.encode()).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _update_with_tensor(hasher: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    hasher.update(f"{t.dtype}{tuple(t.shape)}".encode())
    hasher.update(t.reshape(-1).view(torch.uint8).numpy())


def tensor_fingerprint(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (e.g. corpus windows)."""
    hasher = hashlib.sha256()
    _update_with_tensor(hasher, t)
    return hasher.hexdigest()


def model_fingerprint(model: Any) -> str:
    """SHA-256 of a model's architecture and every weight, so a retrained or edited model gets a new key.

    Hashes the Hugging Face config (without its path and library version) when the model wraps one, the
    TransformerLens sizes, and all tensors of the state dict sorted by name.
    """
    hasher = hashlib.sha256()
    inner = getattr(model, "original_model", model)
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        hasher.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    tl_cfg = getattr(model, "cfg", None)
    sizes = {k: getattr(tl_cfg, k, None) for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_ctx")}
    hasher.update(json.dumps(sizes, sort_keys=True).encode())
    state = inner.state_dict()
    for name in sorted(state):
        hasher.update(name.encode())
        _update_with_tensor(hasher, state[name])
    return hasher.hexdigest()


def _clear_hint(folder: Path) -> str:
    return (f"Nothing was deleted. To recompute, remove the folder (`rm -r '{folder}'`) or pass another "
            "`cache_dir`.")


def _atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_parquet(path: Path, table: pd.DataFrame, run_key: str, progress: int | None = None) -> None:
    """Write `table` atomically with the run's key hash (and `progress`, if given) in its schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    metadata = {**(arrow.schema.metadata or {}), _RUN_KEY: run_key.encode()}
    if progress is not None:
        metadata[_PROGRESS_KEY] = str(progress).encode()
    arrow = arrow.replace_schema_metadata(metadata)
    _atomic_write(path, lambda f: pq.write_table(arrow, f))


class Run:
    """One run folder of the cache, named by the hash of `key` (a JSON-able dict).

    Args:
        kind: sub-folder of the cache (e.g. `"top_activations"`).
        key: everything that changes the result (model and corpus fingerprints, settings).
        cache_dir: the cache folder; `None` for the default (`_env.cache_dir`).
    """

    def __init__(self, kind: str, key: dict, cache_dir: str | os.PathLike | None = None) -> None:
        key = {**key, "cache_format": CACHE_FORMAT}
        self.key = json.loads(json.dumps(key, sort_keys=True))  # plain JSON types, as read back
        self.digest = text_fingerprint(json.dumps(self.key, sort_keys=True))
        self.folder = _env.cache_dir(cache_dir) / kind / self.digest[:20]
        self.meta_path = self.folder / "meta.json"
        self.result_path = self.folder / "result.parquet"
        self.checkpoint_path = self.folder / "checkpoint.parquet"

    def _error(self, path: Path, problem: str) -> CacheError:
        return CacheError(f"Cache file {path} {problem}. {_clear_hint(self.folder)}")

    def _read_meta(self) -> dict | None:
        if not self.meta_path.exists():
            if self.result_path.exists():
                raise self._error(self.meta_path, "is missing beside a result (a half-written or foreign "
                                  "cache folder)")
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            status, key = meta["status"], meta["key"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise self._error(self.meta_path, f"is unreadable ({type(err).__name__}: {err})") from err
        if key != self.key:
            raise self._error(self.meta_path, "was written by other settings (its key differs from this run's)")
        if status not in ("running", "complete"):
            raise self._error(self.meta_path, f"has an unknown status {status!r}")
        return meta

    def _read_parquet(self, path: Path) -> tuple[pd.DataFrame, dict]:
        """The table and its schema metadata, after checking that the file was written by this run."""
        import pyarrow.parquet as pq

        try:
            arrow = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file; all mean the same here
            raise self._error(path, f"is unreadable ({type(err).__name__}: {err})") from err
        metadata = dict(arrow.schema.metadata or {})
        written_by = metadata.get(_RUN_KEY, b"").decode(errors="replace")
        if not written_by:
            raise self._error(path, "carries no run key (copied in from elsewhere or written by an older version)")
        if written_by != self.digest:
            raise self._error(path, f"was written by another run (key {written_by[:12]}, this run's key "
                              f"{self.digest[:12]}): another model, corpus or settings")
        return arrow.to_pandas(), metadata

    def load_finished(self) -> tuple[pd.DataFrame, dict] | None:
        """The finished result and the extra facts saved with it, or `None` when the run has not finished.

        Raises:
            CacheError: `meta.json` or `result.parquet` is unreadable, missing or from other settings.
        """
        meta = self._read_meta()
        if meta is None or meta["status"] != "complete":
            return None
        if not self.result_path.exists():
            raise self._error(self.result_path, "is missing although meta.json says the run is complete")
        table, _ = self._read_parquet(self.result_path)
        return table, meta.get("extra", {})

    def load_checkpoint(self) -> tuple[pd.DataFrame, int] | None:
        """The last checkpoint of an unfinished run and its progress, or `None` when there is none.

        Raises:
            CacheError: the checkpoint is unreadable or has no progress record.
        """
        meta = self._read_meta()
        if meta is None or meta["status"] != "running" or not self.checkpoint_path.exists():
            return None
        table, metadata = self._read_parquet(self.checkpoint_path)
        try:
            progress = int(metadata[_PROGRESS_KEY])
        except (KeyError, ValueError) as err:
            raise self._error(self.checkpoint_path, "has no progress record") from err
        return table, progress

    def _write_meta(self, status: str, extra: dict | None = None) -> None:
        meta = {"status": status, "key": self.key, "extra": extra or {}}
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        _atomic_write(self.meta_path, lambda f: f.write(text.encode()))

    def save_checkpoint(self, table: pd.DataFrame, progress: int) -> None:
        """Replace the checkpoint with `table`, recording `progress` inside the same file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.meta_path.exists():
            self._write_meta("running")
        _write_parquet(self.checkpoint_path, table, self.digest, progress)

    def _table_path(self, name: str) -> Path:
        if not name.isidentifier() or name in ("result", "checkpoint", "meta"):
            raise ValueError(f"`name` must be a plain identifier other than result, checkpoint and meta; got {name!r}.")
        return self.folder / f"{name}.parquet"

    def save_table(self, name: str, table: pd.DataFrame) -> None:
        """Write a further table of this run as `<name>.parquet` (atomically, tied to this run's key)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_parquet(self._table_path(name), table, self.digest)

    def load_table(self, name: str) -> pd.DataFrame | None:
        """The table `<name>.parquet` of this run, or `None` when it was not written.

        Raises:
            CacheError: the file is unreadable or was written by another run.
        """
        path = self._table_path(name)
        return self._read_parquet(path)[0] if path.exists() else None

    def save_finished(self, table: pd.DataFrame, extra: dict | None = None) -> None:
        """Write the result, then mark the run complete and drop its checkpoint."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_parquet(self.result_path, table, self.digest)
        self._write_meta("complete", extra)
        if self.checkpoint_path.exists():
            self.checkpoint_path.unlink()


def process_running(pid: int) -> bool:
    """Whether a process with id `pid` exists (this process included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def scratch_folder(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A new folder `{parent}/{prefix}{pid}-{random}` (default parent: the system's temporary folder), removed
    on exit. Folders of the same prefix left by processes that no longer run (killed before their own clean-up)
    are removed first, so an interrupted run leaves nothing behind for long."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    for old in parent.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if old.is_dir() and pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
