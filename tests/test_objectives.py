"""The shared objectives (mmkit/objectives): hand-computed cases, transformers' CLIP loss as an oracle, the queue
and momentum arithmetic, hard-negative sampling, and two gloo processes against one."""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmkit.objectives as O
from mmkit.objectives import (IGNORE_INDEX, FeatureQueue, QueueConfig, Temperature, TemperatureConfig, itc_loss,
                              itc_loss_with_queue, itm_labels, itm_loss, momentum_copy, momentum_update,
                              sample_hard_negatives, sequence_logprob, token_cross_entropy)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_itc_worker.py")

# The tiny model, data and cases live in the worker so that both sides of the 2-process test share them.
_spec = importlib.util.spec_from_file_location("_itc_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
sys.modules["_itc_worker"] = W
_spec.loader.exec_module(W)

pytestmark = pytest.mark.usefixtures("one_thread")


def lse(xs) -> float:
    """log Σ exp(x) of a Python list."""
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def soft_ce(row, target) -> float:
    """-Σ_j y_j log softmax(row)_j in plain Python."""
    z = lse(row)
    return -sum(t * (x - z) for x, t in zip(row, target))


def symmetric(i2t, t2i, y_i2t, y_t2i) -> float:
    """½ (mean_i CE(i2t_i, y_i) + mean_i CE(t2i_i, y_i)) in plain Python: the ITC loss of given logit rows."""
    mean = lambda rows, ys: sum(soft_ce(r, y) for r, y in zip(rows, ys)) / len(rows)   # noqa: E731
    return 0.5 * (mean(i2t, y_i2t) + mean(t2i, y_t2i))


def softmax(row) -> list[float]:
    z = lse(row)
    return [math.exp(x - z) for x in row]


# --- package rules ---------------------------------------------------------------------------------------------
def test_public_names_and_imports_stay_inside_objectives():
    for name in O.__all__:
        assert hasattr(O, name), name
    allowed_roots = {"__future__", "torch", "math", "copy", "dataclasses", "typing"}
    for path in (ROOT / "mmkit" / "objectives").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module]
                if node.module.startswith("mmkit"):
                    assert not any(a.name.startswith("_") for a in node.names), f"{path.name} imports a _private name"
            else:
                continue
            for m in mods:
                ok = m.split(".")[0] in allowed_roots or m.startswith("mmkit.objectives")
                assert ok, f"{path.name} imports {m}: objectives may import torch, the stdlib and each other only"


# --- lm.py ------------------------------------------------------------------------------------------------------
def test_token_cross_entropy_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]]], requires_grad=True)  # (1, 3, 3)
    labels = torch.tensor([[1, IGNORE_INDEX, 2]])
    loss, m = token_cross_entropy(logits, labels)
    ce0 = lse([1, 2, 0]) - 2                     # -log p(1) at position 0
    ce2 = lse([3, 1, 1]) - 1                     # -log p(2) at position 2; position 1 is ignored
    assert loss.item() == pytest.approx((ce0 + ce2) / 2, abs=1e-6)
    assert m == {"token_acc": 0.5, "n_tokens": 2}  # argmax 1 (right) at 0, argmax 0 (wrong) at 2
    loss.backward()
    p0 = softmax([1, 2, 0])
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([p0[0], p0[1] - 1, p0[2]]) / 2)   # (p - onehot) / n
    assert torch.equal(logits.grad[0, 1], torch.zeros(3))                                       # ignored: no gradient


def test_token_cross_entropy_upcasts_and_handles_no_tokens():
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 4))
    loss, _ = token_cross_entropy(logits, labels)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float().reshape(-1, 7), labels.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)

    z = torch.randn(2, 3, 5, requires_grad=True)
    loss, m = token_cross_entropy(z, torch.full((2, 3), IGNORE_INDEX))
    assert loss.item() == 0.0 and m == {"token_acc": 0.0, "n_tokens": 0}
    loss.backward()                                                  # still on the graph: DDP-safe
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_sequence_logprob_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [5.0, 0.0, 0.0], [3.0, 1.0, 1.0]],
                           [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])     # (2, 3, 3)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX] * 3])
    seq, tok = sequence_logprob(logits, labels, per_token=True)
    lp0, lp2 = 2 - lse([1, 2, 0]), 1 - lse([3, 1, 1])
    torch.testing.assert_close(seq, torch.tensor([lp0 + lp2, 0.0]))                    # empty row: log 1 = 0
    torch.testing.assert_close(tok, torch.tensor([[lp0, 0.0, lp2], [0.0, 0.0, 0.0]]))
    assert torch.equal(sequence_logprob(logits, labels), seq)


