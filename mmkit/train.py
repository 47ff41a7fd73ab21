"""The one training loop every recipe uses (on Hugging Face ``accelerate``), checkpoints, and exact resume.

    cfg = TrainConfig(steps=500, batch_size=64, lr=1e-3, warmup_steps=50, out_dir="runs/m6")
    result = train(model, loss_fn, dataset, cfg, eval_fn=evaluate)   # -> TrainResult(history, evals, ...)
    result = train(model, loss_fn, dataset, cfg, resume_from="auto") # carries on from runs/m6/checkpoint-*

``loss_fn(model, batch)`` returns a scalar loss tensor, or ``(loss, {"itc": 0.7, "mlm": 2.1})`` so multi-task
recipes (M6 §3.3, VLMo §3.3, mPLUG §3.3) can log one number per task. The loss must be a *mean* over the
examples of the batch it was given (see "Data" below). Under several processes ``model`` is the
DistributedDataParallel wrapper: call it (``model(...)``), and reach attributes and other methods through
:func:`unwrap` (``unwrap(model).config``).

Data: deterministic, resumable, and the same for any number of processes
------------------------------------------------------------------------
``dataset_or_batch_fn`` is either

* a map-style dataset (``len(ds)`` and ``ds[i]``): the examples of optimizer step ``s`` are the positions
  ``[s*B, (s+1)*B)`` of an endless stream of shuffled epochs, epoch ``e`` being a permutation drawn from a
  generator seeded by ``(seed, e)`` (:class:`StepSampler`). Any step can be reached without replaying the
  ones before it, which is what makes exact resume cheap. ``collate_fn`` (default: torch's) builds batches
  and ``num_workers`` DataLoader workers load them. ``ds[i]`` must be a pure function of ``i``.
* a function ``batch_fn(generator, batch_size) -> batch`` that builds a whole global batch (tensors, or dicts /
  tuples of them, or lists of per-example items such as captions) from a ``torch.Generator`` seeded by
  ``(seed, s)``: the tool for synthetic data. Every process builds the same global batch and keeps its slice.

Either way the global batch of step ``s`` (``cfg.batch_size`` examples) is a function of ``(seed, s)`` only. It
is cut into ``grad_accum_steps`` micro-batches, and each micro-batch into ``num_processes`` equal slices, one per
process. Accelerate's backward divides each micro-batch loss by ``grad_accum_steps`` and DDP averages gradients
over processes, so the update is the gradient of the mean loss over the global batch: N processes with
accumulation A give the same parameters as 1 process without accumulation (up to float rounding), as long as
``loss_fn`` returns a mean over equal-size slices. (A mean over a varying number of tokens per slice, e.g.
masked-LM over random masks, makes this approximate.)

Randomness inside a step (dropout, random masking in ``loss_fn``, a multi-task sampler using ``random``) comes
from torch / numpy / Python global generators that are re-seeded from ``(seed, step, micro-batch)`` before
every micro-batch, identically on every process (so all processes take the same random decisions, e.g. which
task a step trains). A resumed run therefore draws exactly the numbers the uninterrupted run drew.

Checkpoints (``save_checkpoint`` / ``load_checkpoint``)
-------------------------------------------------------
A checkpoint is a folder written atomically (a temporary sibling folder renamed into place, so an interrupted
save never leaves a half-written checkpoint):

* ``model.safetensors`` - weights (``safetensors.torch.save_model``: tied weights are stored once; float32, or
  float16 / int8 rows with ``weights_dtype``, which loading turns back into float32);
* ``config.json``       - the model's ``.config`` dataclass, when it has one (so :func:`mmkit.hub.load_model_dir`
  can rebuild the model from the folder alone);
* ``training_state.pt`` - optimizer, LR scheduler and RNG states: tensors and plain Python values only, loaded
  back with ``torch.load(weights_only=True)``;
* ``trainer_state.json`` - step, the TrainConfig, the loss/metric/eval history.

Several processes write one checkpoint together when the state is sharded (the checkpoint folder must then be on a
file system every process sees, as on any cluster):

* expert parallelism (:class:`mmkit.nn.moe.ExpertParallelMoE`, M6 §3.4): ``model.safetensors`` holds the replicated
  weights only; every rank writes its experts to ``model-expert-shard-RRRRR-of-WWWWW.safetensors`` and its optimizer
  state to ``optimizer-shard-RRRRR-of-WWWWW.pt``. Loading re-assembles the experts each module holds from the shards
  (any number of processes that divides the experts, one process included); the optimizer shards need the same
  number of processes;
* FSDP and DeepSpeed (chosen by the launcher: ``accelerate launch --config_file ...``, see ``scaled/``):
  ``model.safetensors`` holds the full weights (gathered with ``accelerator.get_state_dict``) and ``sharded/`` what
  ``accelerator.save_state`` writes (each rank's optimizer shard), which resume reads back with ``load_state``.

Strategies on a CPU. Accelerate turns FSDP and DeepSpeed on for GPUs only. When no GPU is present and the launcher
asked for one of them (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``, as ``accelerate launch`` sets them from
its config file) on several processes, :func:`train` builds the accelerator on gloo and switches it to that strategy,
so accelerate's own FSDP / DeepSpeed code runs here exactly as it would on GPUs (``tests/test_scaled_dist.py``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from mmkit.config import config_to_dict
from mmkit.data.scenes import CellData
from mmkit.data.world import object_labels
from mmkit.hub import (BASE_FILE, INT8_FORMAT, INT8_SCALE, WEIGHTS_FILE, CheckpointError, base_weights, checkpoint_dir,
                       file_hashes, from_int8_rows, int8_rows, load_model_dir, load_weights, read_json, stored_int8,
                       verify_checkpoint)
from mmkit.io import atomic_write_json, make_tmp_dir, recover_dir, replace_dir, sha256_file, share_files
from mmkit.nn.modes import evaluating  # noqa: F401  (re-exported: tasks evaluate models with it)
from mmkit.nn.moe import ExpertParallelMoE, MoEFeedForward

__all__ = [
    "TrainConfig", "TrainResult", "train", "lr_factor", "default_param_groups", "local_clip_fn",
    "StepSampler", "slice_batch", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "unwrap",
    "model_width", "cpu_supports_fast_bf16", "resolve_mixed_precision", "AUTO_BF16_MIN_WIDTH", "end_training",
    "scaled_param_groups", "freeze", "evaluating", "recover_checkpoints", "launcher_strategy", "expert_shard_name",
    "expert_param_names", "expert_ranges", "check_train_config", "rounded_to_half", "rounded_to_int8",
    "unchanged_weights", "delta_over", "thinned_history", "CELL_NAMER", "CELL_NAMER_FAST", "CELL_NAMER_AUG_FRACTION",
    "CellNamerRun", "namer_parameter_names", "grad_flags_restored", "cell_namers_fixed", "train_cell_namer",
]

CONFIG_NAME = "config.json"
STATE_NAME = "training_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"
SHARDED_STATE_DIR = "sharded"              # accelerator.save_state under FSDP / DeepSpeed
_EXPERT_SHARD_RE = re.compile(r"^model-expert-shard-(\d{5})-of-(\d{5})\.safetensors$")
_OPT_SHARD_RE = re.compile(r"^optimizer-shard-(\d{5})-of-(\d{5})\.pt$")


def expert_shard_name(rank: int, world: int) -> str:
    """File of rank ``rank``'s experts in a checkpoint written by ``world`` expert-parallel processes."""
    return f"model-expert-shard-{rank:05d}-of-{world:05d}.safetensors"


def _optimizer_shard_name(rank: int, world: int) -> str:
    return f"optimizer-shard-{rank:05d}-of-{world:05d}.pt"

