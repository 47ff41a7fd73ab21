"""mPLUG pretraining wiring (mmkit/mplug/tasks/pretrain.py, mPLUG §3.3-§4): the batch layout, the queue filled and
wrapped by hand at the model level, the momentum update exact, an empty queue = in-batch ITC, the global token mean,
gradient checkpointing (equal) and bf16 (close) switches, a short run in which every part falls, and 2 gloo processes
= 1 process on the global batch."""
from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmkit.mplug.tasks.pretrain as P
from mmkit.config import replace_config
from mmkit.mplug.model import MOMENTUM_PARTS, MPLUG, MPLUGConfig
from mmkit.mplug.tasks.pretrain import (PretrainConfig, PretrainData, StageConfig, VisionCollapsed, VisionRun,
                                        build_batch, check_vision, global_token_mean, make_pretrain_loss, pretrain,
                                        pretrain_loss, pretrain_step)
from mmkit.objectives import IGNORE_INDEX, itc_loss, token_cross_entropy
from mmkit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_mplug_worker.py")
_spec = importlib.util.spec_from_file_location("_mplug_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
sys.modules["_mplug_worker"] = W
_spec.loader.exec_module(W)

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = W.CONFIG                                   # the worker's micro mPLUG (width 32, 16 px images)


def micro(seed: int = 0, **kw) -> MPLUG:
    torch.manual_seed(seed)
    return MPLUG(MPLUGConfig(**{**MICRO, **kw})).train()


@pytest.fixture(scope="module")
def data():
    return PretrainData.build(PretrainConfig(n_pairs=32, image_size=16, max_text_tokens=24))


# --- the batch -------------------------------------------------------------------------------------------------
def test_batch_layout(data, tok):
    b = data.fixed_batch(range(6), seed=0)
    B, L = b["text_ids"].shape
    for i in range(B):
        cap = data.captions[i]
        row = b["text_ids"][i][b["text_mask"][i]].tolist()
        assert row == [tok.cls_token_id] + cap + [tok.sep_token_id]                 # [CLS] caption [SEP]
        chosen = b["mlm_labels"][i] != IGNORE_INDEX                                 # MLM predicts the originals
        assert chosen.any() and torch.equal(b["mlm_labels"][i][chosen], b["text_ids"][i][chosen])
        assert not chosen[0] and not bool((b["mlm_ids"][i] != b["text_ids"][i])[~chosen].any())
        prefix = b["prefix_ids"][i][b["prefix_mask"][i]].tolist()[1:-1]            # PrefixLM: prefix + rest = caption
        rest = b["decoder_labels"][i][b["decoder_labels"][i] != IGNORE_INDEX].tolist()
        assert prefix + rest[:-1] == cap and rest[-1] == tok.eos_token_id
        assert b["decoder_input_ids"][i, 0] == tok.bos_token_id
        assert b["decoder_input_ids"][i, 1:len(rest)].tolist() == rest[:-1]
    assert b["ids"].tolist() == [data.caption_ids[i] for i in range(6)] and isinstance(b["seed"], int)
    for i, j in ((i, j) for i in range(len(data)) for j in range(i)):     # equal captions <=> equal ids
        assert (data.caption_ids[i] == data.caption_ids[j]) == (data.captions[i] == data.captions[j])
    assert data.caption_ids[0] == 0 and all(data.caption_ids[i] <= i for i in range(len(data)))
    all_caption = build_batch(PretrainData(replace_config(data.config, caption_rate=1.0), data.bank, data.texts,
                                           data.langs, data.captions, tok), range(6), torch.Generator())
    assert all_caption["prefix_ids"].shape[1] == 2                                   # every prefix empty: [CLS] [SEP]


# --- queue and momentum at the model level ------------------------------------------------------------------------
def test_queue_fills_and_wraps_by_hand(data):
    m = micro(queue_size=6)
    weights = PretrainConfig(itm=0.0, mlm=0.0, prefix_lm=0.0)
    b1, b2 = data.fixed_batch(range(4), seed=1), data.fixed_batch(range(10, 14), seed=2)
    s1 = pretrain_step(m, b1, weights, return_parts=True)
    q = m.queue
    assert len(q) == 4 and int(q.ptr) == 4 and s1.metrics["queue_size"] == 0      # scored before it was filled
    torch.testing.assert_close(q.image[:4], F.normalize(s1.image_feat_m, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.text[:4], F.normalize(s1.text_feat_m, dim=-1), atol=1e-6, rtol=0)
    assert q.ids[:4].tolist() == b1["ids"].tolist()                                  # the pairs' caption ids
    s2 = pretrain_step(m, b2, weights, return_parts=True)
    assert s2.metrics["queue_size"] == 4 and len(q) == 6 and int(q.ptr) == (4 + 4) % 6
    # slots 4, 5, 0, 1 hold batch 2 in order; slots 2, 3 still hold batch 1's rows 2, 3
    i1, i2 = b1["ids"].tolist(), b2["ids"].tolist()
    assert q.ids.tolist() == [i2[2], i2[3], i1[2], i1[3], i2[0], i2[1]]
    img2 = F.normalize(s2.image_feat_m, dim=-1)
    torch.testing.assert_close(q.image[[4, 5, 0, 1]], img2, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.image[[2, 3]], F.normalize(s1.image_feat_m, dim=-1)[2:], atol=1e-6, rtol=0)
    # the momentum features are the momentum encoders' own, taken after this step's update
    with torch.no_grad():
        fm = m.momentum_features(b2["images"], b2["text_ids"], b2["text_mask"])
    torch.testing.assert_close(fm[0], s2.image_feat_m, atol=1e-6, rtol=0)
    # evaluation leaves queue and momentum encoders alone
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("queue.", "momentum_model."))}
    m.eval()
    pretrain_step(m, b1, weights)
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_momentum_update_is_exact():
    m = micro(momentum=0.75)                     # dyadic values and m = 3/4: every product is exact in float32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randint(-8, 8, p.shape, generator=g).float() / 4)
    online = {n: getattr(m, n).state_dict() for n in MOMENTUM_PARTS}
    theta_m = {n: {k: v.clone() for k, v in m.momentum_model[n].state_dict().items()} for n in MOMENTUM_PARTS}
    others = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("fusion.", "decoder.", "itm_head."))}
    m.momentum_update()
    for n in MOMENTUM_PARTS:
        for k, v in m.momentum_model[n].state_dict().items():
            assert torch.equal(v, 0.75 * theta_m[n][k] + 0.25 * online[n][k]), f"{n}.{k}"   # θ_m <- m θ_m + (1-m) θ
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in others.items())
    assert not any(p.requires_grad for p in m.momentum_model.parameters())
    m.reset_momentum()
    for n in MOMENTUM_PARTS:
        for (k, a), b in zip(getattr(m, n).state_dict().items(), m.momentum_model[n].state_dict().values()):
            assert torch.equal(a, b), k


