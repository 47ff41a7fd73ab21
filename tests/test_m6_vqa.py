"""M6 generative VQA (M6 §4.2): preprocessing of odd pictures, the shipped m6-tiny-vqa checkpoint's accuracy per
question type (world test split and pictures drawn by this test, not by the world's renderer), answers with
confidence and alternatives, heat maps, zero-shot, and that fine-tuning learns."""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmkit import hub
from mmkit.data.augment import AugmentConfig, draw_augmented
from mmkit.data.scenes import render_uint8
from mmkit.data.preprocess import ImageInputError, open_image, preprocess_image
from mmkit.data.text import ANSWERS_EN, ANSWERS_ZH
from mmkit.data.world import make_scene, render, sample_scene
from mmkit.data.text import QTYPES
from mmkit.data.vqa import normalise_question, question_language
from mmkit.m6.tasks import vqa as V

sys.path.insert(0, str(Path(__file__).parent))
from _vqa_drawings import drawn_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Chance per type (uniform over the answers a question of the type can have) and the floors this test enforces:
# accuracy of the shipped m6-tiny-vqa measured on these very questions minus ~0.07-0.13. Measured (test split, 400
# other scenes, 2649 questions): colour 0.70, shape 0.65, size 0.82, count 0.72, position 0.60, existence 0.62,
# relation 0.49; drawn pictures (400 pairs): colour 0.77, shape 0.52, count 0.69, position 0.62.
# Existence and relation questions are NOT learned reliably by the tiny model (near chance): their floors only
# guard against a collapse, they claim nothing above chance.
CHANCE = {"colour": 1 / 6, "shape": 1 / 3, "size": 1 / 2, "count": 1 / 4, "existence": 1 / 2, "position": 1 / 9,
          "relation": 1 / 2}
WORLD_FLOOR = {"colour": 0.6, "shape": 0.55, "size": 0.75, "count": 0.65, "position": 0.52,
               "existence": 0.42, "relation": 0.3}
LEARNED = ("colour", "shape", "size", "count", "position")      # floors clearly above chance
DRAWN_FLOOR = {"colour": 0.6, "shape": 0.45, "count": 0.55, "position": 0.55}


@pytest.fixture(scope="module")
def model():
    return hub.load("m6-tiny-vqa")


# ---------------------------------------------------------------------------------------------------------
# Preprocessing: pictures people bring
# ---------------------------------------------------------------------------------------------------------

def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_world_images_pass_through_unchanged():
    for seed in (1, 2, 3):
        scene = sample_scene(seed)
        p = preprocess_image(render(scene, 32))
        assert torch.equal(p.tensor, render_uint8(scene, 32).float() / 255) and p.notes == []
        big = render(scene, 32).resize((256, 256), Image.Resampling.NEAREST)   # the app's example files
        assert torch.equal(preprocess_image(big).tensor, p.tensor)


def test_odd_modes_sizes_and_backgrounds():
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((20, 10, 44, 34), fill=(220, 38, 38, 255))
    p = preprocess_image(_png(rgba))
    assert p.tensor.shape == (3, 32, 32) and "transparent pixels put on white" in p.notes
    assert p.tensor[:, 0, 0].min() > 0.95                                     # transparent corner -> white
    assert p.tensor[0, 16, 16] > 0.8 and p.tensor[1, 16, 16] < 0.3            # the red disc survives
    pal = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert preprocess_image(_png(pal)).tensor.shape == (3, 32, 32)
    gray = preprocess_image(_png(rgba.convert("L")))
    assert any("grayscale" in n for n in gray.notes)
    tiny = preprocess_image(Image.new("RGB", (12, 12), "white"))
    assert any("upscaled" in n for n in tiny.notes)
    # off-white (cream) background -> balanced to the world's white; JPEG artefacts averaged away
    cream = Image.new("RGB", (300, 300), (225, 215, 190))
    ImageDraw.Draw(cream).rectangle((120, 120, 180, 180), fill=(40, 90, 220))
    p = preprocess_image(_png(cream, "JPEG", quality=30))
    assert any("balanced to white" in n for n in p.notes)
    assert p.tensor[:, 2, 2].min() > 0.93 and abs(float(p.tensor[0, 2, 2] - p.tensor[2, 2, 2])) < 0.04
    # a hollow outline is filled with its own colour
    hollow = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(hollow).rectangle((40, 40, 88, 88), outline=(34, 160, 70), width=5)
    p = preprocess_image(hollow)
    assert "filled the inside of hollow outlines" in p.notes
    centre = p.tensor[:, 16, 16]
    assert centre[1] > centre[0] + 0.3 and centre[1] > centre[2] + 0.3          # green inside, not white


