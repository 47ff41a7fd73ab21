"""Run configs: one YAML says what to train (model, task, data, TrainConfig, where it starts and where it writes), and
one entry point runs it under any launcher (``python scaled/train.py RUN.yaml``, ``mmkit train RUN.yaml``).

    cfg = load_run_config("scaled/configs/runs/m6_base_pretrain.yaml", ["train.steps=10", "out_dir=/tmp/x"])
    result = run(cfg)                        # builds, loads init_from, trains (resuming), writes out_dir/checkpoint-N

A run config (every key optional but ``task``; paths are relative to the YAML file's folder)::

    base: m6_base_pretrain.yaml   # another run config this one changes (tiny overrides, the next stage, ...)
    task: m6-pretrain             # a registered run task (mmkit/<system>/runs.py; `mmkit train --list`)
    model: ../m6_base.yaml        # a preset name or a model YAML (default: the task's full-size preset)
    model_overrides: {}           # model config fields to change (e.g. a tiny width for a test)
    task_options: {}              # the task's options (its dataclass: data sizes, stage, loss weights, ...)
    data: {source: world}         # or {source: shards, path: data/clean/*.tar}: a real corpus (mmkit.data.shards)
    train: {steps: 1000, batch_size: 256, lr: 1e-4, mixed_precision: bf16, save_every: 500}   # the TrainConfig
    gradient_checkpointing: true  # recompute each transformer block in backward (memory for compute)
    expert_parallel: false        # MoE experts sharded over the processes (M6 §3.4); DDP for the rest
    init_from: runs/m6-base/stage0   # a checkpoint folder (or a folder of checkpoint-N: the latest) or a hub name
    out_dir: runs/m6-base/pretrain   # checkpoint-N folders; the next stage's init_from
    resume: true                  # carry on from the latest checkpoint in out_dir (after a lost node, a preemption)

The launcher decides the strategy, the run config does not: ``accelerate launch --config_file
scaled/launch/accelerate/fsdp.yaml scaled/train.py RUN.yaml`` shards with FSDP, ``.../ds_zero3.yaml`` with DeepSpeed
ZeRO-3, ``torchrun`` / ``srun`` / ``--multi_gpu`` give DDP (see ``scaled/README.md``). The same run config gives the
same loss on one process and on several (tests/test_scaled_dist.py).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
import yaml

import mmkit.registry as registry
from mmkit.config import config_from_dict, config_to_dict, load_config, replace_config
from mmkit.hub import CheckpointError, is_int8_file, read_weights, verify_checkpoint
from mmkit.io import atomic_write_text
from mmkit.nn.blocks import TransformerBlock
from mmkit.nn.moe import ExpertParallelMoE, MoEFeedForward, ddp_ignore_expert_params, is_expert_param
from mmkit.train import (TrainConfig, TrainResult, check_train_config, end_training, expert_param_names,
                         expert_ranges, latest_checkpoint, launcher_strategy, load_checkpoint, local_clip_fn, train)

__all__ = ["RunConfig", "RunContext", "RunParts", "RunResult", "load_run_config", "apply_overrides",
           "enable_activation_checkpointing", "init_experts_by_index", "load_init", "InitReport", "run",
           "resolve_checkpoint", "build_run", "describe_run", "world_info", "launcher_env", "model_config"]

RUN_KEYS = ("base", "task", "model", "model_overrides", "task_options", "data", "train", "gradient_checkpointing",
            "expert_parallel", "init_from", "out_dir", "resume")
MAX_BASE_DEPTH = 8


@dataclass
class RunConfig:
    task: str                                        # registered run task (registry.run_task_names())
    model: str | None = None                         # preset name or model YAML; None: the task's full-size preset
    model_overrides: dict = field(default_factory=dict)   # model config fields changed
    task_options: dict = field(default_factory=dict)      # the task's options (its RunTask.options dataclass)
    data: dict = field(default_factory=lambda: {"source": "world"})   # {"source": "world"} | {"source": "shards", "path": ...}
    train: dict = field(default_factory=dict)        # TrainConfig fields
    gradient_checkpointing: bool = False             # recompute transformer blocks in backward
    expert_parallel: bool = False                    # shard MoE experts over the processes (M6 §3.4)
    init_from: str | None = None                     # checkpoint folder / run folder / hub name to start from
    out_dir: str | None = None                       # where checkpoint-N folders go
    resume: bool = True                              # continue from the latest checkpoint in out_dir, if any
    source: str = "<dict>"                           # the YAML file it came from (paths are relative to its folder)

    def train_config(self) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(self.train) - names)
        if unknown:
            raise ValueError(f"{self.source}: unknown train field(s) {unknown}; TrainConfig fields: {sorted(names)}")
        kw = dict(self.train)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        kw.setdefault("out_dir", self.out_dir)
        cfg = TrainConfig(**kw)
        try:
            check_train_config(cfg)                     # before anything runs, --dry-run included
        except ValueError as e:
            raise ValueError(f"{self.source}: {e} (the run config's train: section or a train.KEY=VALUE override)") \
                from None
        return cfg


# ---------------------------------------------------------------------------------------------------------
# Loading run configs
# ---------------------------------------------------------------------------------------------------------

def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; nested dicts (train, data, model_overrides, task_options) merge key by key."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _rebase_paths(d: dict, folder: Path) -> dict:
    """Paths in a YAML are relative to its folder: make them absolute (hub names and presets stay as they are)."""
    d = dict(d)

    def fix(v: str | None) -> str | None:
        if v is None or Path(v).is_absolute():
            return v
        cand = folder / v
        looks_like_path = "/" in v or v.endswith((".yaml", ".yml")) or v.startswith(".")
        return str(cand.resolve()) if looks_like_path else v
    for key in ("model", "init_from", "out_dir"):
        if isinstance(d.get(key), str):
            d[key] = fix(d[key])
    if isinstance(d.get("data"), dict) and isinstance(d["data"].get("path"), str):
        d["data"] = dict(d["data"], path=fix(d["data"]["path"]))
    return d


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"run config {path} does not exist (run configs live in scaled/configs/runs/)")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a run config is a mapping of {list(RUN_KEYS)}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a run config has {list(RUN_KEYS)}")
    return d


def _load_dict(path: Path, chain: tuple = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise ValueError(f"{path}: 'base' leads back to itself ({' -> '.join(p.name for p in chain + (path,))})")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ValueError(f"{path}: more than {MAX_BASE_DEPTH} nested 'base' run configs")
    d = _rebase_paths(_read_yaml(path), path.parent)
    base = d.pop("base", None)
    if base is None:
        return d
    return _merge(_load_dict((path.parent / base) if not Path(base).is_absolute() else Path(base), chain + (path,)), d)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict, overrides: list[str] | tuple = ()) -> dict:
    """``["train.steps=10", "model_overrides.d_model=64", "out_dir=/tmp/x"]`` (values parsed as YAML) over ``d``."""
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value or section.key=value (e.g. train.steps=10)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in RUN_KEYS or parts[0] == "base":
            raise ValueError(f"override {item!r}: {parts[0]!r} is not a run config key; use one of {list(RUN_KEYS[1:])}")
        cur = d
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        cur[parts[-1]] = _parse_value(value)
    return d


def load_run_config(path: str | Path, overrides: list[str] | tuple = ()) -> RunConfig:
    """A :class:`RunConfig` from a YAML file (its ``base`` chain merged, paths made absolute), with ``overrides``."""
    path = Path(path)
    d = apply_overrides(_load_dict(path), overrides)
    if "task" not in d:
        raise ValueError(f"{path}: a run config needs a 'task' (one of {registry.run_task_names()})")
    for key in ("model_overrides", "task_options", "data", "train"):
        if key in d and not isinstance(d[key], dict):
            raise ValueError(f"{path}: '{key}' must be a mapping, got {type(d[key]).__name__}")
    for key in ("gradient_checkpointing", "expert_parallel", "resume"):
        if key in d and not isinstance(d[key], bool):
            raise ValueError(f"{path}: '{key}' must be true or false, got {d[key]!r}")
    return RunConfig(**d, source=str(path))


# ---------------------------------------------------------------------------------------------------------
# What a run task builds
# ---------------------------------------------------------------------------------------------------------

class RunContext(NamedTuple):
    data: dict                          # the run config's data section ({"source": "world"} by default)
    seed: int                           # TrainConfig.seed
    rank: int                           # this process (0 on one process)
    world_size: int                     # processes
    load: Callable[[str], Any] | None   # loads a checkpoint by hub name (given by the CLI), e.g. the image tokenizer
    train: TrainConfig                  # the run's TrainConfig (lr, weight decay for optimizer groups, ...)


class RunParts(NamedTuple):
    model: nn.Module                                 # what train() trains
    loss_fn: Callable                                # loss_fn(model, batch) -> loss or (loss, metrics)
    data: Any                                        # a map-style dataset or batch_fn(generator, batch_size)
    eval_fn: Callable | None = None                  # eval_fn(model) -> {name: float}
    collate_fn: Callable | None = None               # for a dataset
    param_groups_fn: Callable | None = None          # optimizer groups (e.g. frozen parts, scaled LRs)
    prepare: Callable | None = None                  # prepare(model) after init_from is loaded (freezing, copies)


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, accelerate launch, srun + torchrun)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0)
    world = int(os.environ.get("WORLD_SIZE", 1) or 1)
    return rank, world


def options_from(cls, options: dict, source: str):
    """The task's options dataclass from the run config's ``task_options`` (unknown fields are an error)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"{source}: unknown task_options {unknown} for {cls.__name__}; valid: {sorted(names)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Switches applied to any model
