"""The main job: execute notebooks 01..04 in order, writing executed copies to cache/executed/.

    python scripts/run_notebooks.py            # full size
    NBUTILS_SMALL=1 python scripts/run_notebooks.py   # CI size
    python scripts/run_notebooks.py 02 03      # only notebooks whose names start with these
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ExecutePreprocessor

ROOT = Path(__file__).resolve().parents[1]


def main(prefixes: list[str]) -> int:
    out_dir = ROOT / "cache" / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in prefixes)]
    if not notebooks:
        print("no notebooks matched", prefixes, file=sys.stderr)
        return 1
    for path in notebooks:
        started = time.time()
        print(f"running {path.name} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        ExecutePreprocessor(timeout=None, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
        target = out_dir / path.name
        nbformat.write(nb, target)
        print(f"  done in {time.time() - started:.0f} s -> {target.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
