"""Scale out on Ray: collect top activations over corpus shards, and build an atlas, across processes or machines.

The work splits in two:

- **Collection** is a reduction over the corpus. The windows are cut into contiguous shards whose boundaries
  are multiples of `batch_size`, so every shard runs exactly the batches one pass would run and the merged
  result is bit-identical to `activations.collect_top_activations` over all windows. Each shard is one task
  that calls `collect_top_activations(..., window_offset=start)`; its cache keeps finished shards, so a
  driver killed and started again skips them (on a cluster: when the cache folder is shared, or the shard
  lands on the same node).
- **Per-layer `clusters` steps** of the atlas run one task per layer (`atlas.layer_tables`), fed to
  `atlas.build_atlas` through its `map_layers` hook. The driver runs the light `features` steps and the
  `similar` step (one nearest-neighbour search over the features of all layers) and writes the folder.

Why Ray Core tasks, not actors or Ray Data:

- A shard or a layer is a pure function of small arguments (the specs, a window range, the settings) with one
  result. Tasks are exactly that, and Ray retries a task whose worker died (`max_retries`); an actor would hold
  state that is lost with its process, and its restart would need our own replay logic.
- Ray Data's `map_batches` streams rows through stateless batches. Collection is a reduction whose state
  (`[n_layers, d_mlp, k]`) must survive across all batches of a shard, and which must keep the batch
  boundaries of one pass to be bit-identical. Fighting the block sizes of Ray Data for that buys nothing.
- Workers keep the model and the windows they loaded (per process), so consecutive tasks on one worker do
  not reload them. They build both from the specs: a model name or folder (`models.load_model`) and a
  `CorpusSpec` (`data.corpus_windows`). A model is never pickled.

The shard results merge with `activations.merge` in a **fixed pairwise tree of Ray tasks** (`_MergeTree`):
`(0, 1), (2, 3), ...`, then the merged pairs, and so on. Why tasks and not the driver: a merge is submitted as
soon as its two shards report success, so merges run on the workers, next to their inputs, while other shards
still collect; the states travel between workers only, and the driver receives one merged state instead of
one per shard. States travel packed, 12 bytes a slot (float32 act, int32 window, int32 pos): 57 MB for GPT-2
small at k = 128. The fixed shape makes the result independent of the order shards finish in.

Ray is an optional extra (`pip install -e ".[scale]"`): this module imports it only when a function runs.
By default a local cluster starts in this process (`ray.init`), on this machine's cores; `address=` or the
`RAY_ADDRESS` environment variable connects to a running cluster instead. When Ray is already initialised,
the existing connection is used. Each worker takes `num_gpus` GPUs (default: one when the cluster has GPUs)
and runs the model on CUDA when it got one.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from nbutils import _env, activations, data, models
from nbutils._validation import check_choice, check_int_range, fail

__all__ = [
    "CorpusSpec",
    "SpecError",
    "collect_ray",
    "build_atlas_ray",
    "connect",
    "shard_bounds",
    "add_ray_arguments",
    "build_from_args",
]

_RETRIES = 3  # times Ray re-runs a task whose worker process died
_CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster address to answer
_LOCAL_STARTS = 3  # attempts to start a local cluster: on a busy machine, Ray's agents can miss its start-up timeout
_INSTALL = 'Ray is not installed. Install the optional extra with `pip install -e ".[scale]"` (or `pip install "ray>=2.40"`).'


@dataclass(frozen=True)
class CorpusSpec:
    """How a worker rebuilds the corpus windows: `data.corpus_windows(model, n_windows, window, split, source)`.

    Attributes:
        source: `"offline"` or a web-text source (`data.corpus_windows`); `None` reads `$NBUTILS_SOURCE`
            on the driver, so every worker gets the same answer.
        n_windows: windows of the whole corpus (the first ones of the split).
        window: tokens per window.
        split: `"train"` or `"heldout"`.
    """

    source: str | None = data.OFFLINE_SOURCE
    n_windows: int = 2000
    window: int = 64
    split: str = "train"

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _env.switch(self.source, "NBUTILS_SOURCE", data.OFFLINE_SOURCE))
        if not isinstance(self.source, str):
            raise TypeError(f"`source` must be a string; got {type(self.source).__name__} {self.source!r}.")
        check_int_range("n_windows", self.n_windows, 1, 2**31 - 1)
        check_int_range("window", self.window, 2, 2**31 - 1)
        check_choice("split", self.split, data.SPLITS)

    def windows(self, model: Any) -> torch.Tensor:
        """The windows `[n_windows, window]` for `model`'s tokenizer."""
        return data.corpus_windows(model, self.n_windows, self.window, split=self.split, source=self.source)


