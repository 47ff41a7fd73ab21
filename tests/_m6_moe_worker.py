"""Worker for tests/test_m6_moe.py's expert-parallel M6 test (not collected by pytest: no test_ prefix).

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/_m6_moe_worker.py --out DIR

Each rank builds M6-MoE twice from the same seed: the single-process model (all experts) and the
``expert_parallel=True`` one (ExpertParallelMoE blocks holding m/2 experts each), copies the weights over, runs
its half of the global batch, backpropagates its loss, averages the replicated gradients (what DDP does) and
saves logits, side loss and gradients to DIR/rank{R}.pt. The test compares with one process on the whole batch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import mmkit
from mmkit.config import replace_config
from mmkit.nn.moe import ExpertParallelMoE, is_expert_param

ROWS, WORDS = 4, 6


def config(expert_parallel: bool = False):
    return replace_config(mmkit.load_config("m6-tiny-moe"), capacity_factor=1.0, expert_parallel=expert_parallel)


def single_process_model():
    torch.manual_seed(0)
    return mmkit.build_model(config())


def global_batch():
    """images (4, 3, 32, 32), decoder inputs and labels (4, 6): no padding, so both ranks' sequences are equally long."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 380, (ROWS, WORDS + 1), generator=g)
    return torch.rand(ROWS, 3, 32, 32, generator=g), ids[:, :-1], ids[:, 1:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full = single_process_model()
    ep = mmkit.build_model(config(expert_parallel=True))
    sd = full.state_dict()
    for name, mod in ep.named_modules():
        if isinstance(mod, ExpertParallelMoE):                       # this rank's share of each MoE block's experts
            sl = slice(mod.local_experts.start, mod.local_experts.stop)
            for n, _ in mod.experts.named_parameters():
                sd[f"{name}.experts.{n}"] = sd[f"{name}.experts.{n}"][sl]
    ep.load_state_dict(sd)
    images, dec, labels = global_batch()
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    o = ep(images[rows], None, dec[rows], labels[rows])
    o.loss.backward()
    grads = {}
    for n, prm in ep.named_parameters():
        if prm.grad is None:
            continue
        if not is_expert_param(n):                                   # replicated: average over ranks, as DDP does
            dist.all_reduce(prm.grad)
            prm.grad /= world
        grads[n] = prm.grad
    torch.save({"logits": o.logits.detach(), "aux_loss": o.aux_loss.detach(), "grads": grads,
                "local": {n: (m.local_experts.start, m.local_experts.stop) for n, m in ep.named_modules()
                          if isinstance(m, ExpertParallelMoE)}}, out / f"rank{rank}.pt")
    dist.barrier()
    # Results are on disk and every rank passed the barrier. gloo's teardown (destroy_process_group or the
    # interpreter's exit) sometimes aborts with "terminate called without an active exception" on this
    # machine (ENVIRONMENT.md: runs that abort at exit), so leave without running C++ destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
