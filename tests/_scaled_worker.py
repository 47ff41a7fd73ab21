"""Worker of tests/test_scaled_dist.py (not collected): started by torchrun with 2 CPU processes; runs the tiny M6 run
configs under several launcher strategies in the same processes and writes what rank 0 saw to a JSON file.

    torchrun --nproc_per_node 2 tests/_scaled_worker.py OUT.json TMP phase
    phase "main":   DDP / FSDP (from scaled/launch/accelerate/*.yaml, through accelerate's own launcher code),
                    expert parallelism straight and in two chunks (save shards at step 2, resume), then a DDP run whose
                    rank 1 kills itself (SIGKILL) after checkpoint-4: the launcher then tears the job down
    phase "resume": the killed run started again: it resumes from its latest checkpoint
    phase "deepspeed": ZeRO-2 and ZeRO-3 (needs deepspeed)
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "scaled" / "configs" / "runs" / "tiny"
LAUNCH = ROOT / "scaled" / "launch" / "accelerate"
STRATEGY_VARS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def common(tmp: Path, name: str, steps: int = 6) -> list[str]:
    return [f"out_dir={tmp / name}", "init_from=null", "task_options.extractor_lr_scale=1.0", f"train.steps={steps}",
            "gradient_checkpointing=false"]


def main() -> None:
    out, tmp, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    os.chdir(ROOT)                                    # DeepSpeed JSON paths in the accelerate configs are repo-relative
    import mmkit.m6.runs as m6runs
    import mmkit.zoo  # noqa: F401
    from accelerate.state import AcceleratorState
    from mmkit.runs import launcher_env, load_run_config, run

    rank = int(os.environ["RANK"])
    res: dict = {}

    def go(key: str, yaml_name: str, overrides: list[str], config_file: str | None = None, **kw):
        for k in STRATEGY_VARS:
            os.environ.pop(k, None)
        env = launcher_env(LAUNCH / config_file, 2) if config_file else {}
        env.pop("ACCELERATE_MIXED_PRECISION", None)   # the run config decides (fp32 here)
        env.pop("OMP_NUM_THREADS", None)
        os.environ.update(env)
        AcceleratorState._reset_state(reset_partial_state=True)
        r = run(load_run_config(TINY / yaml_name, overrides), **kw)
        res[key] = {"loss": [h["loss"] for h in r.result.history], "step": r.result.step,
                    "checkpoint": r.result.checkpoint, "strategy": r.strategy, "world": r.world_size,
                    "params_here": r.parameters}
        return r

    if phase == "main":
        go("ddp", "m6_base_pretrain.yaml", common(tmp, "ddp"), "ddp.yaml")
        go("fsdp", "m6_base_pretrain.yaml", common(tmp, "fsdp"), "fsdp.yaml")
        ep = [f"init_from={tmp / 'ep_init'}", "train.save_every=2"]      # all experts, written by the test
        go("ep", "m6_100b_pretrain.yaml", [f"out_dir={tmp / 'ep'}"] + ep, None)
        go("ep_chunk1", "m6_100b_pretrain.yaml", [f"out_dir={tmp / 'ep_chunks'}"] + ep, None, stop_at=2)
        go("ep_chunk2", "m6_100b_pretrain.yaml", [f"out_dir={tmp / 'ep_chunks'}"] + ep, None)
        out.write_text(json.dumps(res))               # before the kill: the parent reads it after the launcher fails
        calls = {"n": 0}
        orig = m6runs.global_pretrain_loss

        def dying_loss(model, batch):                 # rank 1 is lost during step 5 (after checkpoint-4 was saved)
            calls["n"] += 1
            if rank == 1 and calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(model, batch)
        m6runs.global_pretrain_loss = dying_loss
        go("killed", "m6_base_pretrain.yaml", common(tmp, "killed") + ["train.save_every=2"], "ddp.yaml")
    elif phase == "resume":
        go("resumed", "m6_base_pretrain.yaml", common(tmp, "killed") + ["train.save_every=2"], "ddp.yaml")
    elif phase == "deepspeed":
        go("zero2", "m6_base_pretrain.yaml", common(tmp, "zero2"), "ds_zero2.yaml")
        go("zero3", "m6_base_pretrain.yaml", common(tmp, "zero3"), "ds_zero3.yaml")
    if rank == 0:
        old = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**old, **res}))
    from mmkit.train import end_training
    end_training()


if __name__ == "__main__":
    main()
