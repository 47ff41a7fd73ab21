"""Worker for tests/test_mplug_pretrain.py's ZeRO-style test (not collected by pytest: no test_ prefix).

mPLUG §4: "we use the ZeRO technique to partition parameters / optimizer states / gradients into the entire
data-parallel group". Here: PyTorch's FullyShardedDataParallel (ZeRO-3: FULL_SHARD, parameters, gradients and the
optimizer state each split in two) on two gloo processes on the CPU, launched as

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/_mplug_fsdp_worker.py --out DIR

The micro mPLUG and the global batches are tests/_mplug_worker.py's (the DDP test's). The momentum encoders stay out of
the sharding (``ignored_modules``: they receive no gradient; every rank keeps the whole copy and updates it from the
gathered online weights inside the forward, as ALBEF does), and so do the queues (buffers) and the ITC temperature
(FSDP refuses scalar parameters; every rank computes ITC on the gathered global batch, so its gradient is already the
same on every rank and needs no reduction). Each rank runs
STEPS joint steps (``pretrain_loss``: ITC with queues, ITM on global hard negatives, MLM, PrefixLM) on its half of
each global batch, gathers the full gradient (``summon_full_params(with_grads=True)``), then updates ITS shard with
plain SGD. The test runs the same steps in one process and compares the gradients, the updated weights, the queue
and the momentum encoders step by step.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _mplug_worker as W  # noqa: E402


def run_fsdp(rank: int, world: int) -> list[dict]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    model = W.make_model()
    fsdp = FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                ignored_modules=[model.momentum_model, model.temperature], use_orig_params=True,
                device_id=torch.device("cpu"))
    out = []
    for batch in W.global_batches():
        loss, metrics = W.pretrain_loss(fsdp, W.rows(batch, rank, world))
        loss.backward()
        local_numel = sum(p.numel() for p in fsdp.parameters() if p.requires_grad)
        with FSDP.summon_full_params(fsdp, with_grads=True):
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()
                     if p.requires_grad and p.grad is not None}
        with torch.no_grad():                       # SGD on this rank's shard (the other half lives on the other rank)
            for p in list(fsdp.parameters()) + list(model.temperature.parameters()):
                if p.grad is not None:
                    p.add_(p.grad, alpha=-W.LR)
                    p.grad = None
        with FSDP.summon_full_params(fsdp):
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if not k.startswith(("momentum_model.", "queue."))}
        out.append({"loss": loss.detach(), "metrics": metrics, "grads": grads, "weights": weights,
                    "local_numel": local_numel,
                    "queue": {k: v.clone() for k, v in model.queue.state_dict().items()},
                    "momentum": {k: v.clone() for k, v in model.momentum_model.state_dict().items()}})
    return out


def main() -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == W.WORLD, f"launch with --nproc_per_node {W.WORLD}"
    res = run_fsdp(rank, world)
    torch.save(res, Path(a.out) / f"rank{rank}.pt")
    dist.barrier()
    print(f"mplug fsdp worker done: rank {rank} of {world}", flush=True)
    sys.stdout.flush()
    os._exit(0)                                     # gloo teardown sometimes aborts at exit (ENVIRONMENT.md)


if __name__ == "__main__":
    main()
