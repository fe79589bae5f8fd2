"""Headless Chromium for tests that look at a rendered page (no network, a throwaway profile)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_file: str | Path, png: str | Path, width: int = 1280, height: int = 2000) -> Path:
    """Render ``html_file`` with headless Chromium to a PNG (the caller skips when :func:`chromium` is None)."""
    exe = chromium()
    assert exe is not None, "no chromium executable on PATH"
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={width},{height}", Path(html_file).resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return png
