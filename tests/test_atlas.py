"""Tests for nbutils.atlas: every table against an independent computation, resume after kills, foreign files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbutils import activations, atlas, clustering, data, embeddings
from nbutils.cache import CacheError

K = 12
SMALL = dict(n_windows=24, window=16, k=6)  # the kill-and-resume builds (subprocesses)


@pytest.fixture(scope="module")
def built(model, windows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    return atlas.build_atlas(model, windows, k=K, out=folder / "a", cache_dir=folder / "cache", progress=False)


@pytest.fixture(scope="module")
def top(model, windows):
    return activations.collect_top_activations(model, windows, k=K, use_cache=False, progress=False)


def _busy(at: atlas.Atlas, layer: int) -> int:
    return int(at.most_polysemantic(1, layer=layer, min_examples=5)["neuron"].iloc[0])


def test_examples_match_the_collection_and_the_manifest_describes_the_build(built, top, windows):
    ex = built.table("examples")
    expected = top.examples
    pd.testing.assert_frame_equal(ex[["layer", "neuron", "window", "pos"]].reset_index(drop=True),
                                  expected[["layer", "neuron", "window", "pos"]].reset_index(drop=True))
    np.testing.assert_array_equal(ex["act"].to_numpy(), expected["act"].to_numpy())
    assert torch.equal(built.windows, windows)
    m = built.manifest
    assert m["status"] == "complete" and m["corpus"]["n_windows"] == len(windows) and m["settings"]["k"] == K
    assert all(step["status"] == "done" for step in m["steps"].values()) and len(m["steps"]) == 2 + 2 * 4  # collect, 2 per layer (clusters with bands, features), similar
    assert {"torch", "duckdb", "transformer_lens"} <= set(m["versions"])


def test_clusters_equal_clustering_of_independent_embeddings(built, model, windows):
    for layer in (0, 2):
        neuron = _busy(built, layer)
        ex = built.neuron_examples(layer, neuron)
        e = embeddings.neuron_embeddings(model, windows, layer, neuron, ex["window"].to_numpy().copy(),
                                         ex["pos"].to_numpy().copy()).numpy()
        # the invariant: the embeddings reproduce the stored activations through the neuron's own bias
        _, b = embeddings.mlp_in_weights(model, layer)
        pre = e.sum(1) + float(b[neuron])
        np.testing.assert_allclose(embeddings.mlp_activation(model, pre), ex["act"], atol=1e-4)
        labels = clustering.cluster(e)
        np.testing.assert_array_equal(ex["cluster"].to_numpy(), labels)
        centres = clustering.central_example(e, labels)
        assert sorted(np.flatnonzero(ex["is_central"].to_numpy())) == sorted(centres.tolist())
        row = built.neuron(layer, neuron)
        assert row["n_clusters"] == labels.max() + 1
        assert row["effective_clusters"] == pytest.approx(clustering.effective_n_clusters(labels))
        assert row["monosemanticity"] == pytest.approx(clustering.monosemanticity(e), abs=1e-6)


def test_an_atlas_in_space_h_clusters_h_and_says_so(built, model, windows, tmp_path):
    layer = 1
    at = atlas.build_atlas(model, windows, k=K, layers=[layer], space="h", out=tmp_path / "h",
                           cache_dir=tmp_path / "cache", progress=False)
    assert at.manifest["settings"]["space"] == "h" and at.manifest["key_hash"] != built.manifest["key_hash"]
    assert "on h)" in repr(at) and "space=h" in at.info() and "on h ⊙ w)" in repr(built)
    lx = clustering.layer_examples(model, windows, at.top, layer)
    for neuron in (_busy(built, layer), _busy(at, layer)):
        ex = at.neuron_examples(layer, neuron)
        h = lx.h[lx.rows(neuron)]  # [n, d_model], read independently of the build
        np.testing.assert_array_equal(ex["cluster"].to_numpy(), clustering.cluster(h))
        np.testing.assert_allclose(lx.vectors(neuron, "embedding"), lx.embeddings(neuron))
        labels = clustering.cluster(h)
        centres = clustering.central_example(h, labels)
        assert sorted(np.flatnonzero(ex["is_central"].to_numpy())) == sorted(centres.tolist())
        # the features' stored vectors (which the similar step compares) are the central examples' h
        vectors = pd.read_parquet(at.path / atlas.folder.layer_file("vectors", layer))
        vectors = vectors[vectors.neuron == neuron]
        big = np.flatnonzero(np.bincount(labels) >= at.settings.min_size)
        assert vectors.cluster.tolist() == big.tolist()
        np.testing.assert_allclose(np.stack(vectors.vector.to_numpy()), h[centres[big]], rtol=1e-5, atol=1e-6)


def _parquet_files(folder: Path) -> dict[str, pd.DataFrame]:
    return {str(f.relative_to(folder)): pd.read_parquet(f) for f in sorted(folder.rglob("*.parquet"))}


def test_a_build_replaying_stored_residuals_equals_one_running_the_model(model, windows, tmp_path, monkeypatch):
    from nbutils import residuals

    from nbutils.atlas import layers

    made, stored_h = [], []
    create, read_h = residuals.ResidualStore.create, layers._stored_h
    monkeypatch.setattr(residuals.ResidualStore, "create", lambda *a: made.append(create(*a)) or made[-1])
    monkeypatch.setattr(layers, "_stored_h", lambda *a: stored_h.append(a[3]) or read_h(*a))
    replayed = atlas.build_atlas(model, windows, k=K, out=tmp_path / "r", cache_dir=tmp_path / "c1", progress=False)
    assert len(made) == 1 and made[0].usable  # the layers pass and the cross activations replayed
    assert stored_h == list(range(model.cfg.n_layers))  # each layer's h read again from the store
    assert not made[0].folder.exists()  # the store's scratch folder is gone with the build
    monkeypatch.setattr(residuals, "DISK_BUDGET", 0)  # no store: every pass runs the model, and the build says why
    with pytest.warns(UserWarning, match=r"No residual store: it would take .* budget of 0\.0 GB"):
        ran = atlas.build_atlas(model, windows, k=K, out=tmp_path / "f", cache_dir=tmp_path / "c2", progress=False)
    assert len(made) == 2 and made[1] is None
    left, right = _parquet_files(replayed.path), _parquet_files(ran.path)
    assert left.keys() == right.keys() and len(left) > 20
    for name, table in left.items():
        other = right[name]
        if name == "similar.parquet":  # a dot product per request against the model's matrix product
            np.testing.assert_allclose(table.pop("cross_act"), other.pop("cross_act"), rtol=1e-5, atol=1e-6)
        pd.testing.assert_frame_equal(table, other, obj=name)


def test_the_default_space_keeps_the_keys_of_atlases_built_before_it(built, tmp_path):
    assert "space" not in atlas.settings.key_settings(built.settings)
    assert atlas.settings.key_settings(atlas.AtlasSettings(space="h"))["space"] == "h"
    old = tmp_path / "old"
    shutil.copytree(built.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["settings"]["space"]  # as written before the setting existed
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert atlas.Atlas.open(old).settings.space == "embedding"


def test_the_command_lines_spaces_are_the_packages():
    from nbutils import __main__

    assert __main__._SPACES == clustering.SPACES


def test_contexts_hold_the_neurons_activation_around_each_shown_example(built, model, windows):
    layer = 1
    neuron = _busy(built, layer)
    ctx = built.neuron_contexts(layer, neuron)
    ex = built.neuron_examples(layer, neuron)
    assert len(ctx) == int(ex["shown"].sum()) > 0
    full = activations.neuron_activations(model, windows, layer, neuron, ctx["window"].to_numpy().copy()).numpy()
    for i, row in enumerate(ctx.itertuples()):
        stop = min(row.pos + built.settings.after + 1, windows.shape[1])
        assert row.start == max(0, row.pos - built.settings.before)
        np.testing.assert_allclose(row.acts, full[i, row.start : stop], atol=1e-4)
    # tabs list each cluster's centre and its next examples by activation
    for c, members in ex.groupby("cluster"):
        if len(members) >= 2:
            assert members["shown"].sum() == min(len(members), built.settings.shown)
            assert members.loc[members["is_central"], "shown"].all()


def test_features_are_the_clusters_of_three_or_more_with_token_labels(built):
    ex, feats = built.table("examples"), built.table("features")
    sizes = ex.groupby(["layer", "neuron", "cluster"]).size()
    big = sizes[sizes >= 3]
    assert len(feats) == len(big)
    for row in feats.sample(min(25, len(feats)), random_state=0).itertuples():
        members = ex[(ex.layer == row.layer) & (ex.neuron == row.neuron) & (ex.cluster == row.cluster)]
        assert row.size == len(members)
        assert row.mean_act == pytest.approx(members["act"].mean(), rel=1e-5)
        centre = members[members["is_central"]]
        assert (row.window, row.pos) == (int(centre["window"].iloc[0]), int(centre["pos"].iloc[0]))
        counts = members["token"].value_counts()
        top_token, share = counts.index[0], counts.iloc[0] / len(members)
        if counts.iloc[0] > (counts.iloc[1] if len(counts) > 1 else 0):  # a unique most common token leads the label
            assert row.label.startswith(f"{json.dumps(top_token, ensure_ascii=False)} {100 * share:.0f}%")
    assert atlas.token_label([" the", " the", " a"]) == '" the" 67% · " a" 33%'


def test_similar_features_are_the_brute_force_nearest_of_other_neurons(built, model, windows):
    feats, sim = built.table("features"), built.table("similar")
    vecs = pd.concat([pd.read_parquet(built.path / f"vectors/layer={l:03d}.parquet") for l in built.layers])
    feats = feats.merge(vecs, on=["layer", "neuron", "cluster"])
    x = np.stack(feats["vector"].to_numpy()).astype(np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert set(sim["other_layer"]) != {0} or set(sim["layer"]) == {0}
    assert (sim["layer"] != sim["other_layer"]).any()  # across layers as well as within
    ex = built.table("examples")
    rng = np.random.default_rng(0)
    for i in rng.choice(len(feats), size=8, replace=False):
        f = feats.iloc[i]
        other = ~((feats["layer"] == f.layer) & (feats["neuron"] == f.neuron)).to_numpy()
        cos = u[other] @ u[i]
        best = np.argsort(-cos, kind="stable")[: built.settings.n_similar]
        got = sim[(sim.layer == f.layer) & (sim.neuron == f.neuron) & (sim.cluster == f.cluster)].sort_values("rank")
        np.testing.assert_allclose(got["similarity"], cos[best], atol=1e-5)
        first = got.iloc[0]
        mine = ex[(ex.layer == f.layer) & (ex.neuron == f.neuron) & (ex.cluster == f.cluster)]
        theirs = ex[(ex.layer == first.other_layer) & (ex.neuron == first.other_neuron) & (ex.cluster == first.other_cluster)]
        a, b = set(zip(mine.window, mine.pos)), set(zip(theirs.window, theirs.pos))
        assert first.shared_examples == pytest.approx(len(a & b) / len(a | b))
        members = mine.head(atlas.CROSS_MEMBERS)
        acts = activations.neuron_activations(model, windows, int(first.other_layer), int(first.other_neuron),
                                              members["window"].to_numpy().copy()).numpy()
        value = acts[np.arange(len(members)), members["pos"].to_numpy()].mean()
        max_act = float(built.neuron(int(first.other_layer), int(first.other_neuron))["max_act"])
        assert first.cross_act == pytest.approx(value / max_act, abs=1e-4)


def test_queries_search_and_ranking_match_pandas(built):
    neurons, ex, feats = built.table("neurons"), built.table("examples"), built.table("features")
    ranked = built.most_polysemantic(7)
    expected = neurons[neurons.n_examples >= 10].sort_values(["effective_clusters", "monosemanticity", "layer", "neuron"],
                                                              ascending=[False, True, True, True]).head(7)
    assert list(zip(ranked.layer, ranked.neuron)) == list(zip(expected.layer, expected.neuron))
    assert set(built.most_polysemantic(50, layer=2)["layer"]) == {2}
    token = ex.merge(feats[["layer", "neuron", "cluster"]])["token"].value_counts().index[0]
    found = built.search(token=token, limit=10**6)
    hits = ex[ex.token.str.strip().str.lower() == token.strip().lower()].merge(feats[["layer", "neuron", "cluster"]])
    counts = hits.groupby(["layer", "neuron", "cluster"]).size()
    assert len(found) == len(counts) and found["matches"].sum() == counts.sum()
    assert found["matches"].is_monotonic_decreasing
    word = "the"
    by_text = built.search(text=word.upper(), limit=10**6)
    text_hits = ex[ex.context.str.lower().str.contains(word, regex=False)].merge(feats[["layer", "neuron", "cluster"]])
    assert by_text["matches"].sum() == len(text_hits)
    assert built.sql("SELECT count(*) AS n FROM examples")["n"].iloc[0] == len(ex)
    with pytest.raises(ValueError, match="`query` failed"):
        built.sql("SELEC 1")
    with pytest.raises(ValueError, match="`token` must be given"):
        built.search()


def test_plain_sql_names_work_as_typed_and_the_old_quoted_view_still_answers(built):
    ex, sim = built.table("examples"), built.table("similar")
    rows = built.sql("select window_id, pos from examples order by layer, neuron, act desc, window_id")
    expected = ex.sort_values(["layer", "neuron", "act", "window"], ascending=[True, True, False, True])
    np.testing.assert_array_equal(rows["window_id"].to_numpy(), expected["window"].to_numpy())
    assert len(built.sql("select * from similar_features")) == len(sim) > 0
    assert len(built.sql('select * from "similar"')) == len(sim)  # the name that queries quoted before
    assert list(built.sql("select * from windows limit 1").columns) == ["window_id", "tokens"]
    assert "window" in built.neuron_examples(0, int(ex["neuron"].iloc[0])).columns  # DataFrames keep `window`


def test_open_reads_without_the_model_and_a_second_build_reuses_everything(built, model, windows):
    opened = atlas.Atlas.open(built.path)
    pd.testing.assert_frame_equal(opened.table("neurons"), built.table("neurons"))
    assert opened.str_tokens(3) == [opened.vocab[t] for t in windows[3].tolist()]
    before = {p: p.stat().st_mtime_ns for p in built.path.rglob("*.parquet")}
    again = atlas.build_atlas(model, windows, k=K, out=built.path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in built.path.rglob("*.parquet")} == before  # nothing recomputed
    assert again.path == built.path


def test_foreign_truncated_and_mismatched_files_are_refused(built, model, windows, tmp_path):
    other = atlas.build_atlas(model, windows[:20], k=4, layers=[1], out=tmp_path / "other", progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(built.path, copy)
    shutil.copy(other.path / "examples/layer=001.parquet", copy / "examples/layer=001.parquet")
    with pytest.raises(CacheError, match="belongs to another atlas"):
        atlas.Atlas.open(copy)
    shutil.copytree(built.path, tmp_path / "cut")
    target = tmp_path / "cut/similar.parquet"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CacheError, match="unreadable"):
        atlas.Atlas.open(tmp_path / "cut")
    with pytest.raises(CacheError, match="unreadable"):  # resuming verifies finished steps too
        atlas.build_atlas(model, windows, k=K, out=tmp_path / "cut", progress=False)
    with pytest.raises(CacheError, match="another model, corpus or settings"):
        atlas.build_atlas(model, windows, k=K + 1, out=built.path, progress=False)


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 37 * 5, 1 << 28])  # one row per block, 5 rows, one block
def test_nearest_other_is_brute_force(chunk_bytes):
    """The search equals the brute-force nearest rows of other owners, for any block size, with owners that leave
    some rows fewer than k candidates."""
    from nbutils.atlas.similar_features import _nearest_other

    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 6)).astype(np.float32)
    x[5] = x[9]  # an exact tie
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    owner = np.sort(rng.integers(0, 6, 37))
    owner[30:] = 99  # 7 rows of one owner: 30 candidates each
    k = 32
    ind, sim = _nearest_other(u, owner, k, chunk_bytes=chunk_bytes)
    cos = u.astype(np.float64) @ u.T.astype(np.float64)
    for i in range(len(u)):
        other = np.flatnonzero(owner != owner[i])
        best = other[np.lexsort((other, -np.round(cos[i, other], 5)))][:k]
        n_valid = min(k, len(other))
        assert (ind[i, n_valid:] == -1).all() and np.isnan(sim[i, n_valid:]).all()
        np.testing.assert_allclose(sim[i, :n_valid], cos[i, best], atol=1e-5)
        assert set(ind[i, :n_valid]) <= set(other) and len(set(ind[i, :n_valid])) == n_valid
        np.testing.assert_allclose(cos[i, ind[i, :n_valid]], cos[i, best], atol=1e-5)


def _brute_nearest_other(u: np.ndarray, owner: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    cos = u.astype(np.float64) @ u.T.astype(np.float64)
    cos[owner[:, None] == owner[None, :]] = -np.inf
    ind = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return ind, np.take_along_axis(cos, ind, axis=1)


@pytest.mark.parametrize("noise, extra, researched_rows", [(0.01, 27, "most"), (1.0, 3, "some"), (1.0, 27, "none")])
def test_nearest_other_proves_or_researches_every_row(monkeypatch, noise, extra, researched_rows):
    """Rows drawn around 40 centres. With tight clusters (noise 0.01: neighbours closer than the bfloat16 rounding)
    or few candidates, the bfloat16 ranking cannot prove some rows' candidates and those are searched again in
    float32; with loose clusters and the default candidates, all are proven. Every row equals the float64 brute
    force either way. Owners are shuffled, not contiguous."""
    from nbutils.atlas import similar_features as sf

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 48))
    x = centres[rng.integers(0, 40, 1500)] + noise * rng.standard_normal((1500, 48))
    u = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    owner = rng.permutation(np.repeat(np.arange(500), 3))
    researched = []
    real_search = sf._exact_rows
    monkeypatch.setattr(sf, "CANDIDATE_EXTRA", extra)
    monkeypatch.setattr(sf, "_exact_rows", lambda u32, own, rows, k: researched.append(len(rows))
                        or real_search(u32, own, rows, k))
    ind, sim = sf._nearest_other(u, owner, 5, chunk_bytes=2 * 1500 * 64)
    want, cos = _brute_nearest_other(u, owner, 5)
    np.testing.assert_allclose(sim, cos, atol=2e-6)
    close = np.abs(cos[:, :, None] - cos[:, None, :]).min(axis=2) < 2e-6  # exact ties may swap
    assert ((ind == want) | close).all()
    n = sum(researched)
    assert {"most": n > len(u) // 2, "some": 0 < n < len(u) // 2, "none": n == 0}[researched_rows], n


def test_outside_bound_holds():
    """The bfloat16 product never falls short of the float32 one by more than `_outside_bound` (before the
    product's own bfloat16 rounding, which the search adds), on vectors of all signs and scales of coordinates."""
    import torch

    from nbutils.atlas.similar_features import _outside_bound

    rng = np.random.default_rng(2)
    x = rng.standard_normal((600, 768)) * rng.lognormal(0, 2, (1, 768))
    u32 = torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    u16 = u32.bfloat16()
    exact = u32.double() @ u32.double().T
    approx = u16.double() @ u16.double().T  # the bfloat16 product, accumulated exactly
    bound = _outside_bound(u32, u16).double()
    assert ((exact - approx).abs() <= bound[:, None]).all()
    assert bound.max() < 0.02  # a bound the search can use: well below the gaps between neighbours


def test_similar_step_refuses_features_without_a_central_embedding(built, model, windows):
    feats = built.table("features")
    layer = int(feats["layer"].iloc[0])

    def vectors(l: int) -> pd.DataFrame:
        table = pd.read_parquet(built.path / f"vectors/layer={l:03d}.parquet")
        return table.iloc[:0] if l == layer else table.iloc[1:] if l == layer + 1 else table

    n_missing = int((feats["layer"] == layer).sum()) + int((feats["layer"] == layer + 1).any())
    with pytest.raises(CacheError, match=f"^{n_missing} features have no stored central embedding; rebuild"):
        atlas.similar_table(model, windows, feats, vectors, lambda l: built.table("examples", l),
                            built.top.max_act.numpy(), built.settings, int(windows.shape[1]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layers=[9]), ValueError, "`layers` must be in 0..3"),
    (dict(layers="0"), TypeError, "`layers` must be a list"),
    (dict(k=0), ValueError, "`k` must be in"),
    (dict(method="kmeans"), ValueError, "`method` must be one of"),
    (dict(shown=0), ValueError, "`shown` must be in"),
    (dict(colour="red"), TypeError, "unknown options"),
    (dict(space="pca"), ValueError, "`space` must be one of"),
])
def test_bad_arguments_name_the_argument(model, windows, kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        atlas.build_atlas(model, windows, out=tmp_path / "a", progress=False, **kwargs)


def test_out_that_is_a_file_and_top_of_other_windows_are_refused(model, windows, top, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="`out` must be a folder"):
        atlas.build_atlas(model, windows, k=K, out=file / "a", progress=False)
    with pytest.raises(ValueError, match="`top` must cover exactly the windows"):
        atlas.build_atlas(model, windows[:10], k=K, top=top, out=tmp_path / "b", progress=False)
    with pytest.raises(TypeError, match="`top` must be an activations.TopActivations"):
        atlas.build_atlas(model, windows, k=K, top=top.examples, out=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="No atlas at"):
        atlas.Atlas.open(tmp_path)


_BUILD = """
import sys
from nbutils import atlas, data, models
model = models.load_model()
windows = data.corpus_windows(model, n_windows={n_windows}, window={window})
atlas.build_atlas(model, windows, k={k}, out=sys.argv[1], cache_dir=sys.argv[2], progress=False, batch_size=4)
"""


def _run_build(out: Path, cache: Path, kill_when: str | None) -> int:
    """Build in a subprocess; with `kill_when`, SIGKILL it as soon as that file (glob) appears in `out`."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", _BUILD.format(**SMALL), str(out), str(cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while kill_when is not None and proc.poll() is None and time.time() < deadline:
        if list(out.glob(kill_when)) or list(cache.glob(kill_when)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=240)
    return proc.returncode


def test_a_killed_build_resumes_to_the_same_atlas(tmp_path):
    reference = tmp_path / "reference"
    assert _run_build(reference, tmp_path / "cache-ref", None) == 0
    expected = atlas.Atlas.open(reference)
    out, cache_dir = tmp_path / "killed", tmp_path / "cache"
    kills = 0
    # during collection (its checkpoint), after the collection step, after a layer's clusters, after features
    for target in ("**/checkpoint.parquet", "top.parquet", "examples/layer=001.parquet", "features/layer=002.parquet"):
        if _run_build(out, cache_dir, target) == -signal.SIGKILL:
            kills += 1
    assert kills >= 3, "the build finished before most kill points; make the test build larger"
    assert _run_build(out, cache_dir, None) == 0
    resumed = atlas.Atlas.open(out)
    for name in ("neurons", "examples", "contexts", "features", "similar"):
        left, right = resumed.table(name), expected.table(name)
        if name == "similar":  # a build resumed after its collection has no residual store: its cross activations
            # come from a forward pass, the uninterrupted build's from dot products on the store (float rounding)
            np.testing.assert_allclose(left.pop("cross_act"), right.pop("cross_act"), rtol=1e-5, atol=1e-6)
        pd.testing.assert_frame_equal(left, right, check_exact=True)
    assert torch.equal(resumed.windows, expected.windows)


def _assert_same_tables(left_tables: atlas.LayerTables, right_tables: atlas.LayerTables) -> None:
    for name in ("neurons", "examples", "contexts", "vectors", "bands"):
        left, right = getattr(left_tables, name), getattr(right_tables, name)
        for column in ("acts", "vector"):  # array columns: compare element by element
            if column in left.columns:
                assert all(np.array_equal(a, b) for a, b in zip(left[column], right[column]))
                left, right = left.drop(columns=column), right.drop(columns=column)
        pd.testing.assert_frame_equal(left, right, check_exact=True)


def test_layers_read_together_equal_each_layer_alone(model, windows, top, tmp_path):
    settings = atlas.AtlasSettings(k=K)
    together = list(atlas.layers_tables(model, windows, top, [1, 3], settings, memory_budget=1 << 40))
    alone = atlas.layer_tables(model, windows, top, 3, settings)
    assert [t.layer for t in together] == [1, 3]
    _assert_same_tables(together[1], alone)
    # budget 0: every layer's h goes to a file and is read back; two worker processes cluster blocks of neurons
    spilled = list(atlas.layers_tables(model, windows, top, [1, 3], settings, memory_budget=0, spill_dir=tmp_path,
                                       workers=2))
    assert [t.layer for t in spilled] == [1, 3] and not any(tmp_path.iterdir())  # the files are gone
    for a, b in zip(spilled, together):
        _assert_same_tables(a, b)


def test_band_samples_are_the_bands_module_sample_with_contexts(built, model, windows, top):
    from nbutils import bands

    stored = built.sql("SELECT * FROM bands ORDER BY layer, neuron, band DESC").rename(columns={"window_id": "window"})
    sample = bands.collect_band_samples(model, windows, top.max_act, bands=built.settings.bands,
                                        per_band=built.settings.per_band, progress=False).table
    cols = ["layer", "neuron", "band", "window", "pos"]
    left = stored[cols].sort_values(cols).reset_index(drop=True)
    right = sample[cols].sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right, check_dtype=False)
    row = stored.iloc[len(stored) // 2]
    acts = activations.neuron_activations(model, windows, int(row.layer), int(row.neuron), [int(row.window)])[0].numpy()
    np.testing.assert_allclose(row.acts, acts[row.start : row.start + len(row.acts)], atol=1e-4)
    assert row.token == built.vocab[int(windows[int(row.window), int(row.pos)])]


def test_decode_texts_is_batch_decode(model):
    """The fast batch decoder gives batch_decode's texts (special tokens, partial characters, empty lists), and a
    tokenizer that cleans up spaces keeps its own decoder."""
    import copy

    from nbutils.atlas.labels import decode_texts

    gen = np.random.default_rng(0)
    tok = model.tokenizer
    ids = [gen.integers(0, model.cfg.d_vocab, size=int(n)).tolist() for n in gen.integers(0, 12, size=300)]
    ids += [[tok.eos_token_id] * 3, [], [tok.eos_token_id, 11, tok.eos_token_id]]
    assert decode_texts(tok, ids) == tok.batch_decode(ids)
    cleaning = copy.copy(tok)
    cleaning.clean_up_tokenization_spaces = True
    calls = []
    cleaning.batch_decode = lambda seqs: calls.append(len(seqs)) or ["x"] * len(seqs)
    assert decode_texts(cleaning, ids) == ["x"] * len(ids) and calls == [len(ids)]
