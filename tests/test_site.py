"""The static site of an atlas (nbutils.site): its files and checksums, bad input, an interrupted export, and the
page itself in headless Chromium, opened from disk (file://) and from `python -m http.server`: requests stay in
the folder, no console error, a neuron page's text matches the parquet tables, search finds a neuron by its top
example's token, and a similar-feature link changes the URL and the page (and back returns).

The browser part needs Debian's Chromium (`bash scripts/install_browser.sh`); it is skipped where missing, except
in CI (`CI=true`), as in `test_browser.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from nbutils import atlas, site
from nbutils.__main__ import main as cli
from nbutils.cache import CacheError
from test_browser import _require_chromium, _stop, chromium

LAYERS = [0, 2]


@pytest.fixture(scope="module")
def built(model, windows, tmp_path_factory) -> atlas.Atlas:
    folder = tmp_path_factory.mktemp("site-atlas")
    return atlas.build_atlas(model, windows[:32], k=10, layers=LAYERS, out=folder / "atlas",
                             cache_dir=folder / "cache", progress=False)


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> Path:
    return site.export_site(built, tmp_path_factory.mktemp("site") / "out", progress=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Files


def test_the_folder_lists_every_file_with_its_checksum_and_the_tables_with_their_rows(built, exported):
    manifest = json.loads((exported / "site.json").read_text())
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()} - {"site.json"}
    assert set(manifest["files"]) == files
    for name, info in manifest["files"].items():
        assert info["bytes"] == (exported / name).stat().st_size and info["sha256"] == _sha256(exported / name)
    for layer in LAYERS:
        for table in ("neurons", "examples", "contexts", "features"):
            name = f"tables/{table}/layer={layer:03d}.parquet"
            assert manifest["files"][name]["rows"] == len(pd.read_parquet(exported / name)) == len(
                built.table(table, layer))
        for block in range(-(-built.d_mlp // site.BLOCK)):
            assert f"data/L{layer}/B{block}.js" in files
    assert manifest["files"]["tables/similar.parquet"]["rows"] == len(built.table("similar"))
    assert _sha256(exported / "tables" / "manifest.json") == _sha256(built.path / "manifest.json")
    assert manifest["bytes"] == site.site_bytes(exported) == sum(f["bytes"] for f in manifest["files"].values())
    for name in site.ASSETS:  # nothing from outside the folder: no absolute URL in the page, script or style
        text = (exported / name).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
        assert "//cdn" not in text and "@import" not in text


def test_exporting_again_replaces_an_earlier_export(built, exported, tmp_path):
    out = tmp_path / "again"
    assert cli(["atlas", "export-site", str(built.path), str(out), "--quiet"]) == 0
    assert json.loads((out / "site.json").read_text())["atlas_key"] == built.manifest["key_hash"]
    (out / "stale.txt").write_text("left from an earlier export")
    site.export_site(built.path, out, progress=False)
    assert not (out / "stale.txt").exists() and (out / "index.html").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# --------------------------------------------------------------------------------------------------
# Bad input


def test_a_folder_that_is_not_a_finished_atlas_is_refused(built, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No atlas at .* \(no manifest.json\)"):
        site.export_site(tmp_path, tmp_path / "out", progress=False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(built.path, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["status"] = "running"
    del manifest["steps"]["similar"]
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="is unfinished .*next step: similar"):
        site.export_site(unfinished, tmp_path / "out", progress=False)
    with pytest.raises(TypeError, match="`atlas` must be an Atlas or an atlas folder"):
        site.export_site(3, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_of_other_files_or_under_a_file_is_refused(built, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="`out` must be a new or empty folder, or an earlier export of a site.*"
                                         "nothing was changed"):
        site.export_site(built, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="`out` must be a folder; got .*which lies under the file"):
        site.export_site(built, tmp_path / "file" / "site", progress=False)
    with pytest.raises(ValueError, match="`out` must be a folder; got the existing file"):
        site.export_site(built, tmp_path / "file", progress=False)
    assert cli(["atlas", "export-site", str(built.path), str(other), "--quiet"]) == 2
    assert cli(["atlas", "export-site", str(tmp_path), str(tmp_path / "x"), "--quiet"]) == 2


def test_an_interrupted_export_leaves_no_site_and_keeps_an_earlier_one(built, tmp_path, monkeypatch):
    out = tmp_path / "site"
    site.export_site(built, out, progress=False)
    before = _sha256(out / "site.json")
    calls = []

    def dies_midway(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = site._script
    monkeypatch.setattr(site, "_script", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        site.export_site(built, out, progress=False)
    assert _sha256(out / "site.json") == before  # the earlier export is untouched
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        site.export_site(built, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()  # no half-site that looks complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # and no temporary folder left


# --------------------------------------------------------------------------------------------------
# In the browser


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """`python -m http.server` on 127.0.0.1 serving `folder`; stopped by its process id."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"http.server did not listen on port {port} within 30 s")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(proc.pid)