# ---------------------------------------------------------------------------------------------------------

def enable_activation_checkpointing(model: nn.Module, block_types: tuple = (TransformerBlock,)) -> int:
    """Recompute every ``block_types`` module's forward in backward (``torch.utils.checkpoint``, non-reentrant: the
    dropout RNG is replayed, so the gradients are those without checkpointing). Only while training with autograd
    on and without a KV cache. Returns the number of blocks switched (0: the model has none)."""
    n = 0
    for m in model.modules():
        if isinstance(m, block_types) and not getattr(m, "_activation_checkpointing", False):
            orig = m.forward

            def forward(*args, _orig=orig, _m=m, **kw):
                if _m.training and torch.is_grad_enabled() and kw.get("cache") is None:
                    return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kw)
                return _orig(*args, **kw)
            m.forward = forward
            m._activation_checkpointing = True
            n += 1
    return n


@torch.no_grad()
def init_experts_by_index(model: nn.Module, seed: int) -> int:
    """Re-draw every MoE expert's weights from a generator seeded by (seed, layer, global expert index), so that the
    experts do not depend on how many processes hold them: 1 or W expert-parallel processes start from the same
    experts. N(0, init_std) weights, zero biases (what ``Experts.reset_parameters`` draws). Returns the experts drawn."""
    n = 0
    for li, (name, mod) in enumerate((nm, m) for nm, m in model.named_modules() if isinstance(m, MoEFeedForward)):
        ex = mod.experts
        for local, e in enumerate(mod.local_experts):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + li * 65_537 + e)
            for w in (ex.w_in, ex.w_out):
                w[local].copy_(torch.randn(w.shape[1:], generator=g) * ex.init_std)
            for b in (ex.b_in, ex.b_out):
                if b is not None:
                    b[local].zero_()
            n += 1
    return n


