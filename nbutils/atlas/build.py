"""Building an atlas: its key and folder, then its steps in order (collect; per layer clusters and features;
similar), each skipped when the folder already holds it finished."""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from jaxtyping import Int
from torch import Tensor

from nbutils import _env, activations, cache
from nbutils._validation import check_int_range, fail
from nbutils.atlas.folder import Folder, check_path_arg, layer_file, model_load_name, read_manifest, read_top, \
    step_names, versions
from nbutils.atlas.labels import vocab_of
from nbutils.atlas.layers import features_table, layers_tables
from nbutils.atlas.reader import Atlas
from nbutils.atlas.settings import FORMAT, AtlasSettings, LayerTables, key_settings
from nbutils.atlas.similar_features import EXAMPLE_COLUMNS, similar_table
from nbutils.atlas.units import NEURONS, Units
from nbutils.cache import CacheError, scratch_folder
from nbutils.models import check_windows, hook_name
from nbutils.residuals import ResidualStore

__all__ = ["default_path", "build_atlas", "load_or_build"]

MapLayers = Callable[[list[int], AtlasSettings], Iterator[LayerTables]]


def default_path(*, model_name: str, source: str, n_windows: int, window: int, layers: Iterable[int] | None = None,
                 cache_dir: str | os.PathLike | None = None, **settings: Any) -> Path:
    """The readable default folder of an atlas: `<cache>/atlas/<model>-<source>-<n_windows>x<window>-k<k>-<hash>`,
    where `<hash>` names the settings (`AtlasSettings` fields in `settings`, defaults resolved, and `layers`), so that
    other settings, or a new default method, get their own folder. The manifest inside holds the full content key
    (the model's weights too): an atlas of other weights there is an error, never an input."""
    resolved = key_settings(AtlasSettings(**settings))
    chosen = None if layers is None else sorted(int(l) for l in layers)
    digest = cache.text_fingerprint(json.dumps({"format": FORMAT, "settings": resolved, "layers": chosen},
                                               sort_keys=True))[:8]
    name = Path(str(model_name)).name or "model"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{source}-{n_windows}x{window}-k{resolved['k']}-{digest}")
    return _env.cache_dir(cache_dir) / "atlas" / slug


def build_atlas(
    model: Any,
    windows: Int[Tensor, "n_windows window"],
    *,
    k: int = 128,
    frac: float = 0.75,
    layers: Iterable[int] | None = None,
    method: str | None = None,
    threshold: float | int | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str | None = None,
    progress: bool = True,
    top: Any = None,
    map_layers: MapLayers | None = None,
    workers: int | None = None,
    sae: Any = None,
    **options: Any,
) -> "Atlas":
    """Build (or resume, or just open) the feature atlas of `model` over `windows`.

    Args:
        model: a TransformerBridge (`models.load_model`).
        windows: token windows `[n_windows, window]` (`data.corpus_windows`), ids 0..n_windows-1.
        k, frac: examples per neuron (`activations.collect_top_activations`).
        layers: MLP layers to cluster (default all); the collection always covers every layer.
        method, threshold: clustering (`clustering.cluster`; `None`: the measured default).
        out: the atlas folder; default `<cache>/atlas/<hash of the key>`.
        cache_dir: the cache folder (collection checkpoints, default atlas folders).
        source: the corpus source name, recorded in the manifest (default `$NBUTILS_SOURCE` or `"offline"`).
        progress: tqdm bars over the collection and the steps.
        top: a precomputed `activations.TopActivations` of this model over exactly these windows (e.g. merged
            shards): the collection step stores it instead of collecting.
        map_layers: runs the `clusters` step of many layers, e.g. on remote workers:
            `map_layers(layers, settings)` yields a `LayerTables` per layer, in any order. Default: in process.
        workers: processes that cluster a layer (`layers.cluster_layer`; default: one per core for large layers).
            The atlas does not depend on it.
        sae: a sparse dictionary (a SAELens folder, or a `dictionary.Dictionary`): the atlas is then of its
            latents instead of the MLP neurons, with the same tables (`neuron` is the latent, `layer` the block of
            the hook it reads; `layers` must be None or that block). The manifest records its config and weight
            hash, which are part of the key. Built in this process (no `top`, no `map_layers`).
        **options: other `AtlasSettings` fields: `space` (`"h"` clusters the pre-MLP vectors instead of the neuron
            embeddings), `fold_ln`, `min_size`, `n_similar`, `shown`, `before`, `after`, `batch_size`.

    Returns:
        the finished `Atlas`.

    Raises:
        ValueError / TypeError: bad arguments (named); `top` from another model or corpus.
        cache.CacheError: `out` holds an atlas of other settings, or a finished step's file is damaged.

    Interrupted at any point, the next call with the same arguments resumes at the first unfinished step
    (module docstring); what is finished survives.
    """
    from tqdm.auto import tqdm

    units, sparse = _dictionary_units(model, sae, layers, top, map_layers)
    if sparse is not None:
        layers = [sparse["layer"]]
    settings, windows, layer_list, out_path = _check_build_args(model, windows, k, frac, layers, method, threshold,
                                                                out, cache_dir, options)
    if top is not None:
        _check_top_arg(model, windows, top, settings)
    folder = _open_folder(model, windows, settings, layer_list, out_path, cache_dir, source, sparse)
    bar = tqdm(total=len(step_names(layer_list)), desc="atlas steps", unit="step", disable=not progress)
    replayable = not folder.done("collect") and top is None and map_layers is None and units.dictionary is None
    with _residual_store(model, windows, replayable) as residuals:
        try:
            top = _collect_step(folder, model, windows, settings, top, cache_dir, progress, units, residuals)
            bar.update(1)
            runner = map_layers if map_layers is not None else (
                lambda ls, st: layers_tables(model, windows, top, ls, st, progress=progress, workers=workers,
                                             units=units, residuals=residuals))
            _clusters_steps(folder, layer_list, settings, runner, bar)
            _features_steps(folder, layer_list, settings, bar)
            _env.release_freed_memory()
            _similar_step(folder, model, windows, top, layer_list, settings, progress, units, residuals)
            bar.update(1)
        finally:
            bar.close()
    folder.manifest["status"] = "complete"
    folder.save()
    return Atlas.open(folder.path)