def test_bad_pictures_get_clear_messages(tmp_path):
    with pytest.raises(ImageInputError, match="at least 8x8"):
        preprocess_image(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageInputError, match="not an image"):
        preprocess_image(b"this is text, not a picture")
    good = _png(Image.new("RGB", (200, 200), (250, 250, 250)))
    with pytest.raises(ImageInputError, match="truncated|damaged|unreadable"):
        preprocess_image(good[: len(good) // 2])
    with pytest.raises(ImageInputError, match="No image"):
        preprocess_image(None)
    with pytest.raises(ImageInputError, match="does not exist"):
        preprocess_image(tmp_path / "missing.png")
    huge = Image.new("RGB", (6000, 6000), (245, 245, 240))
    ImageDraw.Draw(huge).ellipse((2500, 2500, 3500, 3500), fill=(240, 200, 20))
    path = tmp_path / "huge.png"
    huge.save(path)
    p = preprocess_image(path)
    assert p.original_size == (6000, 6000) and any("downscaled from 6000x6000" in n for n in p.notes)
    assert p.tensor[2, 16, 16] < 0.3 and p.tensor[0, 16, 16] > 0.8             # the yellow disc, in the middle
    assert open_image(path).size == (6000, 6000)


def test_augmentations_keep_semantics():
    scene = make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right")])
    rng = random.Random(0)
    for _ in range(5):
        x = np.asarray(draw_augmented(scene, rng, AugmentConfig()), dtype=np.float32)   # (128, 128, 3)
        tl, br = x[:43, :43], x[-43:, -43:]
        assert ((tl[..., 0] - tl[..., 2]) > 80).mean() > 0.05                  # red stays in the top-left cell
        assert ((br[..., 2] - br[..., 0]) > 80).mean() > 0.01                  # blue in the bottom-right cell


# ---------------------------------------------------------------------------------------------------------
# Questions, answers, confidence, heat maps
# ---------------------------------------------------------------------------------------------------------

def test_question_pattern():
    assert normalise_question("  What COLOR is the circle ") == "what colour is the circle?"
    assert V.vqa_prompt("where is the square?") == "where is the square? answer:"        # M6 §4.2 pattern
    assert V.vqa_prompt("圆形在哪里") == "圆形在哪里？答案："
    assert question_language("图中有几个物体？") == "zh" and question_language("is it red?") == "en"


def test_answer_confidence_alternatives_and_heatmap(model):
    scene = make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right")])
    img = render_uint8(scene, 32).float() / 255
    a = V.answer(model, img, "What color is the circle?")
    assert a.answer in ANSWERS_EN[:6] and a.in_vocabulary and a.lang == "en"          # a colour word
    assert a.question == "what colour is the circle?"
    probs = [p for _, p in a.alternatives]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-4
    # the confidence is the answer's sequence probability, the same number its entry in the alternatives has
    assert abs(dict(a.alternatives).get(a.answer, a.confidence) - a.confidence) < 1e-5 and 0 < a.confidence <= 1
    z = V.answer(model, img, "正方形是什么颜色的？")
    assert z.lang == "zh" and z.answer in ANSWERS_ZH and all(alt in ANSWERS_ZH for alt, _ in z.alternatives)
    b = V.answer(model, img, "where is the square?", num_beams=3)                    # beam search
    assert b.answer in ANSWERS_EN and b.confidence > 0
    for method in ("gradcam", "saliency"):
        h = V.answer_heatmap(model, img, "where is the square?", "bottom right", method=method)
        assert h.shape == (32, 32) and float(h.min()) >= 0 and float(h.max()) == pytest.approx(1.0)
    # a colour answer comes from the object: with one square, its quadrant is hotter than the image on average
    # (both methods). "where is ...?" maps are not checked: they also light up the empty cells (evidence of absence).
    for pos, (rows, cols) in (("bottom right", (slice(16, 32), slice(16, 32))), ("top left", (slice(0, 16), slice(0, 16))),
                              ("bottom left", (slice(16, 32), slice(0, 16)))):
        one = render_uint8(make_scene([("square", "blue", "large", pos)]), 32).float() / 255
        a = V.answer(model, one, "what colour is the square?")
        for method in ("gradcam", "saliency"):
            h = V.answer_heatmap(model, one, a.question, a.answer, method=method)
            assert float(h[rows, cols].mean()) > 1.3 * float(h.mean()), (pos, method)
    with pytest.raises(ValueError, match="empty"):
        V.answer(model, img, "   ")


# ---------------------------------------------------------------------------------------------------------
# Accuracy: held-out world scenes, pictures drawn by this test, zero-shot, learning
# ---------------------------------------------------------------------------------------------------------

def test_world_test_split_accuracy_per_type(model):
    ev = V.evaluate_vqa(model, "test", n=160)
    print("world test split:", {k: round(v, 3) for k, v in ev.per_type.items()}, ev.per_lang)
    assert set(ev.per_type) == set(QTYPES) and ev.n_questions > 700
    for t, acc in ev.per_type.items():
        assert acc >= WORLD_FLOOR[t], (t, acc)
        assert t not in LEARNED or WORLD_FLOOR[t] > CHANCE[t] + 0.2
    assert min(ev.per_lang.values()) > 0.55
    assert all(r[2] in ANSWERS_EN + ANSWERS_ZH for r in ev.records[:50])     # generated text is an answer word


def test_drawn_pictures_accuracy_per_type(model):
    """240 pictures drawn by tests/_vqa_drawings.py (thick strokes, rotation, off-white, JPEG; not the world's
    renderer), 60 questions per type, EN + ZH."""
    pairs = drawn_pairs(60, seed=7)
    images = torch.stack([preprocess_image(p[0].png).tensor for p in pairs])
    ev = V.evaluate_vqa_images(model, images, [(q, a, t, lang) for _, q, a, t, lang in pairs])
    print("drawn pictures:", {k: round(v, 3) for k, v in ev.per_type.items()}, ev.n_questions)
    assert ev.n_questions == 240
    for t, acc in ev.per_type.items():
        assert acc >= DRAWN_FLOOR[t] > CHANCE[t] + 0.1, (t, acc)


def test_zero_shot_is_far_below_fine_tuned():
    answers, gen, ranked = V.zero_shot_answers(hub.load("m6-tiny-pretrained"), n=12)
    assert answers and all(isinstance(a.generated, str) for a in answers)
    assert gen.accuracy < 0.2 and ranked.accuracy < 0.4          # fine-tuned: 0.67 (test above)


def test_finetuning_learns_from_pretrained():
    from mmkit.train import TrainConfig

    cfg = V.VQAConfig(n_scenes=300, n_augmented=100)
    bank = V.vqa_bank(cfg, "train")
    tcfg = TrainConfig(**dict(V.VQA_TRAIN, steps=30, warmup_steps=5, batch_size=32, progress_bar=False, log_every=0))
    run = V.finetune_vqa(hub.load("m6-tiny-pretrained").train(), train_config=tcfg, config=cfg, bank=bank,
                         n_eval=0)
    h = run.result.history
    first, last = np.mean([x["loss"] for x in h[:3]]), np.mean([x["loss"] for x in h[-5:]])
    assert last < 0.6 * first, (first, last)
    assert np.mean([x["answer_acc"] for x in h[-5:]]) > 0.2 > np.mean([x["answer_acc"] for x in h[:2]])
