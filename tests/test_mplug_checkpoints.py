"""The shipped mPLUG checkpoints (mmkit/checkpoints/mplug-tiny-*): made by their recipes (recipe.json with hashes and
the recipe's own measurements), inside the size budget, and the VQA model's held-out accuracy per question type and
language on world scenes, on pictures drawn by the tests (not the world's renderer), and served by apps/vqa.py.

VQA and NLVR2 numbers come from the shipped weights (no training; NLVR2's 1500 steps on 30000 pairs take ~13 CPU-min,
so the recipe's model is shipped as a delta over mplug-tiny-vqa); the other downstream tasks that start from
mplug-tiny-vqa (captioning, grounding, SNLI-VE) fine-tune it briefly here. Floors are "blind baseline + margin", the blind baseline
computed in the test on the very items asked (tests/_blind.py; the text-only LabelPrior; the centre box)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mmkit import hub
from mmkit.data.preprocess import preprocess_image
from mmkit.data.text import ANSWERS, QTYPES
from mmkit.mplug.tasks import vqa as V

sys.path.insert(0, str(Path(__file__).parent))
from _blind import blind_eval, blind_prior  # noqa: E402
from _vqa_drawings import drawn_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = ("mplug-tiny-pretrained", "mplug-tiny-vqa", "mplug-tiny-nlvr2")
BUDGET_BYTES = 12 * 1024 * 1024          # mPLUG total (common brief)

# THE TABLE TO RAISE: the margin the shipped mplug-tiny-vqa must clear over the blind baseline on this test's
# questions (None: the type only counts in the overall floor). Measured on these questions (model / blind), the
# checkpoint that reads one code token per world cell (vision_stem="cells", issue 14; recipes.py tuning notes): world
# test split, 100 scenes, 667 questions: overall 0.916 / 0.375, colour 0.91 / 0.12, shape 0.91 / 0.35, size 0.95 /
# 0.48, count 0.92 / 0.63, existence 0.85 / 0.48, position 0.95 / 0.10, relation 0.925 / 0.507; English 0.920 / 0.395,
# Chinese 0.912 / 0.354. Drawn pictures (160): overall 0.95 / 0.25, colour 1.00 / 0.275, shape 1.00 / 0.25, count
# 0.875 / 0.35, position 0.925 / 0.125. (The previous, conv-stem checkpoint: overall 0.474, colour 0.16, position 0.11;
# drawn 0.312.) The margins leave ~0.05-0.1 below each measured value (100 scenes: ~100 questions per type).
MARGIN_OVER_BLIND = {"colour": 0.65, "shape": 0.45, "size": 0.35, "count": 0.2, "existence": 0.3,
                     "position": 0.7, "relation": 0.3, "overall": 0.45, "per_language": {"en": 0.45, "zh": 0.45}}
DRAWN_MARGIN_OVER_BLIND = {"colour": 0.55, "shape": 0.6, "count": 0.4, "position": 0.65, "overall": 0.6}
# Issue 14's targets, asserted as they are (the margins above say "it looks"; these say "it is right"): >= 0.90
# overall and per language, every type >= 0.80, drawn pictures >= 0.85.
TARGET = {"overall": 0.90, "per_type": 0.80, "per_language": 0.90, "drawn": 0.85}
N_SCENES = 100                           # held-out world test scenes (one question of every type each, ~660)
N_DRAWN_PER_TYPE = 40                    # pictures drawn by tests/_vqa_drawings.py per type (160)


@pytest.fixture(scope="module")
def prior():
    return blind_prior()


@pytest.fixture(scope="module")
def vqa():
    return hub.load("mplug-tiny-vqa")


def test_shipped_checkpoints_come_from_their_recipes_and_fit_the_budget():
    total = 0
    for name in SHIPPED:
        d = hub.SHIPPED_DIR / name
        info = json.loads((d / "recipe.json").read_text())
        files = {p.name for p in d.iterdir() if p.is_file() and p.name != "recipe.json"}
        assert info["recipe"] == name and info["fast"] is False and set(info["sha256"]) == files, info
        assert info["metrics"]["cpu_seconds"] > 0 and info["metrics"]["steps"] > 0
        total += sum(p.stat().st_size for p in d.iterdir())
        m = hub.load(name)                                   # verifies every sha256
        assert not m.training and m.config.image_size == 64 and m.config.momentum_encoders is False
        assert ((d / "base.json").exists()) == (name == "mplug-tiny-nlvr2")     # the fine-tune is stored as a delta
    print(f"shipped mPLUG checkpoints: {total / 2**20:.2f} MB")
    assert total <= BUDGET_BYTES, total


def _floors(ev, blind, margins):
    rows = {t: (round(ev.per_type[t], 3), round(blind.per_type[t], 3)) for t in ev.per_type}
    rows["overall"] = (round(ev.accuracy, 3), round(blind.accuracy, 3))
    assert ev.accuracy >= blind.accuracy + margins["overall"], ("overall", ev.accuracy, blind.accuracy)
    for t, acc in ev.per_type.items():
        m = margins.get(t)
        if m is not None:
            assert acc >= blind.per_type[t] + m, (t, acc, blind.per_type[t], m)
    return rows


def test_vqa_world_test_split_per_type_and_language(vqa, prior):
    ev = V.evaluate_vqa(vqa, "test", n=N_SCENES)
    blind = blind_eval(prior, [(r[0], r[1], r[3], r[4]) for r in ev.records])
    print("world test split (model, blind):", _floors(ev, blind, MARGIN_OVER_BLIND), ev.per_lang, blind.per_lang,
          ev.n_questions)
    assert set(ev.per_type) == set(QTYPES) and set(ev.per_lang) == {"en", "zh"}
    with pytest.raises(AssertionError):                      # the floors refuse a model that never looks
        _floors(blind, blind, MARGIN_OVER_BLIND)
    for lang, margin in MARGIN_OVER_BLIND["per_language"].items():
        assert ev.per_lang[lang] >= blind.per_lang[lang] + margin, (lang, ev.per_lang, blind.per_lang)
        assert ev.per_lang[lang] >= TARGET["per_language"], (lang, ev.per_lang)
    assert ev.accuracy >= TARGET["overall"], ev.accuracy
    assert min(ev.per_type.values()) >= TARGET["per_type"], ev.per_type
    # open-vocabulary generation (no answer list at inference), yet the generated text is an answer of the world
    assert sum(r[2] in ANSWERS["en"] + ANSWERS["zh"] for r in ev.records) >= 0.95 * ev.n_questions


def test_vqa_drawn_pictures(vqa, prior):
    pairs = drawn_pairs(N_DRAWN_PER_TYPE, seed=7)
    images = torch.stack([preprocess_image(p[0].png, size=64).tensor for p in pairs])
    items = [(q, a, t, lang) for _, q, a, t, lang in pairs]
    ev = V.evaluate_vqa_images(vqa, images, items)
    blind = blind_eval(prior, items)
    print("drawn pictures (model, blind):", _floors(ev, blind, DRAWN_MARGIN_OVER_BLIND), ev.per_lang)
    with pytest.raises(AssertionError):
        _floors(blind, blind, DRAWN_MARGIN_OVER_BLIND)
    assert ev.accuracy >= TARGET["drawn"], ev.accuracy


# --- downstream tasks fine-tuned briefly from the shipped VQA model (§5.2.2-5.2.5) --------------------------------
# Short runs (the recipes run longer: notebook 08 section 10 and the recipes' tuning notes). Measured at these budgets:
DOWNSTREAM_MARGIN = {"grounding": 0.4, "snli_ve": 0.08, "caption_cider": 1.0, "nlvr2": 0.15}
GROUNDING_STEPS, SNLI_STEPS, CAPTION_STEPS = 400, 120, 100


def _quick(steps: int, batch: int, lr: float):
    from mmkit.train import TrainConfig
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 10), min_lr_ratio=0.5,
                       weight_decay=0.02, mixed_precision="no", log_every=25, seed=0, progress_bar=False)


def test_grounding_from_the_vqa_model_beats_the_centre_box(vqa):
    """§5.2.4: the decoder writes four coordinate tokens; Acc@IoU 0.5 against the centre-of-image box of mean size."""
    from mmkit.mplug.tasks import grounding as G
    model = hub.load("mplug-tiny-vqa").train()
    tok, first = G.coordinate_tokenizer(33)
    torch.manual_seed(0)
    G.finetune_grounding(model, tok, first, 33, _quick(GROUNDING_STEPS, 32, 1e-3), n_train=2000, lang="both")
    ev = G.evaluate_grounding(model.eval(), tok, first, 33, "test", 200, lang="en")
    print(f"grounding after {GROUNDING_STEPS} steps: Acc@IoU0.5 {ev.accuracy:.3f}, centre box {ev.baseline:.3f}, "
          f"mean IoU {ev.mean_iou:.3f}")
    assert ev.accuracy >= ev.baseline + DOWNSTREAM_MARGIN["grounding"]


def test_snli_ve_read_by_the_decoder_beats_the_text_only_prior():
    """§5.2.5 with the labels read as answer words (yes / maybe / no) by the VQA model's decoder. The text-only prior
    knows every neutral hypothesis from its words, so it sits far above the majority label; the image must add more."""
    from mmkit.config import load_config
    from mmkit.data.datasets import EntailmentDataset
    from mmkit.evaluation.vqa import LabelPrior
    from mmkit.mplug.model import MPLUGForClassification
    from mmkit.mplug.tasks import classify as K
    cfg = load_config("mplug-tiny-snli-ve")
    model = MPLUGForClassification.from_pretrained_mplug(hub.load("mplug-tiny-vqa"), 3, read_with=cfg.read_with,
                                                         label_ids=cfg.label_ids)
    train_set = EntailmentDataset("train", 2000, lang="both", image_size=64, cache_images=True)
    torch.manual_seed(0)
    K.finetune_classifier(model.train(), train_set, _quick(SNLI_STEPS, 32, 5e-4))
    ev = K.evaluate_classifier(model.eval(), EntailmentDataset("test", 300, lang="both", image_size=64),
                               prior=LabelPrior.of_dataset(train_set))
    print(f"SNLI-VE after {SNLI_STEPS} steps: {ev.accuracy:.3f}, text-only prior {ev.blind:.3f}, majority "
          f"{ev.majority:.3f}; per kind {ev.per_kind}")
    assert ev.blind >= ev.majority + 0.2 and ev.accuracy >= ev.blind + DOWNSTREAM_MARGIN["snli_ve"]


def test_captioning_from_the_vqa_model_learns_to_describe_the_scene():
    """§5.2.2: cross-entropy on the world's captions; CIDEr-D (beam 3) on held-out scenes against the VQA model's own
    captions before (it answers questions: "yes", "一个")."""
    from mmkit.data.scenes import SceneBank
    from mmkit.mplug.tasks import captioning as C
    model = hub.load("mplug-tiny-vqa").train()
    before = C.evaluate_captioning(model, "test", 32).scores
    C.finetune_captioning(model, SceneBank.build("train", 1000, image_size=64, start=200_000),
                          _quick(CAPTION_STEPS, 32, 5e-4), None)
    after = C.evaluate_captioning(model, "test", 32).scores
    print(f"captions after {CAPTION_STEPS} CE steps: CIDEr-D {before.cider:.3f} -> {after.cider:.3f}, BLEU-4 "
          f"{before.bleu4:.3f} -> {after.bleu4:.3f}")
    assert after.cider >= before.cider + DOWNSTREAM_MARGIN["caption_cider"]


def test_the_shipped_stride_sweep_trained_every_arm_above_the_answer_prior():
    """Figure 3 on the world (mplug-tiny-stride-sweep): four strides, each a fresh fusion network fine-tuned for VQA with
    the same budget, scored on the same held-out questions; every arm well above the answer prior of those questions,
    and more connected layers mean more fusion parameters."""
    sweep = hub.load("mplug-tiny-stride-sweep")
    assert sweep["strides"] == [1, 2, 3, 6] and set(sweep["runs"]) == {"1", "2", "3", "6"}
    for s, r in sweep["runs"].items():
        assert r["plan"].count("connected") == 6 // int(s) and len(r["plan"]) == 6 + 6 // int(s)
        assert r["accuracy"] >= sweep["blind_accuracy"] + 0.3, (s, r["accuracy"], sweep["blind_accuracy"])
    params = [sweep["runs"][s]["params"] for s in ("1", "2", "3", "6")]
    assert params == sorted(params, reverse=True)


def test_the_shipped_nlvr2_model_beats_the_text_only_prior_of_the_same_pairs():
    """§5.2.5 NLVR2 (mplug-tiny-nlvr2: the statement fused with each image, the decoder's [BOS] states classified):
    scored on held-out pairs against the text-only prior fitted on the recipe's 30000 training statements (0.64
    here: "both images contain a blue triangle" is mostly false by its words). Recipe: 0.875 vs 0.637 on 600 pairs.
    The stored weights are only the fusion network and the head; the rest comes from mplug-tiny-vqa, bit for bit."""
    from mmkit.data.datasets import PairDataset
    from mmkit.evaluation.vqa import LabelPrior
    from mmkit.mplug.recipes import classify_settings
    from mmkit.mplug.tasks import classify as K
    model, vqa = hub.load("mplug-tiny-nlvr2"), hub.load("mplug-tiny-vqa")
    settings = classify_settings("mplug-tiny-nlvr2")
    for name, v in vqa.state_dict().items():
        if name.startswith(settings["frozen"]):
            assert torch.equal(model.state_dict()[name], v), name
    prior = LabelPrior.of_dataset(PairDataset("train", settings["n_train"], lang="both", image_size=64))
    ev = K.evaluate_classifier(model, PairDataset("test", 400, lang="both", image_size=64), prior=prior)
    print(f"NLVR2 (shipped): {ev.accuracy:.3f} on {ev.n} held-out pairs, text-only prior {ev.blind:.3f}, majority "
          f"{ev.majority:.3f}; per kind {ev.per_kind} (prior {ev.blind_per_kind})")
    assert ev.blind >= ev.majority + 0.08 and ev.accuracy >= ev.blind + DOWNSTREAM_MARGIN["nlvr2"]
    assert min(ev.per_kind.values()) >= 0.7, ev.per_kind