def shard_bounds(n_windows: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Split `n_windows` into `shards` contiguous `(start, stop)` ranges whose boundaries are multiples of
    `batch_size` (the last stop is `n_windows`), as even as whole batches allow.

    Raises:
        ValueError: more shards than batches.
    """
    n_windows = check_int_range("n_windows", n_windows, 1, 2**31 - 1)
    batch_size = check_int_range("batch_size", batch_size, 1, 2**31 - 1)
    n_batches = -(-n_windows // batch_size)
    shards = check_int_range("shards", shards, 1, n_batches,
                             what=f"({n_windows} windows make {n_batches} batches of {batch_size}; a shard is at least one batch)")
    cuts = [min(n_windows, (i * n_batches // shards) * batch_size) for i in range(shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _model_spec(model_spec: str | os.PathLike | None) -> str:
    """The model spec every worker loads: `$NBUTILS_MODEL` or the default when `None`, an existing local
    folder as an absolute path (workers may run in another folder), a hub name as it is."""
    spec = _env.switch(None if model_spec is None else str(model_spec), "NBUTILS_MODEL", models.DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


# --------------------------------------------------------------------------------------------------
# Connecting


def _ray() -> Any:
    """The `ray` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return ray


def _check_reachable(address: str, origin: str) -> None:
    """Fail fast (one `ConnectionError`) when a `host:port` cluster address does not answer."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        fail(origin, "be a Ray cluster address `host:port` (or `ray://host:port`, or `auto`)", repr(address))
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT):
            pass
    except OSError as err:
        raise ConnectionError(
            f"Cannot reach the Ray cluster at `{origin}` = {address!r} ({type(err).__name__}: {err}). Start one "
            f"with `ray start --head` on that machine, fix `{origin}`, or leave `address` and RAY_ADDRESS unset "
            "to run on a local cluster in this process."
        ) from None


@dataclass
class _Session:
    """A Ray connection: `started` when this module initialised Ray (and shuts it down at the end)."""

    ray: Any
    started: bool

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def connect(address: str | None = None, *, num_cpus: int | None = None) -> _Session:
    """Connect to Ray: an already initialised connection, else `address`, else `$RAY_ADDRESS`, else a new
    local cluster on this machine (`num_cpus`: its CPUs, default all).

    Returns a session; `session.close()` shuts Ray down if this call started it.

    Raises:
        ImportError: Ray is not installed (names the extra to install).
        ConnectionError: the cluster address does not answer within a few seconds (names `address` or
            RAY_ADDRESS and what to do), or a local cluster did not start.
    """
    ray = _ray()
    origin = "address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address, origin)
    if ray.is_initialized():
        return _Session(ray, started=False)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    options = dict(include_dashboard=False, logging_level="warning")
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            raise ConnectionError(
                f"Cannot connect to the Ray cluster at `{origin}` = {address!r} ({type(err).__name__}: {err}). "
                f"Start one with `ray start --head`, fix `{origin}`, or leave both unset for a local cluster."
            ) from None
        return _Session(ray, started=True)
    for attempt in range(1, _LOCAL_STARTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, **options)
            break
        except Exception as err:  # Ray raises a bare Exception when a node is slow to start
            ray.shutdown()
            if attempt == _LOCAL_STARTS or "timed out during startup" not in str(err):
                raise ConnectionError(f"The local Ray cluster did not start ({type(err).__name__}: {err}). "
                                      "On a busy machine, try again; logs are in /tmp/ray/session_latest/logs.") from None
    return _Session(ray, started=True)


# --------------------------------------------------------------------------------------------------
# What runs on the workers


class SpecError(Exception):
    """Raised on a worker that cannot build its inputs from a spec; the driver turns it into one ValueError."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(name, message)
        self.name, self.message = name, message


def _device() -> str:
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=2)
def _worker_inputs(model_spec: str, corpus_spec: CorpusSpec, device: str) -> tuple[Any, torch.Tensor]:
    """The model and windows of this worker process, loaded once from their specs (kept for later tasks)."""
    try:
        model = models.load_model(model_spec, device=device)
    except Exception as err:  # any failure to load means the same to the user: fix `model_spec`
        raise SpecError("model_spec", (
            f"`model_spec` {model_spec!r} could not be loaded on a Ray worker ({type(err).__name__}: {err}). "
            "Pass a model name or a Hugging Face folder that every worker can read (on a cluster: a hub name "
            "or a path on a shared filesystem)."
        )) from None
    try:
        windows = corpus_spec.windows(model)
    except Exception as err:
        raise SpecError("corpus_spec", (
            f"`corpus_spec` {corpus_spec} could not be turned into windows on a Ray worker "
            f"({type(err).__name__}: {err})."
        )) from None
    return model, windows


