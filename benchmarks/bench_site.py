"""The static site of an atlas and the Voilà page, measured (ratios in one run mean more than absolute times on a
shared machine).

    python benchmarks/bench_site.py export ATLAS_DIR [--out DIR]   # export time, size per part, peak RSS
    python benchmarks/bench_site.py browser SITE_DIR               # Chromium from file://: overview, neuron pages
    python benchmarks/bench_site.py voila                          # seconds to the explorer: page notebook vs 03

`browser` opens `index.html` from disk in headless Chromium and times the overview (from the request until every
layer's section is drawn), then 20 neuron pages of random layers and neurons (seed 0), each from the hash change
until that neuron's page is drawn, as the page itself measures it (a page whose data block is not loaded yet loads
it first).

`voila` serves, at full default size with the atlas built, the page notebook `webapp/explorer.ipynb` and notebook
03, one after the other, three page views each, and reports the seconds from the request until the explorer is
drawn (the browser tests' check) and whether any error text shows.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the browser set-up of the tests (Chromium, Voilà server)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def export(args: argparse.Namespace) -> None:
    from nbutils import site

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-site-")) / "site"
    started = time.perf_counter()
    site.export_site(args.atlas, out)
    seconds = time.perf_counter() - started
    parts: dict[str, int] = {}
    for file in out.rglob("*"):
        if file.is_file():
            part = file.relative_to(out).parts[0]
            parts[part] = parts.get(part, 0) + file.stat().st_size
    n_files = sum(1 for f in out.rglob("*") if f.is_file())
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(parts.items()))
    print(f"export: {seconds:.1f} s; {site.site_bytes(out) / 1e6:.1f} MB in {n_files} files ({sizes}); peak RSS "
          f"{_peak_rss_gb():.2f} GB; site at {out}")


def browser(args: argparse.Namespace) -> None:
    import json

    from test_site import _open_neuron, _until, chromium_with_log

    folder = Path(args.site).resolve()
    meta = json.loads((folder / "site.json").read_text())
    rng = random.Random(0)
    picks = [(rng.choice(meta["layers"]), rng.randrange(meta["d_mlp"])) for _ in range(20)]
    with chromium_with_log() as driver:
        started = time.time()
        driver.get((folder / "index.html").as_uri())
        _until(driver, f"return document.querySelectorAll('.ne-layer').length === {len(meta['layers'])}", 60,
               "the overview")
        overview = time.time() - started
        times = []
        for layer, neuron in picks:
            _open_neuron(driver, layer, neuron)
            shown = driver.execute_script("return NE.shown")  # measured in the page: hash change to page drawn
            assert shown["hash"] == f"#L{layer}N{neuron}"
            times.append(shown["ms"] / 1000)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    print(f"overview from file:// {overview:.2f} s; neuron page after a hash change: median "
          f"{statistics.median(times):.3f} s, max {max(times):.3f} s over {len(times)} random neurons; console "
          f"errors: {len(errors)}")


def voila(args: argparse.Namespace) -> None:
    import test_browser as tb

    for notebook in (REPO / "webapp" / "explorer.ipynb", REPO / "notebooks" / "03_visualise_clusters.ipynb"):
        log = Path(tempfile.mkdtemp(prefix="bench-voila-")) / "voila.log"
        shown, errors = [], 0
        with tb.voila_server(notebook, log, small=False) as (url, _), tb.chromium() as driver:
            for _ in range(args.views):
                started = time.time()
                driver.get(url)
                state = tb._wait(driver, tb._consistent, tb.PAGE_TIMEOUT, "the explorer")
                shown.append(time.time() - started)
                errors += int(driver.execute_script(
                    "return /Error displaying widget|model not found|Traceback/.test(document.body.innerText)"))
                driver.get("about:blank")
                time.sleep(2)
        print(f"{notebook.relative_to(REPO)}: explorer shown {', '.join(f'{s:.1f}' for s in shown)} s after the "
              f"request; pages with error text: {errors}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    e = sub.add_parser("export")
    e.add_argument("atlas")
    e.add_argument("--out", default=None)
    b = sub.add_parser("browser")
    b.add_argument("site")
    v = sub.add_parser("voila")
    v.add_argument("--views", type=int, default=3)
    args = parser.parse_args()
    {"export": export, "browser": browser, "voila": voila}[args.part](args)


if __name__ == "__main__":
    main()