def test_lm_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="disagree"):
        token_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_cross_entropy(torch.randn(1, 2, 5), torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match=r"\(B, L, V\)"):
        sequence_logprob(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


# --- the temperature --------------------------------------------------------------------------------------------
def test_temperature_is_log_inverse_sigma_clamped_like_clip():
    t = Temperature()
    assert t.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert t().item() == pytest.approx(1 / 0.07, rel=1e-6) and t.temperature == pytest.approx(0.07)
    with torch.no_grad():
        t.log_scale.fill_(10.0)                                      # σ = e^-10, far below min = 0.01
    s = t()
    assert s.item() == pytest.approx(100.0, rel=1e-6)                # CLIP: logit scale <= 100
    assert t.log_scale.item() == pytest.approx(math.log(100.0))      # clamped in place
    s.backward()
    assert t.log_scale.grad.item() == pytest.approx(100.0, rel=1e-6)   # d e^x/dx: the clamp does not cut it
    with torch.no_grad():
        t.log_scale.fill_(-3.0)
    assert t().item() == pytest.approx(1.0)                          # σ <= max = 1
    fixed = Temperature(TemperatureConfig(init=0.5, learnable=False))
    assert list(fixed.parameters()) == [] and "log_scale" in fixed.state_dict()
    with pytest.raises(ValueError, match="min <= init <= max"):
        TemperatureConfig(init=2.0)


# --- itc.py: in-batch -------------------------------------------------------------------------------------------
def test_itc_two_pairs_by_hand():
    img = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)   # normalised: (1, 0), (0, 1)
    txt = torch.tensor([[5.0, 0.0], [4.0, 3.0]], requires_grad=True)   # normalised: (1, 0), (0.8, 0.6)
    scale = torch.tensor(2.0, requires_grad=True)
    out = itc_loss(img, txt, scale)
    # cosine similarities s = [[1, 0.8], [0, 0.6]]; logits 2s
    i2t = [math.log1p(math.exp(-0.4)), math.log1p(math.exp(-1.2))]      # rows [2, 1.6] and [0, 1.2]
    t2i = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(0.4))]       # rows [2, 0] and [1.6, 1.2]
    assert out.loss.item() == pytest.approx(0.5 * (sum(i2t) / 2 + sum(t2i) / 2), abs=1e-6)
    assert out.metrics["i2t_acc"] == 1.0 and out.metrics["t2i_acc"] == 0.5   # text 2 prefers image 1
    torch.testing.assert_close(out.sim_i2t, torch.tensor([[2.0, 1.6], [0.0, 1.2]]))
    torch.testing.assert_close(out.sim_t2i, out.sim_i2t.T)
    assert out.local_rows == slice(0, 2) and out.ids.tolist() == [0, 1]
    out.loss.backward()
    # d/ds log(1 + e^{s(a_neg - a_pos)}) = (a_neg - a_pos) sigmoid(s (a_neg - a_pos)); each row weighs 1/4
    sig = lambda x: 1 / (1 + math.exp(-x))                            # noqa: E731
    rows = [(0.8 - 1.0), (0.0 - 0.6), (0.0 - 1.0), (0.8 - 0.6)]        # i2t rows, then t2i rows
    assert scale.grad.item() == pytest.approx(sum(d * sig(2 * d) for d in rows) / 4, abs=1e-6)


def test_itc_duplicate_ids_are_all_positives():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    ids = torch.tensor([5, 5, 9, 2])                                  # pairs 0 and 1 show the same image
    out = itc_loss(img, txt, torch.tensor(3.0), ids=ids)
    vi, vt = F.normalize(img, dim=-1).tolist(), F.normalize(txt, dim=-1).tolist()
    sim = [[3.0 * sum(a * b for a, b in zip(vi[i], vt[j])) for j in range(4)] for i in range(4)]
    same = [[float(ids[i] == ids[j]) for j in range(4)] for i in range(4)]
    y = [[s / sum(r) for s in r] for r in same]                        # row 0: [1/2, 1/2, 0, 0]
    sim_t = [[sim[j][i] for j in range(4)] for i in range(4)]          # text rows
    assert out.loss.item() == pytest.approx(symmetric(sim, sim_t, y, y), abs=1e-5)
    hits = [ids[max(range(4), key=lambda j: sim[i][j])] == ids[i] for i in range(4)]
    assert out.metrics["i2t_acc"] == pytest.approx(sum(hits) / 4)


