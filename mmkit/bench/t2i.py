"""Text-to-image faithfulness beside speed (M6 §4.1): how often the first sample is right, then seconds per image
with and without the KV cache, and the VQGAN's images/s.

    mmkit bench t2i                                   # 32 held-out prompts per kind; 2 threads, batch 1 and 8
    mmkit bench t2i --prompts 0                       # speed only
    mmkit bench t2i --threads 1 --batch 1 8 --repeats 5

One image = code_grid² codes sampled by the code LM (16×16 = 256 for the shipped one; top-k 8) + one VQGAN decode.
With the KV cache each new code runs only itself through the stack (M6Model.generate); without it the whole
[prompt | codes so far] sequence is recomputed at every step, so the cost grows with the square of the number of
codes. Both are timed in alternation at each batch size (median of ``--repeats``) so background load hits both alike; the ratio is what to read. The
shipped checkpoints are used when present (speed does not depend on the weights). The VQGAN's encode / decode
throughput is measured by ``mmkit bench vqgan`` (called at the end). Faithfulness is the model-free pixel check of
:mod:`mmkit.evaluation.faithfulness` on the first sample of held-out prompts (seen colour + shape pairs, the pairs
the code LM never saw, and two-object prompts), as the recipe measures it. No asserts: a benchmark only measures.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmkit.bench import nonnegative_int, positive_int, vqgan as vqgan_bench
from mmkit.hub import find_checkpoint
from mmkit.m6.tasks.t2i import EVAL_KINDS, SamplingConfig, eval_prompts, evaluate_t2i, text_to_image
from mmkit.tokenizer import world_tokenizer
from mmkit.zoo import build_model, load, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkit bench t2i", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8],
                   help="images generated per call (default: 1 and 8)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per (mode, batch); median reported")
    p.add_argument("--threads", type=nonnegative_int, default=2, help="torch threads (default 2: the issue's 2 cores)")
    p.add_argument("--no-vqgan", action="store_true", help="skip the VQGAN encode / decode part")
    p.add_argument("--prompts", type=nonnegative_int, default=32,
                   help="held-out prompts per kind for faithfulness (default 32; 0: skip)")
    return p


def _models():
    if find_checkpoint("m6-tiny-t2i") and find_checkpoint("vqgan-world"):
        return load("m6-tiny-t2i"), load("vqgan-world"), world_tokenizer(), "shipped checkpoints"
    torch.manual_seed(0)
    return (build_model(load_config("m6-tiny-t2i")).eval(), build_model(load_config("vqgan-world-tiny")).eval(),
            world_tokenizer(), "random weights (checkpoints not found)")


def run(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv or [])
    torch.set_num_threads(args.threads)
    model, vqgan, tok, source = _models()
    print(f"text-to-image: m6-tiny-t2i ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M) + vqgan-world, "
          f"{source}, {torch.get_num_threads()} threads")
    if args.prompts and source == "shipped checkpoints":
        for kind in EVAL_KINDS:
            ev = evaluate_t2i(model, vqgan, tok, eval_prompts(args.prompts, kind), SamplingConfig(n_samples=1, seed=0))
            attrs = "  ".join(f"{a} {ev[f'first_{a}']:.2f}" for a in ("count", "colour", "shape", "size", "position"))
            print(f"first sample fully right, {kind:<12} {ev['first_all_right']:.3f} of {ev['n_prompts']} prompts "
                  f"({attrs})")
        print()
    print(f"{'batch':>6} {'s/image cache':>14} {'s/image no cache':>17} {'no-cache / cache':>17}")
    prompts = ["a small red circle at the top left", "一个大的蓝色正方形位于中间"]
    rows = []
    for bs in args.batch:
        batch = [prompts[i % 2] for i in range(bs)]
        modes = {m: SamplingConfig(n_samples=1, seed=0, use_cache=m == "cache") for m in ("cache", "no_cache")}
        for s in modes.values():                                        # warm-up
            text_to_image(model, vqgan, tok, batch[:1], s)
        times = {m: [] for m in modes}
        for _ in range(max(1, args.repeats)):
            for m, s in modes.items():                                  # alternate: same background load
                t0 = time.perf_counter()
                text_to_image(model, vqgan, tok, batch, s)
                times[m].append(time.perf_counter() - t0)
        per = {m: statistics.median(v) / bs for m, v in times.items()}
        row = {"batch": bs, "s_per_image_cache": per["cache"], "s_per_image_no_cache": per["no_cache"],
               "ratio": per["no_cache"] / per["cache"]}
        rows.append(row)
        print(f"{bs:>6} {per['cache']:>14.3f} {per['no_cache']:>17.3f} {row['ratio']:>16.2f}x")
    if not args.no_vqgan:
        print()
        vqgan_bench.run(["--batch-sizes", "1", "32", "--threads", str(args.threads), "--repeats", str(args.repeats)])
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    run(sys.argv[1:])
