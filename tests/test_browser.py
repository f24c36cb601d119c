"""The web app in a real browser: Voilà serves the page notebook (`webapp/explorer.ipynb`: notebook 03's explorer
without its figures and without the cell that loads the model), headless Chromium opens it and drives the explorer;
the page shows no error text; page views do not leak kernels (each page's kernel is shut down when it closes, idle
kernels of vanished pages are culled) and XSRF protection stays on.

Needs Debian's `chromium` and `chromium-driver` (`bash scripts/install_browser.sh`, as root). Where they are
missing these tests are skipped with that instruction, except in CI (`CI=true`), where they fail. Voilà runs with
the project's configuration (`webapp/voila.py`, as in the README's command), listens on 127.0.0.1 on a free port,
runs the notebook at CI size (`NBUTILS_SMALL=1`) and is stopped by its process id (with the kernels it started)
at the end. The screenshot goes to `<cache>/screenshots/explorer.png`.
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

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from nbutils import _env

NOTEBOOK = _env.REPO_DIR / "webapp" / "explorer.ipynb"  # the page; the same explorer as notebook 03
CONFIG_DIR = _env.REPO_DIR / "webapp"  # the project's voila.py
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_TIMEOUT = 300  # seconds for Voilà to run the notebook and the widgets to appear (a loaded machine is slow)
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
def voila_server(notebook: Path, log_path: Path, *options: str, small: bool = True) -> Iterator[tuple[str, int]]:
    """Serve `notebook` with Voilà and the project's configuration on 127.0.0.1 (CI size unless `small=False`,
    offline); yield its URL and process id; stop it by its pid. `options`: further command-line settings."""
    port = _free_port()
    env = {**os.environ, "NBUTILS_SMALL": "1" if small else "0", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "voila", f"--Voila.config_file_paths={CONFIG_DIR}", str(notebook),
               "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1", "--show_tracebacks=True", *options]
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
        yield f"http://127.0.0.1:{port}/", proc.pid
    finally:
        _stop(proc.pid)


@pytest.fixture(scope="module", autouse=True)
def page_atlas() -> None:
    """Build the atlas that the page opens at CI size before any page is served, so that page views time
    reading it (as a deployed page does) and not its one-time build. The sizes are read from the notebook's own
    parameters cell, run with `NBUTILS_SMALL=1`."""
    import json

    from nbutils import atlas

    _require_chromium()
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    params: dict = {}
    previous = os.environ.get("NBUTILS_SMALL")
    os.environ["NBUTILS_SMALL"] = "1"
    try:
        exec(source, params)
        atlas.load_or_build(model=params["MODEL"], n_windows=params["N_WINDOWS"], window=params["WINDOW"],
                            k=params["K"], frac=params["FRAC"], progress=False)
    finally:
        if previous is None:
            del os.environ["NBUTILS_SMALL"]
        else:
            os.environ["NBUTILS_SMALL"] = previous


def _require_chromium() -> None:
    """Skip (fail in CI) when Debian's Chromium or its driver is missing."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    why = (f"the browser tests need {CHROMIUM} and {CHROMEDRIVER}: run `bash scripts/install_browser.sh` "
           "(Debian packages `chromium` and `chromium-driver`; needs apt and root)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}. In CI (CI=true) they must run.")
    pytest.skip(why)


