"""bf16 autocast vs fp32 on this CPU: one forward + backward + AdamW step, side by side, per width.

    mmkit bench precision                                  # MLP and transformer stacks at 128..1024 wide
    mmkit bench precision --widths 128 512 --kinds transformer --threads 1 --repeats 9

For every (kind, width) the fp32 and bf16 models are built with the same weights and timed in alternation
(fp32 step, bf16 step, fp32 step, ...) so that noise from other processes on the shared cores hits both
alike; the table shows the medians and the ratio fp32 / bf16 (> 1: bf16 autocast is faster). The threshold
behind ``TrainConfig(mixed_precision="auto")`` (:data:`mmkit.train.AUTO_BF16_MIN_WIDTH`) was read off this
table; re-run it on your machine before trusting it there. No asserts: a benchmark only measures.

On shared, busy cores the default thread count can make single runs swing wildly (OpenMP threads wait for
each other); ``--threads 1`` gives the steadiest ratios.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.bench import nonnegative_int, positive_int
from mmkit.train import AUTO_BF16_MIN_WIDTH, cpu_supports_fast_bf16, resolve_mixed_precision


class _MLPBlock(nn.Module):
    """Pre-LN residual feed-forward block: x + W2 GELU(W1 LN(x)), hidden 4x wide."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):                                   # (B, L, D)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class _TransformerBlock(nn.Module):
    """Pre-LN self-attention (SDPA, 64-wide heads) + the MLP block: the shape of every model in the kit."""

    def __init__(self, d: int):
        super().__init__()
        self.heads = max(1, d // 64)
        self.norm = nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = _MLPBlock(d)

    def forward(self, x):                                   # (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)         # (B, H, L, D/H)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return self.mlp(x)


def build_stack(kind: str, width: int, layers: int) -> nn.Module:
    block = {"mlp": _MLPBlock, "transformer": _TransformerBlock}[kind]
    return nn.Sequential(*[block(width) for _ in range(layers)])


def _make_step(model: nn.Module, x: torch.Tensor, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
        loss = y.float().pow(2).mean()
        loss.backward()
        opt.step()
    return step


def measure(kind: str, width: int, layers: int, batch: int, seq: int, repeats: int, warmup: int) -> dict:
    """Median seconds per training step in fp32 and in bf16 autocast, timed in alternation."""
    torch.manual_seed(0)
    m32 = build_stack(kind, width, layers)
    m16 = copy.deepcopy(m32)
    x = torch.randn(batch, seq, width)
    steps = {"fp32": _make_step(m32, x, False), "bf16": _make_step(m16, x, True)}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(max(1, repeats)):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in m32.parameters())

    return {"kind": kind, "width": width, "params": n_params, "fp32_ms": 1e3 * med["fp32"],
            "bf16_ms": 1e3 * med["bf16"], "speedup": med["fp32"] / med["bf16"],
            "auto": resolve_mixed_precision(m32, "auto")}   # what TrainConfig(mixed_precision="auto") picks here


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkit bench precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=positive_int, nargs="+", default=[128, 256, 512, 1024], help="model widths (default 128 256 512 1024)")
    p.add_argument("--kinds", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"], help="stacks to time (default both)")
    p.add_argument("--layers", type=positive_int, default=2, help="blocks per stack (default 2)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=positive_int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed steps per precision; the median is shown (default 5)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default 0: leave torch's choice)")
    return p


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fast CPU bf16: {cpu_supports_fast_bf16()}; "
          f"step = forward + backward + AdamW on (batch {args.batch}, seq {args.seq}, width), {args.layers} blocks")
    print(f"{'kind':<12}{'width':>6}{'params':>10}{'fp32 ms':>10}{'bf16 ms':>10}{'fp32/bf16':>11}  auto picks")
    for kind in args.kinds:
        for w in args.widths:
            r = measure(kind, w, args.layers, args.batch, args.seq, args.repeats, args.warmup)
            print(f"{kind:<12}{w:>6}{r['params'] / 1e6:>9.2f}M{r['fp32_ms']:>10.1f}{r['bf16_ms']:>10.1f}"
                  f"{r['speedup']:>10.2f}x  {r['auto']}", flush=True)
    print("fp32/bf16 > 1 means bf16 autocast is faster. Timings are medians; only the side-by-side ratios mean anything.")
    print(f"auto: bf16 when the CPU has native bf16 and the model is >= {AUTO_BF16_MIN_WIDTH} wide "
          "(mmkit.train.AUTO_BF16_MIN_WIDTH; width = largest min(in, out) over nn.Linear layers)")