def _check_build_args(model: Any, windows: Tensor, k: int, frac: float, layers: Iterable[int] | None,
                      method: str | None, threshold: float | int | None, out: Any, cache_dir: Any,
                      options: dict[str, Any]) -> tuple[AtlasSettings, Tensor, list[int], Path | None]:
    unknown = set(options) - {f.name for f in fields(AtlasSettings)}
    if unknown:
        raise TypeError(f"build_atlas() got unknown options {sorted(unknown)}; see `AtlasSettings`.")
    settings = AtlasSettings(k=k, frac=frac, method=method, threshold=threshold, **options)
    windows = check_windows(model, windows)
    n_layers = model.cfg.n_layers
    if layers is None:
        layer_list = list(range(n_layers))
    else:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"`layers` must be a list of layer indices; got {type(layers).__name__} {layers!r}.")
        layer_list = sorted({check_int_range("layers", l, 0, n_layers - 1, what="for this model") for l in layers})
        if not layer_list:
            fail("layers", "name at least one layer", "an empty list", "Pass None for all layers.")
    out_path = check_path_arg("out", out)
    check_path_arg("cache_dir", cache_dir)
    return settings, windows, layer_list, out_path


def _dictionary_units(model: Any, sae: Any, layers: Any, top: Any, map_layers: Any) -> tuple[Units, dict | None]:
    """The units of an atlas (`build_atlas`'s `sae`) and, for a dictionary, what the manifest records of it."""
    if sae is None:
        return NEURONS, None
    from nbutils import dictionary

    d = sae if isinstance(sae, dictionary.Dictionary) else dictionary.load_dictionary(sae)
    layer, kind = dictionary.attach(model, d)
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")
                               or list(layers) != [layer]):
        fail("layers", f"be None or [{layer}] with `sae` (the block of its hook {d.hook_name!r})", repr(layers))
    if top is not None or map_layers is not None:
        fail("sae", "be used without `top` and `map_layers`", "both an sae and one of them",
             "The latents are collected and clustered in this process.")
    return Units(d), {"layer": layer, "hook": hook_name(layer, kind, model), "saelens_hook": d.hook_name,
                      "architecture": d.architecture, "d_sae": d.d_sae, "d_in": d.d_in,
                      "path": "" if isinstance(sae, dictionary.Dictionary) else str(Path(sae).expanduser().resolve()),
                      "weights_hash": d.fingerprint(), "cfg": json.loads(json.dumps(d.cfg, default=str))}


def _max_act_by_layer(top: activations.TopActivations) -> np.ndarray:
    """Each unit's max activation `[n_layers, n_units]` indexed by model layer (rows of layers not collected: 0)."""
    if top.layers is None:
        return top.max_act.numpy()
    out = np.zeros((max(top.layers) + 1, top.d_mlp), dtype=np.float32)
    out[list(top.layers)] = top.max_act.numpy()
    return out