@contextmanager
def chromium(*, logs: bool = False) -> Iterator[object]:
    """Headless Debian Chromium driven by selenium, with a fresh profile folder.

    Without `logs`, `get` returns at once and the tests poll for what they need (Voilà streams); with `logs`,
    pages load fully before `get` returns and the console and network logs are kept."""
    _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ne-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    else:
        options.page_load_strategy = "none"
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
  traceback: !!document.body && document.body.innerText.includes('Traceback'),
  error: !!document.body && /Error displaying widget|model not found/.test(document.body.innerText),
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
    _require_chromium()
    started = time.time()
    shot = _env.cache_dir() / "screenshots" / "explorer.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with voila_server(NOTEBOOK, tmp_path / "voila.log") as (url, _), chromium() as driver:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.get(url)
        before = _wait(driver, _consistent, PAGE_TIMEOUT, "the explorer's widgets")
        loaded = time.time() - started
        assert not before["traceback"], "the page shows a Python traceback"
        assert not before["error"], "the page shows a widget error (a widget closed before the page rendered)"
        assert before["umap"], "the UMAP image of the explorer is missing"
        assert len(before["tabs"]) == _expected_tabs(before["summary"])
        neuron = re.search(r"Layer \d+, neuron \d+", before["summary"]).group(0)

        clicked = time.time()
        driver.execute_script("document.querySelector('.ne-random').click()")
        after = _wait(driver, lambda s: _consistent(s) and neuron not in s["summary"], CHANGE_TIMEOUT,
                      "another neuron after pressing the random button")
        response = time.time() - clicked
        assert len(after["tabs"]) == _expected_tabs(after["summary"])  # the tabs follow the new clustering
        assert not after["error"] and not after["traceback"]
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


# --------------------------------------------------------------------------------------------------
# Kernels do not leak: one per open page, gone when the page closes or vanishes

LOADS = 6  # page views in a row
MEMORY_SLACK = 400 * 2**20  # bytes the server may grow between the 2nd and the last view
GONE_TIMEOUT = 30  # seconds for a closed page's kernel to be shut down
_KERNEL_ID = "return JSON.parse(document.getElementById('jupyter-config-data').textContent).kernelId;"


def _kernels(pid: int) -> dict[str, object]:
    """The kernel processes Voilà started, by kernel id (read from each kernel's connection-file argument)."""
    import psutil

    found = {}
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        match = re.search(r"kernel-([0-9a-f-]{36})\.json", cmdline)
        if match and "ipykernel" in cmdline:
            found[match.group(1)] = proc
    return found


def _tree_rss(pid: int) -> int:
    """Resident memory in bytes of Voilà and every process it started (its kernels)."""
    import psutil

    total = 0
    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _wait_until(condition, timeout: float, what: str) -> float:
    started = time.time()
    while not condition():
        if time.time() - started > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.5)
    return time.time() - started


