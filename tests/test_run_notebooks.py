"""The main job (`scripts/run_notebooks.py`) on tiny notebooks in a temporary folder: a cell that stalls ends
the job with a message naming the notebook and the cell, a non-zero exit and no executed copy; a notebook that
runs gets its copy, and the previous copy is marked stale while a notebook runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nbutils import _env

SCRIPT = _env.REPO_DIR / "scripts" / "run_notebooks.py"


def _notebook(path: Path, *sources: str) -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# test"), *(new_code_cell(s) for s in sources)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_stalled_cell_is_named_retried_once_and_leaves_no_copy(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _notebook(folder / "01_stall.ipynb", "x = 1", "import time\ntime.sleep(60)  # stalls", "y = 2")
    out = tmp_path / "executed"
    out.mkdir()
    (out / "01_stall.ipynb").write_text("{}")  # a copy from an earlier run
    done = _run(folder, "--out", out, "--cell-timeout", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "01_stall.ipynb stalled at cell 2 (`import time`)" in done.stderr
    assert "no reply within 2 s" in done.stderr
    assert "attempt 2 of 2" in done.stdout  # retried once before giving up
    assert not (out / "01_stall.ipynb").exists()  # no executed copy of an unfinished run ...
    assert (out / "01_stall.stale.ipynb").read_text() == "{}"  # ... and the old one is marked stale


def test_a_cell_error_stops_the_job_at_once_and_a_finished_notebook_is_written(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    good = _notebook(folder / "01_good.ipynb", "value = 6 * 7\nvalue")
    _notebook(folder / "02_bad.ipynb", "raise ValueError('boom')")
    _notebook(folder / "03_never.ipynb", "1")
    out = tmp_path / "executed"
    out.mkdir()
    (out / "01_good.ipynb").write_text("{}")
    done = _run(folder, "--out", out, "--cell-timeout", "30")
    assert done.returncode == 1
    assert "02_bad.ipynb failed at cell 1 (`raise ValueError('boom')`)" in done.stderr
    assert "ValueError: boom" in done.stderr
    assert "attempt 2" not in done.stdout  # an error is not retried; only stalls are
    assert "03_never" not in done.stdout  # no later notebook runs
    executed = nbformat.read(out / "01_good.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["data"]["text/plain"] == "42"
    assert not (out / "01_good.stale.ipynb").exists()
    assert not (out / "02_bad.ipynb").exists()
    assert good.read_text() != (out / "01_good.ipynb").read_text()  # the source notebook is left as it was


def test_bad_arguments_exit_with_a_message(tmp_path):
    done = _run("no_such_notebook_prefix")
    assert done.returncode != 0 and "no notebook, folder or prefix" in done.stderr
    done = _run(tmp_path, "--cell-timeout", "0")
    assert done.returncode == 2 and "--cell-timeout must be > 0" in done.stderr
