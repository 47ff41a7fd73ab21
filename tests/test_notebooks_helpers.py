"""The small kit helpers the notebooks use to open the box: M6's forward walk, the patch-feature probe, the VQA
answer prior of the same questions, and notebook 05's shipped histories."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmkit
from mmkit.data.world import sample_scene, split_seeds
from mmkit.data.scenes import render_uint8
from mmkit.evaluation.vqa import AnswerPrior, prior_eval, score_answers, world_answer_prior
from mmkit.m6.masking import SEG_DECODER, SEG_ENCODER, SEG_VISUAL
from mmkit.m6.tasks import anatomy as A
from mmkit.m6.tasks import moe as MM
from mmkit.m6.tasks import pretrain as P
from mmkit.tokenizer import world_tokenizer

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def pre():
    torch.set_num_threads(1)
    return mmkit.load("m6-tiny-pretrained")


@pytest.fixture(scope="module")
def val():
    pcfg, _ = P.recipe_configs(fast=True)
    return P.PretrainData.build(pcfg, world_tokenizer(), "val", n_pairs=8, n_texts=8)


@pytest.mark.parametrize("task", ["multimodal_to_text", "image_captioning", "text_denoising"])
def test_forward_walk_lands_on_the_training_loss_and_respects_the_mask(pre, val, task):
    batch = val.fixed_batch(task, range(3))
    walk = A.forward_walk(pre, batch, world_tokenizer())
    assert abs(float(walk.loss) - float(P.task_losses(pre, batch).loss)) < 1e-4
    seg = walk.segment_ids
    ctx = (seg == SEG_VISUAL) | (seg == SEG_ENCODER)
    dec = seg == SEG_DECODER
    att = walk.attention                                               # (B, H, L, L)
    for b in range(3):
        assert float(att[b][:, ctx[b]][:, :, dec[b]].abs().sum()) == 0.0   # context never sees the decoder
        d = dec[b].nonzero()[:, 0]
        sub = att[b][:, d][:, :, d]                                    # decoder on decoder: causal
        assert float(torch.triu(sub, diagonal=1).abs().sum()) == 0.0
        rows = att[b][:, seg[b] != -1].sum(-1)                         # each real query's row sums to 1
        torch.testing.assert_close(rows, torch.ones_like(rows))
    assert walk.steps[-1].shape == () and walk.logits.shape[:2] == walk.labels.shape
    assert (seg[0] == SEG_VISUAL).any() == (task != "text_denoising")


def test_forward_walk_refuses_a_mixed_batch(pre, val):
    a, b = val.fixed_batch("image_captioning", [0]), val.fixed_batch("text_denoising", [0])
    mixed = {"examples": a["examples"] + b["examples"], "images": torch.cat([a["images"], b["images"]]),
             "tasks": a["tasks"] + b["tasks"]}
    with pytest.raises(ValueError, match="one task"):
        A.forward_walk(pre, mixed)


def test_patch_probe_reads_colour_from_trained_features_above_the_majority_baseline(pre):
    scenes = [sample_scene(s) for s in split_seeds("val", 240)]
    imgs = torch.stack([render_uint8(s, 32) for s in scenes]).float() / 255
    r = A.patch_probe(pre, imgs, scenes, attribute=0, steps=120)
    assert r.n_test > 50 and 0.1 < r.majority < 0.35          # 6 colours: the most frequent one is ~1/6
    assert r.test_acc > r.majority + 0.4, r


def test_prior_eval_scores_the_prior_on_the_same_questions():
    prior = AnswerPrior.fit(["what colour?", "what colour?", "how many?"], ["red", "red", "2"], ["colour", "colour", "count"],
                            ["en"] * 3)
    model = score_answers([("what colour?", "red", "blue", "colour", "en"), ("how many?", "3", "3", "count", "en"),
                           ("new question", "red", "red", "colour", "en")])
    blind = prior_eval(prior, model)
    # prior answers: red (right), 2 (wrong), colour/en back-off -> red (right)
    assert blind.accuracy == pytest.approx(2 / 3) and blind.per_type == {"colour": 1.0, "count": 0.0}
    assert model.accuracy == pytest.approx(2 / 3) and blind.n_questions == 3


def test_world_answer_prior_answers_yes_no_and_counts_sensibly():
    prior = world_answer_prior(n_scenes=60, draws=2)
    assert prior("is there a red circle?", "existence", "en") in {"yes", "no"}
    assert prior("how many objects are there?", "count", "en") in {"1", "2", "3"}


def test_histories_round_trip(tmp_path):
    hist = [{"step": i + 1, "loss": 1.0, "ce": 5.0 - i, "cpu_s": 0.1 * i, "load/1/0": 0.5, "load_cv/1": 0.2,
             "dropped/1": 0.01, "lr": 1e-3} for i in range(3)]
    run = MM.MoERun(None, SimpleNamespace(history=hist), 1.234, 2.5)
    rec = MM.run_histories(run, {"val_image_captioning": 0.5, "note": "x"})
    assert set(rec["columns"]) == {"ce", "cpu_s", "load/1/0", "load_cv/1", "dropped/1"}
    assert rec["columns"]["ce"] == [5.0, 4.0, 3.0] and rec["final"] == {"val_image_captioning": 0.5}
    MM.save_comparison(tmp_path / "h.json", {"top1": rec}, {"steps": 3})
    back = MM.load_comparison(tmp_path / "h.json")
    assert back["runs"]["top1"] == rec and back["settings"] == {"steps": 3}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="regenerate"):
        MM.load_comparison(tmp_path / "bad.json")



def test_shipped_histories_of_notebook_05_are_complete():
    data = MM.load_comparison(NB_DIR / "05_moe_histories.json")
    s = data["settings"]
    assert set(data["runs"]) == {"dense", "top1", "top1_nobal", "top2"}
    for name, r in data["runs"].items():
        assert len(r["columns"]["ce"]) == s["steps"] and r["cpu_seconds"] > 0, name
        assert r["columns"]["ce"][0] > 5.5 and sum(r["columns"]["ce"][-10:]) / 10 < 1.0, name   # they learned
        assert any(k.startswith("val_") for k in r["final"]), name
    assert "load_cv/1" in data["runs"]["top1_nobal"]["columns"] and "load_cv/1" not in data["runs"]["dense"]["columns"]
