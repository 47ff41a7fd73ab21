"""The shipped VLMo checkpoints (mmkit/checkpoints/vlmo-tiny-retrieval, vlmo-tiny-vqa): made by their recipe chain (``mmkit train
NAME``: stage 1 -> stage 2 -> stage 3 -> retrieval, each loading the one before), hashes and metrics in recipe.json,
within VLMo's 10 MB budget; dual-encoder retrieval on held-out scenes above chance both ways, and only with the right
images; VQA at issue 13's targets and above the blind baseline of the same questions, on world scenes and on pictures
drawn outside the renderer. Nothing retrains."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import mmkit.zoo as zoo
from mmkit import hub
from mmkit.vlmo.model import VLMo
from mmkit.vlmo.tasks import retrieval as R

sys.path.insert(0, str(Path(__file__).parent))
from _blind import blind_eval, blind_prior  # noqa: E402
from _vqa_drawings import drawn_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = ("vlmo-tiny-retrieval", "vlmo-tiny-vqa")     # stage 1 / 2 / 3, NLVR2, image-only: made on demand
BUDGET_BYTES = 10 * 2**20                                # VLMo's shipped total (common brief)
# R@K floors as multiples of chance (K / N). Measured for the shipped checkpoint on this test's 200 held-out scenes:
# i2t R@1/5/10 0.165 / 0.640 / 0.865, t2i 0.165 / 0.575 / 0.775 (chance 0.005 / 0.025 / 0.05; with the images
# shuffled 0.015 / 0.030 / 0.060 and 0.005 / 0.020 / 0.055). The recipe measured on 1000 scenes: i2t 0.045 / 0.168 /
# 0.291, t2i 0.032 / 0.131 / 0.254 against chance 0.001 / 0.005 / 0.01.
RETRIEVAL_TIMES_CHANCE = {1: 15, 5: 10, 10: 8}


def test_recipes_chain_the_stages():
    needs = {n: zoo.get_recipe(n).needs for n in zoo.recipe_names() if n.startswith("vlmo-")}
    assert needs["vlmo-tiny-stage1"] == ("vqgan-world-32",)                # MIM targets: the kit's VQGAN codes
    assert needs["vlmo-tiny-stage2"] == ("vlmo-tiny-stage1",)
    assert needs["vlmo-tiny-pretrained"] == ("vlmo-tiny-stage2",)
    for down in ("vlmo-tiny-retrieval", "vlmo-tiny-vqa", "vlmo-tiny-image-cls"):
        assert needs[down] == ("vlmo-tiny-pretrained",)
    assert needs["vlmo-tiny-nlvr2"] == ("vlmo-tiny-vqa",)               # its fusion already reads the cell tokens


def test_shipped_checkpoints_carry_hashes_metrics_and_fit_the_budget():
    total = 0
    for name in SHIPPED:
        d = hub.SHIPPED_DIR / name
        info = json.loads((d / "recipe.json").read_text(encoding="utf-8"))
        files = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != "recipe.json")
        assert sorted(info["sha256"]) == files, (name, info["sha256"], files)     # every file hashed
        assert info["recipe"] == name and not info["fast"]
        assert info["metrics"]["cpu_seconds"] > 0 and info["metrics"]["torch_threads"] == 1
        total += sum((d / f).stat().st_size for f in files) + (d / "recipe.json").stat().st_size
    print(f"shipped VLMo checkpoints: {total / 2**20:.2f} MB")
    assert total <= BUDGET_BYTES
    m = json.loads((hub.SHIPPED_DIR / "vlmo-tiny-retrieval" / "recipe.json").read_text(encoding="utf-8"))["metrics"]
    assert m["test_t2i_r10"] > m["before_t2i_r10"] and m["test_i2t_r10"] > m["before_i2t_r10"]   # fine-tuning helped


def test_dual_encoder_retrieval_beats_chance_both_ways():
    model = hub.load("vlmo-tiny-retrieval")
    assert type(model) is VLMo and model.config.image_size == 64
    n = 200
    data = R.retrieval_data("test", n, image_size=model.config.image_size)
    r = R.evaluate_retrieval(model, data)
    print("VLMo dual-encoder retrieval, 200 held-out scenes:", r.dual)
    for k in (1, 5, 10):
        chance = k / n                                       # a random ranking; a model blind to images scores this
        assert r.dual.i2t[k] >= RETRIEVAL_TIMES_CHANCE[k] * chance, ("i2t", k, r.dual.i2t[k], chance)
        assert r.dual.t2i[k] >= RETRIEVAL_TIMES_CHANCE[k] * chance, ("t2i", k, r.dual.t2i[k], chance)
    # the scores come from the images: with the images shuffled, R@10 falls to chance level
    shuffled = R.RetrievalData(data.images[torch.randperm(n, generator=torch.Generator().manual_seed(0))],
                               data.texts, data.text_to_image)
    s = R.evaluate_retrieval(model, shuffled).dual
    print("shuffled images:", s)
    assert s.t2i[10] < r.dual.t2i[10] / 2 and s.i2t[10] < r.dual.i2t[10] / 2


# VQA floors (issue 13): the targets as they are, and margins over the blind baseline (the world's answer prior on
# the SAME questions, computed here: tests/_blind.py). Measured for the shipped checkpoint on this test's questions
# (model / blind), 400 scenes, 2665 questions: overall 0.952 / 0.386, colour 0.938 / 0.138, shape 0.960 / 0.340, size
# 0.963 / 0.490, count 0.927 / 0.652, existence 0.975 / 0.517, position 0.985 / 0.093, relation 0.899 / 0.513; English
# 0.951 / 0.389, Chinese 0.952 / 0.383. Drawn pictures (tests/_vqa_drawings.py, 160): 0.963 / 0.250, colour 0.925 /
# 0.275, shape 1.000 / 0.250, count 0.950 / 0.350, position 0.975 / 0.125. The margins sit ~0.1-0.2 below these.
# (The patch-token checkpoint before it: 0.463, shape / position / relation at the blind level.)
TARGET = {"overall": 0.90, "per_type": 0.80, "per_language": 0.90, "drawn": 0.85}
VQA_MARGIN = {"overall": 0.45, "colour": 0.6, "shape": 0.45, "size": 0.35, "count": 0.15, "existence": 0.25,
              "position": 0.7, "relation": 0.25, "en": 0.45, "zh": 0.45}
DRAWN_MARGIN = {"overall": 0.5, "colour": 0.5, "shape": 0.5, "count": 0.3, "position": 0.5}
N_VQA_SCENES = 400                     # held-out scenes (2665 questions): on 150 the blind baseline alone moved 0.03
N_DRAWN_PER_TYPE = 40


def _vqa_floors(ev, blind, margins, where: str) -> None:
    assert ev.accuracy >= blind.accuracy + margins["overall"], (where, ev.accuracy, blind.accuracy)
    for t, acc in ev.per_type.items():
        if t in margins:
            assert acc >= blind.per_type[t] + margins[t], (where, t, acc, blind.per_type[t])
    for lang, acc in ev.per_lang.items():
        if lang in margins:
            assert acc >= blind.per_lang[lang] + margins[lang], (where, lang, acc, blind.per_lang[lang])


def test_vqa_reaches_the_targets_above_the_blind_baseline_of_the_same_questions():
    from mmkit.vlmo.model import VLMoForVQA
    from mmkit.vlmo.tasks import vqa as V

    model = hub.load("vlmo-tiny-vqa")
    assert type(model) is VLMoForVQA and model.config.image_size == 64 and model.config.visual_tokens == "cells"
    ev = V.evaluate_vqa(model, "test", N_VQA_SCENES)
    blind = blind_eval(blind_prior(), [(r[0], r[1], r[3], r[4]) for r in ev.records])
    print(f"VLMo VQA on {ev.n_questions} held-out questions: {ev.accuracy:.3f} vs blind {blind.accuracy:.3f};",
          {k: (round(v, 3), round(blind.per_type[k], 3)) for k, v in ev.per_type.items()},
          {k: (round(v, 3), round(blind.per_lang[k], 3)) for k, v in ev.per_lang.items()})
    _vqa_floors(ev, blind, VQA_MARGIN, "world")
    with pytest.raises(AssertionError):                      # the floors refuse a model that never looks
        _vqa_floors(blind, blind, VQA_MARGIN, "blind")
    assert ev.accuracy >= TARGET["overall"], ev.accuracy
    assert min(ev.per_type.values()) >= TARGET["per_type"], ev.per_type
    assert min(ev.per_lang.values()) >= TARGET["per_language"], ev.per_lang
    m = json.loads((hub.SHIPPED_DIR / "vlmo-tiny-vqa" / "recipe.json").read_text(encoding="utf-8"))["metrics"]
    assert m["namer_cell_shape"] > 0.95 and m["test_acc"] > m["blind_acc"] + 0.4


def test_vqa_on_pictures_drawn_outside_the_renderer():
    from mmkit.data.preprocess import preprocess_image
    from mmkit.vlmo.tasks import vqa as V

    model = hub.load("vlmo-tiny-vqa")
    pairs = drawn_pairs(N_DRAWN_PER_TYPE, seed=7)
    images = torch.stack([preprocess_image(p[0].png, size=64).tensor for p in pairs])
    items = [(q, a, t, lang) for _, q, a, t, lang in pairs]
    ev = V.evaluate_vqa_images(model, images, items)
    blind = blind_eval(blind_prior(), items)
    print("drawn pictures (model, blind):", round(ev.accuracy, 3), round(blind.accuracy, 3),
          {k: (round(v, 3), round(blind.per_type[k], 3)) for k, v in ev.per_type.items()})
    _vqa_floors(ev, blind, DRAWN_MARGIN, "drawn")
    with pytest.raises(AssertionError):
        _vqa_floors(blind, blind, DRAWN_MARGIN, "blind")
    assert ev.accuracy >= TARGET["drawn"], ev.accuracy


# NLVR2 from the shipped VQA model, a shorter run here than the recipe's (1200 steps of 64 on 8000 pairs: 0.875 on 1000
# held-out pairs against the text-only prior's 0.607). Measured at this budget (400 steps of 64 on 4000 pairs, ~200
# CPU-s): 0.785 vs the prior's 0.597 (1000 pairs); on 400 pairs 0.765 and, in a clean-clone CI run, 0.713 vs 0.620:
# runs differ by ~0.05, hence 800 held-out pairs and a margin of 0.06. Shorter runs stay near the prior: 150 steps of
# 32 0.590 vs 0.600, 300 of 32 0.632 vs 0.600 (layer-scale gains at 30x the LR 0.642 vs 0.582).
NLVR2_STEPS, NLVR2_BATCH, NLVR2_PAIRS, NLVR2_EVAL, NLVR2_MARGIN = 400, 64, 4000, 800, 0.06


def test_nlvr2_from_the_vqa_model_beats_the_text_only_prior_of_the_same_pairs():
    """VLMo §4.3 on the world: two fusion passes of the statement (one per image), the pooled [T_CLS] concatenated, a
    classifier. The blind baseline is the most frequent label of each exact statement in the training pairs
    (LabelPrior): it never sees an image and beats 0.5, because a statement's wording says how likely it is."""
    from mmkit.train import TrainConfig
    from mmkit.vlmo.model import VLMoForNLVR2
    from mmkit.vlmo.tasks import nlvr2 as N
    model = VLMoForNLVR2.from_pretrained_vlmo(hub.load("vlmo-tiny-vqa")).train()
    tcfg = TrainConfig(**dict(N.NLVR2_TRAIN, steps=NLVR2_STEPS, batch_size=NLVR2_BATCH, warmup_steps=NLVR2_STEPS // 10,
                              progress_bar=False))
    torch.manual_seed(0)
    run = N.finetune_nlvr2(model, train_config=tcfg, train_data=N.pair_dataset("train", NLVR2_PAIRS, image_size=64),
                           eval_data=N.pair_dataset("test", NLVR2_EVAL, image_size=64))
    ev = run.eval
    print(f"NLVR2 after {NLVR2_STEPS} steps of {NLVR2_BATCH}: {ev.accuracy:.3f} on {ev.n} held-out pairs, text-only "
          f"prior {ev.blind:.3f}, majority {ev.majority:.3f}; per kind {ev.per_kind}")
    assert ev.accuracy >= ev.blind + NLVR2_MARGIN and ev.blind >= ev.majority