def test_empty_queue_itc_equals_in_batch_itc(data):
    """At the start (momentum encoders = online ones, empty queue, no distillation) the queued ITC is in-batch ITC."""
    m = micro(distill_alpha=0.0).eval()          # eval: no momentum update, no enqueue
    b = data.fixed_batch(range(8), seed=0)
    parts = pretrain_step(m, b, PretrainConfig(itm=0.0, mlm=0.0, prefix_lm=0.0), return_parts=True)
    v, l = m.embed_image(b["images"]), m.embed_text(b["text_ids"], b["text_mask"])
    ref = itc_loss(*m.itc_features(v, l), m.temperature(), ids=b["ids"])
    torch.testing.assert_close(parts.loss, ref.loss, atol=1e-6, rtol=0)
    assert parts.metrics["itc_i2t_acc"] == ref.metrics["i2t_acc"] and len(m.queue) == 0


def test_global_token_mean_on_one_process_is_token_cross_entropy():
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    labels[0, 2:] = IGNORE_INDEX
    loss, acc, n = global_token_mean(logits, labels)
    ref, m = token_cross_entropy(logits, labels)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    assert n == m["n_tokens"] == 12 and acc == pytest.approx(m["token_acc"])


# --- mPLUG §4 switches: gradient checkpointing and bf16 ------------------------------------------------------------
def _step(model, batch):
    loss, metrics = pretrain_loss(model, batch)
    loss.backward()
    return loss.detach(), metrics, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(data):
    b = data.fixed_batch(range(8), seed=3)
    ref, ckpt = micro(), MPLUG(MPLUGConfig(**{**MICRO, "gradient_checkpointing": True})).train()
    ckpt.load_state_dict(ref.state_dict())
    (l1, m1, g1), (l2, m2, g2) = _step(ref, b), _step(ckpt, b)
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=0)
    assert g1.keys() == g2.keys() and len(g1) > 50
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-5, msg=lambda s: f"{k}: {s}")