def _worker_setup(model_spec: str, corpus_spec: CorpusSpec, threads: int = 1) -> tuple[Any, torch.Tensor]:
    """On a Ray worker: this process's model and windows (loaded on first use) with `threads` torch threads."""
    torch.set_num_threads(threads)
    return _worker_inputs(model_spec, corpus_spec, _device())


def _collect_shard(model_spec: str, corpus_spec: CorpusSpec, start: int, stop: int, options: dict,
                   threads: int, kill_marker: str | None) -> tuple[dict, _Packed]:
    """One shard: `collect_top_activations` over windows `start:stop` with global ids. Returns a small status
    (for the driver's progress bar, or the `SpecError` message) and the result (kept in the object store for
    the merge tree; `None` after a `SpecError`, so no failed object is left behind for Ray to report)."""
    began = time.perf_counter()
    try:
        model, windows = _worker_setup(model_spec, corpus_spec, threads)
    except SpecError as err:
        return {"start": start, "error": err.message}, None
    if kill_marker is not None and start == 0 and not os.path.exists(kill_marker):
        Path(kill_marker).write_text(str(os.getpid()))  # test hook: die once, mid-shard, to be retried
        os._exit(1)
    top = activations.collect_top_activations(model, windows[start:stop], window_offset=start, progress=False,
                                              **options)
    return {"start": start, "stop": stop, "seconds": time.perf_counter() - began, "pid": os.getpid()}, _pack(top)


def _layer_tables(model_spec: str, corpus_spec: CorpusSpec, top: _Packed, layer: int, settings: Any,
                  threads: int) -> Any:
    """One layer's `clusters` step of the atlas (`atlas.layer_tables`) on this worker's model and windows."""
    from nbutils import atlas

    model, windows = _worker_setup(model_spec, corpus_spec, threads)
    return atlas.layer_tables(model, windows, _unpack(top), layer, settings)


@dataclass
class _Packed:
    """A collection in transit between workers: window ids and positions as int32, 12 bytes a slot instead of
    20 (ids fit: a `CorpusSpec` has fewer than 2**31 windows)."""

    act: torch.Tensor  # [n_layers, d_mlp, k] float32
    window: torch.Tensor  # [n_layers, d_mlp, k] int32
    pos: torch.Tensor  # [n_layers, d_mlp, k] int32
    facts: dict  # the other fields of `TopActivations`


def _pack(top: activations.TopActivations) -> _Packed:
    facts = dict(settings=top.settings, n_windows=top.n_windows, window_ranges=top.window_ranges,
                 model_id=top.model_id, corpus_id=top.corpus_id)
    return _Packed(top.act, top.window.to(torch.int32), top.pos.to(torch.int32), facts)


