"""The feature atlas: how fast it is read (the web page, the explorer) and what a GPT-2-small-shaped build costs.

    python benchmarks/bench_atlas.py page     # full default size: atlas of notebooks 01-03, notebook 03 as Voilà runs it
    python benchmarks/bench_atlas.py scale    # GPT-2-small-shaped random model, 2,000 windows of 64 tokens
    python benchmarks/bench_atlas.py scale --windows 200 --layers 2   # a quick run of the same path

`page` opens the atlas that notebooks 01-03 share (building it first if it is missing), then times
- the explorer's first render from a closed atlas (open, read the layer, draw the first neuron);
- a neuron change in the explorer (median of 20 random neurons; the model is never loaded: no forward pass);
- notebook 03 executed top to bottom in a fresh kernel, which is what Voilà does for each page view: the time until
  the explorer is shown (Voilà streams each cell's output as it runs) and until the last cell.

`scale` builds an atlas for a randomly initialised model of GPT-2 small's shape (12 layers x 3,072 neurons,
d_model 768, from a `transformers` config: no download), over real corpus windows tokenised with the default
tokenizer, and prints the time of every step (from the manifest), the process's peak RSS during the build, the ratio
of the build to the collection alone (timed after the build in the same process, without a residual store), and the
time of `most_polysemantic` over all layers and of a token search on the reopened atlas (median of 5).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def page(args: argparse.Namespace) -> None:
    from nbutils import _env, atlas, explorer

    started = time.perf_counter()
    at = atlas.load_or_build(n_windows=args.windows, window=64, k=128, frac=0.75)
    print(f"atlas {'opened' if at.loaded_from_cache else 'built'} in {time.perf_counter() - started:.1f} s: {at}")
    path = at.path
    started = time.perf_counter()
    fresh = atlas.Atlas.open(path)
    view = explorer.Explorer(fresh, layer=1, seed=0)
    first = time.perf_counter() - started
    print(f"explorer first render from a closed atlas: {first:.2f} s")
    rng = np.random.default_rng(0)
    times = []
    for neuron in rng.choice(fresh.d_mlp, size=20, replace=False):
        layer = int(rng.choice(fresh.layers))
        t = time.perf_counter()
        explorer.select_neuron(view, layer, int(neuron))
        times.append(time.perf_counter() - t)
    assert fresh._model is None, "a neuron change loaded the model"
    print(f"neuron change: median {statistics.median(times):.3f} s, max {max(times):.3f} s over 20 neurons "
          f"(no model loaded, no forward pass)")
    import nbformat
    from nbclient import NotebookClient

    notebook = _env.REPO_DIR / "notebooks" / "03_visualise_clusters.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    marks: dict[str, float] = {}

    def on_cell_executed(cell, **_):  # when the cell that displays the explorer has run, the page shows it
        if cell.cell_type == "code" and cell.source.strip() == "view.widget":
            marks["explorer"] = time.perf_counter()

    started = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}},
                   on_cell_executed=on_cell_executed).execute()
    done = time.perf_counter()
    print(f"notebook 03 in a fresh kernel (a Voilà page view), full size: explorer shown after "
          f"{marks['explorer'] - started:.1f} s (kernel start included), whole notebook {done - started:.1f} s")


def _gpt2_small_shaped(folder: Path, n_layers: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from nbutils import _env, models

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layers, n_embd=768, n_head=12, n_inner=3072, n_positions=64, vocab_size=4096,
                        activation_function="gelu_new")
    GPT2LMHeadModel(config).save_pretrained(folder)
    for file in _env.DEFAULT_MODEL_DIR.iterdir():  # the default tokenizer (4,096 tokens)
        if "token" in file.name or file.name in ("vocab.json", "merges.txt"):
            shutil.copy(file, folder / file.name)
    return models.load_model(folder)


def scale(args: argparse.Namespace) -> None:
    from nbutils import activations, atlas, data

    if args.no_store:
        from nbutils import residuals

        residuals.DISK_BUDGET = 0
    root = Path(tempfile.mkdtemp(prefix="bench-atlas-"))
    try:
        model = _gpt2_small_shaped(root / "model", args.layers)
        windows = data.corpus_windows(model, n_windows=args.windows, window=64)
        print(f"model: {model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons, d_model {model.cfg.d_model}; "
              f"{len(windows)} windows x 64 tokens; peak RSS after loading {_peak_rss_gb():.2f} GiB")
        started = time.perf_counter()
        at = atlas.build_atlas(model, windows, k=128, frac=0.75, out=root / "atlas", cache_dir=root / "cache",
                               workers=args.workers)
        total = time.perf_counter() - started
        peak = _peak_rss_gb()
        collect = at.manifest["steps"]["collect"]["seconds"]
        started = time.perf_counter()  # the collection alone, as `bench_collect.py` runs it: no residual store
        activations.collect_top_activations(model, windows, k=128, frac=0.75, use_cache=False, progress=False)
        alone = time.perf_counter() - started
        print(f"build: {total:.0f} s in all; peak RSS {peak:.2f} GiB; build / collection = {total / alone:.2f} "
              f"(the collection alone {alone:.0f} s; the build's collect step, which also keeps the residual store, "
              f"{collect:.0f} s: build / collect step = {total / collect:.2f})")
        for step, info in at.manifest["steps"].items():
            print(f"  {step:<22} {info['seconds']:8.1f} s")
        print(at.info())
        del model
        opened = atlas.Atlas.open(at.path)
        token = opened.sql("SELECT token FROM examples GROUP BY token ORDER BY count(*) DESC LIMIT 1")["token"].iloc[0]
        for name, query in [("most_polysemantic(20), all layers", lambda a: a.most_polysemantic(20)),
                            (f"search(token={token!r})", lambda a: a.search(token=token)),
                            ("search(text='the')", lambda a: a.search(text="the"))]:
            times = []
            for _ in range(5):
                fresh = atlas.Atlas.open(at.path)  # a cold connection each time
                t = time.perf_counter()
                query(fresh)
                times.append(time.perf_counter() - t)
            print(f"{name:<40} median {statistics.median(times):.3f} s")
    finally:  # the model and the atlas take over a gigabyte
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("page", help="read times at full default size")
    p.add_argument("--windows", type=int, default=4000, help="the notebooks' full size (4000)")
    s = sub.add_parser("scale", help="a GPT-2-small-shaped build")
    s.add_argument("--windows", type=int, default=2000)
    s.add_argument("--layers", type=int, default=12)
    s.add_argument("--workers", type=int, default=None, help="processes clustering a layer (default: one per core)")
    s.add_argument("--no-store", action="store_true", help="no residual store: every pass runs the model")
    args = parser.parse_args()
    page(args) if args.part == "page" else scale(args)


if __name__ == "__main__":
    main()
