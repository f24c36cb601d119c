"""The atlas folder: parquet files written atomically and stamped with the atlas's key, and a manifest of steps.

Every parquet file carries the key's hash in its metadata and its row count in the manifest; a truncated, foreign
or half-written file raises `cache.CacheError` naming it and what to delete, and is never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from nbutils import _env, activations, cache, pretrained
from nbutils._validation import fail
from nbutils.cache import CacheError

__all__ = ["Folder", "read_manifest", "step_names", "layer_file", "check_path_arg", "read_top", "model_load_name",
           "versions"]

_KEY_META = b"nbutils_atlas_key"
_STEP_META = b"nbutils_atlas_step"


def _write_table(path: Path, table: pd.DataFrame, key_hash: str, step: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _KEY_META: key_hash.encode(),
                                           _STEP_META: step.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    cache._atomic_write(path, lambda f: pq.write_table(arrow, f, row_group_size=65536))
    return len(table)


def _check_file(path: Path, key_hash: str, rows: int | None, folder: Path) -> None:
    """A finished step's file: readable footer, this atlas's key, the recorded row count; else `CacheError`."""
    import pyarrow.parquet as pq

    hint = (f"Nothing was deleted. Delete this file to recompute its step (`rm '{path}'`), or the whole folder "
            f"(`rm -r '{folder}'`).")
    if not path.exists():
        raise CacheError(f"Atlas file {path} is missing although the manifest lists it as finished. {hint}")
    try:
        meta = pq.read_metadata(path)
    except Exception as err:  # a damaged footer raises several pyarrow types; all mean the same here
        raise CacheError(f"Atlas file {path} is unreadable ({type(err).__name__}: {err}). {hint}") from err
    found = (meta.metadata or {}).get(_KEY_META, b"").decode()
    if found != key_hash:
        raise CacheError(f"Atlas file {path} belongs to another atlas (key {found[:12] or 'none'}, this atlas "
                         f"{key_hash[:12]}). {hint}")
    if rows is not None and meta.num_rows != rows:
        raise CacheError(f"Atlas file {path} has {meta.num_rows} rows; the manifest recorded {rows}. {hint}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("neuron-embeddings", "torch", "transformer_lens", "transformers", "numpy", "pandas", "pyarrow",
                 "duckdb", "scikit-learn", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def model_load_name(model: Any) -> str:
    """What `models.load_model` takes to load this model again: its hub name or folder (the offline default by
    its name, so that an atlas stays usable when the project folder moves; a converted pretrained model by its
    name, e.g. `"smollm2-135m"`)."""
    from nbutils import models

    inner = getattr(model, "original_model", None)
    path = getattr(getattr(inner, "config", None), "_name_or_path", "") or getattr(model.cfg, "model_name", "")
    try:
        if str(path) and Path(path).resolve() == _env.DEFAULT_MODEL_DIR.resolve():
            return models.DEFAULT_MODEL_NAME
    except OSError:
        pass
    return pretrained.converted_name(path) or str(path)


class Folder:
    """The atlas folder and its manifest (written atomically after every step)."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def key_hash(self) -> str:
        return self.manifest["key_hash"]

    def file(self, name: str) -> Path:
        return self.path / name

    def done(self, step: str) -> bool:
        info = self.manifest["steps"].get(step)
        if info is None or info.get("status") != "done":
            return False
        for name, rows in info["files"].items():
            _check_file(self.file(name), self.key_hash, rows, self.path)
        return True

    def finish(self, step: str, files: dict[str, pd.DataFrame], seconds: float) -> None:
        rows = {name: _write_table(self.file(name), table, self.key_hash, step) for name, table in files.items()}
        self.manifest["steps"][step] = {"status": "done", "files": rows, "seconds": round(seconds, 3)}
        self.save()

    def save(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=True, default=str) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        cache._atomic_write(self.path / "manifest.json", lambda f: f.write(text.encode()))


def read_manifest(path: Path) -> dict | None:
    file = path / "manifest.json"
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        manifest["key"], manifest["key_hash"], manifest["steps"]  # noqa: B018 - the fields that must be there
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheError(f"Atlas manifest {file} is unreadable ({type(err).__name__}: {err}). Nothing was "
                         f"deleted. Remove the folder to rebuild (`rm -r '{path}'`).") from err
    return manifest


def step_names(layers: list[int]) -> list[str]:
    return ["collect", *[f"layer {l} {s}" for l in layers for s in ("clusters", "features")], "similar"]


def layer_file(table: str, layer: int) -> str:
    return f"{table}/layer={layer:03d}.parquet"


def check_path_arg(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a folder path (str or Path); got {type(value).__name__} {value!r}.")
    path = Path(value).expanduser()
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            fail(name, "be a folder (or not exist yet)", f"{str(path)!r}, where {str(parent)!r} is a file",
                 "Pass another folder.")
    return path



def read_top(folder: Folder) -> activations.TopActivations:
    """The collection as the `collect` step stored it (`top.parquet`)."""
    m = folder.manifest
    table = pd.read_parquet(folder.file("top.parquet"))
    n_layers, d_mlp, k = m["model"]["n_layers"], m["model"]["d_mlp"], m["settings"]["k"]
    act, window, pos = activations._state_from_table(table, n_layers, d_mlp, k)
    settings = activations.CollectSettings(k=k, frac=m["settings"]["frac"], batch_size=m["settings"]["batch_size"])
    n = m["corpus"]["n_windows"]
    return activations.TopActivations(act, window, pos, settings=settings, n_windows=n, window_ranges=((0, n),),
                                      model_id=m["model"]["fingerprint"], corpus_id=m["corpus"]["fingerprint"])

