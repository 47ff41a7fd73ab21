"""The stored notebooks carry fresh outputs of a full-mode run, and figures survive CI's fast-mode execution."""
import os
from pathlib import Path

import nbformat
import pytest

from mmkit import notebooks as N

STORED = N.notebook_paths()
# the kit's notebooks: M6 (00-06), VLMo (07), mPLUG (08); each must be stored executed, any later one as well
EXPECTED = [f"{i:02d}" for i in range(9)]
_BY_NUMBER = {p.stem[:2]: p for p in STORED}
CHECKED = sorted(set(STORED) | {N.NOTEBOOK_DIR / f"{n}_missing.ipynb" for n in EXPECTED if n not in _BY_NUMBER})


def test_finds_the_kit_notebooks_in_order():
    names = [p.stem[:2] for p in STORED]
    assert names == sorted(names) and set(EXPECTED) <= set(names), f"missing: {sorted(set(EXPECTED) - set(names))}"
    assert len(set(names)) == len(names), "two notebooks share a number"
    assert [p.name for p in N.notebook_paths(["03", "00_shapes_world"])] == ["00_shapes_world.ipynb",
                                                                             "03_m6_pretraining.ipynb"]
    with pytest.raises(SystemExit, match="no notebook matches"):
        N.notebook_paths(["99_nothing"])


def test_source_hash_ignores_outputs_but_not_source():
    nb = nbformat.read(STORED[0], as_version=4)
    h = N.source_hash(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
            c.execution_count = None
    assert N.source_hash(nb) == h
    nb.cells[-1].source += " "
    assert N.source_hash(nb) != h


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.stem)
def test_stored_notebook_has_fresh_full_mode_outputs(path):
    assert path.exists(), f"no notebook numbered {path.stem[:2]} in notebooks/"
    nb = nbformat.read(path, as_version=4)
    rec = N.run_record(nb)
    assert rec is not None, f"{path.name} has no run record: run `python -m mmkit.notebooks --execute {path.stem}`"
    assert rec.mode == "full" and rec.notebook == path.name
    assert rec.source_sha256 == N.source_hash(nb), (
        f"{path.name}: stored outputs are stale; run `python -m mmkit.notebooks --execute {path.stem}`")
    assert not N.check_stored(path)
    assert path.stat().st_size <= 1.1 * N.MAX_BYTES
    n_images = sum(k.startswith("image/") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs for k in o.get("data", {}))
    assert n_images >= 1
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_progress_bars_store_their_final_state_as_text():
    """A tqdm widget's plain-text fallback holds the bar as it started ("0%"); the runner rewrites it from the stored
    widget state, so a static view of the notebook shows where the bar ended."""
    nb = nbformat.v4.new_notebook()
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    out = nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": view,
                                                       "text/plain": "train:   0%|          | 0/40 [00:00<?, ?it/s]"})
    other = nbformat.v4.new_output("display_data", data={"text/plain": "untouched"})
    nb.cells = [nbformat.v4.new_code_cell("...", outputs=[out, other])]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_a", "IPY_MODEL_b", "IPY_MODEL_c"]}},
        "a": {"model_name": "HTMLModel", "state": {"value": "train:\u2007 75%"}},
        "b": {"model_name": "FloatProgressModel", "state": {"value": 30.0, "max": 40.0}},
        "c": {"model_name": "HTMLModel", "state": {"value": "\u200730/40\u2007[00:03&lt;00:01]"}}}}}
    assert N.settle_progress_bars(nb) == 1
    assert out["data"]["text/plain"] == "train:  75%|███████   | 30/40 [00:03<00:01]"
    assert other["data"]["text/plain"] == "untouched"


def test_unexecuted_notebook_is_reported(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 1")]
    p = tmp_path / "t.ipynb"
    nbformat.write(nb, p)
    assert any("no run record" in q for q in N.check_stored(p))


def test_ci_backend_keeps_every_figure(tmp_path):
    """CI (test.sh) runs notebooks with the inline backend, under which each plotting cell yields an image; under
    Agg the same cells yield none. Executes a small notebook with the backend test.sh exports."""
    backend = os.environ.get("MPLBACKEND", "")
    assert "MPLBACKEND=" + N.INLINE_BACKEND in (Path(N.REPO) / "test.sh").read_text()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nimport os\nprint(os.environ['MMKIT_FAST'])"),
                nbformat.v4.new_code_cell("plt.plot([1, 2, 3]); plt.title('one'); plt.show()"),
                nbformat.v4.new_code_cell("fig, ax = plt.subplots(); ax.imshow([[0, 1], [1, 0]]); plt.show()"),
                nbformat.v4.new_code_cell("print('no figure here')")]
    src = tmp_path / "00_probe.ipynb"
    nbformat.write(nb, src)
    rec = N.execute(src, fast=True, out=tmp_path / "out.ipynb", verbose=False)
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert N.figureless_plot_cells(done) == []
    assert N.run_record(done) == rec and rec.source_sha256 == N.source_hash(done) and rec.mode == "fast"
    assert "1" in "".join(o.get("text", "") for o in done.cells[0].outputs)      # fast mode reached the kernel
    # the check can fail: the same notebook with its figures removed is caught
    for c in done.cells:
        c.outputs = [o for o in c.outputs if not any(k.startswith("image/") for k in o.get("data", {}))]
    assert N.figureless_plot_cells(done) == [1, 2]
    if backend:   # under test.sh the process itself runs with the backend the nbmake kernels inherit
        assert backend == N.INLINE_BACKEND