def test_itc_matches_transformers_clip_loss_and_gradients():
    transformers = pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip import modeling_clip

    cfg = CLIPConfig(text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=8, patch_size=4),
                     projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)                                  # not the default, not a round number
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            captured[name] = output
        return hook

    model.visual_projection.register_forward_hook(keep("image"))
    model.text_projection.register_forward_hook(keep("text"))
    B = 6
    ids = torch.randint(0, 40, (B, 7), generator=torch.Generator().manual_seed(1))
    pixels = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    hf_loss_fn = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    assert ref.loss.item() == pytest.approx(hf_loss_fn(ref.logits_per_text).item(), abs=1e-7)
    ref.loss.backward()

    img = captured["image"].detach().clone().requires_grad_(True)     # (B, 8) projected, unnormalised
    txt = captured["text"].detach().clone().requires_grad_(True)
    temp = Temperature()
    with torch.no_grad():
        temp.log_scale.copy_(model.logit_scale)
    out = itc_loss(img, txt, temp())
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    torch.testing.assert_close(img.grad, captured["image"].grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt.grad, captured["text"].grad, rtol=0, atol=1e-6)
    assert temp.log_scale.grad.item() == pytest.approx(model.logit_scale.grad.item(), abs=1e-6)
    torch.testing.assert_close(out.sim_i2t, ref.logits_per_image.detach(), rtol=0, atol=1e-6)


def test_itc_rejects_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        itc_loss(x, torch.randn(3, 5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="ids must be integer"):
        itc_loss(x, x, torch.tensor(1.0), ids=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="pass image_feat_m and text_feat_m"):
        itc_loss_with_queue(x, x, torch.tensor(1.0), FeatureQueue(QueueConfig(size=4, dim=4)), alpha=0.4)


# --- itc.py: queue and momentum ---------------------------------------------------------------------------------
def test_empty_queue_equals_in_batch_itc():
    g = torch.Generator().manual_seed(0)
    img0, txt0 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3])
    results = []
    for fn in ("plain", "queue"):
        img, txt = img0.clone().requires_grad_(True), txt0.clone().requires_grad_(True)
        temp = Temperature()
        if fn == "plain":
            out = itc_loss(img, txt, temp(), ids=ids)
        else:
            out = itc_loss_with_queue(img, txt, temp(), FeatureQueue(QueueConfig(size=8, dim=7)), ids=ids)
            assert out.metrics["queue_size"] == 0
        out.loss.backward()
        results.append((out, img.grad, txt.grad, temp.log_scale.grad))
    (a, *ga), (b, *gb) = results
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-7)
    for x, y in zip(ga, gb):                                          # t2i: one matmul vs a transpose
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.sim_i2t, b.sim_i2t)
    assert a.metrics["i2t_acc"] == b.metrics["i2t_acc"] and a.metrics["t2i_acc"] == b.metrics["t2i_acc"]
    # momentum keys equal to the online features: same value (ALBEF's loss right after momentum_copy)
    c = itc_loss_with_queue(img0, txt0, torch.tensor(1 / 0.07), FeatureQueue(QueueConfig(size=8, dim=7)), ids=ids,
                            image_feat_m=img0, text_feat_m=txt0)
    assert c.loss.item() == pytest.approx(a.loss.item(), abs=1e-6)


def test_itc_with_queue_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    queue = FeatureQueue(QueueConfig(size=4, dim=2))
    queue.enqueue_dequeue(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]]))   # (0.6, 0.8) and (0, 1)
    out = itc_loss_with_queue(img, txt, torch.tensor(2.0), queue)
    i2t = [[2.0, 1.6, 0.0], [0.0, 1.2, 2.0]]           # 2 [ĥv·t1, ĥv·t2, ĥv·q_text]
    t2i = [[2.0, 0.0, 1.2], [1.6, 1.2, 1.92]]          # 2 [ĥw·i1, ĥw·i2, ĥw·q_image]
    eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]           # pair i matches text / image i; the queue is negative
    want = symmetric(i2t, t2i, eye, eye)
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(out.sim_i2t, torch.tensor([[2.0, 1.6], [0.0, 1.2]]))   # the batch block only
    assert out.metrics["queue_size"] == 1
    assert out.metrics["i2t_acc"] == 1.0             # in-batch: row 2 picks text 2 although the queue entry is closer


