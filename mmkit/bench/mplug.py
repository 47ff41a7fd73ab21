"""mPLUG speed, measured side by side: the fusion networks of Figure 1 / 4, the stride S of Figure 3, and the training
switches of §4 / Table 6 (gradient checkpointing, bf16).

    mmkit bench mplug                      # everything, paper lengths and world lengths
    mmkit bench mplug --parts fusion stride --threads 1 --repeats 5
    mmkit bench mplug --parts switches --width 256

* **fusion** (mPLUG Figure 1 / Figure 4: "the running time is the total forward time of 100 samples in different
  fusion networks"): the forward time of the fusion network alone, for the same image and text features, of
  connected attention (Fig. 1a, every layer self-attends over [v; l]), co-attention (Fig. 1b, both sides
  cross-attend), asymmetric co-attention (ALBEF / BLIP, text only) and mPLUG's skip-connected network (the released
  base layout: 6 layers, S = 3, one connected layer). At the paper's lengths (257 visual tokens = ViT-B/16 at 256 px
  + [CLS], 40 text tokens, 6 fusion layers, width 768) and at the world's (65 visual tokens, 16 text tokens, the
  tiny model's 4 fusion layers, width 128). Reported per 100 samples and as ratios to the skip-connected network.
* **stride** (Figure 3): the skip-connected network with 6 co-attention layers and a connected layer after every S
  of them (``skip_layout="blocks"``: S = 1, 2, 3, 6 -> 6, 3, 2, 1 connected layers), forward time per 100 samples.
* **switches** (§4, Table 6): training throughput (samples/s of forward + backward + AdamW on the joint ITC + ITM +
  MLM + PrefixLM loss) with and without gradient checkpointing and bf16 autocast, and the activations autograd keeps
  for backward (MB, summed over saved tensors). Table 6 measures on A100s, where bf16 is faster and checkpointing
  buys memory that a larger batch turns into throughput; on this CPU checkpointing only recomputes (slower at the
  same batch) and bf16 pays off only for wide layers (mmkit bench precision).

Every configuration is timed in alternation with the others (round-robin, medians; the measuring functions live in
:mod:`mmkit.mplug.tasks.efficiency`, which notebook 08 and the stride-sweep recipe use too), so that noise from other
processes on the shared cores hits all alike. No asserts: a benchmark only measures.
"""
from __future__ import annotations

import argparse

import torch

import mmkit.zoo  # noqa: F401  (every preset registered)
from mmkit.bench import nonnegative_int, positive_int
from mmkit.config import replace_config
from mmkit.mplug.tasks.efficiency import (PAPER_LENGTHS, WORLD_LENGTHS, fusion_times, paper_fusion_config,
                                          stride_times, switch_throughput, world_fusion_config)

__all__ = ["run"]


def _ratios(values: dict, ref) -> str:
    return "  ".join(f"{k}: {values[k] / values[ref]:.2f}x" for k in values)


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mmkit bench mplug", description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["fusion", "stride", "switches"],
                   choices=["fusion", "stride", "switches"], help="what to measure (default: all)")
    p.add_argument("--batch", type=positive_int, default=8, help="samples per timed fusion forward (default 8)")
    p.add_argument("--train-batch", type=positive_int, default=32, help="pairs per training step for --parts switches")
    p.add_argument("--width", type=positive_int, nargs="+", default=[128, 512],
                   help="d_model of the world model for --parts switches (heads = width / 32; default 128 512)")
    p.add_argument("--threads", type=nonnegative_int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (medians)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch threads: {a.threads}; medians of {a.repeats} rounds, configurations in alternation\n")
    for where, base, lengths in (("paper", paper_fusion_config(), PAPER_LENGTHS),
                                 ("world", world_fusion_config(), WORLD_LENGTHS)):
        tag = (f"{where} lengths: {lengths['n_visual']} visual + {lengths['n_text']} text tokens, width "
               f"{base.d_model}")
        if "fusion" in a.parts:
            r = fusion_times(base, **lengths, batch=a.batch, repeats=a.repeats)
            print(f"Figure 1 / 4, {tag}, {base.fusion_layers} fusion layers: forward seconds per 100 samples")
            for k, v in r["seconds_per_100"].items():
                print(f"  {k:<13} {v:8.3f} s   {' '.join(x[:4] for x in r['plans'][k])}")
            print("  relative to skip-connected: " + _ratios(r["seconds_per_100"], "skip") + "\n")
        if "stride" in a.parts:
            r = stride_times(base, **lengths, batch=a.batch, repeats=a.repeats)
            print(f"Figure 3, {tag}, 6 co-attention layers + a connected layer every S: seconds per 100 samples")
            for s, v in r["seconds_per_100"].items():
                print(f"  S = {s}  {v:8.3f} s   ({sum(x == 'connected' for x in r['plans'][s])} connected)")
            sec = r["seconds_per_100"]
            print(f"  S = 1 -> 6: {sec[1] / sec[6]:.2f}x faster; relative to S = 1: " + _ratios(sec, 1) + "\n")
    if "switches" in a.parts:
        for width in a.width:
            base = replace_config(world_fusion_config(), d_model=width, d_ff=2 * width, vision_width=width,
                                  vision_d_ff=2 * width, n_heads=max(1, width // 32), vision_heads=max(1, width // 32))
            r = switch_throughput(base, batch=a.train_batch, repeats=a.repeats)
            print(f"§4 / Table 6, joint pretraining step, world model at width {width}, batch {r['batch']}:")
            for k, v in r["samples_per_s"].items():
                print(f"  {k:<22} {v:8.1f} samples/s   activations kept for backward "
                      f"{r['saved_activations_mb'][k]:7.1f} MB")
            print("  throughput relative to the baseline: " + _ratios(r["samples_per_s"], "baseline") + "\n")