class InitReport(NamedTuple):
    folder: str                # the checkpoint read
    loaded: int                # tensors copied
    new: list                  # model weights the checkpoint does not hold (new heads): left as initialised
    dropped: list              # checkpoint weights the model has no place for (heads of the previous stage)


def resolve_checkpoint(folder: str | Path) -> Path:
    """A checkpoint folder, or the latest ``checkpoint-N`` inside a run's out_dir."""
    p = Path(folder)
    if (p / "model.safetensors").exists():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"init_from {str(p)!r} is neither a checkpoint folder (model.safetensors) nor a run "
                                "folder holding checkpoint-N folders: run the previous stage first (its out_dir)")
    return latest


def _wrapper_prefix(keys: list[str], own: dict) -> str:
    """The first name component every matching checkpoint key carries when the previous stage trained the model
    inside a wrapper (stage 0's probe holds M6 as ``m6.``): "" when the names match as they are."""
    direct = sum(k in own for k in keys)
    best, best_n = "", direct
    for prefix in {k.split(".", 1)[0] + "." for k in keys if "." in k}:
        n = sum(k[len(prefix):] in own for k in keys if k.startswith(prefix))
        if n > best_n:
            best, best_n = prefix, n
    return best


def load_init(model: nn.Module, folder: str | Path) -> InitReport:
    """Start ``model`` from the weights of a checkpoint of the previous stage: every tensor whose name and shape match
    is copied; the model's own new weights (a new head) stay initialised and the checkpoint's extra ones (the previous
    stage's heads) are left out, both listed. A shape mismatch is an error (another model size). Expert-parallel
    checkpoints (expert shards) are re-assembled for however many experts this process holds, and a process of an
    expert-parallel run takes its own experts' rows from a checkpoint holding all of them."""
    from safetensors import safe_open

    d = resolve_checkpoint(folder)
    verify_checkpoint(d)
    if any(f.name.startswith("model-expert-shard-") for f in d.iterdir()):
        load_checkpoint(d, model, restore_rng=False)
        return InitReport(str(d), len(model.state_dict()), [], [])
    own = model.state_dict()
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    ranges = expert_ranges(model)                    # expert parallelism: the experts this process holds
    loaded, dropped, sd = 0, [], {}
    try:
        with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
            # int8 rows (save_checkpoint(weights_dtype=torch.int8)) are read back to float32 here, whole
            int8 = read_weights(fh) if is_int8_file(fh) else None
            keys = list(fh.keys()) if int8 is None else list(int8)
            prefix = _wrapper_prefix(keys, own)         # e.g. "m6." of stage 0's probe around the model
            for k in keys:
                if prefix and k.startswith(prefix):
                    name = k[len(prefix):]
                else:
                    name = k
                if name not in own:
                    dropped.append(k)
                    continue
                if int8 is not None:
                    t = int8[k]
                    if name in ranges and t.shape[0] == ranges[name][2] != own[name].shape[0]:
                        t = t[ranges[name][0]:ranges[name][1]]
                elif name in ranges and fh.get_slice(k).get_shape()[0] == ranges[name][2] != own[name].shape[0]:
                    t = fh.get_slice(k)[ranges[name][0]:ranges[name][1]]   # all experts on file: this rank's rows
                else:
                    t = fh.get_tensor(k)
                if tuple(t.shape) != tuple(own[name].shape):
                    raise CheckpointError(f"{d / 'model.safetensors'}: {k} has shape {tuple(t.shape)}, the model's is "
                                          f"{tuple(own[name].shape)}: init_from must come from the same model size")
                sd[name] = t
                loaded += 1
    except (OSError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d / 'model.safetensors'} cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    model.load_state_dict(sd, strict=False)
    covered = set(sd)
    for names in tied.values():                      # a tied weight loaded under one name is loaded under all
        if covered & set(names):
            covered |= set(names)
    new = [k for k in own if k not in covered]
    return InitReport(str(d), loaded, new, dropped)


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

