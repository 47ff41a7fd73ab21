"""Worker for tests/test_train.py's multi-process test (not collected by pytest: no test_ prefix).

Launched as two gloo DDP processes on the CPU:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        --num_cpu_threads_per_process 1 --main_process_port PORT tests/_ddp_worker.py --out DIR

It trains the toy CopyNet below with mmkit.train.train, which writes DIR/checkpoint-STEPS; the test trains the
same model in one process and compares parameters. The model and data live here so both sides share them.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CopyNetConfig:
    model_type: str = "train-test-copynet"
    vocab_size: int = 16      # tokens 0..15; the output layer is tied to the token embedding
    seq_len: int = 6          # tokens per example
    d_model: int = 16         # width
    dropout: float = 0.0      # dropout after the hidden layer (the resume test turns it on)


class CopyNet(nn.Module):
    """Tiny classifier: predict the first token of a sequence. Tied embedding / output weights, a LayerNorm,
    biases and dropout: every kind of parameter the loop treats specially."""

    def __init__(self, cfg: CopyNetConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.fc = nn.Linear(cfg.seq_len * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight                         # tied

    def forward(self, tokens):                                       # (B, L) -> (B, V)
        h = self.embed(tokens).flatten(1)                            # (B, L*D)
        return self.head(self.norm(self.drop(F.gelu(self.fc(h)))))   # (B, V)


def make_model(seed: int = 0, **kw) -> CopyNet:
    torch.manual_seed(seed)
    return CopyNet(CopyNetConfig(**kw))


def make_dataset(n: int = 96, seed: int = 1, cfg: CopyNetConfig = CopyNetConfig()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=g)
    return torch.utils.data.TensorDataset(x, x[:, 0].clone())


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean().item()}


def main() -> None:
    from mmkit.train import TrainConfig, end_training, train

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    a = p.parse_args()
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, grad_accum_steps=a.accum, lr=1e-2, warmup_steps=2,
                      mixed_precision="no", log_every=0, progress_bar=False, out_dir=a.out)
    res = train(make_model(), loss_fn, make_dataset(), cfg)
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    print(f"worker done: world {world}, step {res.step}, loss {res.history[-1]['loss']:.4f}", flush=True)
    if world > 1:
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)                                 # gloo teardown sometimes aborts at exit (ENVIRONMENT.md; seen in CI)
    end_training()


if __name__ == "__main__":
    main()
