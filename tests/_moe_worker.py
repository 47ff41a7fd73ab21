"""Worker for tests/test_moe.py's expert-parallel test (not collected by pytest: no test_ prefix).

Launched as two gloo processes on the CPU:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/_moe_worker.py --out DIR

For every case in CASES it builds the full single-process layer from a seed, shards it into an
ExpertParallelMoE (each rank keeps m/2 experts), feeds each rank its slice of the global batch, backpropagates
this rank's loss and saves outputs, gradients and stats to DIR/CASE-rankR.pt. The test computes the
single-process layer on the whole batch and compares. Cases and data live here so both sides share them.
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

import torch

from mmkit.nn.moe import ExpertParallelMoE, MoEConfig, MoEFeedForward, ddp_ignore_expert_params

D = 16
# name -> (MoEConfig overrides, tokens on each rank, gate bias towards experts or None)
CASES: dict[str, tuple[dict, list[int], list[float] | None]] = {
    # top-1, capacity 1.0: drops; uneven tokens per rank (10 and 14); biases in the experts; z-loss on
    "top1_drop_uneven": (dict(top_k=1, capacity_factor=1.0, bias=True, z_loss_coef=0.1), [10, 14], None),
    # top-2 (GShard priority across ranks), gated SwiGLU experts, renormalised weights, (B, L, D) inputs
    "top2_drop_swiglu": (dict(top_k=2, capacity_factor=1.0, gated=True, activation="silu", renormalize=True), [12, 12], None),
    # no capacity at all (Mixtral-style)
    "top2_nodrop": (dict(top_k=2, capacity_factor=None), [8, 16], None),
    # everything routed to rank 0's experts: rank 1 receives zero rows (empty all-to-all splits), heavy dropping
    "skewed_empty_splits": (dict(top_k=1, capacity_factor=1.5, router_bias=True), [9, 7], [6.0, 5.0, -9.0, -9.0]),
    # a rank with no tokens at all
    "rank_without_tokens": (dict(top_k=2, capacity_factor=1.25), [16, 0], None),
}
N_EXPERTS = 4


def config(name: str) -> MoEConfig:
    over, _, _ = CASES[name]
    return MoEConfig(d_model=D, d_ff=32, n_experts=N_EXPERTS, aux_loss_coef=0.5, **over)


def full_layer(name: str) -> MoEFeedForward:
    """The single-process reference layer with seeded, not-too-small weights (so routing is decisive)."""
    torch.manual_seed(zlib.crc32(name.encode()))
    layer = MoEFeedForward(config(name))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.4)
        bias = CASES[name][2]
        if bias is not None:
            layer.gate.bias.copy_(torch.tensor(bias))
    return layer


def global_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w) for the whole global batch: inputs (N, D) and the weights of the test loss sum(y * w)."""
    n = sum(CASES[name][1])
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def rank_slice(name: str, rank: int) -> slice:
    sizes = CASES[name][1]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def loss_of(y: torch.Tensor, w: torch.Tensor, n_global: int, world: int) -> torch.Tensor:
    """This rank's task loss: a sum over its tokens scaled so that the MEAN over ranks is sum_all(y*w)/N_global."""
    return (y * w).sum() * world / n_global


def run_case(name: str, out: Path, rank: int, world: int) -> None:
    full = full_layer(name)
    ep = ExpertParallelMoE(config(name)).load_from(full)
    x_all, w_all = global_batch(name)
    sl = rank_slice(name, rank)
    x = x_all[sl].clone().requires_grad_(True)
    xin = x.view(2, -1, D) if name == "top2_drop_swiglu" else x       # (B, L, D) input on one case
    y = ep(xin).reshape(-1, D)
    loss = loss_of(y, w_all[sl], len(x_all), world) + ep.aux_loss
    loss.backward()
    ep.allreduce_replicated_grads()                                  # what DDP does for the replicated gate
    torch.save({"y": y.detach(), "x_grad": x.grad, "aux_loss": ep.aux_loss.detach(),
                "gate_grads": {n: p.grad for n, p in ep.gate.named_parameters()},
                "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
                "local_experts": (ep.local_experts.start, ep.local_experts.stop),
                "stats": ep.last_stats._asdict()}, out / f"{name}-rank{rank}.pt")


def run_ddp_case(out: Path, rank: int, world: int) -> None:
    """The EP layer inside a DistributedDataParallel model: DDP averages the gate, leaves the experts alone."""
    name = "top1_drop_uneven"
    full = full_layer(name)
    model = torch.nn.Sequential(torch.nn.Identity(), ExpertParallelMoE(config(name)).load_from(full))
    ignored = ddp_ignore_expert_params(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x_all, w_all = global_batch(name)
    sl = rank_slice(name, rank)
    y = ddp(x_all[sl])
    loss = loss_of(y, w_all[sl], len(x_all), world) + model[1].aux_loss
    loss.backward()
    torch.save({"ignored": ignored, "gate_grads": {n: p.grad for n, p in model[1].gate.named_parameters()},
                "expert_grads": {n: p.grad for n, p in model[1].experts.named_parameters()}},
               out / f"ddp-rank{rank}.pt")


def main() -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        run_case(name, out, rank, world)
    run_ddp_case(out, rank, world)
    dist.barrier()
    print(f"moe worker done: rank {rank} of {world}, pid {os.getpid()}", flush=True)
    # Results are on disk and every rank passed the barrier. gloo's teardown (destroy_process_group or the
    # interpreter's exit) sometimes aborts with "terminate called without an active exception" on this
    # machine (ENVIRONMENT.md: runs that abort at exit), so leave without running C++ destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
