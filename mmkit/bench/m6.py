"""M6 throughput: training tokens/s and model-FLOPs utilisation, and decoding tokens/s with / without KV cache.

    mmkit bench m6                                   # m6-tiny (1.0M params) and a wider m6 (d_model 512)
    mmkit bench m6 --config m6-tiny --batch 64 --text-len 32 --threads 2
    mmkit bench m6 --widths 128 256 512 --precision bf16

Everything is measured side by side in one run, on the same shared cores:
- **matmul peak**: GFLOP/s of one large square matmul (fp32 and bf16), the best this CPU reaches now.
- **training**: one forward + backward + AdamW step of image captioning (visual tokens + a caption).
  Tokens/s counts every position the Transformer processes. The step's FLOPs are counted, not estimated,
  by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) on the same step, so
  MFU = FLOPs per step / step time / matmul peak of the same precision.
- **generation**: greedy captions of ``--new-tokens`` tokens, M6's own loop and transformers' ``generate``
  (through :class:`mmkit.generation.HFGenerationAdapter`), each with and without the KV cache; the ratio
  cached / uncached is the cache's speed-up.
No asserts: a benchmark only measures.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmkit.bench import nonnegative_int, positive_int, time_fn
from mmkit.config import replace_config
from mmkit.generation import HFGenerationAdapter
from mmkit.zoo import build_model, load_config


class GenerationSpeed(NamedTuple):
    name: str
    new_tokens: int          # generated tokens (rows x steps) in the timed run
    seconds: float
    tokens_per_s: float


def generation_speed(model, images=None, encoder_ids=None, max_new_tokens: int = 64,
                     repeats: int = 3) -> list[GenerationSpeed]:
    """Tokens/s of greedy decoding, M6's own loop vs transformers' generate, with and without KV cache.

    Every run generates exactly ``max_new_tokens`` per row ([EOS] is suppressed) and the best of ``repeats``
    timings is kept. Returns one :class:`GenerationSpeed` per method.
    """
    eos = model.config.eos_token_id
    B = (images if images is not None else encoder_ids).shape[0]
    hf = HFGenerationAdapter(model)

    def no_eos(ids, logits):
        return logits.index_fill(-1, torch.tensor([eos], device=logits.device), float("-inf"))

    runs = {
        "M6Model.generate, KV cache": lambda: model.generate(images, encoder_ids, max_new_tokens,
                                                             logits_processor=no_eos),
        "M6Model.generate, no cache": lambda: model.generate(images, encoder_ids, max_new_tokens,
                                                             logits_processor=no_eos, use_cache=False),
        "HF generate, KV cache": lambda: hf.generate(images=images, encoder_ids=encoder_ids,
                                                     max_new_tokens=max_new_tokens, use_cache=True,
                                                     suppress_tokens=[eos]),
        "HF generate, no cache": lambda: hf.generate(images=images, encoder_ids=encoder_ids,
                                                     max_new_tokens=max_new_tokens, use_cache=False,
                                                     suppress_tokens=[eos]),
    }
    out = []
    for name, fn in runs.items():
        fn()                                                                  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(GenerationSpeed(name, B * max_new_tokens, best, B * max_new_tokens / best))
    return out


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an (n x n) @ (n x n) matmul: 2 n^3 FLOPs."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / time_fn(lambda: a @ b, repeats=repeats, warmup=1) / 1e9


def caption_batch(model, batch: int, text_len: int, seed: int = 0) -> dict:
    """Random images and caption ids: speed does not depend on the values."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, min(c.vocab_size, 384), (batch, text_len), generator=g)
    return dict(images=torch.rand(batch, c.in_channels, c.image_size, c.image_size, generator=g),
                decoder_input_ids=ids, labels=ids.roll(-1, dims=1))


def training_step_fn(model, batch: dict, precision: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def step():
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_flops(step) -> int:
    """FLOPs of one training step (forward + backward; the optimizer's element-wise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mmkit bench m6", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="m6-tiny", help="preset name or YAML file (default m6-tiny)")
    p.add_argument("--widths", type=positive_int, nargs="+", default=[128, 512],
                   help="d_model values to measure (d_ff = 4 d_model, heads = d_model / 32); default 128 512")
    p.add_argument("--batch", type=positive_int, default=32, help="images per training step / generation batch")
    p.add_argument("--text-len", type=positive_int, default=32, help="caption tokens per training row")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="generated tokens per row")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="training step precision")
    p.add_argument("--threads", type=nonnegative_int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median for training, best for decoding)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype, repeats=a.repeats)
    print(f"matmul peak ({a.precision}, 2048^3, {a.threads} threads): {peak:.1f} GFLOP/s\n")
    print(f"{'d_model':>7} {'params':>8} {'tokens/step':>11} {'step s':>8} {'train tok/s':>11} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6}")
    models = {}
    for width in a.widths:
        cfg = replace_config(load_config(a.config), d_model=width, d_ff=4 * width, n_heads=max(1, width // 32))
        model = build_model(cfg).train()
        models[width] = model
        batch = caption_batch(model, a.batch, a.text_len)
        step = training_step_fn(model, batch, a.precision)
        flops = step_flops(step)
        seconds = time_fn(step, repeats=a.repeats)
        tokens = a.batch * (model.num_visual_tokens + a.text_len)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{width:>7} {n_params / 1e6:>7.2f}M {tokens:>11} {seconds:>8.3f} {tokens / seconds:>11.0f} "
              f"{flops / 1e9:>10.2f} {flops / seconds / 1e9:>8.1f} {flops / seconds / 1e9 / peak:>6.1%}")

    print(f"\ngreedy decoding, {a.batch} captions x {a.new_tokens} tokens (best of {a.repeats}):")
    for width, model in models.items():
        model.eval()
        images = caption_batch(model, a.batch, 1)["images"]
        with torch.no_grad():
            runs = {r.name: r for r in generation_speed(model, images=images, max_new_tokens=a.new_tokens,
                                                        repeats=a.repeats)}
        for r in runs.values():
            print(f"  d_model {width:>4}  {r.name:<28} {r.tokens_per_s:>9.0f} tokens/s  ({r.seconds:.3f} s)")
        for who in ("M6Model.generate", "HF generate"):
            ratio = runs[f"{who}, KV cache"].tokens_per_s / runs[f"{who}, no cache"].tokens_per_s
            print(f"  d_model {width:>4}  {who}: KV cache is {ratio:.2f}x the uncached speed")
