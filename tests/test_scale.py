"""Scale-out on Ray: identical to one process at 1, 2 and 4 shards, retried workers, restarts and clear errors.

One local Ray cluster with 2 CPUs serves the module; it is shut down at the end.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from nbutils import __main__ as cli
from nbutils import activations, atlas, scale

pytest.importorskip("ray")

K, FRAC, BATCH = 16, 0.75, 16
SPEC = scale.CorpusSpec(n_windows=64, window=32)  # 4 batches of 16 windows


@pytest.fixture(scope="module")
def cluster():
    session = scale.connect(num_cpus=2)  # ray.init(num_cpus=2), retried if the busy machine misses Ray's start-up timeout
    assert session.started, "another Ray connection was open"
    yield
    session.close()


@pytest.fixture(scope="module")
def one_pass(model):
    """The in-process reference: one pass over all windows."""
    return activations.collect_top_activations(model, SPEC.windows(model), k=K, frac=FRAC, batch_size=BATCH,
                                               use_cache=False, progress=False)


def _collect(cache_dir, **kwargs):
    options = dict(shards=2, k=K, frac=FRAC, batch_size=BATCH, cache_dir=cache_dir, progress=False)
    options.update(kwargs)
    return scale.collect_ray(None, SPEC, **options)


def _assert_same(a, b) -> None:
    for name in ("act", "window", "pos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), f"state tensor `{name}` differs"
    assert a.window_ranges == ((0, SPEC.n_windows),) or sum(hi - lo for lo, hi in a.window_ranges) == SPEC.n_windows


def test_shard_bounds_fall_on_batches():
    for n, shards, batch in [(64, 4, 16), (100, 3, 16), (65, 5, 16), (10, 1, 64)]:
        bounds = scale.shard_bounds(n, shards, batch)
        assert len(bounds) == shards and bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b for a, b in bounds), bounds
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:])), "shards must be contiguous"
        assert all(a % batch == 0 for a, _ in bounds), f"a boundary is not a multiple of {batch}: {bounds}"
    with pytest.raises(ValueError, match=r"`shards` must be in 1\.\.4 .*4 batches of 16"):
        scale.shard_bounds(64, 5, 16)


@pytest.mark.parametrize("shards", [2, 1, 4])  # 2 first: both workers start at once
def test_identical_to_one_pass(cluster, one_pass, tmp_path, shards):
    top = _collect(tmp_path, shards=shards)
    _assert_same(top, one_pass)
    assert top.n_windows == SPEC.n_windows
    assert len(top.window_ranges) == shards


def test_restart_skips_finished_shards(cluster, one_pass, tmp_path):
    _collect(tmp_path, shards=4)
    results = sorted((tmp_path / "top_activations").glob("*/result.parquet"))
    assert len(results) == 4, "each shard keeps its result in the cache"
    written = {path: path.stat().st_mtime_ns for path in results}
    lost = results[2]  # as if the driver had been killed before this shard finished
    for path in lost.parent.iterdir():
        path.unlink()
    lost.parent.rmdir()
    top = _collect(tmp_path, shards=4)
    _assert_same(top, one_pass)
    assert lost.exists(), "the missing shard was collected again"
    for path, mtime in written.items():
        if path != lost:
            assert path.stat().st_mtime_ns == mtime, f"finished shard {path.parent.name} was recomputed"


def test_unreachable_address_fails_fast(cluster, tmp_path, monkeypatch):
    with pytest.raises(ConnectionError, match=r"`address` = '127\.0\.0\.1:1'.*ray start --head"):
        _collect(tmp_path, address="127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConnectionError, match=r"`RAY_ADDRESS` = '127\.0\.0\.1:1'"):
        _collect(tmp_path)
    with pytest.raises(ValueError, match=r"`address` must be a Ray cluster address"):
        _collect(tmp_path, address="no-port-here")


def test_model_that_workers_cannot_load(cluster, tmp_path, capfd):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"`model_spec` '.*not-a-model' could not be loaded on a Ray worker") as err:
        scale.collect_ray(folder, SPEC, shards=2, k=K, batch_size=BATCH, cache_dir=tmp_path, progress=False)
    assert "Traceback" not in str(err.value) and err.value.__cause__ is None
    gc.collect()  # Ray reports failed objects that nobody read when they are freed: there must be none
    time.sleep(1.0)
    assert "Unhandled error" not in capfd.readouterr().err


def test_corpus_that_workers_cannot_build(cluster, tmp_path):
    spec = scale.CorpusSpec(n_windows=10**8, window=32)
    with pytest.raises(ValueError, match=r"`corpus_spec` .* could not be turned into windows.*`n_windows` must be at most"):
        scale.collect_ray(None, spec, shards=1, k=K, batch_size=BATCH, cache_dir=tmp_path, progress=False)


def test_atlas_identical_to_in_process_build(cluster, model, tmp_path):
    options = dict(k=K, frac=FRAC, batch_size=BATCH, layers=[0, 3], progress=False)
    reference = atlas.build_atlas(model, SPEC.windows(model), out=tmp_path / "one", cache_dir=tmp_path / "c1", **options)
    built = scale.build_atlas_ray(None, SPEC, shards=4, out=tmp_path / "ray", cache_dir=tmp_path / "c2", **options)
    assert built.manifest["key_hash"] == reference.manifest["key_hash"]
    for name in ("neurons", "examples", "contexts", "features", "similar"):
        left, right = built.table(name), reference.table(name)
        if name == "similar":  # in process, cross activations are dot products on the residual store; Ray runs the model
            np.testing.assert_allclose(left.pop("cross_act"), right.pop("cross_act"), rtol=1e-5, atol=1e-6)
        pd.testing.assert_frame_equal(left, right, obj=f"table {name}")
    assert built.manifest["steps"].keys() == reference.manifest["steps"].keys()


def test_command_line(cluster, tmp_path, capsys):
    args = ["atlas", "build", "--windows", "64", "--window", "32", "--k", "8", "--layers", "1", "--quiet", "--ray"]
    assert cli.main(args + ["--shards", "1", "--out", str(tmp_path / "a")]) == 0
    assert "layers    [1]" in capsys.readouterr().out  # the atlas's info, printed at the end
    assert atlas.Atlas.open(tmp_path / "a").layers == [1]
    assert cli.main(args + ["--shards", "2"]) == 2  # 64 windows are one batch of 64
    assert "`shards` must be in 1..1" in capsys.readouterr().err
    assert cli.main(args + ["--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "`address` = '127.0.0.1:1'" in err and len(err.strip().splitlines()) == 1, err


# Last of the Ray tests: the replacement worker starts while nothing waits for it.
def test_worker_killed_mid_shard_is_retried(cluster, one_pass, tmp_path):
    marker = tmp_path / "killed"
    top = _collect(tmp_path / "cache", shards=2, _kill_marker=marker)
    assert marker.exists(), "the first attempt of shard 0 did not run the kill hook"
    _assert_same(top, one_pass)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"`corpus_spec` must be a scale.CorpusSpec"):
        scale.collect_ray(None, {"n_windows": 64}, shards=1)
    with pytest.raises(ValueError, match=r"`split` must be one of 'train', 'heldout'"):
        scale.CorpusSpec(split="test")
    with pytest.raises(ValueError, match=r"`k` must be in 1\.\."):
        scale.collect_ray(None, SPEC, shards=1, k=0)


def test_without_ray(monkeypatch):
    code = ("import sys; sys.modules['ray'] = None\n"
            "import nbutils.scale, nbutils.activations\n"
            "try:\n    nbutils.scale.connect()\n"
            "except ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert 'pip install -e ".[scale]"' in out.stdout, out.stdout + out.stderr
