"""A static site of an atlas: a folder of plain files that any number of readers open without Python, a kernel or
a server. It works opened straight from disk (`file://`), served by `python -m http.server` (no HTTP Range
requests) or from any static host, and fetches nothing from outside the folder.

`export_site(atlas, out)` writes:

- `index.html`, `site.js`, `site.css`: the page, copied from the package's `site_assets/`. The neuron is in the
  URL (`index.html#L2N317`), so links can be shared and back/forward work.
- `data/overview.js`: per layer, the polysemy distribution and the most polysemantic neurons.
- `data/vocab.js`: the text of every token id.
- `data/L{layer}/B{block}.js`: everything a neuron page shows, for `BLOCK` neurons of a layer (numbers, feature
  clusters with central examples, shown examples with the neuron's activation on each token, band examples, the
  2-D map, similar features). Data files are scripts that call `NE.data(name, value)`: a `<script>` tag loads
  them on demand, which works from `file://`, where `fetch` is refused.
- `data/search.js`: the search index (token -> neurons, and every neuron's label), loaded on the first search.
- `tables/`: the atlas's parquet tables (snappy) and its `manifest.json`, as downloads.
- `site.json`: what was exported (the atlas's key, block size) and every file's bytes, sha256 and, for tables,
  row count.

The folder is written under a temporary name beside `out` and renamed into place when complete, so an interrupted
export never leaves a half-site. Memory is bounded by one layer's tables (streamed layer by layer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nbutils import cache as _cache
from nbutils import clustering
from nbutils._validation import check_path, fail

__all__ = ["BLOCK", "SITE_FORMAT", "export_site", "site_bytes"]

BLOCK = 64  # neurons of one layer per data file (about 0.6 MB at the default size: loaded and parsed at once)
SITE_FORMAT = 1
TOP_NEURONS = 12  # most polysemantic neurons listed per layer in the overview
SEARCH_NEURONS = 60  # neurons kept per token in the search index, most matching examples first
ASSETS = ("index.html", "site.js", "site.css")
_MARKER = "nbutils.site"  # `site.json`'s generator: an earlier export may be replaced
_SKIPPED = ("vectors/",)  # the central embeddings: internal to the build, not a download
BAND_SHOWN = 3  # band examples shown per band (the atlas samples more; the download has them all)


# --------------------------------------------------------------------------------------------------
# Reading the atlas: the one place that names its tables and columns


def _layer_tables(at: Any, layer: int) -> dict[str, pd.DataFrame]:
    """One layer's tables of the atlas, with the column names the site uses (`win` for the atlas's `window_id`)."""
    rename = {"window": "win", "window_id": "win", "other_layer": "o_layer", "other_neuron": "o_neuron",
              "other_cluster": "o_cluster", "other_size": "o_size"}  # per-layer files say `window`, SQL `window_id`
    tables = {name: at.table(name, layer).rename(columns=rename)
              for name in ("neurons", "examples", "contexts", "features", "similar")}
    bands = at.path / "bands" / f"layer={layer:03d}.parquet"
    tables["bands"] = pd.read_parquet(bands).rename(columns=rename) if bands.exists() else pd.DataFrame(
        {c: [] for c in ("neuron", "band", "win", "pos", "act", "start", "acts")})
    return tables


def _table_files(at: Any) -> list[str]:
    """The atlas's parquet files offered as downloads (relative paths, as its manifest lists them)."""
    names = sorted({name for step in at.manifest["steps"].values() for name in step["files"]})
    return [n for n in names if not n.startswith(_SKIPPED)]


# --------------------------------------------------------------------------------------------------
# Plain data for the page


def _num(values: Any, digits: int = 3) -> list:
    """Rounded floats as a JSON-able list (NaN and inf -> null)."""
    arr = np.asarray(values, dtype=np.float64)
    out = np.round(arr, digits).tolist()
    if not np.isfinite(arr).all():
        out = [v if np.isfinite(v) else None for v in out]
    return out


def _span(tokens: np.ndarray, start: int, acts: Any, max_act: float) -> list:
    """`[start, token ids, activations in % of the neuron's max]` of the tokens `start..` of one window that `acts`
    covers (percentages: integers, compact; the page colours by them)."""
    pct = np.rint(100.0 * np.asarray(acts, dtype=np.float64) / max_act).astype(np.int64)
    return [int(start), tokens[start:start + len(pct)].tolist(), pct.tolist()]


