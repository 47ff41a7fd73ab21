"""Worker for tests/test_vlmo_distributed.py (not collected by pytest: no test_ prefix).

Launched as two gloo processes on the CPU:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/_vlmo_pretrain_worker.py --out DIR

Each rank prepares a tiny VLMo for stage 3 (mmkit.vlmo.tasks.pretrain.prepare_stage), wraps it in
DistributedDataParallel, computes the stage-3 loss (ITC + ITM with global hard negatives + MLM) on its half of the
global batch and backpropagates; results go to DIR/rank{R}.pt. The test runs the same case in one process on the
whole global batch and compares. Model, batch and case live here so both sides share them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mmkit.objectives import mlm_mask
from mmkit.vlmo.model import VLMo, VLMoConfig
from mmkit.vlmo.tasks.pretrain import PretrainConfig, prepare_stage, vl_losses

WORLD = 2                 # processes
B = 4                     # pairs per process
N = WORLD * B             # the global batch
CONFIG = VLMoConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, n_vl_layers=1, image_size=16, patch_size=4,
                    vocab_size=60, max_text_len=12)
PAIR_IDS = torch.tensor([0, 1, 2, 3, 4, 1, 5, 6])      # id 1 twice, on different ranks: positives of each other
LENGTHS = [9, 7, 5, 9, 4, 8, 6, 3]                     # real tokens per text (the rest is [PAD])


def make_model(seed: int = 0) -> VLMo:
    torch.manual_seed(seed)
    model = VLMo(CONFIG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                             # off the init, so every gradient is informative
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def global_batch() -> dict:
    """A stage-3 batch of N pairs as PairData.batch builds it: images, padded texts, MLM inputs, ids, the ITM seed."""
    g = torch.Generator().manual_seed(7)
    T = max(LENGTHS)
    ids = torch.randint(7, CONFIG.vocab_size, (N, T), generator=g)
    ids[:, 0] = 2                                                             # [T_CLS]
    am = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]
    ids[torch.arange(N), torch.tensor(LENGTHS) - 1] = 3                       # [T_SEP]
    ids = ids.masked_fill(~am, 0)
    m = mlm_mask(ids, mask_id=4, vocab_size=CONFIG.vocab_size, special_ids=[0, 1, 2, 3, 4], generator=g)
    return {"images": torch.rand(N, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": am,
            "mlm_input_ids": m.input_ids, "mlm_labels": m.labels, "pair_ids": PAIR_IDS, "negative_seed": 1234}


def rows(rank: int, world: int) -> slice:
    n = N // world
    return slice(rank * n, (rank + 1) * n)


def local(batch: dict, rank: int, world: int) -> dict:
    r = rows(rank, world)
    return {k: v[r] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def stage3_case(model, rank: int, world: int) -> dict:
    """The stage-3 loss on this process's rows and its gradients (``model`` may be DDP-wrapped)."""
    out = vl_losses(model, local(global_batch(), rank, world), PretrainConfig())
    out.loss.backward()
    raw = getattr(model, "module", model)
    return {"loss": out.loss.detach(), "itc": out.itc.detach(), "itm": out.itm.detach(), "mlm": out.mlm.detach(),
            "metrics": out.metrics, "text_for_image": out.text_for_image, "image_for_text": out.image_for_text,
            "grads": {k: p.grad.detach().clone() for k, p in raw.named_parameters() if p.grad is not None},
            "frozen": sorted(k for k, p in raw.named_parameters() if not p.requires_grad)}


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
    model = make_model()
    prepare_stage(model, 3)                   # freeze BEiT's [MASK] and the MIM head BEFORE DDP sees the parameters
    res = {"stage3": stage3_case(DDP(model), rank, world)}
    torch.save(res, Path(a.out) / f"rank{rank}.pt")
    dist.barrier()
    print(f"vlmo worker done: rank {rank} of {world}", flush=True)
    # Results are on disk and every rank passed the barrier. gloo's teardown sometimes aborts at exit on this
    # machine (ENVIRONMENT.md), so leave without running C++ destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
