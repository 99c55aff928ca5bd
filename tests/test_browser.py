"""JupyterLab in headless Chromium (Debian's ``chromium``, driven by Playwright's Python
package with that executable; no browser download): notebook 02's engine cells run, their
views are drawn at once, and moving a control redraws the figure.

Without chromium the test does not pass silently: it is skipped with the reason locally and
fails under CI (``CI`` set), where .ci/run installs chromium first. Set
``COURSE_SCREENSHOTS=1`` to refresh docs/screenshots/ (one PNG per notebook).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from helpers.course.build import source_notebooks

pytestmark = pytest.mark.slow  # starts JupyterLab and a browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium")

SETUP = """
# Stand-ins for notebook 02's session: one simulated run where notebook 00 would put it.
from pathlib import Path
from types import SimpleNamespace
import nibabel as nib
import pandas as pd
from helpers.analysis import simulate
cfg = SimpleNamespace(data_dir=Path("data"), results_dir=Path("results"))
func = cfg.data_dir / "raw" / "sub-01" / "func"
func.mkdir(parents=True, exist_ok=True)
nib.save(simulate.simulate_run(shape=(28, 28, 16), n_volumes=40, seed=0).img,
         func / "sub-01_task-rest_bold.nii.gz")
"""


def _require_chromium():
    if CHROMIUM:
        return
    reason = ("Debian's chromium is not installed, so the browser test did NOT run "
              "(apt-get install chromium; .ci/run does this in CI)")
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _widget_notebook(folder: Path) -> Path:
    """Notebook 02's engine cells (tagged ``engine``), after a setup cell."""
    source = next(p for p in source_notebooks() if p.name.startswith("02_"))
    engine = [c for c in nbformat.read(source, as_version=4).cells
              if "engine" in c.metadata.get("tags", [])]
    assert sum(c.cell_type == "code" for c in engine) >= 4
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SETUP), *engine])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "engine_views.ipynb"
    nbformat.write(nb, path)
    return path


def _lab_settings(folder: Path) -> None:
    """Render every cell (JupyterLab 4 leaves cells out of view out of the page by default)
    and ask no question about news (its pop-up would cover the outputs)."""
    for plugin, settings in {"notebook-extension/tracker": {"windowingMode": "none"},
                             "apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = folder / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require_chromium()
    folder = tmp_path_factory.mktemp("lab")
    for path in source_notebooks():
        shutil.copy(path, folder / path.name)
    _widget_notebook(folder)
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
               "--ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
               # a workspace of its own: the user's saved one would reopen other notebooks
               f"--LabApp.workspaces_dir={folder / '.workspaces'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    _lab_settings(folder / ".lab-settings")
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(folder / ".lab-settings"),
           "WORKBOOK_BUILD_DIR": str(folder / "build"), "WORKBOOK_DATA_DIR": str(folder / "data")}
    server = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("JupyterLab did not start")
                time.sleep(0.5)
        yield {"base": base, "token": token, "folder": folder}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        yield page
        browser.close()


def _open(page, lab, name: str):
    page.goto(f"{lab['base']}/lab/tree/{name}?token={lab['token']}")
    # notebooks opened before stay in the workspace, hidden: wait for the visible one
    page.locator(".jp-Notebook .jp-Cell:visible").first.wait_for(timeout=120_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']:visible").first.wait_for(
        timeout=120_000)


def _run_all(page):
    """Run All Cells from the menu, again if the first code cell's prompt shows it did not
    start (a kernel still connecting can drop the request)."""
    prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt:visible").first
    for _ in range(3):
        page.click(".lm-MenuBar-itemLabel:text-is('Run')", timeout=30_000)
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')", timeout=30_000)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if re.search(r"\[(\*|\d+)\]", prompt.inner_text()):
                return
            time.sleep(0.5)
    raise AssertionError("Run All Cells did not start the notebook's cells")


def test_notebook_02_views_redraw_when_a_control_moves(lab, page):
    _open(page, lab, "engine_views.ipynb")
    _run_all(page)
    # three views, each drawn at once: an image with a PNG in it, before any control moves
    page.wait_for_function(
        "document.querySelectorAll('.widget-image').length >= 3", timeout=180_000)
    images = page.locator(".widget-image")
    first_view = images.nth(0)
    before = first_view.get_attribute("src")
    assert before and before.startswith(("blob:", "data:"))
    caption = page.locator(".widget-html").nth(0)
    assert "volume 0 of 39" in caption.inner_text()
    # the volume slider spans the notebook's width: at least one pixel per volume
    slider = page.locator(".widget-slider .noUi-target, .widget-slider .slider").first
    assert slider.bounding_box()["width"] >= 40
    page.locator(".widget-slider .noUi-handle").first.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "src => document.querySelectorAll('.widget-image')[0].getAttribute('src') !== src",
        arg=before, timeout=30_000)
    page.wait_for_function(
        "() => document.querySelectorAll('.widget-html')[0].innerText.includes('volume 5 of 39')",
        timeout=30_000)
    if os.environ.get("COURSE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        first_view.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "02_engine_views.png"))


def test_every_notebook_opens_in_the_lab(lab, page):
    """Each notebook opens with its title and objectives; one screenshot each on request."""
    for path in source_notebooks():
        _open(page, lab, path.name)
        title = nbformat.read(path, as_version=4).cells[0].source.splitlines()[0].lstrip("# ")
        # the notebook's own heading (the table of contents lists the same text, hidden)
        page.locator(".jp-Notebook .jp-RenderedMarkdown h1:visible",
                     has_text=title[:30]).first.wait_for(timeout=60_000)
        if os.environ.get("COURSE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"))
