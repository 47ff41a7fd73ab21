"""M6 generative VQA (M6 §4.2): preprocessing of odd pictures, the shipped m6-tiny-vqa checkpoint's accuracy per
question type (world test split and pictures drawn by this test, not by the world's renderer), answers with
confidence and alternatives, heat maps, zero-shot, and that fine-tuning learns."""
from __future__ import annotations

import io
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmkit import hub
from mmkit.data.augment import AugmentConfig, draw_augmented
from mmkit.data.scenes import render_uint8, sample_scenes
from mmkit.data.preprocess import ImageInputError, open_image, preprocess_image
from mmkit.data.text import ANSWERS_EN, ANSWERS_ZH
from mmkit.data.world import COLOURS, COLOURS_ZH, SHAPES, SHAPES_ZH, make_scene, render, sample_scene
from mmkit.data.text import QTYPES
from mmkit.data.vqa import eval_questions, normalise_question, question_language
from mmkit.m6.tasks import vqa as V

sys.path.insert(0, str(Path(__file__).parent))
from _blind import blind_eval, blind_prior  # noqa: E402
from _vqa_drawings import drawn_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Accuracy floors are "blind baseline + margin", the blind baseline computed in the test (tests/_blind.py: the most
# frequent training answer for the exact question string, fitted on 6000 train scenes) on the very questions the
# model is scored on. A model that never looks at the image gets exactly the blind score, so it fails every floor.
#
# THE TABLE TO RAISE: the margin the model must clear over the blind baseline, per question type (None: no per-type
# floor). Measured for the shipped m6-tiny-vqa (one code token per world cell, relation questions asked in one
# direction, 1800 + 500 steps: 8.1 CPU-minutes; issue 12) on this test's questions (world test split, 160 scenes, 1062
# questions; model / blind): colour 0.925 / 0.100, shape 0.950 / 0.331, size 0.981 / 0.519, count 0.887 / 0.644,
# existence 0.931 / 0.525, position 1.000 / 0.081, relation 0.873 / 0.559, overall 0.939 / 0.385; English 0.924, Chinese
# 0.954. (The 2400 + 600-step model before it, 12 CPU-minutes: overall 0.958, existence 0.981, relation 0.931; the
# patch-token model: overall 0.655, existence 0.537, relation 0.392.)
MARGIN_OVER_BLIND = {"colour": 0.75, "shape": 0.50, "size": 0.40, "count": 0.15, "existence": 0.38,
                     "position": 0.80, "relation": 0.30, "overall": 0.45, "per_language": 0.45}
# Issue 12's targets, absolute: >= 0.90 overall and in each language, every type >= 0.80.
ABSOLUTE_FLOOR = {"overall": 0.90, "colour": 0.90, "shape": 0.90, "size": 0.95, "count": 0.82, "existence": 0.90,
                  "position": 0.95, "relation": 0.83, "per_language": 0.90}
# Pictures drawn by tests/_vqa_drawings.py (60 per type; model / blind measured): colour 0.983 / 0.250, shape 0.983 /
# 0.383, count 0.700 / 0.367, position 1.000 / 0.133, overall 0.917 / 0.283 (issue 12's target: >= 0.85). The
# relation phase (no augmented views) costs drawn counting: 0.933 before it in the 2400-step model.
DRAWN_MARGIN_OVER_BLIND = {"colour": 0.60, "shape": 0.50, "count": 0.30, "position": 0.70, "overall": 0.55}
DRAWN_ABSOLUTE_FLOOR = 0.90


@pytest.fixture(scope="module")
def prior():
    return blind_prior()


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


def test_long_thin_pictures_are_refused_or_shrunk_before_padding(tmp_path):
    """Issue 17: a 1 kB PNG of 45000x8 pixels passed the pixel-count check (0.36 MP) and was padded to a 45000 x 45000
    square: ~6 GB. The longest side is bounded, and pictures are shrunk before they are padded."""
    import tracemalloc

    strip = _png(Image.new("RGB", (45000, 8), "white"))
    assert len(strip) < 2000
    with pytest.raises(ImageInputError, match="45000x8 pixels; sides longer than 10,000 pixels are refused"):
        preprocess_image(strip)
    with pytest.raises(ImageInputError, match="sides longer than"):
        preprocess_image(np.zeros((8, 45000, 3), np.uint8))
    tall = Image.new("RGB", (9, 9000), (250, 250, 250))                  # allowed: shrunk first, then padded
    ImageDraw.Draw(tall).rectangle((0, 4000, 8, 5000), fill=(220, 38, 38))
    tracemalloc.start()
    p = preprocess_image(_png(tall))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert p.tensor.shape == (3, 32, 32) and any("padded from 9x9000" in n for n in p.notes)
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MB"                   # padding first took 9000^2 x 3 = 243 MB


def test_arrays_and_tensors_outside_their_range_are_refused(model):
    """Issue 17: a float image in 0-255 was answered (nonsense); float arrays in [0, 1] were read as 0-255 (black)."""
    lone = render_uint8(make_scene([("circle", "red", "large", "top left")]), 32).float() / 255
    with pytest.raises(ValueError, match=r"values in \[0, 1\], this one goes from 38 to 252; divide a 0-255 image by 255"):
        V.answer(model, lone * 255, "what colour is the circle?")
    with pytest.raises(ValueError, match="NaN"):
        V.answer(model, torch.full((3, 32, 32), float("nan")), "what colour is the circle?")
    arr = lone.permute(1, 2, 0).numpy()                                  # (H, W, 3) float in [0, 1]
    assert torch.allclose(preprocess_image(arr).tensor, lone, atol=1 / 255)
    assert V.answer(model, arr, "what colour is the circle?").answer == "red"
    with pytest.raises(ImageInputError, match=r"float image array holds values from 38 to 252"):
        preprocess_image(arr * 255)
    assert V.answer(model, lone.double(), "what colour is the circle?").answer == "red"   # was a raw dtype RuntimeError
    with pytest.raises(ImageInputError, match="Cannot read an image from a int"):
        preprocess_image(42)                                                              # was an AttributeError
    with pytest.raises(ImageInputError, match="channels first"):
        preprocess_image(np.zeros((3, 40, 40), np.uint8))
    with pytest.raises(ImageInputError, match="values from -3 to 300"):
        preprocess_image(np.array([[-3, 300]] * 40 * 20, np.int32).reshape(40, 40))


def test_answer_refuses_other_models_string_tokenizers_and_bad_sizes(model):
    """Issue 17 sweep: answer(mmkit.load('vqgan-world'), ...) raised AttributeError, tokenizer='world' "'str' object
    is not callable"; preprocess_image(size=100000) tried to allocate ~30 GB, size=0 / '32' gave raw PIL errors."""
    lone = render_uint8(make_scene([("circle", "red", "large", "top left")]), 32).float() / 255
    with pytest.raises(ValueError, match=r"answer\(\) needs an M6 model that generates text.*got Linear"):
        V.answer(torch.nn.Linear(2, 2), lone, "what colour is the circle?")
    with pytest.raises(ValueError, match="tokenizer must be a tokenizer object"):
        V.answer(model, lone, "what colour is the circle?", tokenizer="world")
    for size in (100_000, 0, -32, 2.5, "32", True):
        with pytest.raises(ValueError, match=r"preprocess_image: size must be a whole number of pixels from 1 to 1024"):
            preprocess_image(lone, size=size)


def test_questions_without_words_or_too_long_are_refused(model):
    """Issue 17: a question of control characters was answered; a 1500-word question was silently cut to 48 tokens."""
    lone = render_uint8(make_scene([("circle", "red", "large", "top left")]), 32).float() / 255
    for q in ("\x00\x07\x1b", "\u200b\u200b", "?!?", "😀🎉"):
        with pytest.raises(ValueError, match="no words"):
            V.answer(model, lone, q)
    with pytest.raises(ValueError, match=r"the question is too long: \d+ tokens .* at most 48"):
        V.answer(model, lone, "what colour is the circle " * 300)
    with pytest.raises(ValueError, match="too long"):
        V.answer_heatmap(model, lone, "what colour is the circle " * 300, "red")
    with pytest.raises(ValueError, match="must be a string"):
        V.answer(model, lone, None)
    for kw in (dict(top_k=0), dict(num_beams=0), dict(max_new_tokens=-1), dict(max_new_tokens=10_000)):
        with pytest.raises(ValueError, match="must be a whole number"):
            V.answer(model, lone, "what colour is the circle?", **kw)
    # control characters inside a real question separate words; the answer is the same as without them
    assert V.answer(model, lone, "what\x00colour is\u200bthe circle?").answer == "red"


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
    # one object: every question has exactly one right answer, and the model must give it (not just "a colour word")
    lone = render_uint8(make_scene([("circle", "red", "large", "top left")]), 32).float() / 255
    a = V.answer(model, lone, "What color is the circle?")
    assert a.answer == "red" and a.in_vocabulary and a.lang == "en"
    assert a.question == "what colour is the circle?"
    probs = [p for _, p in a.alternatives]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-4
    # the confidence is the answer's sequence probability, the same number its entry in the alternatives has
    assert a.alternatives[0][0] == "red" and abs(a.alternatives[0][1] - a.confidence) < 1e-5 and 0.3 < a.confidence <= 1
    z = V.answer(model, lone, "圆形是什么颜色的？")
    assert z.lang == "zh" and z.answer == "红色" and all(alt in ANSWERS_ZH for alt, _ in z.alternatives)
    b = V.answer(model, lone, "where is the circle?", num_beams=3)                  # beam search
    assert b.answer == "top left" and b.confidence > 0
    assert V.answer(model, lone, "圆形在哪里？").answer == "左上方"
    assert V.answer(model, lone, "is the circle small or large?").answer == "large"
    scene = make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right")])
    img = render_uint8(scene, 32).float() / 255
    for method in ("gradcam", "saliency"):
        h = V.answer_heatmap(model, img, "where is the square?", "bottom right", method=method)
        assert h.shape == (32, 32) and float(h.min()) >= 0 and float(h.max()) == pytest.approx(1.0)
    # a colour answer comes from the object: with one square, its quadrant is hotter than the image on average
    # (both methods). "where is ...?" maps are not checked: they also light up the empty cells (evidence of absence).
    for pos, (rows, cols) in (("bottom right", (slice(16, 32), slice(16, 32))), ("top left", (slice(0, 16), slice(0, 16))),
                              ("bottom left", (slice(16, 32), slice(0, 16)))):
        one = render_uint8(make_scene([("square", "blue", "large", pos)]), 32).float() / 255
        a = V.answer(model, one, "what colour is the square?")
        assert a.answer == "blue", (pos, a.answer)
        for method in ("gradcam", "saliency"):
            h = V.answer_heatmap(model, one, a.question, a.answer, method=method)
            assert float(h[rows, cols].mean()) > 1.3 * float(h.mean()), (pos, method)
    with pytest.raises(ValueError, match="empty"):
        V.answer(model, img, "   ")


def test_the_colour_of_a_lone_object_is_read_from_the_picture(model, prior):
    """Every colour x shape alone in the middle: the question string is the same for all colours of a shape, so the
    blind baseline gets at most one colour per shape right (3 of 18); the model has to read the pixels."""
    from mmkit.data.world import COLOURS, SHAPES

    items, images = [], []
    for shape in SHAPES:
        for colour in COLOURS:
            images.append(render_uint8(make_scene([(shape, colour, "large", "center")]), 32).float() / 255)
            items.append((f"what colour is the {shape}?", colour, "colour", "en"))
    ev = V.evaluate_vqa_images(model, torch.stack(images), items)
    blind = blind_eval(prior, items)
    right, blind_right = round(ev.accuracy * 18), round(blind.accuracy * 18)
    print("lone objects: model", right, "/ 18, blind", blind_right, "/ 18")
    assert blind_right <= 3 and right >= 17 and right >= blind_right + 12, (right, blind_right)


# ---------------------------------------------------------------------------------------------------------
# Accuracy: held-out world scenes, pictures drawn by this test, zero-shot, learning
# ---------------------------------------------------------------------------------------------------------

def _floors(ev, blind, margins):
    """Assert accuracy >= blind + margin overall and for every type with a margin; return the table printed."""
    rows = {t: (round(ev.per_type[t], 3), round(blind.per_type[t], 3)) for t in ev.per_type}
    rows["overall"] = (round(ev.accuracy, 3), round(blind.accuracy, 3))
    assert ev.accuracy >= blind.accuracy + margins["overall"], ("overall", ev.accuracy, blind.accuracy)
    for t, acc in ev.per_type.items():
        m = margins.get(t)
        if m is not None:
            assert acc >= blind.per_type[t] + m, (t, acc, blind.per_type[t], m)
    return rows


def test_world_test_split_accuracy_per_type(model, prior):
    ev = V.evaluate_vqa(model, "test", n=160)
    blind = blind_eval(prior, [(r[0], r[1], r[3], r[4]) for r in ev.records])   # the same questions, no image
    print("world test split (model, blind):", _floors(ev, blind, MARGIN_OVER_BLIND), ev.per_lang, blind.per_lang)
    assert set(ev.per_type) == set(QTYPES) and ev.n_questions > 700
    with pytest.raises(AssertionError):                      # the floors refuse a model that never looks at the image
        _floors(blind, blind, MARGIN_OVER_BLIND)
    for lang, acc in ev.per_lang.items():
        assert acc >= blind.per_lang[lang] + MARGIN_OVER_BLIND["per_language"], (lang, acc, blind.per_lang[lang])
        assert acc >= ABSOLUTE_FLOOR["per_language"], (lang, acc)
    assert ev.accuracy >= ABSOLUTE_FLOOR["overall"], ev.accuracy
    for t, acc in ev.per_type.items():
        assert acc >= ABSOLUTE_FLOOR.get(t, 0.0), (t, acc)
    assert all(r[2] in ANSWERS_EN + ANSWERS_ZH for r in ev.records[:50])     # generated text is an answer word


def test_drawn_pictures_accuracy_per_type(model, prior):
    """240 pictures drawn by tests/_vqa_drawings.py (thick strokes, rotation, off-white, JPEG; not the world's
    renderer), 60 questions per type, EN + ZH."""
    pairs = drawn_pairs(60, seed=7)
    images = torch.stack([preprocess_image(p[0].png).tensor for p in pairs])
    items = [(q, a, t, lang) for _, q, a, t, lang in pairs]
    ev = V.evaluate_vqa_images(model, images, items)
    blind = blind_eval(prior, items)
    print("drawn pictures (model, blind):", _floors(ev, blind, DRAWN_MARGIN_OVER_BLIND), ev.n_questions)
    assert ev.n_questions == 240 and set(ev.per_type) == set(DRAWN_MARGIN_OVER_BLIND) - {"overall"}
    assert ev.accuracy >= DRAWN_ABSOLUTE_FLOOR, ev.accuracy
    with pytest.raises(AssertionError):
        _floors(blind, blind, DRAWN_MARGIN_OVER_BLIND)


_PAIR_EN = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_PAIR_ZH = re.compile(rf"({'|'.join(COLOURS_ZH.values())})({'|'.join(SHAPES_ZH.values())})")


def _named_pairs(text: str) -> set:
    """(colour, shape) pairs a generated text names, English or Chinese ("a small blue square", "蓝色正方形")."""
    zh_c = {v: k for k, v in COLOURS_ZH.items()}
    zh_s = {v: k for k, v in SHAPES_ZH.items()}
    return set(_PAIR_EN.findall(text)) | {(zh_c[c], zh_s[s]) for c, s in _PAIR_ZH.findall(text)}


def test_zero_shot_reads_the_picture_but_does_not_answer(model, prior):
    """M6 §4.2 "without finetuning": the pretrained model continues "question ... answer:" with a caption of the
    picture (it reads the image: the objects it names are in *its* scene far more often than in another scene), but
    it does not answer: below the blind baseline, far below the fine-tuned model on the same questions."""
    n = 12
    answers, gen, ranked = V.zero_shot_answers(hub.load("m6-tiny-pretrained"), n=n)
    scenes = sample_scenes("test", n)
    index = [i for i, _ in eval_questions(scenes, 0)]                  # the scene of every zero-shot question
    assert len(index) == len(answers) and all(isinstance(a.generated, str) for a in answers)
    named = own = other = 0
    for i, a in zip(index, answers):
        pairs = _named_pairs(a.generated)
        if pairs:
            named += 1
            own += pairs <= {(o.colour, o.shape) for o in scenes[i].objects}
            other += pairs <= {(o.colour, o.shape) for o in scenes[(i + 1) % n].objects}
    print(f"zero-shot: {named}/{len(answers)} continuations name objects; all in their own scene {own}, "
          f"all in the next scene {other}; accuracy generated {gen.accuracy:.3f} ranked {ranked.accuracy:.3f}")
    assert named >= len(answers) // 2                                  # measured 66 / 79
    assert own >= 0.65 * named and own - other >= 0.4 * named           # measured 59 vs 10 of 66
    fine_tuned = V.evaluate_vqa(model, "test", n=n)
    assert [r[0] for r in fine_tuned.records] == [a.question for a in answers]      # the same questions
    blind = blind_eval(prior, [(a.question, a.gold, a.qtype, a.lang) for a in answers])
    assert gen.accuracy <= blind.accuracy - 0.2 and ranked.accuracy <= blind.accuracy - 0.2   # 0.00 / 0.03 vs 0.37
    assert fine_tuned.accuracy >= blind.accuracy + 0.2 >= max(gen.accuracy, ranked.accuracy) + 0.4   # 0.73


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


def test_cell_code_head_names_the_cells_then_fine_tuning_leaves_the_image_side_alone():
    """Issue 12's visual tokens: the code head learns each cell's object from frozen CNN features (well above the
    majority class of the same cells), then the answer fine-tune (image side x0) trains the Transformer only."""
    from mmkit.data.world import object_labels
    from mmkit.m6.model import IMAGE_SIDE, M6Model
    from mmkit.train import TrainConfig

    torch.manual_seed(0)
    model = M6Model.with_cell_code(hub.load("m6-tiny-pretrained")).train()
    cfg = V.VQAConfig(n_scenes=600, n_augmented=200, code_steps=0, image_lr_scale=0.0)
    bank = V.vqa_bank(cfg, "train")
    code = V.train_cell_code(model, bank, steps=150, n_test=300)
    labels = object_labels(sample_scenes("test", 300))                 # the held-out scenes the head is scored on
    occupied = labels[..., 0] > 0
    for j, name in enumerate(("colour", "shape", "size")):
        majority = float(labels[..., j][occupied].bincount().max()) / int(occupied.sum())
        assert code["test"][name] >= majority + 0.3, (name, code["test"][name], majority)
    assert code["test"]["empty"] >= 0.95
    image_side = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(IMAGE_SIDE)}
    tcfg = TrainConfig(**dict(V.VQA_TRAIN, steps=30, warmup_steps=5, batch_size=32, progress_bar=False, log_every=0))
    run = V.finetune_vqa(model, train_config=tcfg, config=cfg, bank=bank, n_eval=0)
    assert run.cell_code is None                                        # code_steps=0: the head was trained above
    assert all(torch.equal(model.state_dict()[k], v) for k, v in image_side.items())
    h = run.result.history
    assert np.mean([x["loss"] for x in h[-5:]]) < 0.7 * np.mean([x["loss"] for x in h[:3]])
    with pytest.raises(ValueError, match="visual_tokens='cells'"):
        V.train_cell_code(hub.load("m6-tiny-pretrained"), bank, steps=1)


def test_accuracy_by_object_count_hand_computed():
    from mmkit.data.vqa import eval_questions
    from mmkit.evaluation.vqa import by_object_count, score_answers

    scenes = [make_scene([("circle", "red", "large", "top left")], seed=1),
              make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right")], seed=2)]
    qs = eval_questions(scenes)
    # right on every question of the 1-object scene, wrong on the 2-object scene except its colour question
    recs = [(qa.question, qa.answer, qa.answer if i == 0 or qa.qtype == "colour" else "?", qa.qtype, qa.lang)
            for i, qa in qs]
    got = by_object_count(score_answers(recs), scenes)
    assert got["colour"] == {1: 1.0, 2: 1.0} and got["shape"] == {1: 1.0, 2: 0.0} and got["relation"] == {2: 0.0}
    with pytest.raises(ValueError, match="eval_questions"):
        by_object_count(score_answers(recs[1:]), scenes)
