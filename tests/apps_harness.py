"""Start an mmkit app in a subprocess on a free port, and look at its page in headless Chromium.

    with running_app("apps/vqa.py") as app:
        Client(app.url).predict(..., api_name="/answer")
        screenshot(app.url, ARTIFACTS / "vqa.png")

Screenshots are test artifacts in `test-artifacts/` (git-ignored; `MMKIT_ARTIFACTS` moves them).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MMKIT_ARTIFACTS", ROOT / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp(NamedTuple):
    url: str
    process: subprocess.Popen
    log: Path


def _log_tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


@contextlib.contextmanager
def running_app(script: str, *args: str, timeout: float = 240.0) -> Iterator[RunningApp]:
    """Run `python script --port FREE *args` until the page answers; stop it (and its children) afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = Path(tempfile.mkstemp(prefix=Path(script).stem + "-", suffix=".log")[1])
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / script), "--port", str(port), *args], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{script} exited with code {proc.returncode} before serving:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{script} did not serve {url} within {timeout:.0f} s:\n{_log_tail(log)}")
            time.sleep(0.5)
        yield RunningApp(url, proc, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


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
