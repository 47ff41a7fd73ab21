"""Execute the kit's notebooks and store them with their outputs (``python -m mmkit.notebooks --execute``).

Teaching notebooks are read before they are run, so the repository keeps each one executed: figures inline, every
number of its prose printed by its own run. This module is the one way they are executed:

* in order (``00_...`` to the last), in a fresh kernel each, with matplotlib's inline backend so every figure is kept
  as a PNG output (``Agg`` would silently drop ``plt.show()``);
* the first code cell's outputs start with a *run record*: date, code version (``git describe``), wall time, mode and
  the sha256 of the notebook's source cells (:func:`source_hash`). A test compares that hash with the current
  source, so an edited notebook whose stored outputs are stale fails CI;
* stored notebooks stay small (<= ``MAX_BYTES``): large PNGs are downscaled / re-encoded after the run.

Full mode (the default) writes the executed notebooks back in place; ``--fast`` (``MMKIT_FAST=1``, what CI runs)
executes and times them without overwriting the stored full-mode outputs unless ``--out DIR`` is given. Wall times of
both modes are kept in ``notebooks/timings.json`` (what ``notebooks/README.md`` quotes).
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nbformat
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
TIMINGS = NOTEBOOK_DIR / "timings.json"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"   # keeps plt.show() figures as image/png outputs
MAX_BYTES = 2_000_000        # a stored notebook stays under ~2 MB (the budget)
MAX_IMAGE_WIDTH = 1400       # PNGs wider than this are downscaled before storing (notebook width is ~1000 px)
RECORD_KEY = "mmkit_run"     # metadata key of the run-record output (and of the notebook's metadata)
CELL_TIMEOUT = 3600          # seconds one cell may take before the run is declared hung


@dataclass
class RunRecord:
    """What the first output of a stored notebook says about the run that produced it."""
    notebook: str          # file name
    date: str              # UTC, ISO 8601
    code_version: str      # git describe --always --dirty (or "unknown" outside a checkout)
    commit: str            # full commit hash (or "unknown")
    mode: str              # "full" or "fast"
    wall_seconds: float    # wall time of the whole execution
    source_sha256: str     # source_hash() of the notebook at execution time

    def markdown(self) -> str:
        return (f"**Run record** · executed {self.date} · code `{self.code_version}` · {self.mode} mode · "
                f"{self.wall_seconds:.0f} s wall on this machine · source sha256 `{self.source_sha256[:16]}`")


def notebook_paths(names: Sequence[str] = ()) -> list[Path]:
    """The notebooks to run, in order. ``names`` may be file names, stems or number prefixes ("03", "03_m6")."""
    every = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return every
    out = []
    for name in names:
        hits = [p for p in every if p.name == name or p.stem == name or p.name.startswith(name)]
        if not hits:
            raise SystemExit(f"mmkit notebooks: no notebook matches {name!r}; choose from "
                             f"{', '.join(p.stem for p in every)}")
        out.extend(h for h in hits if h not in out)
    return sorted(out)


def source_hash(nb) -> str:
    """sha256 of the notebook's cells (type + source, in order): outputs, metadata and execution counts excluded."""
    h = hashlib.sha256()
    for cell in nb.cells:
        h.update(cell.cell_type.encode() + b"\0" + cell.source.encode("utf-8") + b"\0\0")
    return h.hexdigest()