def _until(driver, script: str, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.time() > deadline:
            text = driver.execute_script("return document.body ? document.body.innerText.slice(0, 500) : ''")
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; page: {text!r}")
        time.sleep(0.02)


def _shown(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "⇥")


def _open_neuron(driver, layer: int, neuron: int) -> float:
    """Change the hash to a neuron's page; seconds until it is drawn."""
    started = time.time()
    driver.execute_script(f"location.hash = '#L{layer}N{neuron}'")
    _until(driver, f"return !!document.querySelector('.ne-neuron[data-layer=\"{layer}\"][data-neuron=\"{neuron}\"]')",
           30, f"the page of L{layer}N{neuron}")
    return time.time() - started


_PAGE = """
const q = (s) => Array.from(document.querySelectorAll(s));
return {
  label: document.querySelector('.ne-neuron-label').innerText,
  features: q('.ne-feature').map(r => ({cluster: +r.dataset.cluster,
      label: r.querySelector('.ne-feature-label').innerText,
      central: r.querySelector('.ne-central').textContent,
      window: +r.querySelector('.ne-central').dataset.window, pos: +r.querySelector('.ne-central').dataset.pos,
      similar: Array.from(r.querySelectorAll('.ne-similar-link')).map(a => a.dataset.key)})),
};
"""


def _check_neuron_page(driver, at: atlas.Atlas, layer: int, neuron: int) -> None:
    """The page's label, features, central examples and similar features equal the parquet tables'."""
    page = driver.execute_script(_PAGE)
    row = at.neuron(layer, neuron)
    assert page["label"] == (row["label"] or "(no examples)")
    feats = at.sql("SELECT * FROM features WHERE layer = ? AND neuron = ? ORDER BY size DESC, cluster", [layer, neuron])
    assert [f["cluster"] for f in page["features"]] == feats["cluster"].tolist()
    assert [f["label"] for f in page["features"]] == feats["label"].tolist()
    contexts = at.neuron_contexts(layer, neuron).set_index(["window", "pos"])
    similar = at.similar_to(layer, neuron)
    vocab, windows = at.vocab, at.windows
    for shown, f in zip(page["features"], feats.itertuples(index=False)):
        assert (shown["window"], shown["pos"]) == (f.window_id, f.pos)
        ctx = contexts.loc[(f.window_id, f.pos)]
        tokens = windows[f.window_id, int(ctx["start"]):int(ctx["start"]) + len(ctx["acts"])].tolist()
        assert shown["central"] == "".join(_shown(vocab[t]) for t in tokens)
        near = similar[similar["cluster"] == f.cluster].sort_values("rank")
        assert shown["similar"] == [f"{r.other_layer}/{r.other_neuron}/{r.other_cluster}" for r in
                                    near.itertuples(index=False)]


def _requests_outside(driver, root: str) -> list[str]:
    """URLs the page requested (Chromium's network log) that lie outside `root` (inline `data:` URLs excepted)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent" and params.get("documentURL", "").startswith(root):
            urls.append(params["request"]["url"])  # what the site's page asked for
    assert any(u.endswith("/data/overview.js") for u in urls), f"the network log misses the data files: {urls}"
    return [u for u in urls if not u.startswith((root, "data:"))]


@pytest.mark.parametrize("how", ["file", "http"])
def test_the_site_in_chromium(built, exported, how):
    _require_chromium()
    at = atlas.Atlas.open(built.path)
    neurons = at.sql("SELECT layer, neuron FROM features GROUP BY layer, neuron ORDER BY count(*) DESC, layer, neuron")
    sample = [tuple(map(int, r)) for r in neurons.groupby("layer").head(2).itertuples(index=False)]
    with (http_server(exported) if how == "http" else nullcontext(exported.as_uri() + "/")) as root, \
            chromium(logs=True) as driver:
        driver.get_log("performance")  # the browser's own start-up requests are not the site's
        started = time.time()
        driver.get(root + "index.html")
        _until(driver, f"return document.querySelectorAll('.ne-layer').length === {len(LAYERS)}", 30, "the overview")
        overview = time.time() - started
        shown = [_open_neuron(driver, layer, neuron) for layer, neuron in sample]
        for layer, neuron in sample:
            _open_neuron(driver, layer, neuron)
            _check_neuron_page(driver, at, layer, neuron)

        # search: a neuron's top example's token finds it
        layer, neuron = sample[0]
        _open_neuron(driver, layer, neuron)
        top_token = at.neuron_examples(layer, neuron)["token"].iloc[0]
        holders = at.sql("SELECT count(DISTINCT (layer, neuron)) AS n FROM examples WHERE lower(trim(token)) = "
                         "lower(trim(?))", [top_token])["n"].iloc[0]
        driver.find_element("id", "ne-query").send_keys(top_token.strip())
        hrefs = _until(driver, "const a = Array.from(document.querySelectorAll('#ne-results a.ne-result'));"
                               "return a.length ? a.map(x => x.getAttribute('href')) : null", 30, "search results")
        if holders <= site.SEARCH_NEURONS:
            assert f"#L{layer}N{neuron}" in hrefs
        assert len(hrefs) >= 1

        # a similar-feature link changes the URL and the page; back returns
        link = driver.execute_script("const a = document.querySelector('.ne-similar-link'); a.click();"
                                     "return a.getAttribute('href')")
        _until(driver, f"return location.hash === '{link}'", 10, "the URL of the similar feature")
        other_layer, other_neuron = map(int, link[2:].split("N"))
        _until(driver, f"return !!document.querySelector('.ne-neuron[data-layer=\"{other_layer}\"]"
                       f"[data-neuron=\"{other_neuron}\"]')", 30, "the similar feature's page")
        _check_neuron_page(driver, at, other_layer, other_neuron)
        driver.back()
        _until(driver, f"return location.hash === '#L{layer}N{neuron}' && !!document.querySelector("
                       f"'.ne-neuron[data-neuron=\"{neuron}\"]')", 10, "the page before, after going back")

        outside = _requests_outside(driver, root)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not outside, f"requests outside the folder: {outside}"
    assert not errors, f"console errors: {errors}"
    print(f"\n{how}: overview shown {overview:.2f} s after the request; neuron pages "
          f"{', '.join(f'{s:.2f}' for s in shown)} s after the hash change (first ones load their block)")