def test_queued_entries_with_the_same_id_are_positives():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = FeatureQueue(QueueConfig(size=4, dim=2))
    queue.enqueue_dequeue(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]]), ids=torch.tensor([0]))
    out = itc_loss_with_queue(img, txt, torch.tensor(1.0), queue, ids=torch.tensor([0, 3]))
    r = 1 / math.sqrt(2)
    i2t = [[1.0, 0.0, r], [0.0, 1.0, -r]]
    t2i = [[1.0, 0.0, r], [0.0, 1.0, r]]
    y = [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]             # pair 0 and the queued entry share id 0
    want = symmetric(i2t, t2i, y, y)
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    no_ids = itc_loss_with_queue(img, txt, torch.tensor(1.0), queue)     # no ids: the queue is all negatives,
    # even though the batch's default ids 0, 1 include the queued entry's 0
    y0 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    want0 = symmetric(i2t, t2i, y0, y0)
    assert no_ids.loss.item() == pytest.approx(want0, abs=1e-6)


def test_momentum_distillation_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6]], requires_grad=True)
    img_m = torch.tensor([[0.0, 1.0], [1.0, 0.0]])       # the momentum encoder disagrees
    txt_m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = FeatureQueue(QueueConfig(size=4, dim=2))
    out = itc_loss_with_queue(img, txt, torch.tensor(1.0), queue, image_feat_m=img_m, text_feat_m=txt_m, alpha=0.5)
    s_i2t = [[1.0, 0.0], [0.0, 1.0]]                     # online images · momentum texts
    s_t2i = [[0.0, 1.0], [0.6, 0.8]]                     # online texts · momentum images
    m_i2t = [[0.0, 1.0], [1.0, 0.0]]                     # momentum images · momentum texts
    m_t2i = [[0.0, 1.0], [1.0, 0.0]]
    onehot = [[1.0, 0.0], [0.0, 1.0]]

    def targets(m):
        return [[0.5 * q + 0.5 * h for q, h in zip(softmax(m[i]), onehot[i])] for i in range(2)]

    y_i2t, y_t2i = targets(m_i2t), targets(m_t2i)
    want = symmetric(s_i2t, s_t2i, y_i2t, y_t2i)
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    hard = itc_loss_with_queue(img, txt, torch.tensor(1.0), queue, image_feat_m=img_m, text_feat_m=txt_m)
    want_hard = symmetric(s_i2t, s_t2i, onehot, onehot)
    assert hard.loss.item() == pytest.approx(want_hard, abs=1e-6)
    assert hard.loss.item() != pytest.approx(out.loss.item(), abs=1e-3)


def test_queue_is_a_fifo_whose_pointer_wraps():
    q = FeatureQueue(QueueConfig(size=4, dim=2))
    vec = {c: torch.tensor([[float(k + 1), 1.0]]) for k, c in enumerate("abcdefghij")}   # distinct directions
    unit = {c: F.normalize(v, dim=-1)[0] for c, v in vec.items()}

    def push(letters, ids=None):
        img = torch.cat([vec[c] for c in letters])
        q.enqueue_dequeue(img, -2 * img, None if ids is None else torch.tensor(ids))  # texts: opposite direction

    def slots(letters):
        return torch.stack([unit[c] for c in letters])

    assert len(q) == 0 and [t.shape[0] for t in q.contents()] == [0, 0, 0]
    push("abc", [0, 1, 2])
    assert int(q.ptr) == 3 and len(q) == 3
    torch.testing.assert_close(q.contents()[0], slots("abc"))
    push("de", [3, 4])                                               # d -> slot 3, e wraps to slot 0
    assert int(q.ptr) == 1 and len(q) == 4
    torch.testing.assert_close(q.image, slots("ebcd"))
    torch.testing.assert_close(q.text, -slots("ebcd"))
    assert q.ids.tolist() == [4, 1, 2, 3]
    push("fghij")                                                    # 5 > K: as if written one by one from slot 1
    assert int(q.ptr) == 2 and len(q) == 4
    torch.testing.assert_close(q.image, slots("ijgh"))
    assert q.ids.tolist() == [-1, -1, -1, -1]
    with pytest.raises(ValueError, match="QueueConfig.dim"):
        q.enqueue_dequeue(torch.randn(2, 3), torch.randn(2, 3))
    assert set(q.state_dict()) == {"image", "text", "ids", "ptr", "count"}


