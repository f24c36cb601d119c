"""The main job: execute the notebooks in order, writing each executed copy to cache/executed/.

    .venv/bin/python scripts/run_notebooks.py                   # notebooks/01 .. 04, full size
    NBUTILS_SMALL=1 .venv/bin/python scripts/run_notebooks.py   # CI size
    .venv/bin/python scripts/run_notebooks.py 02 03             # only notebooks whose names start with these
    .venv/bin/python scripts/run_notebooks.py some/folder x.ipynb --out /tmp/executed --cell-timeout 600

It never waits forever. Each cell has a timeout (`--cell-timeout`, default 1200 s): a cell that gives no
reply by then (the known cause is nbclient waiting for a reply to a widget cell that the kernel already
finished, jupyter/nbclient#312) stalls its notebook, which is run once more from the start (`--retries`);
a second stall, a cell that raises or a kernel that dies ends the job with a message naming the notebook and
the cell (index and first line), exit code 1, and no later notebook run.

Before a notebook starts, its previous executed copy is renamed `<name>.stale.ipynb`; the new copy is
written (atomically) only when the notebook finished, and the stale one is then removed. So a copy named
`<name>.ipynb` in the output folder always comes from a complete run of the current notebook.

Kernels talk to this process over Unix sockets (IPC transport) in a private temporary folder on Linux, not TCP.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CELL_TIMEOUT = 1200  # seconds; the slowest cell at full size takes a few minutes on 2 cores
PROGRESS_EVERY = 30  # seconds between progress lines inside one long notebook


@dataclass
class Failure(Exception):
    """A notebook that did not finish: what happened and in which cell."""

    kind: str  # "stalled", "failed" or "kernel died"
    cell_index: int
    first_line: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.kind} at cell {self.cell_index} (`{self.first_line}`)"
        return f"{where}: {self.detail}" if self.detail else where


def find_notebooks(selectors: list[str]) -> list[Path]:
    """Notebooks to run, in order: every `NN_*.ipynb` of `notebooks/` when `selectors` is empty; else each
    selector is a notebook file, a folder (its `NN_*.ipynb` files, else all `*.ipynb`), or a name prefix
    of a notebook in `notebooks/`."""
    if not selectors:
        return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    found: list[Path] = []
    for selector in selectors:
        path = Path(selector)
        if path.is_file() and path.suffix == ".ipynb":
            found.append(path)
        elif path.is_dir():
            found += sorted(path.glob("[0-9][0-9]_*.ipynb")) or sorted(path.glob("*.ipynb"))
        else:
            matches = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name.startswith(selector))
            if not matches:
                raise SystemExit(f"run_notebooks: {selector!r} is no notebook, folder or prefix of a notebook "
                                 f"name in {ROOT / 'notebooks'}")
            found += matches
    return list(dict.fromkeys(p.resolve() for p in found if not p.name.endswith(".stale.ipynb")))


def _first_line(cell: dict) -> str:
    lines = [line for line in cell.get("source", "").splitlines() if line.strip()]
    text = lines[0].strip() if lines else "(empty)"
    return text if len(text) <= 80 else text[:77] + "..."


def _kernel_manager_config(socket_dir: str) -> dict:
    """IPC transport (Unix sockets in `socket_dir`) on Linux; TCP elsewhere (macOS's long temporary paths can
    exceed the length limit of a socket path)."""
    if not sys.platform.startswith("linux"):
        return {}
    return {"KernelManager": {"transport": "ipc", "ip": os.path.join(socket_dir, "kernel")}}


def execute(path: Path, cell_timeout: float) -> nbformat.NotebookNode:
    """Execute one notebook in a fresh kernel (working directory: its folder); raise `Failure`."""
    from traitlets.config import Config

    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    state = {"index": -1, "started": time.time(), "last_print": time.time()}

    def on_cell_start(cell, cell_index):  # noqa: ANN001 (nbclient hook signature; called for every cell)
        if cell.cell_type != "code":
            return
        now = time.time()
        state["index"] = cell_index
        done = code.index(cell_index)
        if now - state["last_print"] >= PROGRESS_EVERY or done == 0:
            print(f"    cell {cell_index} ({done + 1}/{len(code)} code cells, {now - state['started']:.0f} s): "
                  f"{_first_line(cell)}", flush=True)
            state["last_print"] = now

    with tempfile.TemporaryDirectory(prefix="nbutils-kernel-") as sockets:
        client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", interrupt_on_timeout=False,
                                config=Config(_kernel_manager_config(sockets)),
                                resources={"metadata": {"path": str(path.parent)}})
        client.on_cell_start = on_cell_start
        try:
            client.execute()
        except (CellTimeoutError, CellExecutionError, DeadKernelError) as err:
            index = state["index"]
            cell = nb.cells[index] if 0 <= index < len(nb.cells) else {}
            if isinstance(err, CellTimeoutError):
                raise Failure("stalled", index, _first_line(cell),
                              f"no reply within {cell_timeout:g} s (--cell-timeout)") from None
            if isinstance(err, DeadKernelError):
                raise Failure("kernel died", index, _first_line(cell), str(err)) from None
            print(str(err), file=sys.stderr, flush=True)  # the cell's traceback
            raise Failure("failed", index, _first_line(cell), f"{err.ename}: {err.evalue}") from err
    return nb


def _write_atomic(nb: nbformat.NotebookNode, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, target)


def run(notebooks: list[Path], out_dir: Path, cell_timeout: float, retries: int) -> int:
    """Run each notebook (up to `1 + retries` times when it stalls); return the exit code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    job_started = time.time()
    for number, path in enumerate(notebooks, 1):
        target = out_dir / path.name
        stale = out_dir / f"{path.stem}.stale.ipynb"
        if target.exists():
            os.replace(target, stale)
        for attempt in range(1, retries + 2):
            started = time.time()
            tries = f" (attempt {attempt} of {retries + 1})" if attempt > 1 else ""
            print(f"[{number}/{len(notebooks)}] running {path.name}{tries} ...", flush=True)
            try:
                nb = execute(path, cell_timeout)
            except Failure as failure:
                print(f"  {path.name} {failure} after {time.time() - started:.0f} s", flush=True)
                if failure.kind == "stalled" and attempt <= retries:
                    continue
                kept = f"; the previous executed copy is kept as {stale}" if stale.exists() else ""
                print(f"run_notebooks: {path.name} {failure}. No executed copy written{kept}.", file=sys.stderr,
                      flush=True)
                return 1
            _write_atomic(nb, target)
            stale.unlink(missing_ok=True)
            print(f"  done in {time.time() - started:.0f} s -> {target}", flush=True)
            break
    print(f"all {len(notebooks)} notebooks executed in {time.time() - job_started:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook files, folders or name prefixes (default: notebooks/)")
    parser.add_argument("--out", type=Path, default=ROOT / "cache" / "executed", help="folder of the executed copies")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT,
                        help=f"seconds a cell may run without reply (default {DEFAULT_CELL_TIMEOUT})")
    parser.add_argument("--retries", type=int, default=1, help="runs more of a notebook that stalled (default 1)")
    args = parser.parse_args(argv)
    if args.cell_timeout <= 0:
        parser.error(f"--cell-timeout must be > 0 seconds; got {args.cell_timeout:g}")
    if args.retries < 0:
        parser.error(f"--retries must be >= 0; got {args.retries}")
    notebooks = find_notebooks(args.notebooks)
    if not notebooks:
        print(f"run_notebooks: no notebooks found in {args.notebooks or [str(ROOT / 'notebooks')]}", file=sys.stderr)
        return 1
    return run(notebooks, args.out, args.cell_timeout, args.retries)


if __name__ == "__main__":
    sys.exit(main())