def _open_folder(model: Any, windows: Tensor, settings: AtlasSettings, layer_list: list[int], out_path: Path | None,
                 cache_dir: Any, source: str | None, sparse: dict | None = None) -> Folder:
    """The atlas folder of this key: resumed when it holds this atlas, new when empty; else `CacheError`."""
    from nbutils import data

    source = data._source(source)
    model_id, corpus_id = cache.model_fingerprint(model), cache.tensor_fingerprint(windows)
    key = {"format": FORMAT, "model_id": model_id, "corpus_id": corpus_id, "layers": layer_list,
           "settings": key_settings(settings),
           **({"dictionary": {"weights_hash": sparse["weights_hash"], "cfg": sparse["cfg"]}} if sparse else {})}
    key = json.loads(json.dumps(key, sort_keys=True))
    key_hash = cache.text_fingerprint(json.dumps(key, sort_keys=True))
    path = out_path if out_path is not None else _env.cache_dir(cache_dir) / "atlas" / key_hash[:20]
    manifest = read_manifest(path)
    if manifest is None:
        if path.exists() and any(path.iterdir()):
            raise CacheError(f"Folder {path} is not empty and holds no atlas manifest. Nothing was deleted. Pass "
                             "another `out` folder, or empty this one.")
        manifest = {
            "format": FORMAT, "key": key, "key_hash": key_hash, "layers": layer_list,
            "model": {"name": model_load_name(model), "fingerprint": model_id, "n_layers": model.cfg.n_layers,
                      "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp, "d_vocab": model.cfg.d_vocab},
            "corpus": {"source": source, "n_windows": int(windows.shape[0]), "window": int(windows.shape[1]),
                       "fingerprint": corpus_id},
            "settings": asdict(settings), "versions": versions(), "steps": {}, "status": "running",
            "units": "latents" if sparse else "neurons", **({"dictionary": sparse} if sparse else {}),
        }
    elif manifest["key_hash"] != key_hash:
        raise CacheError(f"Folder {path} holds an atlas of another model, corpus or settings (key "
                         f"{manifest['key_hash'][:12]}, asked for {key_hash[:12]}). Nothing was deleted. Pass another "
                         f"`out` folder, or remove that one to rebuild (`rm -r '{path}'`).")
    folder = Folder(path, manifest)
    folder.save()
    return folder


@contextmanager
def _residual_store(model: Any, windows: Tensor, wanted: bool) -> Iterator[ResidualStore | None]:
    """A residual store for this build in a scratch folder (removed after it), when `wanted` and it fits its
    budget (`residuals.ResidualStore.create`); else None, and the passes run the model."""
    if not wanted:
        yield None
        return
    with scratch_folder("atlas-x-") as scratch:
        yield ResidualStore.create(model, windows, scratch)


def _collect_step(folder: Folder, model: Any, windows: Tensor, settings: AtlasSettings, top: Any, cache_dir: Any,
                  progress: bool, units: Units = NEURONS, residuals: ResidualStore | None = None
                  ) -> activations.TopActivations:
    """`collect`: the top-k collection (or the given `top`; a dictionary's latents for an atlas of latents) with the
    windows and the vocabulary; `residuals` is filled when the collection runs here."""
    if folder.done("collect"):
        return top if top is not None else read_top(folder)
    started = time.perf_counter()
    if units.dictionary is not None:
        from nbutils.dictionary import collect_latent_top

        top = collect_latent_top(model, windows, units.dictionary, k=settings.k, frac=settings.frac,
                                 batch_size=settings.batch_size, progress=progress)
    elif top is None:
        top = activations.collect_top_activations(model, windows, k=settings.k, frac=settings.frac,
                                                  batch_size=settings.batch_size, cache_dir=cache_dir,
                                                  progress=progress, residuals=residuals)
    vocab = vocab_of(model)
    folder.finish("collect", {
        "top.parquet": activations._state_table(top.act, top.window, top.pos),
        "windows.parquet": pd.DataFrame({"window": np.arange(len(windows), dtype=np.int64),
                                         "tokens": list(windows.numpy().astype(np.int32))}),
        "vocab.parquet": pd.DataFrame({"token_id": np.arange(len(vocab), dtype=np.int64), "token": vocab}),
    }, time.perf_counter() - started)
    return top


def _clusters_steps(folder: Folder, layer_list: list[int], settings: AtlasSettings, runner: MapLayers,
                    bar: Any) -> None:
    """`layer L clusters` of every unfinished layer, as `runner` yields them (in any order)."""
    todo = [l for l in layer_list if not folder.done(f"layer {l} clusters")]
    bar.update(len(layer_list) - len(todo))
    started, waiting = time.perf_counter(), set(todo)
    for tables in runner(todo, settings):
        l = getattr(tables, "layer", None)
        if l not in waiting:
            fail("map_layers", f"yield one LayerTables per asked layer {sorted(waiting)}", f"layer {l!r}")
        waiting.discard(l)
        folder.finish(f"layer {l} clusters", {
            layer_file("neurons", l): tables.neurons, layer_file("examples", l): tables.examples,
            layer_file("contexts", l): tables.contexts, layer_file("vectors", l): tables.vectors,
            **({layer_file("bands", l): tables.bands} if tables.bands is not None else {}),
        }, time.perf_counter() - started)
        del tables
        _env.release_freed_memory()  # one layer's tables less: keep the resident size near what is held
        bar.update(1)
        started = time.perf_counter()
    if waiting:
        fail("map_layers", "yield the tables of every asked layer", f"none for layers {sorted(waiting)}")


def _features_steps(folder: Folder, layer_list: list[int], settings: AtlasSettings, bar: Any) -> None:
    """`layer L features`: one row per cluster of at least `min_size` examples, from the stored examples."""
    for l in layer_list:
        if not folder.done(f"layer {l} features"):
            started = time.perf_counter()
            ex = pd.read_parquet(folder.file(layer_file("examples", l)))
            folder.finish(f"layer {l} features", {layer_file("features", l): features_table(ex, settings.min_size)},
                          time.perf_counter() - started)
        bar.update(1)


def _similar_step(folder: Folder, model: Any, windows: Tensor, top: activations.TopActivations,
                  layer_list: list[int], settings: AtlasSettings, progress: bool, units: Units = NEURONS,
                  residuals: ResidualStore | None = None) -> None:
    """`similar`: nearest features of other neurons over all layers (`similar_table`)."""
    if folder.done("similar"):
        return
    started = time.perf_counter()
    feats = pd.concat([pd.read_parquet(folder.file(layer_file("features", l))) for l in layer_list],
                      ignore_index=True)
    table = similar_table(model, windows, feats, lambda l: pd.read_parquet(folder.file(layer_file("vectors", l))),
                          lambda l: pd.read_parquet(folder.file(layer_file("examples", l)), columns=EXAMPLE_COLUMNS),
                          _max_act_by_layer(top), settings, int(windows.shape[1]), progress=progress, units=units,
                          residuals=residuals)
    folder.finish("similar", {"similar.parquet": table}, time.perf_counter() - started)

def _check_top_arg(model: Any, windows: Tensor, top: Any, settings: AtlasSettings) -> None:
    if not isinstance(top, activations.TopActivations):
        raise TypeError(f"`top` must be an activations.TopActivations; got {type(top).__name__}.")
    if (top.n_layers, top.d_mlp) != (model.cfg.n_layers, model.cfg.d_mlp):
        fail("top", f"come from this model ({model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons)",
             f"{top.n_layers} x {top.d_mlp}")
    if top.n_windows != len(windows) or not _contiguous(top.window_ranges, len(windows)):
        fail("top", f"cover exactly the windows 0..{len(windows) - 1}", f"ranges {list(top.window_ranges)}",
             "Collect (or merge shards) over these windows with global window ids.")
    if (top.k, top.frac) != (settings.k, settings.frac):
        fail("top", f"be collected with k={settings.k}, frac={settings.frac}", f"k={top.k}, frac={top.frac}")
    if top.model_id and top.model_id != cache.model_fingerprint(model):
        fail("top", "come from this model's weights", f"model fingerprint {top.model_id[:12]}")


def _contiguous(ranges: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """`ranges` sorted when they tile [0, n) exactly, else an empty list."""
    ordered = sorted(ranges)
    expected = 0
    for lo, hi in ordered:
        if lo != expected:
            return []
        expected = hi
    return ordered if expected == n else []



def load_or_build(*, model: Any = None, source: str | None = None, n_windows: int, window: int = 64,
                  k: int = 128, frac: float = 0.75, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, **options: Any) -> "Atlas":
    """The atlas of a model and corpus in its readable default folder (`default_path`): opened at once when it is
    complete, else built (or resumed) there. `atlas.loaded_from_cache` says which.

    Args:
        model: a loaded model, or a model name or folder (`models.load_model`; `None`: `$NBUTILS_MODEL` or the
            offline default). A name is loaded only when the atlas must be built.
        source: corpus source (`data.corpus_windows`); n_windows, window: the corpus windows.
        k, frac, **options: as in `build_atlas`.
    """
    from nbutils import data, models

    loaded = model if hasattr(model, "cfg") else None
    name = (model_load_name(loaded) if loaded is not None
            else _env.switch(model, "NBUTILS_MODEL", models.DEFAULT_MODEL_NAME))
    src = data._source(source)
    path = default_path(model_name=str(name), source=src, n_windows=n_windows, window=window, cache_dir=cache_dir,
                        k=k, frac=frac, **options)
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("status") == "complete":
        atlas = Atlas.open(path)
        if loaded is not None:
            atlas._model = atlas.check_model(loaded)
        atlas.loaded_from_cache = True
        return atlas
    lm = loaded if loaded is not None else models.load_model(name)
    windows = data.corpus_windows(lm, n_windows=n_windows, window=window, source=src)
    atlas = build_atlas(lm, windows, k=k, frac=frac, out=path, cache_dir=cache_dir, source=src, progress=progress,
                        **options)
    atlas._model = lm
    return atlas