# --- mixed precision ------------------------------------------------------------------------------------
# `mixed_precision="auto"` on a CPU: bf16 autocast when the CPU has native bf16 matmuls (AVX-512 BF16 or AMX)
# and the model is at least this wide (``model_width``: the largest min(in, out) over its nn.Linear layers,
# i.e. d_model for a transformer). Derived from `mmkit bench precision` (forward + backward + AdamW step, batch
# 8 x 64 tokens, 2 pre-LN blocks, fp32 and bf16 timed in alternation, medians of 7), 2026-11-23, AVX-512 BF16:
#
#     fp32 / bf16 step time (> 1: bf16 faster)   width 128    256    512   1024
#     --threads 1   MLP stack                          1.79x  1.94x  2.03x  2.09x
#                   transformer                        1.04x  1.47x  1.69x  1.95x
#     2 threads     transformer (4 runs)               0.51-1.11x  0.92-1.43x  1.07-1.55x  1.02-1.36x
#
# Single-thread ratios are steady; with 2 threads on the shared, busy cores each run swings widely (OpenMP
# threads wait for each other). At width 128 a transformer gains nothing or loses (ENVIRONMENT.md: slower for a
# 0.8M-parameter, 128-wide model): its small attention matmuls, softmax and the casts eat the matmul gain. From
# 256 on bf16 wins in (almost) every run, so the threshold is 256. Re-run the benchmark on another machine.
AUTO_BF16_MIN_WIDTH = 256


def model_width(model: nn.Module) -> int:
    """The model's width: the largest ``min(in_features, out_features)`` over its ``nn.Linear`` layers.

    For a transformer that is d_model (its FFN is d -> 4d -> d, attention d -> 3d, d -> d). 0 without Linears.
    """
    return max((min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)), default=0)


def cpu_supports_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); otherwise bf16 is emulated (slow)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_mixed_precision(model: nn.Module, mode: str = "auto") -> str:
    """``"no"`` or ``"bf16"`` for ``mode`` in ("auto", "no", "bf16"); see :data:`AUTO_BF16_MIN_WIDTH` for "auto"."""
    if mode not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {mode!r} "
                         "(fp16 needs a loss scaler and is not supported; use bf16)")
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_supports_fast_bf16() and model_width(model) >= AUTO_BF16_MIN_WIDTH else "no"


# --- configuration --------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 1000                   # optimizer steps in the whole run (the LR schedule spans them)
    batch_size: int = 32                # GLOBAL examples per optimizer step (all processes x all accumulation micro-batches)
    grad_accum_steps: int = 1           # micro-batches per optimizer step; each process sees batch_size/(processes*accum) examples at a time
    lr: float = 3e-4                    # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.01          # AdamW decoupled weight decay on weight matrices only (biases, norms, embeddings: 0)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas; 0.95 (nanoGPT, GPT-3) is steadier than 0.999 with small batches
    warmup_steps: int = 100             # linear warmup: step s (0-based) uses lr*(s+1)/warmup_steps
    min_lr_ratio: float = 0.1           # cosine decay from lr to lr*min_lr_ratio over the steps after warmup
    clip_grad_norm: float | None = 1.0  # clip the global gradient L2 norm to this; None or 0: no clipping
    mixed_precision: str = "auto"       # "auto" (bf16 on GPUs with bf16, and on CPUs for models >= AUTO_BF16_MIN_WIDTH wide), "no", "bf16"
    eval_every: int = 0                 # run eval_fn every this many steps; 0: only at the end
    log_every: int = 10                 # refresh the progress bar's loss every N steps (print a line instead when the bar is off); 0: never
    save_every: int = 0                 # with out_dir: write out_dir/checkpoint-STEP every N steps; 0: only at the end
    keep_checkpoints: int = 2           # newest checkpoint-* folders kept in out_dir (older ones deleted); 0: keep all
    seed: int = 0                       # seeds the data order, per-step randomness and the torch/numpy/random generators
    num_workers: int = 0                # DataLoader worker processes for map-style datasets; 0: load in the training process
    out_dir: str | None = None          # where train() writes checkpoint-STEP folders; None: train() writes nothing
    progress_bar: bool = True           # tqdm bar with the live loss (main process only)
    find_unused_parameters: bool = False  # DDP: True when some parameters get no gradient in a step (e.g. one task per step)