def _histogram(values: np.ndarray) -> dict:
    """Counts of the effective number of clusters in bins of 0.5 (the last bin open)."""
    top = max(4.0, float(np.ceil(values.max(initial=0.0) * 2) / 2))
    edges = np.arange(0.0, min(top, 10.0) + 0.5, 0.5)
    counts, _ = np.histogram(np.minimum(values, edges[-1] - 1e-9), bins=edges)
    return {"edges": _num(edges), "counts": counts.tolist()}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _by_neuron(table: pd.DataFrame, d_mlp: int, floats: tuple[str, ...] = (), digits: int = 3
               ) -> tuple[dict[str, list], np.ndarray]:
    """A table sorted by neuron as plain column lists (`floats` rounded to `digits`), and each neuron's row range
    `bounds[n]:bounds[n + 1]`."""
    columns = {c: (_num(table[c], digits) if c in floats else table[c].tolist()) for c in table.columns}
    bounds = np.searchsorted(table["neuron"].to_numpy(), np.arange(d_mlp + 1))
    return columns, bounds


def _neuron_records(t: dict[str, pd.DataFrame], windows: np.ndarray, labels: dict, d_mlp: int) -> list[dict]:
    """One record per neuron 0..d_mlp-1 of a layer: what its page shows."""
    keys = ["neuron", "win", "pos"]
    ctx = t["contexts"][keys + ["start", "acts"]]
    ex = t["examples"].sort_values(["neuron", "act"], ascending=[True, False], kind="stable")
    ex["size"] = ex.groupby(["neuron", "cluster"])["cluster"].transform("size")
    shown = ex[ex["shown"]].merge(ctx, on=keys, how="left", validate="one_to_one")
    features = t["features"].sort_values(["neuron", "size", "cluster"], ascending=[True, False, True])
    features = features.merge(ctx, on=keys, how="left", validate="many_to_one")
    similar = t["similar"].sort_values(["neuron", "cluster", "rank"], kind="stable")
    bands = t["bands"].sort_values(["neuron", "band", "act"], ascending=[True, False, False], kind="stable")
    bands = bands.groupby(["neuron", "band"], sort=False).head(BAND_SHOWN)
    E, eb = _by_neuron(ex[["neuron", "x", "y", "cluster", "is_central"]], d_mlp, ("x", "y"), digits=2)
    S, sb = _by_neuron(shown[["neuron", "cluster", "size", "is_central", "act", "pos", "win", "start", "acts"]], d_mlp,
                       ("act",))
    F, fb = _by_neuron(features[["neuron", "cluster", "size", "mean_act", "label", "act", "pos", "win", "start",
                                 "acts"]], d_mlp, ("mean_act", "act"))
    M, mb = _by_neuron(similar[["neuron", "cluster", "o_layer", "o_neuron", "o_cluster", "o_size", "similarity"]],
                       d_mlp, ("similarity",))
    B, bb = _by_neuron(bands[["neuron", "band", "act", "pos", "win", "start", "acts"]], d_mlp, ("act",))
    N = t["neurons"].sort_values("neuron")
    if len(N) != d_mlp or not (N["neuron"].to_numpy() == np.arange(d_mlp)).all():
        fail("atlas", f"hold one `neurons` row per neuron 0..{d_mlp - 1} of each layer", f"{len(N)} rows")
    N, _ = _by_neuron(N, d_mlp, ("max_act", "effective_clusters", "monosemanticity"))
    records = []
    for n in range(d_mlp):
        top = N["max_act"][n] if N["max_act"][n] and N["max_act"][n] > 0 else 1.0  # the scale of context activations
        rec: dict[str, Any] = {
            "neuron": n, "label": _text(N["label"][n]), "max_act": N["max_act"][n], "n_examples": N["n_examples"][n],
            "dead": bool(N["dead"][n]), "n_clusters": N["n_clusters"][n], "n_singletons": N["n_singletons"][n],
            "effective_clusters": N["effective_clusters"][n], "monosemanticity": N["monosemanticity"][n],
        }
        e = slice(eb[n], eb[n + 1])
        if e.start < e.stop:  # every example: x, y, cluster, is central
            rec["map"] = [E["x"][e], E["y"][e], E["cluster"][e], [int(v) for v in E["is_central"][e]]]
        rec["examples"] = [  # shown examples: [cluster, cluster size, is central, act, pos, start, token ids, acts]
            [S["cluster"][i], S["size"][i], int(S["is_central"][i]), S["act"][i], S["pos"][i],
             *_span(windows[S["win"][i]], S["start"][i], S["acts"][i], top)] for i in range(sb[n], sb[n + 1])]
        sim = range(mb[n], mb[n + 1])
        rec["features"] = [{
            "cluster": F["cluster"][i], "size": F["size"][i], "mean_act": F["mean_act"][i],
            "label": _text(F["label"][i]), "act": F["act"][i], "pos": F["pos"][i], "win": F["win"][i],
            "central": _span(windows[F["win"][i]], F["start"][i], F["acts"][i], top),
            "similar": [  # [layer, neuron, cluster, size, similarity, label]
                [M["o_layer"][j], M["o_neuron"][j], M["o_cluster"][j], M["o_size"][j], M["similarity"][j],
                 labels.get((M["o_layer"][j], M["o_neuron"][j], M["o_cluster"][j]), "")]
                for j in sim if M["cluster"][j] == F["cluster"][i]],
        } for i in range(fb[n], fb[n + 1])]
        rec["bands"] = [  # [band, act, pos, start, token ids, acts]
            [B["band"][i], B["act"][i], B["pos"][i], *_span(windows[B["win"][i]], B["start"][i], B["acts"][i], top)]
            for i in range(bb[n], bb[n + 1])]
        records.append(rec)
    return records