def _unpack(packed: _Packed) -> activations.TopActivations:
    return activations.TopActivations(packed.act, packed.window.long(), packed.pos.long(), **packed.facts)


def _merge(a: _Packed, b: _Packed) -> _Packed:
    return _pack(activations.merge(_unpack(a), _unpack(b)))


# --------------------------------------------------------------------------------------------------
# The driver


def _gpus(ray: Any, num_gpus: float | None) -> float:
    if num_gpus is None:
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or num_gpus < 0:
        fail("num_gpus", "be a number >= 0 (GPUs per worker) or None (one when the cluster has GPUs)", repr(num_gpus))
    return float(num_gpus)


def _get(ray: Any, refs: Any) -> Any:
    """`ray.get`, turning a worker's `SpecError` into one ValueError without Ray's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, SpecError):
            raise ValueError(cause.message) from None
        raise


class _MergeTree:
    """The fixed pairwise merge tree over shard results: level 0 holds the shards in order; each next level
    merges items `(0, 1), (2, 3), ...` of the one below and carries an odd last item up unchanged.

    A merge task is submitted as soon as both of its inputs are known to be good (their shards' statuses came
    back without error), so merges run while other shards still collect, and nothing is built on a failed
    shard."""

    def __init__(self, ray: Any, results: list) -> None:
        self.merge = ray.remote(_merge).options(num_cpus=1, max_retries=_RETRIES)
        self.results = results
        sizes = [len(results)]
        while sizes[-1] > 1:
            sizes.append((sizes[-1] + 1) // 2)
        self.levels: list[list[Any]] = [[None] * n for n in sizes]

    def shard_done(self, index: int) -> None:
        """Shard `index` finished well: place it and submit every merge that now has both inputs."""
        self.levels[0][index] = self.results[index]
        for below, level in zip(self.levels, self.levels[1:]):
            for i, item in enumerate(level):
                pair = below[2 * i : 2 * i + 2]
                if item is not None or None in pair:
                    continue
                level[i] = pair[0] if len(pair) == 1 else self.merge.remote(*pair)  # an odd last item moves up

    @property
    def root(self) -> Any:
        return self.levels[-1][0]


def _start_shards(ray: Any, spec: str, corpus_spec: CorpusSpec, shards: int, settings: dict, num_gpus: float | None,
                  cache_dir: Any, kill_marker: Any = None) -> tuple[list, list]:
    """Submit one task per shard; (status references, result references), in shard order."""
    bounds = shard_bounds(corpus_spec.n_windows, shards, settings["batch_size"])
    options = {**settings, "cache_dir": None if cache_dir is None else str(Path(cache_dir).resolve())}
    marker = None if kill_marker is None else str(Path(kill_marker).resolve())
    task = ray.remote(_collect_shard).options(num_cpus=1, num_gpus=_gpus(ray, num_gpus), num_returns=2,
                                              max_retries=_RETRIES)
    submitted = [task.remote(spec, corpus_spec, start, stop, options, 1, marker) for start, stop in bounds]
    return [s for s, _ in submitted], [r for _, r in submitted]


def _collect(ray: Any, spec: str, corpus_spec: CorpusSpec, shards: int, settings: dict, num_gpus: float | None,
             cache_dir: Any, progress: bool, kill_marker: Any = None) -> activations.TopActivations:
    """Run the shard tasks, follow them with a bar as they finish (`ray.wait`), feed the merge tree, return the
    merged result. A shard whose worker could not build its inputs stops the run with one ValueError (the
    other shards finish on their own, or end with the cluster)."""
    from tqdm.auto import tqdm

    statuses, results = _start_shards(ray, spec, corpus_spec, shards, settings, num_gpus, cache_dir, kill_marker)
    tree, pending = _MergeTree(ray, results), list(statuses)
    with tqdm(total=shards, unit="shard", desc=f"collecting {shards} shards on Ray", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            status = ray.get(ready[0])
            if "error" in status:
                raise ValueError(status["error"])
            tree.shard_done(statuses.index(ready[0]))
            bar.update(1)
    return _unpack(ray.get(tree.root))


def collect_ray(
    model_spec: str | os.PathLike | None,
    corpus_spec: CorpusSpec,
    *,
    shards: int | None = None,
    k: int = 128,
    frac: float = 0.75,
    batch_size: int = 64,
    address: str | None = None,
    num_gpus: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    _kill_marker: str | os.PathLike | None = None,
) -> activations.TopActivations:
    """`activations.collect_top_activations` over the windows of `corpus_spec`, split into `shards` Ray tasks.

    The result is bit-identical to one in-process pass with the same `batch_size` on the same device type
    (shard boundaries fall on batch boundaries). Each shard's result is cached by its worker, so a run
    started again skips the shards that finished.

    Args:
        model_spec: a model name or Hugging Face folder (`models.load_model`); `None` for `$NBUTILS_MODEL` or
            the offline default. Every worker loads it itself.
        corpus_spec: the windows (`CorpusSpec`).
        shards: number of tasks, 1..number of batches; default two per CPU of the cluster.
        k, frac, batch_size: as in `collect_top_activations`.
        address: a Ray cluster (`host:port`, `ray://host:port` or `auto`); default `$RAY_ADDRESS`, else a local
            cluster started in this process.
        num_gpus: GPUs per worker; default one when the cluster has GPUs, else none.
        cache_dir: the workers' cache folder; default theirs (`$NBUTILS_CACHE` or `cache/`).
        progress: a tqdm bar over shards.
        _kill_marker: test hook: the first shard's worker kills its own process if this file does not exist
            (creating it first), so Ray retries the shard.

    Raises:
        ImportError: Ray is not installed.
        ConnectionError: the cluster cannot be reached.
        ValueError: bad settings, or a worker could not load the model or the corpus (names `model_spec` or
            `corpus_spec`).
    """
    _check_corpus_spec(corpus_spec)
    settings = dict(k=k, frac=frac, batch_size=batch_size)
    activations.CollectSettings(**settings)  # checks the settings on the driver
    _check_shards(shards, corpus_spec.n_windows, batch_size)
    spec = _model_spec(model_spec)
    session = connect(address)
    try:
        shards = _default_shards(session.ray, shards, corpus_spec.n_windows, batch_size)
        return _collect(session.ray, spec, corpus_spec, shards, settings, num_gpus, cache_dir, progress, _kill_marker)
    finally:
        session.close()


def _check_shards(shards: int | None, n_windows: int, batch_size: int) -> None:
    if shards is not None:
        shard_bounds(n_windows, shards, batch_size)


def _default_shards(ray: Any, shards: int | None, n_windows: int, batch_size: int) -> int:
    """`shards`, or two per CPU of the cluster (at most one per batch), so a slow shard delays little."""
    if shards is not None:
        return shards
    return max(1, min(-(-n_windows // batch_size), 2 * int(ray.cluster_resources().get("CPU", 1))))


def _check_corpus_spec(corpus_spec: Any) -> CorpusSpec:
    if not isinstance(corpus_spec, CorpusSpec):
        raise TypeError(f"`corpus_spec` must be a scale.CorpusSpec; got {type(corpus_spec).__name__}.")
    return corpus_spec


def build_atlas_ray(
    model_spec: str | os.PathLike | None,
    corpus_spec: CorpusSpec,
    *,
    shards: int | None = None,
    address: str | None = None,
    layers: list[int] | None = None,
    out: str | os.PathLike | None = None,
    k: int = 128,
    frac: float = 0.75,
    num_gpus: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> Any:
    """`atlas.build_atlas` with the collection (`collect_ray`) and the per-layer `clusters` steps on Ray.

    The driver loads the model and the windows too: it checks the merged collection against them, writes the
    atlas folder (`out`, on the driver's disk or a shared filesystem), and runs the `features` and `similar`
    steps. Each layer's `clusters` step is one task (`atlas.layer_tables`) on a worker that loads the model and
    windows from their specs; the merged collection goes to the object store once. The atlas is identical,
    table by table, to `atlas.build_atlas` in one process, and resumes like it.

    Args:
        model_spec, corpus_spec, shards, address, num_gpus, cache_dir, progress: as in `collect_ray`.
        layers, out, k, frac, **options: as in `atlas.build_atlas` (`method`, `threshold`, `batch_size`, ...).

    Returns:
        the finished `atlas.Atlas`.

    Raises:
        as `collect_ray` and `atlas.build_atlas`.
    """
    from dataclasses import asdict, fields

    from nbutils import atlas

    _check_corpus_spec(corpus_spec)
    unknown = set(options) - {f.name for f in fields(atlas.AtlasSettings)}
    if unknown:
        raise TypeError(f"build_atlas_ray() got unknown options {sorted(unknown)}; see `atlas.AtlasSettings`.")
    settings = atlas.AtlasSettings(k=k, frac=frac, **options)
    _check_shards(shards, corpus_spec.n_windows, settings.batch_size)
    spec = _model_spec(model_spec)
    session = connect(address)
    ray = session.ray
    try:
        shards = _default_shards(ray, shards, corpus_spec.n_windows, settings.batch_size)
        collect = dict(k=settings.k, frac=settings.frac, batch_size=settings.batch_size)
        top = _collect(ray, spec, corpus_spec, shards, collect, num_gpus, cache_dir, progress)
        model = models.load_model(spec)
        windows = corpus_spec.windows(model)
        top_ref = ray.put(_pack(top))  # once in the object store, read by every layer task
        task = ray.remote(_layer_tables).options(num_cpus=1, num_gpus=_gpus(ray, num_gpus), max_retries=_RETRIES)

        def map_layers(todo: list[int], st: Any) -> Iterator[Any]:
            pending = [task.remote(spec, corpus_spec, top_ref, layer, st, 1) for layer in todo]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield _get(ray, ready[0])

        return atlas.build_atlas(model, windows, top=top, map_layers=map_layers, layers=layers, out=out,
                                 cache_dir=cache_dir, source=corpus_spec.source, progress=progress, **asdict(settings))
    finally:
        session.close()


# --------------------------------------------------------------------------------------------------
# Command line (`python -m nbutils atlas build --ray ...`)


def add_ray_arguments(parser: Any) -> None:
    """Add `--ray`, `--address`, `--shards` and `--num-gpus` to the `atlas build` parser."""
    group = parser.add_argument_group("Ray (needs `pip install -e \".[scale]\"`)")
    group.add_argument("--ray", action="store_true", help="collect and cluster on Ray (local cluster by default)")
    group.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    group.add_argument("--shards", type=int, default=None, help="corpus shards (default: two per CPU of the cluster)")
    group.add_argument("--num-gpus", type=float, default=None, help="GPUs per worker (default: 1 when the cluster has GPUs)")


def build_from_args(args: Any) -> Any:
    """`build_atlas_ray` from the parsed `atlas build --ray` arguments; the atlas goes where `atlas build` puts it."""
    from nbutils import atlas

    spec = CorpusSpec(source=args.source, n_windows=args.windows, window=args.window)
    model = _model_spec(args.model)
    out = args.out or atlas.default_path(model_name=_env.switch(args.model, "NBUTILS_MODEL", models.DEFAULT_MODEL_NAME),
                                         source=spec.source, n_windows=spec.n_windows, window=spec.window,
                                         layers=args.layers, k=args.k, frac=args.frac, method=args.method,
                                         threshold=args.threshold, space=args.space)
    return build_atlas_ray(model, spec, shards=args.shards, address=args.address, layers=args.layers, out=out, k=args.k,
                           frac=args.frac, method=args.method, threshold=args.threshold, space=args.space,
                           num_gpus=args.num_gpus,
                           progress=not args.quiet)