class RunResult(NamedTuple):
    result: TrainResult | None          # train()'s result (None for a dry run)
    init: InitReport | None             # what init_from loaded
    parameters: int                     # parameters of the model (this process's experts only, under EP)
    strategy: str                       # "ddp" / "fsdp" / "deepspeed" (the launcher's)
    world_size: int


def model_config(cfg: RunConfig):
    task = registry.run_task(cfg.task)
    name = cfg.model or task.model
    if name is None:
        raise ValueError(f"{cfg.source}: the run task {cfg.task!r} has no default model; give 'model:'")
    mcfg = load_config(name)
    overrides = dict(cfg.model_overrides)
    if cfg.expert_parallel:
        if not hasattr(mcfg, "expert_parallel"):
            raise ValueError(f"{cfg.source}: expert_parallel needs a Mixture-of-Experts model (e.g. m6-100b), "
                             f"{type(mcfg).__name__} has no experts")
        overrides["expert_parallel"] = True
    if cfg.gradient_checkpointing and hasattr(mcfg, "gradient_checkpointing"):
        overrides["gradient_checkpointing"] = True    # the model's own switch (mPLUG §4)
    return replace_config(mcfg, _source=cfg.source, **overrides) if overrides else mcfg


def build_run(cfg: RunConfig, load: Callable[[str], Any] | None = None, init_dir: str | Path | None = None):
    """Build the model and the task's pieces, load ``init_dir`` (the resolved init_from) and apply the switches.
    Returns (RunParts, InitReport or None). Under expert parallelism the process group must exist already."""
    task = registry.run_task(cfg.task)
    tcfg = cfg.train_config()
    rank, world = world_info()
    ctx = RunContext(dict(cfg.data or {"source": "world"}), tcfg.seed, rank, world, load, tcfg)
    mcfg = model_config(cfg)
    torch.manual_seed(tcfg.seed)
    parts = task.build(mcfg, dict(cfg.task_options), ctx)
    model = parts.model
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        init_experts_by_index(model, tcfg.seed)
    init = load_init(model, init_dir) if init_dir is not None else None
    if parts.prepare is not None:
        parts.prepare(model)
    if cfg.gradient_checkpointing and not hasattr(mcfg, "gradient_checkpointing"):
        if enable_activation_checkpointing(model) == 0:
            raise ValueError(f"{cfg.source}: gradient_checkpointing is on but {type(model).__name__} has no "
                             "TransformerBlock to recompute")
    return parts, init


