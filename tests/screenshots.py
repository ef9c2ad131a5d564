"""Screenshots the browser tests take of each console page, kept for people (README) and CI's artifacts.

They go to $SINGULARITY_SCREENSHOTS, or docs/screenshots in the checkout, where the README shows them:
a test run refreshes the committed pictures.
"""

from __future__ import annotations

import os
from pathlib import Path

from playwright.async_api import Page

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


def screenshot_dir() -> Path:
    directory = Path(os.environ.get("SINGULARITY_SCREENSHOTS") or DEFAULT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def save_screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save `page` as <dir>/<name>.png and return the path; the file is asserted non-empty."""
    path = screenshot_dir() / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 1000, f"{path}: the screenshot is empty"
    return path