def test_bf16_switch_gives_a_close_loss(data):
    b = data.fixed_batch(range(8), seed=3)
    ref, half = micro(), MPLUG(MPLUGConfig(**{**MICRO, "bf16": True})).train()
    half.load_state_dict(ref.state_dict())
    (l1, m1, _), (l2, m2, g2) = _step(ref, b), _step(half, b)
    assert abs(float(l2) / float(l1) - 1) < 0.02                     # bf16 keeps ~3 significant digits
    for part in ("itc", "itm", "mlm", "prefix_lm"):
        assert m2[part] == pytest.approx(m1[part], rel=0.03), part
    assert all(torch.isfinite(g).all() for g in g2.values())
    assert half.embed_image(b["images"]).dtype == torch.float32      # stacks hand fp32 back to the heads


# --- learning ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_run_every_part_falls():
    """8 pairs, batch 8, a small model (width 64, 32 px images in 8 px patches). From random weights the [CLS] features of both encoders start almost
    identical (std ~5e-4 over a batch), and measured: the joint loss then trains MLM / PrefixLM for hundreds of steps
    before ITC leaves chance. mPLUG never starts there (§5.1: CLIP-ViT and BERT); the stand-in here is 60 ITC-only
    steps (a dual encoder, CLIP-style) before the joint run. Then all four parts fall well below their chance levels."""
    n = 8
    d = PretrainData.build(PretrainConfig(n_pairs=n, image_size=32, max_text_tokens=48))
    batches = [d.fixed_batch(range(n), seed=s) for s in range(4)]           # 4 maskings / cuts / negative draws
    batch_fn = lambda g, bs: batches[int(torch.randint(4, (), generator=g))]                 # noqa: E731
    m = micro(queue_size=n, d_model=64, n_heads=2, d_ff=256, vision_width=64, vision_heads=2, vision_d_ff=256,
              image_size=32, patch_size=8, embed_dim=32, max_text_len=64)
    tc = lambda steps: TrainConfig(steps=steps, batch_size=n, lr=2e-3, warmup_steps=10, mixed_precision="no",  # noqa
                                   progress_bar=False, log_every=0)
    train(m, make_pretrain_loss(PretrainConfig(itm=0.0, mlm=0.0, prefix_lm=0.0)), batch_fn, tc(60))
    h = train(m, pretrain_loss, batch_fn, tc(200)).history
    first = {k: sum(r[k] for r in h[:5]) / 5 for k in ("loss", "mlm", "prefix_lm")}
    last = {k: sum(r[k] for r in h[-20:]) / 20 for k in ("loss", "itc", "itm", "mlm", "prefix_lm", "itm_acc")}
    itc_chance = math.log(n + n)                        # 8 batch keys + 8 queued: log 16 = 2.77
    itm_prior = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))     # 1 positive : 2 negatives -> 0.637
    vocab_chance = math.log(MICRO["vocab_size"])        # 6.24
    assert last["itc"] < 0.5 * itc_chance, last
    assert last["itm"] < itm_prior - 0.1 and last["itm_acc"] > 2 / 3, last
    assert first["mlm"] > 0.8 * vocab_chance and last["mlm"] < 0.3 * first["mlm"], (first, last)
    assert first["prefix_lm"] > 0.8 * vocab_chance and last["prefix_lm"] < 0.3 * first["prefix_lm"], (first, last)
    assert last["loss"] < 0.4 * first["loss"], (first, last)


# --- stage 0 is checked before the later stages -------------------------------------------------------------------
def test_stage0_below_its_floor_stops_the_pretraining_loudly(monkeypatch):
    """A stage 0 that collapsed to "empty" scores 0 on occupied cells (the shipped run at vision_lr 4e-3: 0.09 / 0.11
    / 0.27): check_vision names it, and pretrain() raises before stage 1 trains anything."""
    floor = {"colour_acc": 0.5, "shape_acc": 0.4}
    check_vision(VisionRun([], {"colour_acc": 0.9, "shape_acc": 0.6, "size_acc": 0.9}, 1.0), floor)   # passes
    check_vision(VisionRun([], {"colour_acc": 0.0, "shape_acc": 0.0, "size_acc": 0.0}, 1.0), None)    # no floor
    with pytest.raises(VisionCollapsed, match=r"did not learn.*colour_acc.*vision_lr"):
        check_vision(VisionRun([], {"colour_acc": 0.09, "shape_acc": 0.6, "size_acc": 0.27}, 1.0), floor)
    with pytest.raises(VisionCollapsed, match="no held-out accuracy"):
        check_vision(VisionRun([], {}, 1.0), floor)

    calls = []
    monkeypatch.setattr(P, "train", lambda *a, **k: calls.append(a) or pytest.fail("a later stage started"))
    monkeypatch.setattr(P, "pretrain_visual_encoder",
                        lambda *a, **k: VisionRun([], {"colour_acc": 0.0, "shape_acc": 0.0, "size_acc": 0.0}, 0.1))
    cfg = PretrainConfig(n_pairs=8, image_size=16, max_text_tokens=24)
    st = StageConfig(vision_steps=1, itc_steps=5, n_val=4, vision_floor={"colour_acc": 0.3})
    with pytest.raises(VisionCollapsed, match="later stages were not started"):
        pretrain(micro(), cfg, TrainConfig(steps=2, batch_size=4, progress_bar=False, log_every=0), st)
    assert calls == []


