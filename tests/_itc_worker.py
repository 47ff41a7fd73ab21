"""Worker for tests/test_objectives.py's 2-process test (not collected by pytest: no test_ prefix).

Launched as two gloo processes on the CPU:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/_itc_worker.py --out DIR

Each rank wraps the tiny dual encoder below in DistributedDataParallel, feeds it its half of the global batch and
runs the cases; results go to DIR/rank{R}.pt. The test runs the same case functions in one process on the whole
global batch and compares. Model, data and cases live here so both sides share them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from mmkit.objectives import (FeatureQueue, QueueConfig, Temperature, TemperatureConfig, itc_loss,
                              itc_loss_with_queue, momentum_copy, momentum_update, sample_hard_negatives)

WORLD = 2             # processes
B = 4                 # pairs per process
N = WORLD * B         # the global batch
D_IN, D = 6, 5        # input width, projected feature width
QUEUE = 12            # queue slots: two global batches of 8 wrap around it
HARD_NEG_SEED = 1234  # the generator seed every rank uses for hard-negative sampling
# pair ids of the global batch per step; equal ids are duplicates (id 1 spans both ranks, id 7 is queued at step 0)
IDS = [torch.tensor([0, 1, 2, 3, 4, 1, 5, 6]), torch.tensor([7, 8, 9, 10, 11, 12, 13, 8])]


class TinyDual(nn.Module):
    """Two linear 'encoders' and a learned temperature: parameters before and after the gathered loss."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.temperature = Temperature(TemperatureConfig(init=0.2))

    def forward(self, x_img, x_txt):                                     # (b, D_IN) x2 -> (b, D) x2, ()
        return self.img(x_img), self.txt(x_txt), self.temperature()


def make_model(seed: int = 0) -> TinyDual:
    torch.manual_seed(seed)
    return TinyDual()


def make_momentum(model: nn.Module) -> nn.Module:
    """A momentum copy that differs from the model (so that momentum keys are not the online features)."""
    m = momentum_copy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_img (N, D_IN), x_txt (N, D_IN), ids (N,)) of the global batch at ``step``."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g), IDS[step]


def rows(rank: int, world: int) -> slice:
    """The rows of the global batch that ``rank`` holds (all of them on one process)."""
    n = N // world
    return slice(rank * n, (rank + 1) * n)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def in_batch_case(model: nn.Module, rank: int, world: int) -> dict:
    """itc_loss on this process's rows + global hard negatives; model may be DDP-wrapped."""
    x_img, x_txt, ids = global_batch(0)
    r = rows(rank, world)
    fi, ft, scale = model(x_img[r], x_txt[r])
    fi.retain_grad()
    ft.retain_grad()
    out = itc_loss(fi, ft, scale, ids=ids[r])
    out.loss.backward()
    neg = sample_hard_negatives(out.sim_i2t, out.sim_t2i, out.ids,
                                generator=torch.Generator().manual_seed(HARD_NEG_SEED))
    raw = getattr(model, "module", model)
    return {"loss": out.loss.detach(), "metrics": out.metrics, "img_grad": fi.grad, "txt_grad": ft.grad,
            "param_grads": grads(raw), "sim_i2t": out.sim_i2t, "sim_t2i": out.sim_t2i, "ids": out.ids,
            "local_rows": (out.local_rows.start, out.local_rows.stop),
            "text_for_image": neg.text_for_image, "image_for_text": neg.image_for_text}


def queue_case(model: nn.Module, rank: int, world: int) -> dict:
    """Two ALBEF/mPLUG steps: fill the queue from the momentum model, then ITC over [batch + queue] with momentum
    keys, distillation and ids that match queued entries; the queue wraps at the second enqueue."""
    raw = getattr(model, "module", model)
    model_m = make_momentum(raw)
    queue = FeatureQueue(QueueConfig(size=QUEUE, dim=D, momentum=0.9, alpha=0.4))
    r = rows(rank, world)

    x_img, x_txt, ids = global_batch(0)                                  # step 0: only fills the queue
    with torch.no_grad():
        fi_m, ft_m, _ = model_m(x_img[r], x_txt[r])
    queue.enqueue_dequeue(fi_m, ft_m, ids[r])

    x_img, x_txt, ids = global_batch(1)                                  # step 1: the loss with a queue of 8
    fi, ft, scale = model(x_img[r], x_txt[r])
    fi.retain_grad()
    ft.retain_grad()
    with torch.no_grad():
        momentum_update(raw, model_m, queue.config.momentum)
        fi_m, ft_m, _ = model_m(x_img[r], x_txt[r])
    out = itc_loss_with_queue(fi, ft, scale, queue, ids=ids[r], image_feat_m=fi_m, text_feat_m=ft_m,
                              alpha=queue.config.alpha)
    out.loss.backward()
    queue.enqueue_dequeue(fi_m, ft_m, ids[r])                            # 16 rows into 12 slots: wraps
    return {"loss": out.loss.detach(), "metrics": out.metrics, "img_grad": fi.grad, "txt_grad": ft.grad,
            "param_grads": grads(raw), "momentum_params": {k: v.clone() for k, v in model_m.state_dict().items()},
            "queue": {k: v.clone() for k, v in queue.state_dict().items()}}


def uneven_case(rank: int) -> str:
    """Rank 1 brings one pair fewer: every rank must get a clear error instead of a hang."""
    x = torch.randn(B - rank, D)
    try:
        itc_loss(x, x, torch.tensor(1.0))
    except ValueError as e:
        return str(e)
    return "no error"


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
    res = {"in_batch": in_batch_case(DDP(make_model()), rank, world),
           "queue": queue_case(DDP(make_model()), rank, world),
           "uneven": uneven_case(rank)}
    torch.save(res, Path(a.out) / f"rank{rank}.pt")
    dist.barrier()
    print(f"itc worker done: rank {rank} of {world}", flush=True)
    # Results are on disk and every rank passed the barrier. gloo's teardown sometimes aborts at exit on this
    # machine (ENVIRONMENT.md), so leave without running C++ destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
