"""Start one of the kit's Gradio apps (``apps/NAME.py``) in a subprocess on a free port, and stop it cleanly.

    with running_app("apps/vqa.py") as app:          # waits until the page answers
        Client(app.url).predict(..., api_name="/answer")

Used by the app benchmarks (``mmkit bench vqa``) and the app tests. The apps live in the repository's ``apps/``
folder (next to ``mmkit/``), so this works from a clone, not from an installed wheel.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, NamedTuple

__all__ = ["ROOT", "free_port", "RunningApp", "running_app"]

ROOT = Path(__file__).resolve().parents[1]          # the repository: apps/ lives here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp(NamedTuple):
    url: str
    process: subprocess.Popen
    log: Path


def log_tail(log: Path, n: int = 60) -> str:
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
                raise RuntimeError(f"{script} exited with code {proc.returncode} before serving:\n{log_tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{script} did not serve {url} within {timeout:.0f} s:\n{log_tail(log)}")
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
