"""VLMo speed: retrieval with the dual encoder vs fusion scoring of every pair, the training step (time, FLOPs, MFU),
and the same step next to transformers' ``ViltModel`` of the same width and depth.

    mmkit bench vlmo                                   # vlmo-tiny: 1K x 1K retrieval, stage-3 / VQA steps, ViLT
    mmkit bench vlmo --n 1000 --fusion-pairs 4000      # how many pairs the fusion path really scores
    mmkit bench vlmo --full-fusion                     # score all n x n pairs by fusion (about an hour on 1 core)
    mmkit bench vlmo --checkpoint vlmo-tiny-pretrained # a trained model (default: a fresh one, speed is the same)

Everything is measured side by side in one run, on the same shared cores:
- **retrieval** (VLMo §3.5, §4.4): the dual encoder encodes n images and n texts once and takes one (n, D) x (D, n)
  product; the fusion encoder runs one joint pass per (image, text) pair, n^2 passes. By default the fusion path
  times ``--fusion-pairs`` pairs (batched exactly as a full run would be) and scales that per-pair time to n^2:
  its cost is a fixed number of identical batched passes per pair, so it is linear in the pairs (``--full-fusion``
  checks it). The ratio fusion / dual is the dual encoder's speed-up.
- **training**: one forward + backward + AdamW step of VQA fine-tuning (a fusion pass + the classifier) and of
  stage-3 pretraining (ITC's two unimodal passes, the fusion MLM pass, ITM over 3B pairs); FLOPs counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the same step; MFU = FLOPs / step time / matmul peak.
- **ViLT**: ``transformers.ViltModel`` built from a config of the same width, depth, heads, FFN width, image size,
  patch size and text length (random weights, no download), with a VQA-sized classifier on its pooler, one
  training step on the same batch as VLMo's VQA step. ViLT is a single-FFN fusion encoder (VLMo §2 compares
  with it); the ratio shows what the Multiway routing costs in a fusion pass.
No asserts: a benchmark only measures.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mmkit.bench import nonnegative_int, positive_int, time_fn
from mmkit.bench.m6 import matmul_peak
from mmkit.tokenizer import world_tokenizer
from mmkit.train import freeze
from mmkit.vlmo.model import VLMoForVQA
from mmkit.vlmo.tasks import retrieval as R
from mmkit.vlmo.tasks.pretrain import PairData, PretrainConfig, vl_loss
from mmkit.vlmo.tasks.vqa import vqa_loss
from mmkit.data.scenes import SceneBank
from mmkit.data.vqa import VQASampler
from mmkit.zoo import build_model, load, load_config

__all__ = ["retrieval_speed", "step_cost", "vilt_like", "run"]


def retrieval_speed(model, images: torch.Tensor, texts: list[str], fusion_pairs: int | None = None,
                    tokenizer=None, batch_size: int = 256) -> dict:
    """Seconds of dual scoring (n_img x n_txt) and of fusion scoring (every pair, or ``fusion_pairs`` of them scaled
    to every pair). Returns {"dual_s", "fusion_s", "fusion_measured_pairs", "fusion_pairs_per_s", "ratio"}."""
    n_img, n_txt = len(images), len(texts)
    R.dual_scores(model, images[:8], texts[:8], tokenizer)                 # warm-up: first-call allocations untimed
    R.itm_scores(model, images[:8], texts[:8], tokenizer)
    t0 = time.perf_counter()
    sim = R.dual_scores(model, images, texts, tokenizer)
    dual = time.perf_counter() - t0
    total = n_img * n_txt
    k = total if fusion_pairs is None else min(fusion_pairs, total)
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:k]
    ii, tt = (idx // n_txt), (idx % n_txt)
    t0 = time.perf_counter()
    R.itm_scores(model, images[ii], [texts[j] for j in tt.tolist()], tokenizer, batch_size=batch_size)
    measured = time.perf_counter() - t0
    fusion = measured * total / k
    return {"dual_s": dual, "fusion_s": fusion, "fusion_measured_pairs": k, "fusion_measured_s": measured,
            "fusion_pairs_per_s": k / measured, "ratio": fusion / dual, "sim_shape": tuple(sim.shape)}


def step_cost(step, repeats: int = 3) -> tuple[float, int]:
    """(median seconds, FLOPs) of one training step (forward + backward; the optimizer's element-wise work is not
    counted in the FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return time_fn(step, repeats=repeats, warmup=1), counter.get_total_flops()


def _train_step(model: nn.Module, loss_fn, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = loss_fn(model, batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


class ViltClassifier(nn.Module):
    """transformers' ViltModel + the VQA classifier of ViLT / VLMo on its pooler (Linear, LN, GELU, Linear)."""

    def __init__(self, vilt: nn.Module, d: int, n_answers: int):
        super().__init__()
        self.vilt = vilt
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, n_answers))

    def forward(self, pixel_values, input_ids, attention_mask):
        pooled = self.vilt(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                           pixel_mask=torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:],
                                                 dtype=torch.long)).pooler_output
        return self.head(pooled)