def describe_run(cfg: RunConfig) -> str:
    """What the run would do, without building anything large (the model on the meta device)."""
    from mmkit.config import build_model
    from mmkit.params import human

    tcfg = cfg.train_config()
    mcfg = model_config(replace_config_safe(cfg))
    model = build_model(mcfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    rank, world = world_info()
    lines = [f"run {cfg.source}", f"  task {cfg.task}; model {cfg.model or registry.run_task(cfg.task).model} "
             f"({type(mcfg).__name__}, {human(n)} parameters)",
             f"  launcher strategy {launcher_strategy()}, {world} process(es); batch {tcfg.batch_size} = "
             f"{world} x {tcfg.grad_accum_steps} x {tcfg.batch_size // max(1, world * tcfg.grad_accum_steps)}",
             f"  steps {tcfg.steps}, lr {tcfg.lr}, precision {tcfg.mixed_precision}, gradient checkpointing "
             f"{cfg.gradient_checkpointing}, expert parallel {cfg.expert_parallel}",
             f"  data {cfg.data}", f"  init_from {cfg.init_from}", f"  out_dir {cfg.out_dir} (resume {cfg.resume})"]
    return "\n".join(lines)


def replace_config_safe(cfg: RunConfig) -> RunConfig:
    """The run config without expert_parallel (for a description on one process: no process group needed)."""
    return dataclasses.replace(cfg, expert_parallel=False)


def _init_process_group_for_experts() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def run(cfg: RunConfig, load: Callable[[str], Any] | None = None, init_dir: str | Path | None = None,
        stop_at: int | None = None) -> RunResult:
    """Build and train the run (see the module doc). ``init_dir``: the resolved ``init_from`` folder (the CLI resolves
    hub names); defaults to ``cfg.init_from`` as a folder. ``stop_at``: stop after that step (train in chunks)."""
    tcfg = cfg.train_config()
    rank, world = world_info()
    if cfg.expert_parallel and world > 1:
        _init_process_group_for_experts()             # ExpertParallelMoE asks for the group when it is built
    if init_dir is None and cfg.init_from is not None:
        init_dir = cfg.init_from
    parts, init = build_run(cfg, load, init_dir)
    model = parts.model
    clip_fn = None
    if cfg.expert_parallel and world > 1:
        ddp_ignore_expert_params(model)               # experts differ per rank: DDP must not average them
        clip_fn = local_clip_fn(is_expert_param)      # M6 §3.4 local clipping of the experts
    if tcfg.out_dir and rank == 0:
        Path(tcfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(tcfg.out_dir) / "run.yaml", yaml.safe_dump(_as_dict(cfg), sort_keys=False))
    resume = "auto" if (cfg.resume and tcfg.out_dir) else None
    result = train(model, parts.loss_fn, parts.data, tcfg, eval_fn=parts.eval_fn, collate_fn=parts.collate_fn,
                   resume_from=resume, stop_at=stop_at, clip_fn=clip_fn, param_groups_fn=parts.param_groups_fn)
    n = sum(p.numel() for p in model.parameters())
    return RunResult(result, init, n, launcher_strategy(), world)


def _as_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source")
    return json.loads(json.dumps(d, default=str))


def launcher_env(config_file: str | Path, num_processes: int | None = None) -> dict[str, str]:
    """The environment variables ``accelerate launch --config_file config_file`` gives the processes it starts,
    computed by accelerate's own launcher code (its config loader and ``prepare_multi_gpu_env`` /
    ``prepare_deepspeed_cmd_env``): what :func:`mmkit.train.train` reads to pick FSDP / DeepSpeed and their options.
    ``scaled/cpu_rehearsal.py`` starts CPU processes with it (accelerate itself starts one process without GPUs)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(config_file), "--num_machines", "1", "--machine_rank", "0"]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv + ["x.py"]))
    before = dict(os.environ)
    if args.use_deepspeed:
        fields_ = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields_ + (["mixed_precision"] if mp_from_config else []))
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if before.get(k) != v}