def test_momentum_update_exact_values():
    model, mom = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        mom.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        mom.bias.copy_(torch.tensor([0.0, -1.0]))
        model.weight.copy_(torch.tensor([[11.0, 12.0], [13.0, 14.0]]))
        model.bias.copy_(torch.tensor([10.0, 9.0]))
    momentum_update(model, mom, 0.9)                                  # 0.9 θ_m + 0.1 θ
    torch.testing.assert_close(mom.weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    torch.testing.assert_close(mom.bias, torch.tensor([1.0, 0.0]))
    for _ in range(2):
        momentum_update(model, mom, 0.9)                              # θ_m(k) = θ + 0.9^k (θ_m(0) - θ)
    torch.testing.assert_close(mom.weight, torch.tensor([[11.0, 12.0], [13.0, 14.0]]) - 10 * 0.9 ** 3)
    with torch.no_grad():
        mom.weight.fill_(1.0)
        model.weight.fill_(3.0)
    momentum_update(model, mom, 0.5)
    assert torch.equal(mom.weight, torch.full((2, 2), 2.0))           # dyadic numbers: bit-exact
    before = mom.weight.clone()
    momentum_update(model, mom, 1.0)
    assert torch.equal(mom.weight, before)                            # m = 1 freezes
    momentum_update(model, mom, 0.0)
    assert torch.equal(mom.weight, model.weight)                      # m = 0 copies
    frozen = momentum_copy(model)
    assert all(not p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen.weight, model.weight) and frozen.weight is not model.weight
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        momentum_update(model, mom, 1.5)
    with pytest.raises(ValueError, match="momentum_copy"):
        momentum_update(model, nn.Linear(2, 2, bias=False), 0.9)


# --- itm.py -----------------------------------------------------------------------------------------------------
def test_itm_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    labels = torch.tensor([1, 1, 0])
    loss, m = itm_loss(logits, labels)
    want = (math.log1p(math.exp(2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["itm_acc"] == pytest.approx(1 / 3) and m["itm_pos_acc"] == 0.5 and m["itm_neg_acc"] == 0.0
    assert itm_labels(2, 3).tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="1 \\(matched\\) or 0"):
        itm_loss(logits, torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="\\(M, 2\\)"):
        itm_loss(torch.randn(3, 3), labels)


def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])                             # duplicates of images 0 and 2
    sim = 5 * torch.randn(6, 6, generator=g)
    sim += 20 * (ids[:, None] == ids[None, :])                        # positives are the most similar of all
    for _ in range(300):
        neg = sample_hard_negatives(sim, sim.T, ids, generator=g)
        assert (ids[neg.text_for_image] != ids).all() and (ids[neg.image_for_text] != ids).all()


def test_hard_negatives_pick_the_hardest_when_peaked():
    sim_i2t = torch.zeros(4, 4)
    sim_i2t.fill_diagonal_(50.0)                                       # the positive, excluded
    hardest_text = [2, 3, 0, 1]
    sim_i2t[torch.arange(4), hardest_text] = 30.0
    sim_t2i = torch.zeros(4, 4)
    hardest_image = [1, 0, 3, 2]
    sim_t2i[torch.arange(4), hardest_image] = 30.0
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        neg = sample_hard_negatives(sim_i2t, sim_t2i, generator=g)
        assert neg.text_for_image.tolist() == hardest_text and neg.image_for_text.tolist() == hardest_image


def test_hard_negative_frequencies_follow_the_softmax():
    sim = torch.tensor([[3.0, 1.0, 0.0, 0.5],
                        [2.0, 3.0, 1.0, 0.0],
                        [0.0, 0.5, 3.0, 1.5],
                        [1.0, 0.0, 1.0, 3.0]])
    ids = torch.tensor([0, 1, 2, 2])                                   # pairs 2 and 3 are duplicates
    want = []
    for i in range(4):                                                 # P(j|i) ∝ e^{s_ij} over id_j != id_i
        w = [math.exp(sim[i, j].item()) if ids[j] != ids[i] else 0.0 for j in range(4)]
        want.append([x / sum(w) for x in w])
    g = torch.Generator().manual_seed(2)
    draws = 4000
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        neg = sample_hard_negatives(sim, sim.T.contiguous(), ids, generator=g)
        counts[torch.arange(4), neg.text_for_image] += 1
    freq = counts / draws
    assert (freq - torch.tensor(want)).abs().max().item() < 0.03      # 4000 draws: sd <= 0.008
    assert freq[2, 3] == 0 and freq[3, 2] == 0 and freq[0, 0] == 0


def test_hard_negatives_are_deterministic_given_a_generator():
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(4))
    a = sample_hard_negatives(sim, sim.T, generator=torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, sim.T, generator=torch.Generator().manual_seed(7))
    c = sample_hard_negatives(sim, sim.T, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.text_for_image, b.text_for_image) and torch.equal(a.image_for_text, b.image_for_text)
    assert not (torch.equal(a.text_for_image, c.text_for_image) and torch.equal(a.image_for_text, c.image_for_text))