# --- two processes -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    """ITC over the gathered batch, ITM on GLOBAL hard negatives (partners gathered with gradient), MLM and PrefixLM
    normalised by the global token count: 2 DDP processes on 4 pairs each = 1 process on the 8, step for step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W.WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W.WORLD)]
    one = W.run(W.make_model(), 0, 1)
    for s, ref in enumerate(one):
        got = [r[s] for r in ranks]
        # the joint loss: the mean of the ranks' losses (ITC is the same global loss on each)
        torch.testing.assert_close(sum(g["loss"] for g in got) / W.WORLD, ref["loss"], atol=1e-5, rtol=0)
        for part in ("itc", "itm", "mlm", "prefix_lm"):
            assert sum(g["metrics"][part] for g in got) / W.WORLD == pytest.approx(ref["metrics"][part], abs=1e-5)
        assert got[0]["metrics"]["itc"] == pytest.approx(got[1]["metrics"]["itc"], abs=1e-6)
        for g in got:                                     # after DDP's average: the single-process gradient
            for k, v in ref["grads"].items():
                torch.testing.assert_close(g["grads"][k], v, atol=2e-6, rtol=1e-4, msg=lambda m: f"step {s} {k}: {m}")
            for k, v in ref["queue"].items():             # the same queue on every rank (the global batch enqueued)
                torch.testing.assert_close(g["queue"][k], v, atol=1e-6, rtol=0)
            for k, v in ref["momentum"].items():
                torch.testing.assert_close(g["momentum"][k], v, atol=1e-6, rtol=0)
    assert one[1]["metrics"]["queue_size"] == W.GLOBAL_B                # step 2 scored against step 1's keys
    assert int(one[1]["queue"]["count"]) == W.CONFIG["queue_size"]       # ... and wrapped: 16 rows into 12 slots


FSDP_WORKER = Path(__file__).with_name("_mplug_fsdp_worker.py")


@pytest.mark.slow
def test_fsdp_zero3_on_two_gloo_processes_equals_one_process(tmp_path):
    """mPLUG §4's ZeRO: FullyShardedDataParallel (FULL_SHARD: parameters, gradients and optimizer state split in two) on
    2 gloo processes, the joint ITC + ITM + MLM + PrefixLM loss, = 1 process on the global batch, step for step:
    the same losses, the same full gradients, the same weights after each rank updated only its shard, the same queue
    and momentum encoders (kept whole on every rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W.WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(FSDP_WORKER), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W.WORLD)]
    ref_model = W.make_model()
    one = W.run(ref_model, 0, 1)
    total = sum(p.numel() for p in ref_model.parameters() if p.requires_grad)
    # each rank holds about half of the trainable parameters (ZeRO-3); the temperature (1 value) is kept whole
    assert all(abs(r[0]["local_numel"] - total / 2) <= 64 for r in ranks), [r[0]["local_numel"] for r in ranks]
    for s, ref in enumerate(one):
        got = [r[s] for r in ranks]
        torch.testing.assert_close(sum(g["loss"] for g in got) / W.WORLD, ref["loss"], atol=1e-5, rtol=0)
        for part in ("itc", "itm", "mlm", "prefix_lm"):
            assert sum(g["metrics"][part] for g in got) / W.WORLD == pytest.approx(ref["metrics"][part], abs=1e-5)
        for g in got:
            assert set(g["grads"]) == set(ref["grads"])
            for k, v in ref["grads"].items():
                torch.testing.assert_close(g["grads"][k], v, atol=2e-6, rtol=1e-4, msg=lambda m: f"step {s} {k}: {m}")
            for k, v in ref["queue"].items():
                torch.testing.assert_close(g["queue"][k], v, atol=1e-6, rtol=0)
            for k, v in ref["momentum"].items():
                torch.testing.assert_close(g["momentum"][k], v, atol=1e-6, rtol=0)
    after = ref_model.state_dict()                        # the single process after both SGD steps
    for g in ranks:
        for k, v in g[-1]["weights"].items():
            torch.testing.assert_close(v, after[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