class TrainResult(NamedTuple):
    history: list[dict]       # one dict per optimizer step: step (1-based), loss, lr, grad_norm (before clipping), loss_fn's metrics
    evals: list[dict]         # one dict per evaluation: step + eval_fn's metrics
    seconds: float            # wall-clock seconds of this call
    step: int                 # optimizer steps completed (including those before a resume)
    mixed_precision: str      # "no" or "bf16": what was used
    checkpoint: str | None    # the last checkpoint folder written by this call, if any


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the field, its value and what it must be, for any TrainConfig value of the wrong
    type or out of range (``train()`` and ``mmkit train --dry-run`` call it before anything runs)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"TrainConfig: {msg}")

    def whole(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def real(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    need(whole(cfg.steps) and cfg.steps > 0, f"steps must be a positive whole number, got {cfg.steps!r}")
    need(whole(cfg.batch_size) and cfg.batch_size > 0, f"batch_size must be a positive whole number, got {cfg.batch_size!r}")
    need(whole(cfg.grad_accum_steps) and cfg.grad_accum_steps >= 1,
         f"grad_accum_steps must be a whole number >= 1, got {cfg.grad_accum_steps!r}")
    need(real(cfg.lr) and cfg.lr > 0, f"lr must be a number > 0 (e.g. 3.0e-4), got {cfg.lr!r}")
    need(real(cfg.weight_decay) and cfg.weight_decay >= 0, f"weight_decay must be a number >= 0, got {cfg.weight_decay!r}")
    need(isinstance(cfg.betas, (tuple, list)) and len(cfg.betas) == 2 and all(real(b) and 0 <= b < 1 for b in cfg.betas),
         f"betas must be two numbers in [0, 1), e.g. (0.9, 0.95), got {cfg.betas!r}")
    need(whole(cfg.warmup_steps) and cfg.warmup_steps >= 0, f"warmup_steps must be a whole number >= 0, got {cfg.warmup_steps!r}")
    need(real(cfg.min_lr_ratio) and 0.0 <= cfg.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
    need(cfg.clip_grad_norm is None or real(cfg.clip_grad_norm) and cfg.clip_grad_norm >= 0,
         f"clip_grad_norm must be None, 0 (no clipping) or a number > 0, got {cfg.clip_grad_norm!r}")
    for name in ("eval_every", "log_every", "save_every", "keep_checkpoints", "seed", "num_workers"):
        v = getattr(cfg, name)
        need(whole(v) and v >= 0, f"{name} must be a whole number >= 0, got {v!r}"
             + (" (0 keeps every checkpoint)" if name == "keep_checkpoints" else ""))
    need(cfg.out_dir is None or isinstance(cfg.out_dir, (str, os.PathLike)),
         f"out_dir must be a folder path or None, got {cfg.out_dir!r}")
    for name in ("progress_bar", "find_unused_parameters"):
        need(isinstance(getattr(cfg, name), bool), f"{name} must be true or false, got {getattr(cfg, name)!r}")
    need(isinstance(cfg.mixed_precision, str), f"mixed_precision must be 'auto', 'no' or 'bf16', got {cfg.mixed_precision!r}")
    resolve_mixed_precision(nn.Identity(), cfg.mixed_precision)      # validates the name


# --- learning-rate schedule -----------------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiple of ``cfg.lr`` used by optimizer step ``step`` (0-based).

    Linear warmup ``(step+1)/warmup_steps`` (never a zero LR), then a half cosine from 1 down to
    ``min_lr_ratio``, which it would reach at step ``cfg.steps`` (one past the last).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:       # a plain function: LambdaLR then stores no state for it
        return lr_factor(step, cfg)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- optimizer parameter groups and clipping hooks --------------------------------------------------------
def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices decay; biases, norm gains, embeddings and position/type tokens do not.

    No decay for: parameters with fewer than 2 dims (biases, LayerNorm), weights of ``nn.Embedding`` (also when
    tied to an output layer), raw ``nn.Parameter`` s whose name mentions embed/token/pos (``cls_token``,
    ``pos_embed``), and names listed by a ``model.no_weight_decay()`` method (the timm convention).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        raw_token = leaf not in ("weight", "bias") and any(t in leaf for t in ("embed", "token", "pos"))
        if p.ndim < 2 or id(p) in embedding_ids or raw_token or name in extra:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def freeze(model: nn.Module, prefixes: tuple[str, ...] | list[str], frozen: bool = True) -> list[str]:
    """Set ``requires_grad = not frozen`` on every parameter whose name starts with one of ``prefixes``.

    Stagewise training (VLMo §3.4: "the parameters of self-attention and vision experts are frozen") and a frozen
    feature extractor (M6 §3.1) are this. Returns the names changed; raises when a prefix matches nothing (a typo
    would otherwise freeze nothing, silently).
    """
    raw = unwrap(model)
    hit, names = set(), []
    for name, p in raw.named_parameters():
        match = [q for q in prefixes if name.startswith(q)]
        if match:
            hit.update(match)
            p.requires_grad_(not frozen)
            names.append(name)
    unknown = [q for q in prefixes if q not in hit]
    if unknown:
        raise ValueError(f"no parameter name starts with {unknown}; names start with e.g. "
                         f"{sorted({n.split('.')[0] for n, _ in raw.named_parameters()})}")
    return names


def scaled_param_groups(model: nn.Module, weight_decay: float, lr: float,
                        lr_scales: dict[str, float]) -> list[dict]:
    """:func:`default_param_groups` with the learning rate of some parameters multiplied (``param_groups_fn``).

    ``lr_scales`` maps name prefixes to LR multipliers: ``{"feature_extractor.": 0.1}`` trains a pretrained
    image side ten times slower; a multiplier of 0 freezes those parameters (``requires_grad = False``, so they
    get no gradient and stay bit-identical). The schedule of :func:`train` scales every group alike.
    """
    raw = unwrap(model)
    scale_of = {}
    for name, p in raw.named_parameters():
        scale = next((v for q, v in lr_scales.items() if name.startswith(q)), None)
        if scale is not None:
            scale_of[id(p)] = scale
            if scale == 0:
                p.requires_grad_(False)
    out = []
    for g in default_param_groups(raw, weight_decay):
        by_scale: dict = {}
        for p in g["params"]:
            by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
        for scale, params in by_scale.items():
            out.append(dict(g, params=params) if scale == 1.0 else dict(g, params=params, lr=lr * scale))
    return out


ClipFn = Callable[[nn.Module, float], "float | torch.Tensor"]   # (unwrapped model, max_norm) -> norm before clipping


def local_clip_fn(is_local: Callable[[str, nn.Parameter], bool], local_max_norm: float | None = None) -> ClipFn:
    """A ``clip_fn`` for :func:`train` that clips two parameter sets separately.

    M6 §3.4: "gradient clipping globally can increase costs on all-to-all communication as it computes norms
    across all experts, and thus we apply local clipping". Parameters for which ``is_local(name, param)`` is
    True (e.g. ``lambda n, p: ".experts." in n``) are clipped by their own norm on each process, with no
    communication, to ``local_max_norm`` (default: the same max norm); the other (data-parallel, already
    averaged) parameters are clipped by their global norm as usual. Returns the norm of the non-local ones.
    """
    def clip(model: nn.Module, max_norm: float) -> torch.Tensor:
        local, shared = [], []
        for name, p in model.named_parameters():
            if p.grad is not None:
                (local if is_local(name, p) else shared).append(p)
        lmax = local_max_norm if local_max_norm is not None else max_norm
        if local and lmax:
            torch.nn.utils.clip_grad_norm_(local, lmax)
        if not shared:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(shared, max_norm if max_norm else float("inf"))
    return clip


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar ``.module``) wrapper; the model itself otherwise."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# --- deterministic data -----------------------------------------------------------------------------------
_DATA, _STEP = 1, 2   # stream tags mixed into derived seeds, so data order and per-step noise are independent


def _derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (numpy's SeedSequence hashing)."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def _reseed(seed: int, step: int, micro: int) -> None:
    s = _derive_seed(seed, _STEP, step, micro)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class StepSampler(torch.utils.data.Sampler):
    """Yields, step by step, the index lists of one process's micro-batches (a DataLoader ``batch_sampler``).

    The global batch of optimizer step ``s`` is positions ``[s*B, (s+1)*B)`` of the stream
    ``perm(0) ++ perm(1) ++ ...``, where ``perm(e)`` is a permutation of the dataset drawn from a generator
    seeded by ``(seed, e)``: jumping to any step costs one permutation. The global batch is cut into
    ``grad_accum_steps`` consecutive micro-batches, each cut into ``num_processes`` consecutive slices.
    """

    def __init__(self, dataset_len: int, batch_size: int, grad_accum_steps: int = 1, num_processes: int = 1,
                 process_index: int = 0, seed: int = 0, start_step: int = 0, end_step: int = 1):
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.B, self.A, self.N, self.rank = dataset_len, batch_size, grad_accum_steps, num_processes, process_index
        self.seed, self.start, self.end = seed, start_step, end_step
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, _DATA, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step``'s whole global batch (all processes, all micro-batches)."""
        out, pos, end = [], step * self.B, (step + 1) * self.B
        while pos < end:
            epoch, off = divmod(pos, self.n)
            take = min(end - pos, self.n - off)
            out.extend(self._permutation(epoch)[off:off + take].tolist())
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        micro, local = self.B // self.A, self.B // (self.A * self.N)
        for s in range(self.start, self.end):
            g = self.global_batch(s)
            for m in range(self.A):
                a = m * micro + self.rank * local
                yield g[a:a + local]

    def __len__(self) -> int:
        return (self.end - self.start) * self.A


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``[start, stop)`` of a batch: tensors and arrays along dim 0, dicts and tuples per entry,
    lists as sequences of per-example items (e.g. captions); other values (ints, strings, None) unchanged."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[start:stop]
    if isinstance(batch, dict):
        return type(batch)((k, slice_batch(v, start, stop)) for k, v in batch.items())
    if isinstance(batch, tuple):
        items = [slice_batch(v, start, stop) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return batch[start:stop]
    return batch


def _batch_len(batch: Any) -> int | None:
    """Number of examples in a batch: length of its first tensor / array / list leaf."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return len(batch) if batch.ndim else None
    if isinstance(batch, list):
        return len(batch)
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, tuple) else ()
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None


def _micro_batches(data: Any, cfg: TrainConfig, collate_fn: Callable | None, start: int, end: int,
                   num_processes: int, rank: int) -> Iterator[Any]:
    """This process's micro-batches for steps [start, end), grad_accum_steps per step (see module doc)."""
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError("train() needs a map-style dataset (len(ds), ds[i]) or a batch_fn(generator, batch_size): an "
                        "IterableDataset cannot jump to step s, so exact resume and per-process slicing are impossible")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        sampler = StepSampler(len(data), cfg.batch_size, cfg.grad_accum_steps, num_processes, rank, cfg.seed, start, end)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers,
                                             collate_fn=collate_fn or torch.utils.data.default_collate)
        yield from loader
        return
    if not callable(data):
        raise TypeError(f"dataset_or_batch_fn must be a map-style dataset or a callable batch_fn(generator, "
                        f"batch_size), got {type(data).__name__}")
    if collate_fn is not None:
        raise ValueError("collate_fn is only used with a dataset; a batch_fn returns ready batches")
    micro, local = cfg.batch_size // cfg.grad_accum_steps, cfg.batch_size // (cfg.grad_accum_steps * num_processes)
    for s in range(start, end):
        g = torch.Generator().manual_seed(_derive_seed(cfg.seed, _DATA, s))
        full = data(g, cfg.batch_size)
        n = _batch_len(full)
        if n != cfg.batch_size:
            raise ValueError(f"batch_fn(generator, {cfg.batch_size}) returned a batch of {n} examples; it must return "
                             f"exactly batch_size (the global batch, which train() splits across micro-batches and processes)")
        for m in range(cfg.grad_accum_steps):
            a = m * micro + rank * local
            yield slice_batch(full, a, a + local)


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor or (loss, {{name: float}}), got {type(out).__name__}")
    if loss.ndim != 0:
        raise ValueError(f"loss_fn returned a loss of shape {tuple(loss.shape)}; it must be a scalar (0-dim) tensor, "
                         "the mean over the batch's examples: reduce it, e.g. loss.mean()")
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a loss that does not require grad (computed under torch.no_grad(), "
                         "detached, or from a model with no trainable parameters)")
    return loss, {str(k): float(v) for k, v in metrics.items()}


# --- RNG state as weights_only-loadable tensors -------------------------------------------------------
def _rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


# --- checkpoints --------------------------------------------------------------------------------------
def _model_config_dict(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return config_to_dict(cfg)
    if hasattr(cfg, "to_dict"):                       # a transformers PretrainedConfig
        return cfg.to_dict()
    return None


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_checkpoint(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, *, step: int = 0, train_config: TrainConfig | None = None,
                    history: list[dict] | None = None, evals: list[dict] | None = None,
                    extra: dict | None = None, state_dict: dict | None = None, exclude: list[str] | tuple = (),
                    tmp_dir: str | Path | None = None, weights_dtype: torch.dtype | None = None,
                    base: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (see module doc); returns its path. Call it on ONE process.

    With only ``model`` it writes a plain model checkpoint (``model.safetensors`` + ``config.json`` +
    ``trainer_state.json``) that :func:`mmkit.hub.load_model_dir` loads. An existing folder is replaced.

    Every file is written into ``.NAME.<pid>-<random>.tmp`` and fsynced, ``trainer_state.json`` last (it marks the
    copy complete), then :func:`mmkit.io.replace_dir` swaps it in (rolled back on error). A process killed between
    the two renames of that swap leaves no ``checkpoint-N`` for a moment: :func:`latest_checkpoint` puts the
    complete copy back, so ``resume_from="auto"`` never silently restarts at step 0.

    Several processes (see the module doc): ``state_dict`` gives the weights to write (the full ones gathered from
    FSDP / DeepSpeed shards) instead of ``model``'s; ``exclude`` names weights left out of ``model.safetensors``
    (expert shards the ranks wrote); ``tmp_dir`` is the folder, made by :func:`mmkit.io.make_tmp_dir` beside
    ``ckpt_dir``, into which the other ranks already wrote their files.

    ``weights_dtype=torch.float16`` stores every float32 weight in half precision: the shipped tiny checkpoints
    are half the size, and loading casts them back (``load_state_dict`` copies into the float32 model).
    :func:`rounded_to_half` gives the model such a file loads as, so a recipe can measure what it ships.

    ``weights_dtype=torch.int8`` stores every float32 tensor of 2+ dimensions as int8 with one float16 scale per
    output row (:func:`mmkit.hub.int8_rows`; the file's metadata says so) and the rest (norms, biases) in float16:
    a quarter of float32, and loading turns them back into float32 (:func:`rounded_to_int8` gives that model). It
    stores whole models only: with ``exclude`` / ``base`` it raises a ValueError (see :func:`unchanged_weights`).

    ``base={"checkpoint": name, "sha256": of its model.safetensors}`` writes a delta checkpoint: ``base.json``
    records the base, and ``exclude`` should name the weights equal to it (:func:`unchanged_weights`); loading
    fills them from the base (:func:`mmkit.hub.base_weights`).
    """
    from safetensors.torch import save_file, save_model

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise FileExistsError(f"{ckpt_dir} is a file; a checkpoint is a folder")
    if weights_dtype == torch.int8 and (exclude or base is not None):
        raise ValueError("weights_dtype=torch.int8 stores whole models only, not a delta or expert-sharded checkpoint "
                         "(exclude= / base=): a delta leaves out the weights that equal its base's as stored in "
                         "float16 (unchanged_weights), and expert shards are written unquantized. Save the delta with "
                         "weights_dtype=torch.float16 (its base may be an int8 checkpoint), or the whole model in int8 "
                         "without exclude / base")
    if weights_dtype not in (None, torch.float32, torch.float16, torch.bfloat16, torch.int8):
        raise ValueError(f"weights_dtype={weights_dtype} is not a weight storage: use torch.float16, torch.bfloat16, "
                         "torch.int8 (int8 rows with a float16 scale each) or None (as the model holds them)")
    raw = unwrap(model)
    if tmp_dir is None:
        recover_dir(ckpt_dir, _is_complete_checkpoint)     # leftovers of a killed earlier save: put back / delete
    tmp = make_tmp_dir(ckpt_dir) if tmp_dir is None else Path(tmp_dir)
    try:
        if state_dict is None and not exclude and weights_dtype is None:
            save_model(raw, str(tmp / WEIGHTS_FILE))
        else:
            tensors = _deduplicated(raw, state_dict, set(exclude))
            if weights_dtype == torch.int8:
                tensors = _int8_tensors(tensors)
            elif weights_dtype is not None:
                tensors = {k: v.to(weights_dtype) if v.dtype == torch.float32 else v for k, v in tensors.items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=INT8_FORMAT if weights_dtype == torch.int8 else None)
        cfg_dict = _model_config_dict(raw)
        if cfg_dict is not None:
            atomic_write_json(tmp / CONFIG_NAME, _json_safe(cfg_dict))
        if base is not None:
            if set(base) != {"checkpoint", "sha256"}:
                raise ValueError(f"base must be {{'checkpoint': name, 'sha256': hash of its weights}}, got {base}")
            atomic_write_json(tmp / BASE_FILE, base)
        if optimizer is not None or scheduler is not None:
            state = {"step": int(step), "rng": _rng_state()}
            if optimizer is not None:
                state["optimizer"] = optimizer.state_dict()
            if scheduler is not None:
                state["scheduler"] = scheduler.state_dict()
            torch.save(state, tmp / STATE_NAME)
        for f in tmp.rglob("*"):                       # data on disk before the marker and the rename
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        share_files(tmp)                               # safetensors writes 0600 files; checkpoints are shared
        atomic_write_json(tmp / TRAINER_STATE_NAME, _json_safe({      # last: the copy is complete
            "format": "mmkit-checkpoint-1",
            "step": int(step),
            "sha256": file_hashes(tmp),                # every file above, checked by verify_checkpoint on load
            "train_config": dataclasses.asdict(train_config) if train_config is not None else None,
            "history": history or [],
            "evals": evals or [],
            **(extra or {}),
        }))
        replace_dir(tmp, ckpt_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)         # only left when something above failed
    return ckpt_dir


def _int8_tensors(tensors: dict) -> dict:
    """The tensors of an int8 file: int8 rows + their scales (NAME + INT8_SCALE) where :func:`mmkit.hub.stored_int8`
    says so, the other float32 tensors in float16, the rest (integer buffers) as they are."""
    out = {}
    for k, v in tensors.items():
        if stored_int8(v):
            out[k], out[k + INT8_SCALE] = int8_rows(v)
        else:
            out[k] = v.half() if v.dtype == torch.float32 else v
    return out


def _deduplicated(raw: nn.Module, state_dict: dict | None, exclude: set) -> dict:
    """Weights to write: ``state_dict`` (or the model's), contiguous CPU tensors, tied weights once (as
    ``safetensors.torch.save_model`` stores them), without the ``exclude`` names."""
    sd = raw.state_dict() if state_dict is None else state_dict
    groups: dict[int, list[str]] = {}
    for name, p in raw.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    drop = {n for names in groups.values() for n in sorted(names)[1:]}   # safetensors keeps the first name sorted
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if k not in drop and k not in exclude}


def thinned_history(history: list[dict], every: int = 10) -> list[dict]:
    """Every ``every``-th entry of a training history and the last one, floats rounded to 4 decimals: what a shipped
    checkpoint keeps of its run (a plot of the curve, not a replay of every step)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    keep = history[::every] + ([history[-1]] if history and (len(history) - 1) % every else [])
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in keep]


def unchanged_weights(model: nn.Module, base: nn.Module, weights_dtype: torch.dtype | None = None) -> list[str]:
    """Names of ``model``'s tensors equal to ``base``'s (same name, shape and values, compared as they would be
    stored in ``weights_dtype``): what a delta checkpoint over ``base`` leaves out (``save_checkpoint(exclude=..,
    base=..)``). A fine-tune that froze its encoders stores only the rest."""
    if weights_dtype == torch.int8:
        raise ValueError("unchanged_weights(weights_dtype=torch.int8): a delta checkpoint cannot be stored in int8 "
                         "(save_checkpoint refuses it); compare as float16 and save the delta with "
                         "weights_dtype=torch.float16 (its base may be an int8 checkpoint)")
    ref = unwrap(base).state_dict()
    out = []
    for k, v in unwrap(model).state_dict().items():
        r = ref.get(k)
        if r is None or r.shape != v.shape or r.dtype != v.dtype:
            continue
        if weights_dtype is not None and v.dtype == torch.float32:
            v, r = v.to(weights_dtype), r.to(weights_dtype)
        if torch.equal(v.cpu(), r.cpu()):
            out.append(k)
    return out


def delta_over(model: nn.Module, base_name: str, weights_dtype: torch.dtype | None = None,
               base_model: nn.Module | None = None) -> dict:
    """``save_checkpoint`` arguments (``exclude``, ``base``) that store ``model`` as a delta over the checkpoint
    ``base_name`` (shipped or cached, found by name): only the tensors that differ from it are written.
    ``base_model``: that checkpoint as already loaded (unmodified), so it is not read again."""
    d = checkpoint_dir(base_name)
    base_model = base_model if base_model is not None else load_model_dir(d)
    return {"exclude": unchanged_weights(model, base_model, weights_dtype),
            "base": {"checkpoint": base_name, "sha256": sha256_file(d / WEIGHTS_FILE)}}


def rounded_to_half(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose float weights went through float16: what a checkpoint saved with
    ``weights_dtype=torch.float16`` loads as (``model`` itself is left alone)."""
    out = copy.deepcopy(unwrap(model))
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.half().float())
    return out


def rounded_to_int8(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose weights went through int8 storage: what a checkpoint saved with
    ``weights_dtype=torch.int8`` loads as (int8 rows where :func:`mmkit.hub.stored_int8`, float16 for the other
    float32 tensors; ``model`` itself is left alone), so a recipe can measure what it ships."""
    out = copy.deepcopy(unwrap(model))
    seen = set()
    with torch.no_grad():
        for t in out.state_dict().values():           # what the file holds: tied weights once, no transient buffers
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if stored_int8(t):
                t.copy_(from_int8_rows(*int8_rows(t)))
            elif t.dtype == torch.float32:
                t.copy_(t.half().float())
    return out


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert weights of every Mixture-of-Experts layer in ``model`` (``...experts.w_in`` ...)."""
    names = []
    for mod_name, mod in unwrap(model).named_modules():
        if isinstance(mod, MoEFeedForward):
            prefix = f"{mod_name}.experts." if mod_name else "experts."
            names += [prefix + n for n, _ in mod.experts.named_parameters()]
    return names


def expert_ranges(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{expert weight name: (first, stop, n_experts)}: which of the layer's experts this process holds."""
    out = {}
    for mod_name, mod in unwrap(model).named_modules():
        if isinstance(mod, MoEFeedForward):
            prefix = f"{mod_name}.experts." if mod_name else "experts."
            r = mod.local_experts
            for n, _ in mod.experts.named_parameters():
                out[prefix + n] = (r.start, r.stop, mod.config.n_experts)
    return out


def _save_rank_shards(tmp: Path, raw: nn.Module, optimizer, experts: list[str], rank: int, world: int) -> None:
    """Expert parallelism: this rank's experts and optimizer state (its experts' moments + the replicated ones)."""
    from safetensors.torch import save_file

    params = dict(raw.named_parameters())
    ranges = expert_ranges(raw)
    meta = {"rank": str(rank), "world_size": str(world)}
    for n in experts:
        meta[n] = f"{ranges[n][0]}:{ranges[n][1]}:{ranges[n][2]}"
    save_file({n: params[n].detach().cpu().contiguous() for n in experts}, str(tmp / expert_shard_name(rank, world)),
              metadata=meta)
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer   # accelerate's wrapper
    torch.save(opt.state_dict(), tmp / _optimizer_shard_name(rank, world))


def _shard_files(ckpt_dir: Path, pattern: re.Pattern) -> list[tuple[int, int, Path]]:
    return sorted((int(m.group(1)), int(m.group(2)), f) for f in ckpt_dir.iterdir() if (m := pattern.match(f.name)))


def _load_expert_shards(raw: nn.Module, ckpt_dir: Path, names: set, hint: str) -> None:
    """Fill the expert weights ``names`` of ``raw`` from the ranks' shard files, whatever split this process holds:
    rows ``[first, stop)`` of a layer's experts are cut from the shards that cover them."""
    from safetensors import safe_open

    shards = _shard_files(ckpt_dir, _EXPERT_SHARD_RE)
    worlds = {w for _, w, _ in shards}
    if len(worlds) != 1 or [r for r, _, _ in shards] != list(range(next(iter(worlds)))):
        raise CheckpointError(f"{ckpt_dir}: the expert shards {[f.name for _, _, f in shards]} are not one complete "
                              f"set (model-expert-shard-R-of-W for every R < W); {hint}")
    ranges = expert_ranges(raw)
    params = dict(raw.named_parameters())
    with torch.no_grad():
        for name in sorted(names):
            first, stop, m = ranges[name]
            pieces = []
            for r, w, f in shards:
                per = m // w
                lo, hi = max(first, r * per), min(stop, (r + 1) * per)
                if lo >= hi:
                    continue
                with safe_open(str(f), framework="pt") as fh:
                    if name not in fh.keys():
                        raise CheckpointError(f"{f} holds no {name}: it was saved from another model; {hint}")
                    pieces.append(fh.get_slice(name)[lo - r * per:hi - r * per])
            full = torch.cat(pieces) if pieces else None
            p = params[name]
            if full is None or tuple(full.shape) != tuple(p.shape):
                raise CheckpointError(f"{ckpt_dir}: the expert shards give {name} the shape "
                                      f"{None if full is None else tuple(full.shape)}, the model holds "
                                      f"{tuple(p.shape)}; {hint}")
            p.copy_(full.to(p.dtype))


def _is_complete_checkpoint(d: Path) -> bool:
    return (d / TRAINER_STATE_NAME).exists() and (d / WEIGHTS_FILE).exists()


def load_checkpoint(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, restore_rng: bool = True) -> dict:
    """Load a :func:`save_checkpoint` folder into ``model`` (strict) and, if given, ``optimizer`` / ``scheduler``.

    Weights come from safetensors, the rest from ``torch.load(weights_only=True)``. Returns the trainer state
    (``step``, ``train_config``, ``history``, ``evals``, ...). Weights of another model, a truncated file or a
    damaged JSON raise :class:`mmkit.hub.CheckpointError` naming the file.
    """
    ckpt_dir = Path(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{ckpt_dir} is not a checkpoint: {WEIGHTS_FILE} is missing")
    verify_checkpoint(ckpt_dir)                        # sha256s, when a recipe recorded them
    raw = unwrap(model)
    device = next((p.device for p in raw.parameters()), torch.device("cpu"))
    hint = (f"delete {ckpt_dir} (resume then starts from the checkpoint before it) or train again without "
            "resume_from")
    if _shard_files(ckpt_dir, _EXPERT_SHARD_RE):        # expert parallelism: replicated weights + expert shards
        from safetensors.torch import load_model
        experts = set(expert_param_names(raw))
        try:
            missing, unexpected = load_model(raw, str(weights), strict=False, device=str(device))
        except Exception as e:                          # truncated / damaged / another model: as load_weights says
            raise CheckpointError(f"{weights} cannot be loaded ({type(e).__name__}: {str(e)[:160]}); {hint}") from None
        if set(missing) != experts or unexpected:
            raise CheckpointError(f"{weights} does not match {type(raw).__name__}: missing {sorted(set(missing) - experts)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}, expert weights {len(experts)}; {hint}")
        _load_expert_shards(raw, ckpt_dir, experts, hint)
    else:
        load_weights(raw, weights, str(device), hint=hint, base=base_weights(ckpt_dir))
    ts_file = ckpt_dir / TRAINER_STATE_NAME
    trainer_state = read_json(ts_file, "trainer state", hint) if ts_file.exists() else {"step": 0}
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step", 0), int):
        raise CheckpointError(f"{ts_file} is not a trainer state (a JSON object with an integer 'step'); {hint}")
    if optimizer is not None or scheduler is not None:
        st_file = ckpt_dir / STATE_NAME
        if not st_file.exists():
            raise FileNotFoundError(f"{ckpt_dir} holds no optimizer/scheduler state ({STATE_NAME}): it is a model-only "
                                    "checkpoint, which can initialise a new run but not resume one")
        try:
            state = torch.load(st_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:                 # not written by save_checkpoint: never unpickled unsafely
            raise CheckpointError(f"{st_file} cannot be read: it is not a torch file of tensors and plain values "
                                  f"(torch.load(weights_only=True) refused it; it is never loaded unsafely); {hint}") \
                from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:   # truncated / damaged
            raise CheckpointError(f"{st_file} cannot be read ({type(e).__name__}: {str(e)[:120]}); {hint}") from None
        if optimizer is not None and "optimizer" not in state:   # written per rank (expert parallelism)
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            shards = _shard_files(ckpt_dir, _OPT_SHARD_RE)
            mine = ckpt_dir / _optimizer_shard_name(rank, world)
            if not mine.exists():
                raise CheckpointError(f"{ckpt_dir} holds the optimizer states of {len(shards)} process(es) "
                                      f"({', '.join(f.name for _, _, f in shards[:2])}...), not of rank {rank} of "
                                      f"{world}: resume with the number of processes that wrote it, or start a new "
                                      "run from its weights (init_from)")
            try:
                state["optimizer"] = torch.load(mine, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
                raise CheckpointError(f"{mine} cannot be read ({type(e).__name__}); {hint}") from None
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if restore_rng:
            _set_rng_state(state["rng"])
    return trainer_state


_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


_HIDDEN_CKPT_RE = re.compile(r"^\.(checkpoint-\d+)\.(?:[A-Za-z0-9_-]+\.)?(?:tmp|old)$")


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted((s, p) for s, p in found if (p / TRAINER_STATE_NAME).exists())


def recover_checkpoints(out_dir: str | Path) -> list[Path]:
    """Repair what killed saves left in ``out_dir``: a ``checkpoint-N`` that a kill between the two renames of
    :func:`save_checkpoint` took away is put back from its complete hidden copy, and stale hidden ``.tmp`` / ``.old``
    folders are deleted (those of processes still running are left alone). Returns the checkpoints put back."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    names = sorted({m.group(1) for p in out_dir.iterdir() if (m := _HIDDEN_CKPT_RE.match(p.name))})
    restored = []
    for name in names:
        dest = out_dir / name
        existed = dest.exists()
        if recover_dir(dest, _is_complete_checkpoint) is not None and not existed:
            restored.append(dest)
    return restored


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-STEP`` folder with the highest STEP in ``out_dir``, or None (after
    :func:`recover_checkpoints`)."""
    recover_checkpoints(out_dir)
    ckpts = _checkpoints(Path(out_dir))
    return ckpts[-1][1] if ckpts else None


def _resolve_resume(resume_from: str | Path, cfg: TrainConfig) -> Path | None:
    if str(resume_from) == "auto":
        return latest_checkpoint(cfg.out_dir) if cfg.out_dir else None
    p = Path(resume_from)
    if _CKPT_RE.match(p.name):
        recover_dir(p, _is_complete_checkpoint)        # a save killed between its two renames took it away
    if (p / TRAINER_STATE_NAME).exists() and (p / WEIGHTS_FILE).exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"resume_from={str(p)!r} is neither a checkpoint folder nor a folder holding "
                                "checkpoint-STEP folders (pass resume_from='auto' to start fresh when there is none)")
    return latest


def end_training() -> None:
    """End a multi-process run (what ``Accelerator.end_training`` does): destroy the process group.

    Call it once at the end of a script launched on several processes, after the last collective; some runs
    abort at exit without it (ENVIRONMENT.md, "Distributed on CPU"). Harmless in a single process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- the loop -----------------------------------------------------------------------------------------
def launcher_strategy() -> str:
    """The strategy the launcher asked for: "deepspeed", "fsdp" or "ddp" (what ``accelerate launch --config_file``
    sets in the environment; ``torchrun`` / ``srun`` alone mean data parallelism)."""
    def on(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")
    if on("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if on("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def _world_size_from_env() -> int:
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 1


def _make_accelerator(precision: str, cfg: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    # accelerate keeps one process-wide state and refuses a new mixed-precision setting for it; a notebook that
    # calls train() first with "no" and then with "bf16" needs it reset (the process group, if any, is kept).
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
    kw = dict(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum_steps,
              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)])
    strategy = launcher_strategy()
    if torch.cuda.is_available() or strategy == "ddp" or _world_size_from_env() < 2:
        return Accelerator(cpu=not torch.cuda.is_available(), **kw)
    return _cpu_accelerator_for(strategy, precision, kw, AcceleratorState, PartialState)


def _cpu_accelerator_for(strategy: str, precision: str, kw: dict, AcceleratorState, PartialState):
    """An accelerator on gloo (CPU) running accelerate's FSDP or DeepSpeed code (see the module doc).

    Accelerate only selects these strategies for GPU processes; here the state built for CPU processes is switched to
    them, with the plugin accelerate itself builds from the launcher's environment."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    if strategy == "deepspeed":
        import deepspeed.ops
        # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (~1-3 min) when its comm backend starts;
        # it only speeds up CPU inference collectives, and gloo does them here, so it is marked unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        plugin = DeepSpeedPlugin()
        acc = Accelerator(cpu=True, deepspeed_plugin=plugin, **kw)
        kind = DistributedType.DEEPSPEED
    else:
        # sync_module_states (rank 0's weights broadcast at wrapping) needs a GPU in torch's FSDP: on CPU it is left
        # off. Every rank builds the same weights anyway (run() seeds before building; init_from loads one file).
        saved = os.environ.get("FSDP_SYNC_MODULE_STATES")
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
        try:
            plugin = FullyShardedDataParallelPlugin()
        finally:
            if saved is None:
                os.environ.pop("FSDP_SYNC_MODULE_STATES", None)
            else:
                os.environ["FSDP_SYNC_MODULE_STATES"] = saved
        acc = Accelerator(cpu=True, fsdp_plugin=plugin, **kw)
        kind = DistributedType.FSDP
    if acc.num_processes < 2:
        raise RuntimeError(f"the launcher asked for {strategy} but this process sees {acc.num_processes} process(es); "
                           "launch several (torchrun --nproc_per_node N, or accelerate launch on GPUs)")
    for st in (PartialState(), acc.state):          # both shared states: AcceleratorState() copies PartialState's
        st.distributed_type = kind
        st.device = torch.device("cpu")
    if strategy == "deepspeed":
        acc.state.deepspeed_plugins = plugin
        plugin.set_mixed_precision(precision)
        plugin.select(_from_accelerator_state=True)
        acc.state._mixed_precision = "no"            # DeepSpeed casts the model itself (its bf16 section)
    else:
        acc.state.fsdp_plugin = plugin
        if precision != "no":
            plugin.set_mixed_precision(precision)
    return acc


def _fill_deepspeed_config(accelerator, cfg: TrainConfig, N: int, width: int | None = None) -> None:
    """The TrainConfig is the one source of the batch, accumulation and clipping: fill DeepSpeed's "auto" values
    from it, and refuse a config file that says otherwise."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": cfg.batch_size // (N * cfg.grad_accum_steps),
            "gradient_accumulation_steps": cfg.grad_accum_steps,
            "train_batch_size": cfg.batch_size,
            "gradient_clipping": float(cfg.clip_grad_norm or 0.0)}
    for k, v in want.items():
        have = ds.get(k, "auto")
        if have == "auto" or k not in ds:
            ds[k] = v
        elif float(have) != float(v):
            raise ValueError(f"the DeepSpeed config sets {k}={have} but the run's TrainConfig gives {v}; write "
                             f'"{k}": "auto" in the DeepSpeed JSON (the TrainConfig decides it)')
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    # the bucket sizes accelerate derives from a transformers config's hidden_size (its formulas), from the model's
    # width here (mmkit models have no hidden_size)
    D = width or 1024
    for key, value in (("reduce_bucket_size", D * D), ("stage3_prefetch_bucket_size", int(0.9 * D * D)),
                       ("stage3_param_persistence_threshold", 10 * D)):
        if zero.get(key) == "auto":
            zero[key] = value


def _full_state_dict(accelerator, dmodel) -> dict:
    """The full weights gathered from the FSDP / DeepSpeed shards (every rank calls it). On CPU, FSDP's gather with
    ``offload_to_cpu`` (what ``accelerator.get_state_dict`` asks for) crashes the process (SIGSEGV, torch 2.13):
    the tensors already live on the CPU, so they are gathered without it."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not torch.cuda.is_available():
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(dmodel, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
            return dmodel.state_dict()
    return accelerator.get_state_dict(dmodel)


def _reduce_mean(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(t)
    return (t / accelerator.num_processes).tolist()


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], dataset_or_batch_fn: Any, cfg: TrainConfig,
          eval_fn: Callable[[nn.Module], dict] | None = None, collate_fn: Callable | None = None,
          resume_from: str | Path | None = None, *, stop_at: int | None = None,
          clip_fn: ClipFn | None = None,
          param_groups_fn: Callable[[nn.Module], list[dict]] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps (see the module doc for data and loss rules).

    Args:
        model: an ``nn.Module``; trained in place (also under several processes: it is what DDP wraps).
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, {name: float})``; loss a scalar mean over the batch.
        dataset_or_batch_fn: a map-style dataset, or ``batch_fn(generator, batch_size) -> global batch``.
        cfg: a :class:`TrainConfig`.
        eval_fn: ``eval_fn(model) -> {name: float}``, run under ``torch.no_grad()`` with the model in eval mode,
            every ``cfg.eval_every`` steps and at the end, on every process (it gets the unwrapped model).
        collate_fn: turns a list of ``dataset[i]`` into a batch (datasets only; default torch's default_collate).
        resume_from: a checkpoint folder, a folder of ``checkpoint-STEP`` folders (the latest is used), or
            ``"auto"`` (the latest in ``cfg.out_dir`` if any, else a fresh start). Restores weights, optimizer,
            scheduler, step and history: the run continues exactly as if it had never stopped.
        stop_at: stop after this optimizer step (the schedule still spans ``cfg.steps``): train in chunks, e.g.
            a lesson that looks at the model half-way, then ``resume_from`` the checkpoint written there.
        clip_fn: ``clip_fn(model, max_norm) -> norm`` replaces the global-norm clipping of
            ``accelerator.clip_grad_norm_``; called every step with the unwrapped model and
            ``cfg.clip_grad_norm or 0``, e.g. :func:`local_clip_fn` for MoE experts (M6 §3.4).
        param_groups_fn: ``param_groups_fn(model) -> [{"params": [...], "weight_decay": .., "lr": ..}, ...]``
            replaces :func:`default_param_groups` (e.g. a lower LR for a pretrained encoder); the schedule
            scales every group's LR by :func:`lr_factor`.
    Returns:
        :class:`TrainResult`.
    """
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm

    check_train_config(cfg)
    t0 = time.perf_counter()
    precision = resolve_mixed_precision(model, cfg.mixed_precision)
    accelerator = _make_accelerator(precision, cfg)
    N, A, rank = accelerator.num_processes, cfg.grad_accum_steps, accelerator.process_index
    if cfg.batch_size % (N * A):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by num_processes ({N}) x grad_accum_steps "
                         f"({A}) = {N * A}: every process needs an equal slice of every micro-batch. Use a multiple "
                         f"of {N * A}, e.g. batch_size={max(N * A, cfg.batch_size // (N * A) * (N * A))}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)

    # optimizer and schedule on the raw model, before any wrapping
    was_training = model.training
    groups = param_groups_fn(model) if param_groups_fn else default_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = _make_scheduler(optimizer, cfg)

    from accelerate.utils import DistributedType
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and any(isinstance(m, ExpertParallelMoE) for m in model.modules()):
        raise ValueError(f"expert parallelism shards the experts itself and runs under DDP; launch it without "
                         f"{accelerator.distributed_type.value} (torchrun / srun / accelerate launch --multi_gpu)")
    if sharded and clip_fn is not None:
        raise ValueError(f"clip_fn is not supported under {accelerator.distributed_type.value} (the gradients are "
                         "sharded); use cfg.clip_grad_norm")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_config(accelerator, cfg, N, model_width(model))

    start, history, evals = 0, [], []
    ckpt = _resolve_resume(resume_from, cfg) if resume_from is not None else None
    if ckpt is not None:
        # sharded strategies: the optimizer shards are read by accelerator.load_state once the model is wrapped
        state = load_checkpoint(ckpt, model, None if sharded else optimizer, scheduler)
        start, history, evals = int(state["step"]), list(state.get("history", [])), list(state.get("evals", []))
        old = state.get("train_config") or {}
        changed = [k for k in ("seed", "batch_size", "steps", "lr", "warmup_steps", "min_lr_ratio")
                   if k in old and old[k] != getattr(cfg, k)]
        if changed:
            warnings.warn(f"resuming {ckpt} with a different {', '.join(changed)} than it was trained with: the run "
                          "continues, but not exactly as the original would have", stacklevel=2)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)

    # prepare wraps the model in DDP under several processes; autocast is applied around loss_fn below, so the
    # forward-patching accelerate does for mixed precision is undone to leave the user's module unchanged.
    dmodel, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(dmodel, keep_fp32_wrapper=False)
    dmodel.train()
    if ckpt is not None and sharded:
        if not (Path(ckpt) / SHARDED_STATE_DIR).is_dir():
            raise FileNotFoundError(f"{ckpt} holds no {SHARDED_STATE_DIR}/ folder of optimizer shards, so a "
                                    f"{accelerator.distributed_type.value} run cannot resume from it; start a new run "
                                    "from its weights instead (init_from in a run config)")
        accelerator.load_state(str(Path(ckpt) / SHARDED_STATE_DIR))

    main = accelerator.is_main_process
    bar = tqdm(total=end, initial=min(start, end), desc="train", dynamic_ncols=True,
               disable=not (cfg.progress_bar and main))
    batches = _micro_batches(dataset_or_batch_fn, cfg, collate_fn, start, end, N, rank)
    last_ckpt: str | None = None
    max_norm = float(cfg.clip_grad_norm or 0.0)

    def evaluate(step: int) -> None:
        raw.eval()
        with torch.no_grad():
            out = eval_fn(raw)
        raw.train()
        rec = {"step": step, **{k: float(v) for k, v in dict(out).items()}}
        evals.append(rec)
        if main:
            msg = " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step")
            (bar.write if not bar.disable else print)(f"step {step}: eval {msg}")

    def checkpoint(step: int) -> str:
        path = Path(cfg.out_dir) / f"checkpoint-{step}"
        accelerator.wait_for_everyone()
        experts = expert_param_names(raw) if N > 1 else []
        full = _full_state_dict(accelerator, dmodel) if sharded else None   # a collective: every rank takes part
        tmp = None
        if experts or sharded:                      # every rank writes into one folder, which the main one finishes
            if main:
                recover_dir(path, _is_complete_checkpoint)
                tmp = make_tmp_dir(path)
            box = [str(tmp) if tmp else None]
            torch.distributed.broadcast_object_list(box, src=0)
            tmp = Path(box[0])
            if experts:
                _save_rank_shards(tmp, raw, optimizer, experts, rank, N)
            if sharded:
                accelerator.save_state(str(tmp / SHARDED_STATE_DIR))
            accelerator.wait_for_everyone()
        if main:
            save_checkpoint(path, raw, None if experts or sharded else optimizer, scheduler, step=step,
                            train_config=cfg, history=history, evals=evals,
                            extra={"num_processes": N, "mixed_precision": precision,
                                   "strategy": accelerator.distributed_type.value},
                            state_dict=full, exclude=experts, tmp_dir=tmp)
            if cfg.keep_checkpoints:
                for _, old in _checkpoints(Path(cfg.out_dir))[:-cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return str(path)

    try:
        for step in range(start, end):
            # the schedule's LR this update uses: cfg.lr x the warmup / cosine factor (param groups with a scaled
            # LR, e.g. an image side at 0.1x, use that times their scale; the first group may be one of them)
            lr = cfg.lr * lr_factor(step, cfg)
            loss_sum, metric_sums = 0.0, {}
            for micro in range(A):
                batch = send_to_device(next(batches), accelerator.device)
                _reseed(cfg.seed, step, micro)         # after loading: the DataLoader draws from torch's RNG
                with accelerator.accumulate(dmodel):   # no DDP all-reduce until the last micro-batch
                    with accelerator.autocast():
                        loss, metrics = _split_loss(loss_fn(dmodel, batch))
                    accelerator.backward(loss)         # divides by grad_accum_steps
                loss_sum += float(loss.detach())
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + v
            assert accelerator.sync_gradients, "gradient accumulation went out of step with the micro-batches"

            # one all-reduce per step for the logged numbers (metric names must be the same on every process);
            # checked before the update, so a NaN never reaches the weights (or a checkpoint)
            keys = sorted(metric_sums)
            values = _reduce_mean(accelerator, [loss_sum / A] + [metric_sums[k] / A for k in keys])
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"loss is {values[0]} at step {step + 1}: lower the learning rate "
                                         f"(lr={cfg.lr}), raise warmup_steps, or check the data for NaNs")
            if clip_fn is not None:
                grad_norm = clip_fn(raw, max_norm)
            elif max_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(dmodel.parameters(), max_norm)
            else:
                grad_norm = None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            rec = {"step": step + 1, "loss": values[0], "lr": lr}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            rec.update(zip(keys, values[1:]))
            history.append(rec)
            bar.update(1)
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                if not bar.disable:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                elif main:
                    extra = "".join(f" {k} {rec[k]:.4g}" for k in keys)
                    print(f"step {step + 1}/{cfg.steps} loss {rec['loss']:.4f} lr {lr:.2e}{extra}")
            if eval_fn is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == end):
                evaluate(step + 1)
            if cfg.out_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == end):
                last_ckpt = checkpoint(step + 1)
    finally:
        bar.close()
        model.train(was_training)
    accelerator.wait_for_everyone()

    return TrainResult(history=history, evals=evals, seconds=time.perf_counter() - t0, step=max(start, end),
                       mixed_precision=precision, checkpoint=last_ckpt)


# ---------------------------------------------------------------------------------------------------------
# Stage 0 of a cell front end (mmkit.nn.CellTokens): VLMo's and mPLUG's world VQA models
# ---------------------------------------------------------------------------------------------------------

# The namer (a small CNN + one linear head per cell) learns which object each world cell holds, on the VQA training
# scenes' clean and drawn views (half of each batch). Measured at 64 px (10k scenes + 6k drawn views, 1 thread):
# after 800 steps per-cell colour / shape / size 1.00 / 0.997 / 1.00 on clean held-out scenes, ~60 CPU-s.
CELL_NAMER = dict(steps=800, batch_size=64, lr=2e-3, warmup_steps=80, min_lr_ratio=0.05, weight_decay=0.01,
                  mixed_precision="no", log_every=50, seed=0)
CELL_NAMER_FAST = dict(CELL_NAMER, steps=150, warmup_steps=15)
CELL_NAMER_AUG_FRACTION = 0.5      # share of each namer batch drawn from the bank's drawn-style views


class CellNamerRun(NamedTuple):
    result: TrainResult
    eval: dict                       # per-cell accuracy on test_bank's clean views (colour / shape / size, empty)
    eval_augmented: dict             # the same on its drawn views ({} without them)
    cpu_seconds: float               # process time of the training (1 thread: CPU-seconds)


def namer_parameter_names(model: nn.Module, tokens: nn.Module) -> tuple[str, ...]:
    """Names (in ``model``) of what the namer of ``tokens`` (a :class:`mmkit.nn.CellTokens` inside it) trains: its CNN
    and per-cell heads. The code tables and cell vectors are not among them (they learn with the task)."""
    ids = {id(p) for p in tokens.namer_parameters()}
    return tuple(n for n, p in unwrap(model).named_parameters() if id(p) in ids)


@contextlib.contextmanager
def grad_flags_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, change any parameter's ``requires_grad`` (freeze a part, train only another); on exit, even
    after an error, every flag is as it was. Yields the unwrapped model."""
    raw = unwrap(model)
    flags = [(p, p.requires_grad) for p in raw.parameters()]
    try:
        yield raw
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def cell_namers_fixed(model: nn.Module) -> Iterator[tuple[str, ...]]:
    """Inside the block, the namer (CNN + per-cell heads) of every :class:`mmkit.nn.CellTokens` in ``model`` has
    ``requires_grad = False``; on exit each flag is as it was. Yields their names (empty for a model without cells).

    Why: once stage 0 has taught the namer to name each cell's object, a downstream loss that reaches it rewrites
    those names in a few hundred steps. Measured on NLVR2 from vlmo-tiny-vqa (1000 steps at 1e-3, namer not fixed):
    the namer's per-cell colour / shape / size fell from 1.00 / 0.99 / 1.00 to 0.00, and the model stopped at its
    text-only baseline (0.616 vs 0.597)."""
    with grad_flags_restored(model) as raw:
        ids = {id(p) for m in raw.modules() if hasattr(m, "namer_parameters") for p in m.namer_parameters()}
        named = [(n, p) for n, p in raw.named_parameters() if id(p) in ids]
        for _, p in named:
            p.requires_grad_(False)
        yield tuple(n for n, _ in named)


def train_cell_namer(model: nn.Module, tokens: nn.Module, bank, train_config: TrainConfig | None = None,
                     aug_fraction: float = CELL_NAMER_AUG_FRACTION, test_bank=None) -> CellNamerRun:
    """Train the namer of ``tokens`` (the :class:`mmkit.nn.CellTokens` inside ``model``, whose ``image_mean`` /
    ``image_std`` normalise its [0, 1] images) in place to name the object of every cell of ``bank``'s scenes
    (``aug_fraction`` of each batch from the drawn views); nothing else in ``model`` moves. ``eval`` is its per-cell
    accuracy on ``test_bank`` (a :class:`mmkit.data.scenes.SceneBank`; clean views, and drawn ones if it has them)."""
    raw = unwrap(model)
    tcfg = train_config if train_config is not None else TrainConfig(**CELL_NAMER)
    names = set(namer_parameter_names(raw, tokens))

    def normalised(images: torch.Tensor) -> torch.Tensor:
        return (images.to(raw.image_mean.device) - raw.image_mean) / raw.image_std

    c0 = time.process_time()
    with grad_flags_restored(raw):
        for n, p in raw.named_parameters():
            p.requires_grad_(n in names)
        result = train(raw, lambda m, b: tokens.loss(normalised(b["images"]), b["labels"].to(raw.image_mean.device)),
                       CellData(bank, aug_fraction).batch_fn, tcfg)
    cpu = time.process_time() - c0
    evals = {}
    for augmented in (False, True):
        if test_bank is None or (augmented and not test_bank.n_augmented):
            evals[augmented] = {}
            continue
        with evaluating(raw):
            images = test_bank.images(range(len(test_bank)), augmented)
            evals[augmented] = tokens.accuracy(normalised(images), object_labels(test_bank.scenes).to(images.device))
    return CellNamerRun(result, evals[False], evals[True], cpu)
