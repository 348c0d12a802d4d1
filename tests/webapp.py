"""Helpers for the web-app tests (tests/test_ch0*_app.py): serve a Gradio page in this process
and drive it in a real headless Chromium (Debian's `chromium` package) with Playwright.

Playwright's own browser downloads are never used: it starts the system's chromium. The tests
skip, saying why, only where chromium is not installed (`.ci/run` installs it).

Set LLMFS_SCREENSHOT_DIR (e.g. docs/screenshots) to keep a PNG of each page the tests check.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium package for the browser tests (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(demo):
    """Serve a Gradio app on a free local port; yield its URL; close it afterwards."""
    from llmfs.apps import launch

    url = launch(demo, port=free_port(), block=False)
    try:
        yield url
    finally:
        demo.close()


@contextmanager
def chromium():
    """A headless system Chromium, started through Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser, url: str):
    """A page showing `url`; on leaving, checks that the page asked nothing of any other host."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("data:")
            else elsewhere.append(r.url))
    page.goto(url)
    page.wait_for_selector("#message", state="attached")  # every app has one; Gradio has built the page
    try:
        yield page
    finally:
        page.close()
    assert not elsewhere, f"the page reached beyond {url}: {elsewhere}"


@contextmanager
def slowed_generation(seconds: float = 0.1, model_class=None):
    """Each forward pass of a `model_class` (default GPTModel) takes `seconds` longer: a tiny model is too
    fast to watch stream (0.1 s, so a browser on a loaded machine still sees the text grow in several steps)."""
    import torch

    if model_class is None:
        from ch04.gpt import GPTModel as model_class

    def slow_down(module, args, output):
        if isinstance(module, model_class):
            time.sleep(seconds)

    hook = torch.nn.modules.module.register_module_forward_hook(slow_down)
    try:
        yield
    finally:
        hook.remove()


def record_changes(page, selector: str, prop: str = "value") -> None:
    """Start keeping, in the page, each new non-empty `prop` of `selector`; `recorded` returns them."""
    page.evaluate("""([sel, prop]) => { window.seen = [];
        setInterval(() => { const v = document.querySelector(sel)?.[prop];
                            if (v && window.seen.at(-1) !== v) window.seen.push(v); }, 5); }""", [selector, prop])


def recorded(page) -> list[str]:
    return page.evaluate("window.seen")


@contextmanager
def app_page(demo, browser=None):
    """Serve `demo` and yield a page showing it, in `browser` or in a Chromium started for it."""
    if browser is None:
        with chromium() as browser, app_page(demo, browser) as page:
            yield page
        return
    with served(demo) as url, open_page(browser, url) as page:
        yield page


def wait_for_text(page, selector: str, expected: str, timeout_ms: int = 30_000, prop: str = "value") -> None:
    """Wait until the element's `prop` equals `expected`; otherwise fail showing both."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"([sel, exp]) => document.querySelector(sel)?.{prop} === exp",
                               arg=[selector, expected], timeout=timeout_ms)
    except PlaywrightTimeout:
        actual = page.eval_on_selector(selector, f"el => el.{prop}") if page.query_selector(selector) else None
        assert actual == expected, (f"{selector} did not show the expected text in {timeout_ms / 1000:.0f} s:\n"
                                    f"expected {expected!r}\nshown    {actual!r}")


MESSAGE = "#message [data-testid=markdown]"  # the text, not the progress timer Gradio lays over it


def message_text(page) -> str:
    """The app's message line once it is not empty."""
    page.wait_for_function(f"() => document.querySelector('{MESSAGE}')?.innerText.trim().length > 0",
                           timeout=20_000)
    return page.inner_text(MESSAGE).strip()


def screenshot(page, name: str) -> None:
    """Save the page as <LLMFS_SCREENSHOT_DIR>/<name>.png when that variable is set."""
    folder = os.environ.get("LLMFS_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
