"""The shipped VLMo checkpoints (mmkit/checkpoints/vlmo-tiny-retrieval, vlmo-tiny-vqa): made by their recipe chain (``mmkit train
NAME``: stage 1 -> stage 2 -> stage 3 -> retrieval, each loading the one before), hashes and metrics in recipe.json,
within VLMo's 10 MB budget; dual-encoder retrieval on held-out scenes above chance both ways, and only with the right
images; VQA above the blind baseline of the same questions, and reading colour and size from the image. Nothing
retrains."""
from __future__ import annotations

import json

import pytest
import torch

import mmkit.zoo as zoo
from mmkit import hub
from mmkit.vlmo.model import VLMo
from mmkit.vlmo.tasks import retrieval as R

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
    assert needs["vlmo-tiny-stage1"] == ("vqgan-world",)                  # MIM targets: the kit's VQGAN codes
    assert needs["vlmo-tiny-stage2"] == ("vlmo-tiny-stage1",)
    assert needs["vlmo-tiny-pretrained"] == ("vlmo-tiny-stage2",)
    for down in ("vlmo-tiny-retrieval", "vlmo-tiny-vqa", "vlmo-tiny-nlvr2", "vlmo-tiny-image-cls"):
        assert needs[down] == ("vlmo-tiny-pretrained",)


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


# VQA floors over the blind baseline (the world's answer prior on the SAME questions, computed here). Measured for the
# shipped checkpoint on the recipe's 400 held-out scenes (2665 questions, recipe.json): 0.463 vs blind 0.391 (EN 0.465
# vs 0.397, ZH 0.462 vs 0.385); colour 0.48 vs 0.18, size 0.70 vs 0.49. Shape, position and relation stay at the
# blind level (issue 13: far from the 0.90 the paper's scale reaches). On 150 scenes the blind baseline alone moved
# by 0.03, hence the full 400.
VQA_MARGIN = {"overall": 0.05, "colour": 0.2, "size": 0.12, "en": 0.04, "zh": 0.04}


def test_vqa_answers_above_the_blind_baseline_of_the_same_questions():
    from mmkit.evaluation.vqa import prior_eval, world_answer_prior
    from mmkit.vlmo.model import VLMoForVQA
    from mmkit.vlmo.tasks import vqa as V

    model = hub.load("vlmo-tiny-vqa")
    assert type(model) is VLMoForVQA and model.config.image_size == 64
    ev = V.evaluate_vqa(model, "test", 400)
    blind = prior_eval(world_answer_prior(), ev)
    print(f"VLMo VQA on {ev.n_questions} held-out questions: {ev.accuracy:.3f} vs blind {blind.accuracy:.3f};",
          {k: (round(v, 3), round(blind.per_type[k], 3)) for k, v in ev.per_type.items()},
          {k: (round(v, 3), round(blind.per_lang[k], 3)) for k, v in ev.per_lang.items()})
    assert ev.accuracy >= blind.accuracy + VQA_MARGIN["overall"]
    for t in ("colour", "size"):
        assert ev.per_type[t] >= blind.per_type[t] + VQA_MARGIN[t], (t, ev.per_type[t], blind.per_type[t])
    for lang in ("en", "zh"):
        assert ev.per_lang[lang] >= blind.per_lang[lang] + VQA_MARGIN[lang], (lang, ev.per_lang, blind.per_lang)
    m = json.loads((hub.SHIPPED_DIR / "vlmo-tiny-vqa" / "recipe.json").read_text(encoding="utf-8"))["metrics"]
    assert m["test_acc"] > m["blind_acc"] and m["test_acc_colour"] > m["blind_acc_colour"]