def run_record(nb) -> RunRecord | None:
    """The run record stored in an executed notebook (None when it carries none)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}).get(RECORD_KEY)
            if meta:
                return RunRecord(**meta)
        return None
    return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _stamp(nb, record: RunRecord) -> None:
    """Put the record first in the first code cell's outputs (and in the notebook's metadata)."""
    out = nbformat.v4.new_output("display_data", data={"text/markdown": record.markdown(),
                                                      "text/plain": record.markdown()},
                                 metadata={RECORD_KEY: record.__dict__})
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.outputs = [out] + [o for o in first.outputs if RECORD_KEY not in o.get("metadata", {})]
    nb.metadata[RECORD_KEY] = record.__dict__


def shrink_images(nb, max_width: int = MAX_IMAGE_WIDTH, budget: int = MAX_BYTES) -> int:
    """Downscale PNG outputs wider than ``max_width``; if the notebook is still over ``budget`` bytes, re-encode the
    largest images as JPEG (quality 85) until it fits. Returns the notebook's size in bytes afterwards."""
    def size():
        return len(nbformat.writes(nb).encode())

    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    for o in pngs:
        im = Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
            buf = io.BytesIO(); im.save(buf, "PNG", optimize=True)
            o.data["image/png"] = base64.b64encode(buf.getvalue()).decode()
    if size() <= budget:
        return size()
    for o in sorted(pngs, key=lambda o: -len(o.data["image/png"])):
        im = Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))).convert("RGB")
        buf = io.BytesIO(); im.save(buf, "JPEG", quality=85)
        del o.data["image/png"]
        o.data["image/jpeg"] = base64.b64encode(buf.getvalue()).decode()
        if size() <= budget:
            break
    return size()


def settle_progress_bars(nb) -> int:
    """Write each tqdm widget's FINAL state into its plain-text fallback (which holds the bar as it started, "0%"):
    JupyterLab draws the stored widget state, but a static view of the notebook (GitHub, nbviewer, ``--check``) reads
    the text. Returns how many bars were settled."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            box = state.get(view.get("model_id", "")) if view else None
            if not box or box.get("model_name") != "HBoxModel":
                continue
            kids = [state.get(str(c).replace("IPY_MODEL_", ""), {}) for c in box["state"].get("children", [])]
            if len(kids) != 3 or not kids[1].get("model_name", "").endswith("ProgressModel"):
                continue                                   # not tqdm's [label, bar, counts] layout
            def text(k):
                return html.unescape(str(k.get("state", {}).get("value", ""))).replace("\u2007", " ")
            bar = kids[1]["state"]
            total, value = float(bar.get("max") or 0), float(bar.get("value") or 0)
            filled = int(10 * value / total) if total > 0 else 0
            out["data"]["text/plain"] = f"{text(kids[0])}|{'█' * filled}{' ' * (10 - filled)}|{text(kids[2])}"
            n += 1
    return n


def execute(path: Path, fast: bool = False, out: Path | None = None, verbose: bool = True) -> RunRecord:
    """Execute one notebook in a fresh kernel (cwd = notebooks/), stamp its run record and write it to ``out``
    (``path`` itself when None). Figures are kept with the inline backend. Raises nbclient's CellExecutionError,
    naming the cell, when a cell fails: nothing is written then."""
    from nbclient import NotebookClient   # the executor's one heavy import, kept out of `import mmkit.notebooks`

    nb = nbformat.read(path, as_version=4)
    digest = source_hash(nb)
    env = {"MPLBACKEND": INLINE_BACKEND, "MMKIT_FAST": "1" if fast else ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if not fast:
        os.environ.pop("MMKIT_FAST")
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    t_cell = [0.0]
    done = [0]

    def started(cell, cell_index, **_):
        t_cell[0] = time.perf_counter()

    def finished(cell, cell_index, **_):
        done[0] += 1
        if verbose:
            print(f"  {path.stem} cell {cell_index:>2} ({done[0]}/{n_code}) {time.perf_counter() - t_cell[0]:7.1f} s",
                  file=sys.stderr, flush=True)

    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
                            on_cell_start=started, on_cell_executed=finished)
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    wall = time.perf_counter() - t0
    record = RunRecord(notebook=path.name, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       code_version=_git("describe", "--always", "--dirty"), commit=_git("rev-parse", "HEAD"),
                       mode="fast" if fast else "full", wall_seconds=round(wall, 1), source_sha256=digest)
    _stamp(nb, record)
    settle_progress_bars(nb)
    n_bytes = shrink_images(nb)
    target = out if out is not None else path
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    if verbose:
        print(f"{path.name}: {record.mode} mode, {wall:.0f} s, stored {n_bytes / 1e6:.2f} MB -> {target}",
              file=sys.stderr, flush=True)
    return record


README = NOTEBOOK_DIR / "README.md"
TABLE_START, TABLE_END = "<!-- timings: written by python -m mmkit.notebooks -->", "<!-- /timings -->"


def _save_timing(record: RunRecord) -> None:
    data = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    data.setdefault(record.notebook, {})[record.mode] = {"wall_seconds": record.wall_seconds, "date": record.date,
                                                         "code_version": record.code_version}
    TIMINGS.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    update_readme_timings()


def timings_table() -> str:
    """The README's table of measured wall times (from ``notebooks/timings.json``)."""
    data = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    fmt = lambda d: f"{d['wall_seconds']:.0f} s ({d['date'][:10]})" if d else "not measured"
    rows = ["| notebook | full mode | fast mode (`MMKIT_FAST=1`, CI) |", "| --- | --- | --- |"]
    rows += [f"| {name} | {fmt(t.get('full'))} | {fmt(t.get('fast'))} |" for name, t in sorted(data.items())]
    return "\n".join(rows)