def _post_without_token(url: str, kernel_id: str) -> int:
    """Status of a shutdown request that carries no XSRF token (as a cross-site page would send)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}voila/api/shutdown/{kernel_id}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_page_views_do_not_leak_kernels_and_xsrf_stays_on(tmp_path):
    _require_chromium()
    rss, closed_in = [], []
    with voila_server(NOTEBOOK, tmp_path / "voila.log") as (url, pid), chromium() as driver:
        for view in range(LOADS):
            started = time.time()
            driver.get(url)
            state = _wait(driver, _consistent, PAGE_TIMEOUT, f"the explorer's widgets (page view {view + 1})")
            assert not state["error"], f"page view {view + 1} shows a widget error"
            kernel_id = driver.execute_script(_KERNEL_ID)
            assert list(_kernels(pid)) == [kernel_id], "the open page's kernel is not the server's only one"
            rss.append(_tree_rss(pid))  # with this view's page open
            if view == 0:
                assert driver.get_cookie("_xsrf"), "the page did not get its XSRF cookie"
                assert _post_without_token(url, kernel_id) == 403  # XSRF protection is on ...
                assert kernel_id in _kernels(pid)  # ... and the refused request left the kernel alone
            driver.get("about:blank")  # closing the page sends its shutdown request
            closed_in.append(_wait_until(lambda: kernel_id not in _kernels(pid), GONE_TIMEOUT,
                                         f"the kernel of closed page view {view + 1} is shut down"))
            print(f"\nview {view + 1}: page ready and closed in {time.time() - started:.0f} s, server with the page "
                  f"open {rss[-1] / 2**20:.0f} MB, kernel gone {closed_in[-1]:.1f} s after closing", flush=True)
        assert not _kernels(pid), "kernels are left after every page closed"
    log = (tmp_path / "voila.log").read_text()
    refused = set(re.findall(r"403 POST /voila/api/shutdown/(\S+) \(.*'_xsrf' argument missing", log))
    assert len(refused) == 1, f"shutdown requests refused for {len(refused)} kernels; only the probe's should be"
    mb = [r / 2**20 for r in rss]
    print(f"\nserver memory with each of {LOADS} page views open (MB): {', '.join(f'{m:.0f}' for m in mb)}; "
          f"growth from view 2 to view {LOADS}: {mb[-1] - mb[1]:+.0f} MB; kernels shut down "
          f"{max(closed_in):.1f} s after their page closed at most")
    assert rss[-1] - rss[1] <= MEMORY_SLACK, f"the server grew by {(rss[-1] - rss[1]) / 2**20:.0f} MB"


def test_a_vanished_page_kernel_is_culled_and_an_open_page_kernel_is_kept(tmp_path):
    """A page that disappears without its shutdown request (here: the request is disabled) leaves an idle,
    unconnected kernel, which Voilà culls; a kernel whose page is open is never culled. The culling timeout is
    shortened here (the project's configuration: `webapp/voila.py`)."""
    _require_chromium()
    notebook = tmp_path / "tiny.ipynb"
    nb = new_notebook(cells=[new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=3)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebook)
    timeout = 6
    options = (f"--MappingKernelManager.cull_idle_timeout={timeout}", "--MappingKernelManager.cull_interval=1")
    with voila_server(notebook, tmp_path / "voila.log", *options) as (url, pid), chromium() as driver:
        driver.get(url)
        _wait_until(lambda: driver.execute_script("return !!document.querySelector('.widget-slider');"), 60,
                    "the slider is drawn")
        kept = driver.execute_script(_KERNEL_ID)
        time.sleep(timeout + 4)
        assert kept in _kernels(pid), "the kernel of an open page was culled"
        driver.execute_script("navigator.sendBeacon = () => true;")  # the page will vanish without a word
        driver.get("about:blank")
        waited = _wait_until(lambda: kept not in _kernels(pid), timeout + 20, "the idle kernel is culled")
    assert f"Culling 'idle' kernel 'python3' ({kept}) with 0 connections" in (tmp_path / "voila.log").read_text()
    print(f"\nthe vanished page's kernel was culled {waited:.0f} s after the page went (idle timeout {timeout} s)")


def test_a_page_that_builds_an_atlas_shows_no_widget_error(tmp_path):
    """The atlas's progress bars stay on the page when done: a notebook bar that closes itself before Voilà renders
    the page shows as "Error displaying widget: model not found". A tiny atlas (8 windows, one layer) is built in
    the page's kernel."""
    _require_chromium()
    notebook = tmp_path / "build.ipynb"
    code = ("from nbutils import atlas, data, models\n"
            "model = models.load_model()\n"
            "windows = data.corpus_windows(model, n_windows=8, window=16)\n"
            f"at = atlas.build_atlas(model, windows, k=4, layers=[0], out={str(tmp_path / 'atlas')!r}, "
            f"cache_dir={str(tmp_path / 'cache')!r})\n"
            "print('atlas built:', at.manifest['status'])")
    nb = new_notebook(cells=[new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebook)
    with voila_server(notebook, tmp_path / "voila.log") as (url, _), chromium() as driver:
        driver.get(url)
        _wait_until(lambda: "atlas built: complete" in driver.execute_script(
            "return document.body ? document.body.innerText : ''"), PAGE_TIMEOUT, "the page that builds an atlas")
        time.sleep(2)  # widget views render after the text
        state = driver.execute_script(_READ)
        bars = driver.execute_script("return document.querySelectorAll('.widget-hprogress, .progress').length")
    assert not state["error"] and not state["traceback"], "the page shows error text"
    assert bars >= 1, "no progress bar was drawn (the check above would then be empty)"