def _search_rows(t: dict[str, pd.DataFrame], layer: int, d_mlp: int) -> pd.DataFrame:
    """(token key, neuron id, matching examples) of one layer; token key: lower-case text without outer spaces."""
    ex = t["examples"]
    key = ex["token"].str.strip().str.lower()
    rows = pd.DataFrame({"key": key, "gid": layer * d_mlp + ex["neuron"].astype(np.int64)})
    rows = rows[rows["key"] != ""]
    return rows.groupby(["key", "gid"], sort=False).size().rename("count").reset_index()


def _search_index(rows: list[pd.DataFrame]) -> dict[str, list[int]]:
    """token key -> neuron ids (`layer * d_mlp + neuron`), most matching examples first, at most `SEARCH_NEURONS`."""
    if not rows:
        return {}
    table = pd.concat(rows, ignore_index=True).sort_values(["key", "count", "gid"], ascending=[True, False, True])
    table = table.groupby("key", sort=False).head(SEARCH_NEURONS)
    return {k: g.tolist() for k, g in table.groupby("key", sort=True)["gid"]}


# --------------------------------------------------------------------------------------------------
# Writing


def _script(path: Path, name: str, value: Any) -> None:
    """A data file: a script that hands `value` to the page (`NE.data(name, value)`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    path.write_text(f"NE.data({json.dumps(name)},{text});\n", encoding="utf-8")


def _copy(src: Path, dst: Path) -> str:
    """Copy a file in chunks; return its sha256."""
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()



def _check_out(out: Any) -> Path:
    """`out`: a folder that does not exist, is empty, or holds an earlier export; its parent must be writable."""
    path = check_path("out", out, what="a folder path").resolve()
    if path.exists():
        if not path.is_dir():
            fail("out", "be a folder", f"the existing file {path}", "Pass another folder.")
        if any(path.iterdir()) and not _is_export(path):
            fail("out", "be a new or empty folder, or an earlier export of a site", f"{path}, which holds other "
                 "files", "Pass another folder; nothing was changed.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail("out", "be a folder", f"{path}, which lies under the file {parent}", "Pass another folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail("out", "be in a folder you can write", f"{path} ({parent} is not writable)", "Pass another folder.")
    return path


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / "site.json").read_text()).get("generator") == _MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _open_atlas(atlas: Any) -> Any:
    from nbutils import atlas as atlas_module

    if isinstance(atlas, atlas_module.Atlas):
        return atlas_module.Atlas.open(atlas.path)  # checked again: the folder may have changed since it was opened
    return atlas_module.Atlas.open(check_path("atlas", atlas, what="an Atlas or an atlas folder"))


def export_site(atlas: Any, out: str | os.PathLike, *, progress: bool = True) -> Path:
    """Write the static site of `atlas` into the folder `out` (module docstring) and return its path.

    Args:
        atlas: an `atlas.Atlas`, or the folder of a finished atlas.
        out: the site's folder: new, empty, or an earlier export (replaced as a whole once the new one is complete).
        progress: a tqdm bar over the layers.

    Raises:
        FileNotFoundError / cache.CacheError: `atlas` is not a finished atlas.
        ValueError: `out` is a file, a folder of other files, or not writable.
    """
    at = _open_atlas(atlas)
    path = _check_out(out)
    tmp = path.with_name(f".{path.name}.export-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        fail("out", "be in a folder you can write", f"{path} ({err.strerror})", "Pass another folder.")
    started = time.perf_counter()
    try:
        _write_site(at, tmp, progress=progress)
        manifest = json.loads((tmp / "site.json").read_text())
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "site.json").write_text(json.dumps(manifest, indent=1) + "\n")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)  # an earlier export (checked above), replaced as a whole
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def site_bytes(out: str | os.PathLike) -> int:
    """Bytes of every file of an exported site (as its `site.json` records them)."""
    return int(json.loads((Path(out) / "site.json").read_text())["bytes"])


def _write_site(at: Any, root: Path, *, progress: bool) -> None:
    """Every file of the site into `root` (a fresh folder), one layer's tables in memory at a time."""
    from tqdm.auto import tqdm

    from nbutils.explorer import POLYSEMANTIC_MIN

    assets = resources.files("nbutils") / "site_assets"
    for name in ASSETS:
        (root / name).write_bytes((assets / name).read_bytes())
    d_mlp = at.d_mlp
    windows = at.windows.numpy()
    _script(root / "data" / "vocab.js", "vocab", at.vocab)
    labels: dict = {}
    for layer in at.layers:  # every feature's label, so that similar features are named on the page
        f = at.table("features", layer)
        labels.update(zip(zip(f["layer"].tolist(), f["neuron"].tolist(), f["cluster"].tolist()), f["label"].map(_text)))
    overview, search_rows, neuron_labels = [], [], {}
    for layer in tqdm(at.layers, desc="site layers", unit="layer", disable=not progress):
        t = _layer_tables(at, layer)
        neurons = t["neurons"]
        live = neurons[neurons["n_examples"] > 0]
        top = live[live["n_examples"] >= 10].sort_values(["effective_clusters", "monosemanticity", "neuron"],
                                                         ascending=[False, True, True]).head(TOP_NEURONS)
        overview.append({
            "layer": int(layer), "neurons": int(len(neurons)), "live": int(len(live)),
            "polysemantic": int((live["effective_clusters"] >= POLYSEMANTIC_MIN).sum()),
            "histogram": _histogram(live["effective_clusters"].to_numpy(dtype=np.float64)),
            "top": [[int(r.neuron), _num([r.effective_clusters])[0], _num([r.monosemanticity])[0], int(r.n_examples),
                     _text(r.label)] for r in top.itertuples(index=False)],
        })
        neuron_labels.update({layer * d_mlp + int(n): _text(label)
                              for n, label in zip(neurons["neuron"], neurons["label"])})
        search_rows.append(_search_rows(t, layer, d_mlp))
        records = _neuron_records(t, windows, labels, d_mlp)
        for start in range(0, d_mlp, BLOCK):
            _script(root / "data" / f"L{layer}" / f"B{start // BLOCK}.js", f"L{layer}B{start // BLOCK}",
                    records[start:start + BLOCK])
        del t, records
    _script(root / "data" / "search.js", "search", {
        "tokens": _search_index(search_rows), "per_token": SEARCH_NEURONS,
        "labels": [neuron_labels.get(g, "") for g in range(at.n_layers * d_mlp)],
    })
    files = {}
    for name in _table_files(at) + ["manifest.json"]:
        digest = _copy(at.path / name, root / "tables" / name)
        files[f"tables/{name}"] = {"bytes": (root / "tables" / name).stat().st_size, "sha256": digest}
    for name, info in at.manifest["steps"].items():
        for file, rows in info["files"].items():
            if f"tables/{file}" in files:
                files[f"tables/{file}"]["rows"] = int(rows)
    m = at.manifest
    _script(root / "data" / "overview.js", "overview", {
        "model": m["model"]["name"], "n_layers": at.n_layers, "d_mlp": d_mlp, "layers": list(at.layers),
        "block": BLOCK, "corpus": m["corpus"], "settings": {**{k: m["settings"][k] for k in ("k", "frac", "method", "threshold")},
                                 "space": clustering.SPACE_NAMES[at.settings.space]},
        "polysemantic_min": POLYSEMANTIC_MIN, "per_layer": overview,
        "tables": [[name, info["bytes"], info.get("rows")] for name, info in files.items()],
    })
    for file in sorted(root.rglob("*")):
        name = file.relative_to(root).as_posix()
        if file.is_file() and name not in files:
            files[name] = {"bytes": file.stat().st_size, "sha256": _cache.file_fingerprint(file)}
    (root / "site.json").write_text(json.dumps({
        "generator": _MARKER, "format": SITE_FORMAT, "atlas_key": m["key_hash"], "model": m["model"]["name"],
        "layers": list(at.layers), "d_mlp": d_mlp, "block": BLOCK,
        "bytes": sum(f["bytes"] for f in files.values()), "files": dict(sorted(files.items())),
    }, indent=1) + "\n")