def vilt_like(cfg, n_answers: int) -> ViltClassifier:
    """A ViltModel with VLMo ``cfg``'s width, depth, heads, FFN width, image / patch size and text length."""
    from transformers import ViltConfig, ViltModel
    vc = ViltConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
                    max_position_embeddings=cfg.max_text_len, image_size=cfg.image_size, patch_size=cfg.patch_size,
                    num_channels=cfg.in_channels, max_image_length=-1, layer_norm_eps=cfg.layer_norm_eps,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, modality_type_vocab_size=2)
    return ViltClassifier(ViltModel(vc), cfg.d_model, n_answers)


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mmkit bench vlmo", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="hub name of a VLMo to time (default: a fresh vlmo-tiny)")
    p.add_argument("--n", type=positive_int, default=1000, help="images and texts of the retrieval benchmark (n x n pairs)")
    p.add_argument("--fusion-pairs", type=positive_int, default=4000, help="pairs the fusion path really scores")
    p.add_argument("--full-fusion", action="store_true", help="score all n x n pairs by fusion (slow)")
    p.add_argument("--batch", type=positive_int, default=64, help="examples per VQA training step (stage 3: half)")
    p.add_argument("--threads", type=nonnegative_int, default=1, help="torch threads (default 1: the kit's training setting)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = world_tokenizer()
    model = load(a.checkpoint) if a.checkpoint else build_model(load_config("vlmo-tiny"))
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VLMo d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.image_size} px / {cfg.patch_size} px patches, "
          f"{n_params / 1e6:.2f}M parameters, {a.threads} thread(s)\n")

    # -- retrieval: dual encoder vs fusion of every pair (§4.4) ----------------------------------------------------
    data = R.retrieval_data("test", a.n, image_size=cfg.image_size)
    r = retrieval_speed(model.eval(), data.images, data.texts, None if a.full_fusion else a.fusion_pairs, tok)
    how = "all pairs" if a.full_fusion else f"{r['fusion_measured_pairs']} pairs measured, scaled to {a.n ** 2}"
    print(f"retrieval {a.n} images x {a.n} texts:")
    print(f"  dual encoder   {r['dual_s']:9.2f} s  ({2 * a.n} unimodal passes + one product)")
    print(f"  fusion encoder {r['fusion_s']:9.1f} s  ({r['fusion_pairs_per_s']:.0f} pairs/s; {how})")
    print(f"  fusion / dual  {r['ratio']:9.0f}x\n")

    # -- training steps, MFU ----------------------------------------------------------------------------------------
    peak = matmul_peak(torch.float32, repeats=a.repeats)
    print(f"matmul peak (fp32, 2048^3, {a.threads} threads): {peak:.1f} GFLOP/s")
    vqa = VLMoForVQA.from_pretrained_vlmo(model).train()
    freeze(vqa, ("itc_image_proj.", "itc_text_proj.", "temperature.", "itm_head.", "mlm_head.", "mim_head.",
                 "image_embed.mask_token"))
    bank = SceneBank.build("train", 256, image_size=cfg.image_size)
    vbatch = VQASampler(bank).batch_fn(torch.Generator().manual_seed(0), a.batch)
    pc = PretrainConfig(image_size=cfg.image_size, n_pairs=256)
    pairs = PairData.build(pc, tok, cfg.max_text_len)
    pbatch = pairs.batch_fn(torch.Generator().manual_seed(0), a.batch // 2)
    pre = build_model(cfg).train() if not a.checkpoint else load(a.checkpoint).train()
    rows = {}
    print(f"{'step':<34} {'batch':>5} {'step s':>8} {'examples/s':>10} {'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6}")
    for name, m, fn, b, n in (("VQA fine-tune (1 fusion pass)", vqa, lambda m_, b_: vqa_loss(m_, b_, tok), vbatch,
                               a.batch),
                              ("stage 3 (ITC + MLM + ITM x 3B)", pre, lambda m_, b_: vl_loss(m_, b_, pc), pbatch,
                               a.batch // 2)):
        sec, flops = step_cost(_train_step(m, fn, b), a.repeats)
        rows[name] = sec
        print(f"{name:<34} {n:>5} {sec:>8.3f} {n / sec:>10.1f} {flops / 1e9:>10.2f} {flops / sec / 1e9:>8.1f} "
              f"{flops / sec / 1e9 / peak:>6.1%}")

    # -- the same VQA step on transformers' ViltModel of the same shape ---------------------------------------------
    vilt = vilt_like(cfg, vqa.config.n_answers).train()
    ids, am = R.tokenize(model, vbatch["questions"], tok)
    target = torch.zeros(a.batch, vqa.config.n_answers)

    def vilt_loss(m_, b_):
        logits = m_(b_["images"], ids, am.long())
        return nn.functional.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
    sec, flops = step_cost(_train_step(vilt, vilt_loss, vbatch), a.repeats)
    n_vilt = sum(p.numel() for p in vilt.parameters())
    print(f"{'ViltModel VQA step (same shape)':<34} {a.batch:>5} {sec:>8.3f} {a.batch / sec:>10.1f} "
          f"{flops / 1e9:>10.2f} {flops / sec / 1e9:>8.1f} {flops / sec / 1e9 / peak:>6.1%}")
    vqa_s = rows["VQA fine-tune (1 fusion pass)"]
    print(f"\nVLMo VQA step / ViLT VQA step: {vqa_s / sec:.2f}x  (VLMo {sum(p.numel() for p in vqa.parameters()) / 1e6:.2f}M "
          f"parameters incl. every expert, ViLT {n_vilt / 1e6:.2f}M)")