def test_hard_negatives_without_candidates_raise():
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))                 # batch of 1
    with pytest.raises(ValueError, match="at least 2 distinct ids"):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(torch.zeros(2, 5), torch.zeros(5, 2))


def test_itc_similarities_feed_hard_negative_sampling():
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])
    out = itc_loss(img, txt, torch.tensor(10.0), ids=ids)
    neg = sample_hard_negatives(out.sim_i2t, out.sim_t2i, out.ids, generator=g)
    assert neg.text_for_image.shape == (6,) and neg.image_for_text.shape == (6,)
    assert (ids[neg.text_for_image] != ids).all() and (ids[neg.image_for_text] != ids).all()


# --- two gloo processes ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b, msg: str, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{msg}: {m}")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W.WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W.WORLD)]
    one = {"in_batch": W.in_batch_case(W.make_model(), 0, 1), "queue": W.queue_case(W.make_model(), 0, 1)}
    world = W.WORLD

    ref = one["in_batch"]
    assert ref["img_grad"].abs().sum() > 0 and ref["param_grads"]["temperature.log_scale"].abs() > 0
    assert len(set(ref["text_for_image"].tolist())) > 1               # the sampler's output is not trivial
    for r, res in enumerate(ranks):
        got = res["in_batch"]
        sl = W.rows(r, world)
        close(got["loss"], ref["loss"], f"rank {r} ITC loss")          # every rank: the global batch's loss
        assert got["metrics"] == pytest.approx(ref["metrics"])
        close(got["sim_i2t"], ref["sim_i2t"], f"rank {r} sim_i2t")
        close(got["sim_t2i"], ref["sim_t2i"], f"rank {r} sim_t2i")
        assert torch.equal(got["ids"], ref["ids"])
        assert got["local_rows"] == (sl.start, sl.stop)
        # the gather's backward sums over ranks: the local features' grad is W x the single-process grad ...
        close(got["img_grad"] / world, ref["img_grad"][sl], f"rank {r} image feature grad")
        close(got["txt_grad"] / world, ref["txt_grad"][sl], f"rank {r} text feature grad")
        # ... so that after DDP's average every parameter, the temperature included, has the single-process grad
        for k, g in got["param_grads"].items():
            close(g, ref["param_grads"][k], f"rank {r} DDP grad of {k}")
        # global hard negatives: the same indices on every rank as in one process
        assert torch.equal(got["text_for_image"], ref["text_for_image"])
        assert torch.equal(got["image_for_text"], ref["image_for_text"])

    ref = one["queue"]
    assert ref["metrics"]["queue_size"] == W.N
    for r, res in enumerate(ranks):
        got = res["queue"]
        sl = W.rows(r, world)
        close(got["loss"], ref["loss"], f"rank {r} queue ITC loss")
        assert got["metrics"] == pytest.approx(ref["metrics"])
        close(got["img_grad"] / world, ref["img_grad"][sl], f"rank {r} queue image feature grad")
        close(got["txt_grad"] / world, ref["txt_grad"][sl], f"rank {r} queue text feature grad")
        for k, g in got["param_grads"].items():
            close(g, ref["param_grads"][k], f"rank {r} queue DDP grad of {k}")
        for k, v in got["momentum_params"].items():
            close(v, ref["momentum_params"][k], f"rank {r} momentum {k}")
        for k, v in got["queue"].items():                             # identical queues, wrapped the same way
            close(v, ref["queue"][k], f"rank {r} queue buffer {k}")
        assert int(got["queue"]["ptr"]) == (2 * W.N) % W.QUEUE and int(got["queue"]["count"]) == W.QUEUE

    for r, res in enumerate(ranks):
        assert "different batch sizes [4, 3]" in res["uneven"], res["uneven"]
