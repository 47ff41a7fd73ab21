"""mPLUG opened up (notebook 08, "Inside mPLUG"): the step-by-step forward walk lands on the kit's VQA training loss,
follows the config's fusion plan (S co-attention layers + 1 connected layer, N times), its attention maps are
probabilities over the allowed positions only, and the patch-token probe (stage 0's GridProbe) reads colours from
frozen features above the majority baseline of the same cells."""
import pytest
import torch

import mmkit
from mmkit.config import load_config, replace_config
from mmkit.data.vqa import VQASampler
from mmkit.data.world import object_labels
from mmkit.mplug.model import MPLUGForClassification, fusion_plan
from mmkit.mplug.tasks import anatomy as A
from mmkit.mplug.tasks.vqa import VQAConfig, vqa_bank, vqa_loss


@pytest.fixture(scope="module")
def vqa():
    torch.set_num_threads(1)
    return mmkit.load("mplug-tiny-vqa")


@pytest.fixture(scope="module")
def batch():
    bank = vqa_bank(VQAConfig(), "val", 24)
    b = VQASampler(bank).batch_fn(torch.Generator().manual_seed(3), 6)
    assert len({len(q) for q in b["questions"]}) > 1          # questions of different lengths: padding to mask
    return b


@pytest.fixture(scope="module")
def walk(vqa, batch):
    return A.forward_walk(vqa, batch)


def test_walk_loss_equals_the_kit_vqa_loss_on_a_real_batch(vqa, batch, walk):
    with torch.no_grad():
        ref = float(vqa_loss(vqa.eval(), batch)[0])
    assert abs(float(walk.loss) - ref) < 1e-5 and abs(walk.reference_loss - ref) < 1e-5
    assert walk.steps[-1].shape == () and walk.logits.shape[:2] == walk.labels.shape
    n = int((walk.labels != -100).sum())                      # the loss is the mean over answer + [EOS] tokens
    torch.testing.assert_close(walk.token_loss.sum() / n, walk.loss)
    assert "[EOS]" in walk.answer_tokens                       # the decoder's targets: answer + [EOS]


def _layers(walk, what):
    return [s for s in walk.steps if s.name.startswith("fusion") and what in s.name]


def test_walk_follows_the_config_plan_s_coattention_layers_then_one_connected(vqa, walk):
    c = vqa.config
    S, N = c.stride, c.fusion_layers // (c.stride + 1)
    assert walk.plan == fusion_plan(c) == (("asym",) * S + ("connected",)) * N
    assert len(_layers(walk, "text-to-image cross-attention")) == S * N
    assert len(_layers(walk, "connected attention")) == N
    Nv, L = walk.n_image_tokens, walk.text_mask.shape[1]
    assert Nv == 1 + c.grid_size ** 2 == c.num_image_tokens        # [CLS] + patches ("cells": [CLS] + 3x3 cells)
    for s in _layers(walk, "connected attention"):
        assert s.shape[1] == Nv + L                            # one self-attention over [v; l]
    for s in _layers(walk, "cross-attention"):
        assert s.shape[1] == L                                 # only the text side is updated


def test_walk_on_another_layout_s1_n2():
    torch.manual_seed(0)
    model = mmkit.build_model(replace_config(load_config("mplug-tiny"), stride=1, fusion_layers=4,
                                             momentum_encoders=False))
    b = VQASampler(vqa_bank(VQAConfig(), "val", 8)).batch_fn(torch.Generator().manual_seed(0), 3)
    w = A.forward_walk(model, b)
    assert w.plan == ("asym", "connected") * 2 and w.connected_layer == 1
    with torch.no_grad():
        assert abs(float(w.loss) - float(vqa_loss(model.eval(), b)[0])) < 1e-5


def test_attention_rows_sum_to_one_over_allowed_positions_and_zero_on_padding(walk):
    text = walk.text_mask                                      # (B, L)
    assert (~text).any()
    cross = walk.cross_attention                               # (B, H, L, Nv)
    rows = cross.sum(-1)                                       # (B, H, L)
    torch.testing.assert_close(rows[text[:, None].expand_as(rows)], torch.ones(int(text.sum()) * cross.shape[1]))
    assert float(rows[~text[:, None].expand_as(rows)].abs().sum()) == 0.0
    both = torch.cat([torch.ones(text.shape[0], walk.n_image_tokens, dtype=torch.bool), text], 1)   # (B, Nv + L)
    conn = walk.connected_attention                            # (B, H, Nv + L, Nv + L)
    for b in range(conn.shape[0]):
        real = both[b]
        torch.testing.assert_close(conn[b][:, real].sum(-1), torch.ones(conn.shape[1], int(real.sum())))
        assert float(conn[b][:, :, ~real].abs().sum()) == 0.0      # padding is never attended to
        assert float(conn[b][:, ~real].abs().sum()) == 0.0         # padding queries are not shown
        assert float(conn[b][:, :walk.n_image_tokens, walk.n_image_tokens:][:, :, real[walk.n_image_tokens:]]
                     .sum()) > 0                                   # the image side reads the text only here


def test_wrong_batches_are_refused_clearly(vqa, batch):
    with pytest.raises(ValueError, match="VQA batch"):
        A.forward_walk(vqa, {"images": batch["images"], "questions": batch["questions"]})
    with pytest.raises(ValueError, match="one question and one answer per image"):
        A.forward_walk(vqa, dict(batch, answers=batch["answers"][:-1]))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        A.forward_walk(vqa, dict(batch, images=batch["images"][0]))
    with pytest.raises(ValueError, match="decoder"):
        A.forward_walk(MPLUGForClassification.from_pretrained_mplug(mmkit.build_model("mplug-tiny"), 3), batch)


def test_patch_probe_reads_colour_from_frozen_patch_tokens_above_the_majority(vqa):
    bank = vqa_bank(VQAConfig(), "val", 240)
    before = {k: v.clone() for k, v in vqa.state_dict().items()}
    r = A.patch_probe(vqa, bank.images_u8, object_labels(bank.scenes), steps=120)
    assert r.n_train == 180 and r.n_test == 60 and r.occupied_test > 60
    assert set(r.accuracy) == set(r.majority) == {"colour_acc", "shape_acc", "size_acc"}
    assert 0.05 < r.majority["colour_acc"] < 0.35               # 7 colours: the most frequent is a small share
    assert r.accuracy["colour_acc"] > r.majority["colour_acc"] + 0.4, r
    assert all(torch.equal(v, vqa.state_dict()[k]) for k, v in before.items())   # the model is not trained