def update_readme_timings() -> None:
    """Rewrite the timing table between the README's markers (nothing else of the README is touched)."""
    if not README.exists():
        return
    text = README.read_text()
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        _, tail = rest.split(TABLE_END, 1)
        README.write_text(head + TABLE_START + "\n" + timings_table() + "\n" + TABLE_END + tail)


PLOT_CALLS = re.compile(r"plt\.show\(|\.savefig\(|plt\.(subplots|figure)\(")


def figureless_plot_cells(nb) -> list[int]:
    """Indices of code cells that draw a matplotlib figure (``plt.show()`` / ``plt.subplots`` / ...) but carry no
    image output: under the ``Agg`` backend that is every one of them, under the inline backend a broken figure."""
    bad = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and PLOT_CALLS.search(cell.source):
            if not any(k.startswith("image/") for o in cell.get("outputs", []) for k in o.get("data", {})):
                bad.append(i)
    return bad


def check_stored(path: Path) -> list[str]:
    """Problems with a stored notebook: no outputs, no run record, or a record whose source hash is stale."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    rec = run_record(nb)
    if rec is None:
        problems.append(f"{path.name}: no run record (not executed by `python -m mmkit.notebooks --execute`)")
    elif rec.source_sha256 != source_hash(nb):
        problems.append(f"{path.name}: stored outputs are stale (source changed since {rec.date}); re-run "
                        f"`python -m mmkit.notebooks --execute {path.stem}`")
    if not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
        problems.append(f"{path.name}: stored without outputs")
    if figureless_plot_cells(nb):
        problems.append(f"{path.name}: plotting cells {figureless_plot_cells(nb)} stored without an image")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmkit notebooks", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="notebooks to run (file name, stem or number prefix); default: all")
    p.add_argument("--execute", action="store_true", help="execute them (in order) and store the outputs")
    p.add_argument("--fast", action="store_true", help="fast mode (MMKIT_FAST=1, what CI runs); stored notebooks "
                                                        "are not overwritten unless --out is given")
    p.add_argument("--out", type=Path, help="write executed notebooks into this folder instead")
    p.add_argument("--check", action="store_true", help="only check the stored notebooks (outputs, fresh hash)")
    a = p.parse_args(argv)
    paths = notebook_paths(a.names)
    if a.check or not a.execute:
        problems = [q for path in paths for q in check_stored(path)]
        for path in paths:
            rec = run_record(nbformat.read(path, as_version=4))
            print(f"{path.name:<28}" + (f"{rec.mode} {rec.wall_seconds:>6.0f} s  {rec.date}  {rec.code_version}"
                                        if rec else "not executed"))
        for q in problems:
            print("PROBLEM:", q)
        if not a.execute:
            return 1 if problems else 0
    failed = []
    for path in paths:
        try:
            if a.fast and not a.out:     # time it, keep the stored full-mode outputs
                with tempfile.TemporaryDirectory() as tmp:
                    rec = execute(path, fast=True, out=Path(tmp) / path.name)
            else:
                rec = execute(path, fast=a.fast, out=(a.out / path.name) if a.out else None)
        except Exception as e:   # report the failing notebook and go on with the next one
            print(f"{path.name}: FAILED: {str(e)[-3000:]}", file=sys.stderr, flush=True)
            failed.append(path.name)
            continue
        _save_timing(rec)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
