"""The web app in a real browser: Voilà serves notebook 03, headless Chromium opens it and drives the explorer.

Needs Debian's `chromium` and `chromium-driver` (`bash scripts/install_browser.sh`); without them the test
fails with that instruction instead of skipping. Voilà listens on 127.0.0.1 on a free port, runs the notebook
at CI size (`NBUTILS_SMALL=1`) and is stopped by its process id (with the kernel it started) at the end.
The screenshot goes to `<cache>/screenshots/explorer.png`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from nbutils import _env

NOTEBOOK = _env.REPO_DIR / "notebooks" / "03_visualise_clusters.ipynb"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_TIMEOUT = 150  # seconds for Voilà to run the notebook and the widgets to appear
CHANGE_TIMEOUT = 45  # seconds for the explorer to show another neuron after a click
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1500")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(pid: int) -> None:
    """Stop a process and the processes it started (the kernel), each by its id."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    children = parent.children(recursive=True)
    parent.terminate()  # Voilà shuts its kernels down on SIGTERM
    _, alive = psutil.wait_procs([parent], timeout=20)
    for proc in alive:
        proc.kill()
    _, alive = psutil.wait_procs(children, timeout=10)
    for proc in alive:
        proc.kill()


@contextmanager
def voila_server(notebook: Path, log_path: Path) -> Iterator[str]:
    """Serve `notebook` with Voilà on 127.0.0.1 (CI size, offline); yield its URL; stop it by its pid."""
    port = _free_port()
    env = {**os.environ, "NBUTILS_SMALL": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}",
               "--Voila.ip=127.0.0.1", "--show_tracebacks=True"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_env.REPO_DIR)
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Voilà exited with code {proc.returncode}; log: {log_path}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"Voilà did not listen on port {port} within 60 s; log: {log_path}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(proc.pid)


@contextmanager
def chromium() -> Iterator[object]:
    """Headless Debian Chromium driven by selenium, with a fresh profile folder."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"The browser test needs {CHROMIUM} and {CHROMEDRIVER}: run `bash scripts/install_browser.sh` "
                    "(Debian packages `chromium` and `chromium-driver`, as root).")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ne-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# The DOM is rebuilt on every change, so state is read (and the button clicked) by script, never through
# element handles that go stale.
_READ = """
const text = (sel) => { const el = document.querySelector(sel); return el ? el.innerText : null; };
return {
  summary: text('.ne-summary'),
  tabs: Array.from(document.querySelectorAll('.ne-tabs .lm-TabBar-tab')).map(t => t.innerText.trim()),
  panel: text('.ne-tabs .widget-tab-contents') || text('.ne-tabs .lm-TabPanel-stackedPanel:not(.lm-mod-hidden)'),
  history: text('.ne-history'),
  umap: !!document.querySelector('.ne-umap') && document.querySelector('.ne-umap').naturalWidth > 0,
  traceback: document.body.innerText.includes('Traceback'),
};
"""


def _wait(driver, predicate, timeout: float, what: str) -> dict:
    deadline = time.time() + timeout
    state = driver.execute_script(_READ)
    while not predicate(state):
        if state.get("traceback"):
            pytest.fail(f"the page shows a Python traceback while waiting for {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; page state: {state}")
        time.sleep(0.5)
        state = driver.execute_script(_READ)
    return state


def _expected_tabs(summary: str) -> int:
    """Tabs the explorer shows for the summary line: one per cluster of >= 2 examples, one for all singletons."""
    match = re.search(r"(\d+) clusters \((\d+) singletons\)", summary)
    assert match, f"summary line without cluster counts: {summary!r}"
    clusters, singles = int(match.group(1)), int(match.group(2))
    return clusters - singles + (1 if singles else 0)


def _consistent(state: dict) -> bool:
    """The explorer is drawn and its tabs match its summary line (updates reach the page one widget at a time)."""
    return bool(state["summary"]) and "clusters (" in state["summary"] and len(state["tabs"]) > 0 \
        and len(state["tabs"]) == _expected_tabs(state["summary"])


def test_voila_serves_the_explorer_and_the_random_button_changes_the_tabs(tmp_path):
    started = time.time()
    shot = _env.cache_dir() / "screenshots" / "explorer.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with voila_server(NOTEBOOK, tmp_path / "voila.log") as url, chromium() as driver:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.get(url)
        before = _wait(driver, _consistent, PAGE_TIMEOUT, "the explorer's widgets")
        loaded = time.time() - started
        assert not before["traceback"], "the page shows a Python traceback"
        assert before["umap"], "the UMAP image of the explorer is missing"
        assert len(before["tabs"]) == _expected_tabs(before["summary"])
        neuron = re.search(r"Layer \d+, neuron \d+", before["summary"]).group(0)

        clicked = time.time()
        driver.execute_script("document.querySelector('.ne-random').click()")
        after = _wait(driver, lambda s: _consistent(s) and neuron not in s["summary"], CHANGE_TIMEOUT,
                      "another neuron after pressing the random button")
        response = time.time() - clicked
        assert len(after["tabs"]) == _expected_tabs(after["summary"])  # the tabs follow the new clustering
        new_neuron = re.search(r"Layer \d+, neuron \d+", after["summary"]).group(0)
        assert (after["tabs"], after["summary"]) != (before["tabs"], before["summary"])
        assert new_neuron.replace("Layer ", "L").replace(", neuron ", "/N") in after["history"]
        driver.execute_script("document.querySelector('.ne-layer').scrollIntoView()")  # controls at the top
        time.sleep(0.5)
        assert driver.save_screenshot(str(shot)), f"could not write the screenshot {shot}"
    total = time.time() - started
    print(f"\npage ready in {loaded:.1f} s; random neuron shown {response:.2f} s after the click; "
          f"{neuron} -> {new_neuron}; total {total:.1f} s; screenshot {shot}")
    assert shot.stat().st_size > 10_000
