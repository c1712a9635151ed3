"""End to end in a real browser: JupyterLab serves the notebooks, headless Chromium (Playwright)
runs every cell, moves a widget control and checks that the displayed figure changes.

Needs Debian's ``chromium`` (``.ci/run`` installs it with apt-get) and the ``playwright`` package;
Playwright's own browser download is not used. Without Chromium the tests are skipped and say why.
The notebooks run in the smoke profile on the synthetic dataset, writing into a temporary
reports folder; the screenshots are kept in ``reports/browser/`` for the record.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mnv2lib.utils import paths

CHROMIUM = os.environ.get("MNV2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium); "
                                                 "the browser tests need it"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

RUN_TIMEOUT_MS = 600_000  # every cell of a smoke notebook, training included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(name: str, folder: Path) -> None:
    """The notebook with its parameters cell set to the smoke profile (what papermill would inject)."""
    notebook = json.loads((paths.NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = 'profile = "smoke"\ndataset = "synthetic"\nseed = 0\ninteractive = True\n'
    (folder / f"{name}.ipynb").write_text(json.dumps(notebook))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smoke_reports_dir):
    """A JupyterLab server on a loopback port, no token, with temporary settings and runtime folders."""
    root = tmp_path_factory.mktemp("lab")
    for name in ("01_activation_study", "02_triplet_attention"):
        _smoke_copy(name, root)
    env = {**os.environ, "MNV2_REPORTS_DIR": str(smoke_reports_dir), "MNV2_PROGRESS": "auto"}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[var] = str(root / ".jupyter" / sub)
    port = _free_port()
    log = open(root / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.allow_root=True", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(root / 'jupyter.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _run_all_cells(page, url: str, name: str) -> None:
    # a workspace of its own, reset: only this notebook is open (no tab restored from another test)
    page.goto(f"{url}/lab/workspaces/{name}/tree/{name}.ipynb?reset")
    page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
    # the kernel must be up before "Run All Cells" (the status bar says "<kernel> | Idle")
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=120_000)
    for _ in range(3):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
        try:  # the first code cell gets an execution count once the kernel took the cells
            page.locator(".jp-InputPrompt", has_text="[1]").first.wait_for(state="attached", timeout=60_000)
            return
        except playwright_api.TimeoutError:
            page.keyboard.press("Escape")
    pytest.fail(f"{name}: JupyterLab did not start running the cells")


def _figure_src(view) -> str:
    image = view.locator("img").first
    image.wait_for(timeout=RUN_TIMEOUT_MS)
    return image.get_attribute("src")


def _check_control_changes_figure(page, url: str, name: str, title: str, control: int, option: str,
                                  screenshot: str) -> None:
    _run_all_cells(page, url, name)
    view = page.locator(".widget-vbox", has=page.locator("b", has_text=title)).last
    try:
        view.wait_for(timeout=RUN_TIMEOUT_MS)
    except playwright_api.TimeoutError:
        page.screenshot(path=str(paths.REPORTS_DIR / f"browser_failure_{name}.png"), full_page=True)
        raise
    view.scroll_into_view_if_needed()
    before = _figure_src(view)
    assert before.startswith("data:image/png")
    select = view.locator("select").nth(control)
    assert select.input_value() != option
    select.select_option(option)
    deadline = time.monotonic() + 120
    after = _figure_src(view)
    while after == before and time.monotonic() < deadline:
        page.wait_for_timeout(250)
        after = _figure_src(view)
    assert after != before, f"{name}: the figure did not change after choosing {option!r}"
    assert page.locator("text=Error displaying widget").count() == 0
    folder = paths.REPORTS_DIR / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    view.screenshot(path=str(folder / screenshot))


@pytest.mark.parametrize("notebook, label, control, option", [
    ("02_triplet_attention", "Attention gates: image, block, branch", 1, "combined"),
    ("01_activation_study", "The spiral at one dimension n", 0, "15"),
])
def test_widget_rerenders_in_jupyterlab(lab, browser, notebook, label, control, option):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        _check_control_changes_figure(page, lab, notebook, label, control=control, option=option,
                                      screenshot=f"{notebook}_widget.png")
    finally:
        page.close()
