"""apps/vqa.py end to end: started on a free port in a subprocess, called through gradio_client with world scenes,
with this test's own drawings and with every kind of bad input, queued concurrent callers, and the page rendered
by headless Chromium (screenshot kept in test-artifacts/)."""
from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from _vqa_drawings import drawn_pairs  # noqa: E402
from apps_harness import ARTIFACTS, dump_dom, not_blank, running_app, screenshot  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


# Floors: measured accuracy of the shipped m6-tiny-vqa minus a margin (test_m6_vqa.py measures it on far more
# questions); chance over the answers of a type is 1/9 - 1/2.
APP_WORLD_FLOOR = 0.4
APP_DRAWN_FLOOR = 0.3


@pytest.fixture(scope="module")
def app():
    with running_app("apps/vqa.py") as a:
        yield a


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from mmkit.data.world import make_scene, render

    d = tmp_path_factory.mktemp("vqa_app")
    scene = make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right"),
                        ("triangle", "yellow", "large", "center")])
    render(scene, 96).save(d / "scene.png")
    Image.new("RGB", (1, 1), "white").save(d / "one.png")
    huge = Image.new("RGB", (6000, 6000), (248, 248, 246))
    ImageDraw.Draw(huge).ellipse((300, 300, 1600, 1600), fill=(34, 160, 70))           # top left
    huge.save(d / "huge.png")
    (d / "notes.png").write_text("I am text with a .png name")
    good = io.BytesIO()
    Image.new("RGB", (300, 300), "white").save(good, "PNG")
    (d / "truncated.png").write_bytes(good.getvalue()[:200])
    return d


def ask(client, path, question, **kw):
    return client.predict(handle_file(str(path)), question, api_name="/answer", **kw)


def test_world_scene_answers(client, files, tmp_path):
    from mmkit.data.text import ANSWERS, questions
    from mmkit.data.world import render, sample_scene, split_seeds

    out = ask(client, files / "scene.png", "what color is the circle?")        # the example call
    answer, label, heat, seen, details = out
    assert answer in ANSWERS["en"][:6]                                         # a colour word
    assert label["label"] in ANSWERS["en"] and 0.0 < label["confidences"][0]["confidence"] <= 1.0
    assert Path(heat).exists() and Path(seen).exists() and "ms" in details
    with Image.open(seen) as im:
        assert im.size[0] == im.size[1]
    # held-out world scenes, one question of each type (English and Chinese), answers checked against the scene
    right = total = 0
    for k, seed in enumerate(split_seeds("test", 4, start=500)):
        scene = sample_scene(seed)
        path = tmp_path / f"world{k}.png"
        render(scene, 64).save(path)
        lang = ("en", "zh")[k % 2]
        seen_types = set()
        for qa in questions(scene, lang):
            if qa.qtype in seen_types:
                continue
            seen_types.add(qa.qtype)
            got = ask(client, path, qa.question)[0]
            assert got in ANSWERS[lang], (qa.question, got)
            right += got == qa.answer
            total += 1
    assert total >= 16 and right / total >= APP_WORLD_FLOOR, f"{right}/{total} right"


def test_own_drawings(client, tmp_path):
    pairs = drawn_pairs(3, seed=11)                 # 12 pictures drawn by the test (not the world's renderer)
    right = 0
    for k, (drawn, q, a, t, lang) in enumerate(pairs):
        p = tmp_path / f"drawn{k}.jpg"
        p.write_bytes(drawn.png)
        right += ask(client, p, q)[0] == a
    assert right >= APP_DRAWN_FLOOR * 12, f"{right}/12 drawn pictures answered right"   # see test_m6_vqa.py


@pytest.mark.parametrize("name,question,message", [
    (None, "what colour is the circle?", "No image"),
    ("notes.png", "what colour is the circle?", "not an image"),
    ("truncated.png", "what colour is the circle?", "truncated|damaged|unreadable"),
    ("one.png", "what colour is the circle?", "at least 8x8"),
    ("scene.png", "", "question is empty"),
    ("scene.png", "what " * 1000, "5,000 characters"),
    ("scene.png", "😀🎉\x00\x07", "no words left"),
])
def test_bad_input_gets_a_clear_message(client, files, name, question, message):
    import re

    image = None if name is None else handle_file(str(files / name))
    with pytest.raises(Exception) as err:
        client.predict(image, question, api_name="/answer")
    text = str(err.value)
    assert re.search(message, text), text
    assert "Traceback" not in text


def test_big_pictures_emoji_and_control_characters_are_handled(client, files):
    answer, _, _, _, details = ask(client, files / "huge.png", "what colour is the circle? 😀\x07")
    assert answer in ("red", "green", "blue", "yellow", "purple", "orange")
    assert "downscaled from 6000x6000" in details and "emoji" in details and "control character" in details


def test_concurrent_users_are_queued(app, client, files):
    questions = ["what colour is the circle?", "where is the square?", "how many objects are there?",
                 "what shape is the yellow object?"] * 2
    alone = [ask(client, files / "scene.png", q)[0] for q in questions[:4]] * 2

    def one(q):
        return Client(app.url, verbose=False).predict(handle_file(str(files / "scene.png")), q, api_name="/answer")[0]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, questions)) == alone          # 8 at once: queued, same answers as one by one


def test_page_renders_in_chromium(app):
    shot = screenshot(app.url, ARTIFACTS / "vqa_app.png")
    assert not_blank(shot)
    dom = dump_dom(app.url)
    for text in ("Ask a picture a question", "New random scene", "Confidence and top alternatives",
                 "Where the answer came from", "What the model saw", "M6-tiny VQA"):
        assert text in dom, text
