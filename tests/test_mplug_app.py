"""apps/vqa.py serves mPLUG from the shipped mplug-tiny-vqa checkpoint, end to end: the app started on a free port,
asked through gradio_client with model="mPLUG-tiny VQA" (EN and ZH), and every answer equal to what the shipped
checkpoint answers directly (mmkit.mplug.tasks.vqa.answer on the same preprocessed picture): the app serves that
model. How often it is right is the checkpoint's business (tests/test_mplug_checkpoints.py). Light on purpose:
tests/test_app_vqa.py covers the app itself."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from apps_harness import running_app  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

MODEL = "mPLUG-tiny VQA"


def test_the_app_answers_with_mplug(tmp_path):
    from mmkit import hub
    from mmkit.data.preprocess import preprocess_image
    from mmkit.data.text import ANSWERS
    from mmkit.data.world import make_scene, render
    from mmkit.mplug.tasks.vqa import answer as mplug_answer

    lone = tmp_path / "lone.png"
    render(make_scene([("circle", "red", "large", "top left")]), 192).save(lone)
    pair = tmp_path / "pair.png"
    render(make_scene([("square", "blue", "large", "center"), ("triangle", "yellow", "small", "bottom right")]),
           192).save(pair)
    cases = [(lone, "what color is the circle?", "red", "en"), (lone, "圆形是什么颜色的？", "红色", "zh"),
             (pair, "how many objects are there?", "2", "en"), (pair, "正方形是大的还是小的？", "大", "zh")]
    model = hub.load("mplug-tiny-vqa")
    direct = [mplug_answer(model, preprocess_image(str(path), size=64).tensor, q).answer for path, q, _, _ in cases]
    with running_app("apps/vqa.py") as app:
        client = Client(app.url, verbose=False)
        got = []
        for path, q, want, lang in cases:
            answer, label, heat, seen, details = client.predict(handle_file(str(path)), q, MODEL, "gradcam",
                                                                api_name="/answer")
            assert MODEL in details and Path(heat).exists() and Path(seen).exists()
            assert answer in ANSWERS[lang], (q, answer)
            got.append(answer)
    print(f"mPLUG in the app: {sum(g == c[2] for g, c in zip(got, cases))} / {len(cases)} right", got)
    assert got == direct, (got, direct)
