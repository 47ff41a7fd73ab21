"""Start an mmkit app in a subprocess on a free port, and look at its page in headless Chromium.

    with running_app("apps/vqa.py") as app:
        Client(app.url).predict(..., api_name="/answer")
        screenshot(app.url, ARTIFACTS / "vqa.png")

Screenshots are test artifacts in `test-artifacts/` (git-ignored; `MMKIT_ARTIFACTS` moves them).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mmkit.launch import ROOT, RunningApp, free_port, running_app  # noqa: F401  (re-exported for the tests)

ARTIFACTS = Path(os.environ.get("MMKIT_ARTIFACTS", ROOT / "test-artifacts"))


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("Chromium is not installed; `bash setup.sh` installs Debian's chromium (apt), "
                           "or run `apt-get install -y chromium`")
    return exe


def screenshot(url: str, path: Path, size: tuple[int, int] = (1200, 900), budget_ms: int = 20000) -> Path:
    """Headless Chromium screenshot once the page has loaded (--virtual-time-budget, see ENVIRONMENT.md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    return path


def dump_dom(url: str, budget_ms: int = 20000) -> str:
    """The page's DOM after scripts ran: lets a test check that the app's widgets rendered, not just pixels."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180).stdout


def not_blank(png: Path, min_colours: int = 8) -> bool:
    """A rendered page has text and widgets: many distinct colours, not one flat fill."""
    from PIL import Image
    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    return colours is None or len(colours) >= min_colours
