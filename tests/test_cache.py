"""The cache never mixes runs: every file a run reads back (meta.json, checkpoint.parquet, result.parquet, further
tables) carries its run's key, and a file copied in from another run raises `CacheError`, leaving it in place."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from nbutils import activations, cache, topk

SETTINGS = dict(k=6, frac=0.5, batch_size=8, progress=False)


def _collect(model, windows, cache_dir, **kwargs):
    return activations.collect_top_activations(model, windows, cache_dir=cache_dir, **{**SETTINGS, **kwargs})


def _folders(root):
    return {p.name: p for p in (root / "top_activations").iterdir()}


def _interrupted(model, windows, cache_dir, monkeypatch, **kwargs):
    """Collect until the second batch, then stop as a KeyboardInterrupt would: a checkpoint is left behind."""
    original, calls = topk.merge_topk, []

    def failing(state, candidates, k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(state, candidates, k)

    before = set(_folders(cache_dir)) if (cache_dir / "top_activations").exists() else set()
    with monkeypatch.context() as patch:
        patch.setattr(topk, "merge_topk", failing)
        with pytest.raises(KeyboardInterrupt):
            _collect(model, windows, cache_dir, checkpoint_every=1, **kwargs)
    (new,) = set(_folders(cache_dir)) - before
    folder = _folders(cache_dir)[new]
    assert (folder / "checkpoint.parquet").exists()
    return folder


def test_files_copied_from_another_run_are_refused(model, windows, tmp_path):
    _collect(model, windows[:16], tmp_path)
    (mine,) = _folders(tmp_path).values()
    _collect(model, windows[:16], tmp_path, k=7)  # other settings
    (other_settings,) = set(_folders(tmp_path).values()) - {mine}
    _collect(model, windows[16:32], tmp_path)  # another corpus
    (other_corpus,) = set(_folders(tmp_path).values()) - {mine, other_settings}
    own = (mine / "result.parquet").read_bytes()
    for theirs in (other_settings, other_corpus):
        shutil.copy(theirs / "result.parquet", mine / "result.parquet")
        foreign = (mine / "result.parquet").read_bytes()
        with pytest.raises(cache.CacheError, match=r"result\.parquet was written by another run .*Nothing was deleted"):
            _collect(model, windows[:16], tmp_path)
        assert (mine / "result.parquet").read_bytes() == foreign  # left in place for the user to look at
    (mine / "result.parquet").write_bytes(own)
    shutil.copy(other_settings / "meta.json", mine / "meta.json")
    with pytest.raises(cache.CacheError, match=r"meta\.json was written by other settings"):
        _collect(model, windows[:16], tmp_path)


def test_a_checkpoint_copied_from_another_run_is_refused(model, windows, tmp_path, monkeypatch):
    mine = _interrupted(model, windows[:32], tmp_path, monkeypatch)
    theirs = _interrupted(model, windows[:32], tmp_path, monkeypatch, frac=0.9)  # other settings
    shutil.copy(theirs / "checkpoint.parquet", mine / "checkpoint.parquet")
    with pytest.raises(cache.CacheError, match=r"checkpoint\.parquet was written by another run"):
        _collect(model, windows[:32], tmp_path)


def test_tables_without_a_run_key_and_further_tables(tmp_path):
    run = cache.Run("demo", {"n": 1}, tmp_path)
    other = cache.Run("demo", {"n": 2}, tmp_path)
    table = pd.DataFrame({"a": [1, 2, 3]})
    run.save_finished(table)
    assert run.load_finished()[0].equals(table)
    # a parquet file written by plain pandas (no run key), e.g. a result of an older version
    table.to_parquet(run.result_path)
    with pytest.raises(cache.CacheError, match=r"result\.parquet carries no run key"):
        run.load_finished()
    # further tables of a run are tied to it the same way
    run.save_table("features", table)
    assert run.load_table("features").equals(table) and run.load_table("absent") is None
    other.save_table("features", table.iloc[:1])
    shutil.copy(other.folder / "features.parquet", run.folder / "features.parquet")
    with pytest.raises(cache.CacheError, match=r"features\.parquet was written by another run"):
        run.load_table("features")
    with pytest.raises(ValueError, match=r"`name` must be a plain identifier"):
        run.save_table("../result", table)


def test_the_key_records_the_cache_format(tmp_path):
    run = cache.Run("demo", {"n": 1}, tmp_path)
    assert run.key["cache_format"] == cache.CACHE_FORMAT
    run.save_finished(pd.DataFrame({"a": [1]}))
    assert '"cache_format": 2' in run.meta_path.read_text()


def test_the_offline_corpus_file_is_tied_to_its_inputs(tmp_path, monkeypatch):
    import gzip
    import json

    from nbutils import data

    monkeypatch.setenv("NBUTILS_CACHE", str(tmp_path))
    key = data._offline_key()
    path = tmp_path / "corpus" / f"offline-v3-py{key['python']}.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"key": key, "documents": ["one document", "another"]}, f)
    assert data._offline_documents() == ["one document", "another"]  # read back, not rebuilt
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"key": {**key, "fortunes": "0.0"}, "documents": ["from elsewhere"]}, f)
    with pytest.raises(cache.CacheError, match=r"offline-v3-py.*was built from other inputs.*Nothing was deleted"):
        data._offline_documents()
    assert path.exists()


def test_scratch_folder_removes_what_killed_processes_left(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its id now names no process
    stale = tmp_path / f"atlas-h-{dead.pid}-abc"
    live = tmp_path / f"atlas-h-{os.getppid()}-abc"  # a running process's folder is never touched
    other = tmp_path / f"other-{dead.pid}-abc"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "h.npy").write_bytes(b"x")
    with cache.scratch_folder("atlas-h-", tmp_path) as folder:
        assert folder.is_dir() and folder.parent == tmp_path and folder.name.startswith(f"atlas-h-{os.getpid()}-")
        assert not stale.exists() and live.exists() and other.exists()
        (folder / "h.npy").write_bytes(b"x")
    assert not folder.exists()
    with pytest.raises(RuntimeError):
        with cache.scratch_folder("atlas-h-", tmp_path) as folder:
            raise RuntimeError("a failed step")
    assert not folder.exists() and live.exists()
