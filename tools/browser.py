"""Headless Chromium (Debian's) driven by Playwright, on the real ComfyUI frontend."""

from __future__ import annotations

import contextlib

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


@contextlib.contextmanager
def frontend_page(url: str, *, width: int = 1600, height: int = 1000):
    """A page with ComfyUI's frontend loaded and its app ready."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager",
                               timeout=60000)
        try:
            yield page
        finally:
            browser.close()
