"""Worker for tests/test_mplug_pretrain.py's 2-process test (not collected by pytest: no test_ prefix).

Launched as two gloo processes on the CPU:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/_mplug_worker.py --out DIR

Each rank wraps the micro mPLUG below in DistributedDataParallel and runs STEPS pretraining steps on its half of each
global batch (mmkit.mplug.tasks.pretrain.pretrain_loss: ITC with momentum queues, ITM on global hard negatives, MLM,
PrefixLM), with a plain SGD update after each; results go to DIR/rank{R}.pt. The test runs the same steps in one
process on the whole global batches and compares. Model, data and the step loop live here so both sides share them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mmkit.mplug.model import MPLUG, MPLUGConfig
from mmkit.mplug.tasks.pretrain import PretrainConfig, PretrainData, pretrain_loss

WORLD = 2                 # processes
GLOBAL_B = 8              # pairs per global batch (4 per process)
STEPS = 2                 # step 1 fills the queue, step 2 scores against it (and wraps it: 8 + 8 > 12)
LR = 0.05                 # plain SGD
CONFIG = dict(vocab_size=512, d_model=32, n_heads=4, d_ff=64, vision_width=32, vision_heads=4, vision_d_ff=64,
              vision_layers=1, text_layers=1, fusion_layers=2, stride=1, decoder_layers=1, image_size=16,
              patch_size=4, queue_size=12, embed_dim=16, max_text_len=48, momentum=0.9)


def make_model(seed: int = 0) -> MPLUG:
    torch.manual_seed(seed)
    return MPLUG(MPLUGConfig(**CONFIG)).train()


def global_batches() -> list[dict]:
    """The STEPS global batches (identical on every process): pairs 0..7, then 8..15 of a small train set."""
    data = PretrainData.build(PretrainConfig(n_pairs=GLOBAL_B * STEPS, image_size=16, max_text_tokens=24))
    return [data.fixed_batch(range(s * GLOBAL_B, (s + 1) * GLOBAL_B), seed=s) for s in range(STEPS)]


def rows(batch: dict, rank: int, world: int) -> dict:
    n = GLOBAL_B // world
    return {k: (v[rank * n:(rank + 1) * n] if torch.is_tensor(v) else v) for k, v in batch.items()}


def run(model, rank: int, world: int) -> list[dict]:
    """STEPS steps; after each: loss, metrics, every trainable gradient, the queue and the momentum parameters."""
    raw = getattr(model, "module", model)
    out = []
    for batch in global_batches():
        loss, metrics = pretrain_loss(model, rows(batch, rank, world))
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in raw.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in raw.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-LR)
                    p.grad = None
        out.append({"loss": loss.detach(), "metrics": metrics, "grads": grads,
                    "queue": {k: v.clone() for k, v in raw.queue.state_dict().items()},
                    "momentum": {k: v.clone() for k, v in raw.momentum_model.state_dict().items()}})
    return out


def main() -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, f"launch with --nproc_per_node {WORLD}"
    res = run(DDP(make_model()), rank, world)
    torch.save(res, Path(a.out) / f"rank{rank}.pt")
    dist.barrier()
    print(f"mplug worker done: rank {rank} of {world}", flush=True)
    # Results are on disk and every rank passed the barrier. gloo's teardown sometimes aborts at exit on this
    # machine (ENVIRONMENT.md), so leave without running C++ destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
