"""scaled/launch/: every accelerate YAML parses with accelerate's own loader (and gives the launcher environment that
mmkit.train reads), every shell template passes `bash -n` and a dry run printing the command it would launch, every
DeepSpeed JSON loads with DeepSpeed's own config class (when deepspeed is installed)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from mmkit.runs import launcher_env

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scaled" / "launch"
RUN = "scaled/configs/runs/m6_base_pretrain.yaml"
EXPECTED = {"ddp.yaml": DistributedType.MULTI_GPU, "multi_node.yaml": DistributedType.MULTI_GPU,
            "fsdp.yaml": DistributedType.FSDP, "ds_zero2.yaml": DistributedType.DEEPSPEED,
            "ds_zero3.yaml": DistributedType.DEEPSPEED}


def test_every_accelerate_yaml_parses_with_accelerates_loader():
    files = sorted(p.name for p in (LAUNCH / "accelerate").glob("*.yaml"))
    assert files == sorted(EXPECTED)
    for name, kind in EXPECTED.items():
        cfg = load_config_from_file(str(LAUNCH / "accelerate" / name))
        assert cfg.distributed_type == kind, name
    fsdp = load_config_from_file(str(LAUNCH / "accelerate" / "fsdp.yaml"))
    assert fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "TransformerBlock"
    assert load_config_from_file(str(LAUNCH / "accelerate" / "multi_node.yaml")).num_machines > 1


def test_accelerate_launch_environment_selects_the_strategy():
    """What `accelerate launch --config_file F` exports (accelerate's own code) is what mmkit.train reads."""
    env = launcher_env(LAUNCH / "accelerate" / "fsdp.yaml", 2)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "TransformerBlock"
    for stage in (2, 3):
        env = launcher_env(LAUNCH / "accelerate" / f"ds_zero{stage}.yaml", 2)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        ds = json.loads((ROOT / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
        assert ds["zero_optimization"]["stage"] == stage
    env = launcher_env(LAUNCH / "accelerate" / "ddp.yaml", 2)
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


TEMPLATES = {
    "torchrun.sh": ([RUN, "train.steps=10"], {"NPROC": "8", "NNODES": "2", "HEAD": "node001"},
                    ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                     "node001:29500", "scaled/train.py", RUN, "train.steps=10"]),
    "slurm_torchrun.sbatch": ([RUN], {"SLURM_NNODES": "16", "HEAD_NODE": "gpu-a01"},
                              ["srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "16", "--nproc_per_node", "8",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-a01:29500", "scaled/train.py", RUN]),
    "slurm_accelerate.sbatch": (["scaled/launch/accelerate/ds_zero3.yaml", RUN, "train.steps=5"],
                                {"SLURM_NNODES": "4", "HEAD_NODE": "gpu-a01"}, ["srun", "--kill-on-bad-exit=1", "bash",
                                                                                "-c"]),
}


def test_shell_templates_pass_bash_n_and_dry_run():
    found = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert found == sorted(TEMPLATES)
    for name, (args, env, want) in TEMPLATES.items():
        path = LAUNCH / name
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, name
        r = subprocess.run(["bash", str(path), *args], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, DRY_RUN="1", **env))
        assert r.returncode == 0, (name, r.stderr)
        words = [w for w in shlex.split(r.stdout) if w not in ("--rdzv_id", "mmkit")]
        assert words[:len(want)] == want, (name, words)
        if name == "slurm_accelerate.sbatch":
            inner = shlex.split(words[-1])
            assert inner[:4] == ["accelerate", "launch", "--config_file", "scaled/launch/accelerate/ds_zero3.yaml"]
            assert inner[inner.index("--num_processes") + 1] == "32" and "$SLURM_NODEID" in inner
            assert inner[-3:] == ["scaled/train.py", RUN, "train.steps=5"]
        if name.endswith(".sbatch"):
            text = path.read_text()
            assert "scontrol show hostnames" in text and "#SBATCH --requeue" in text
    # a missing run config is refused with the usage line
    r = subprocess.run(["bash", str(LAUNCH / "torchrun.sh")], capture_output=True, text=True, env=dict(os.environ,
                                                                                                       DRY_RUN="1"))
    assert r.returncode != 0 and "usage" in r.stderr


def _filled(ds: dict) -> dict:
    """The JSON with its "auto" values as mmkit.train / accelerate fill them for 1 process, batch 8, fp32 and bf16."""
    ds = json.loads(json.dumps(ds))
    ds.update(train_batch_size=8, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1,
              gradient_clipping=1.0, bf16={"enabled": True})
    for k, v in ds["zero_optimization"].items():
        if v == "auto":
            ds["zero_optimization"][k] = 1_000_000
    return ds


DS_CHECK = """
import json, sys
from deepspeed.runtime.config import DeepSpeedConfig
for path in sys.argv[1:]:
    c = DeepSpeedConfig(json.loads(open(path).read()))
    print(json.dumps({"stage": c.zero_optimization_stage, "batch": c.train_batch_size, "bf16": c.bfloat16_config.enabled}))
"""


def test_deepspeed_jsons_load_with_deepspeeds_config_class(tmp_path):
    files = sorted((LAUNCH / "deepspeed").glob("*.json"))
    assert [p.name for p in files] == ["zero2.json", "zero3.json"]
    paths = []
    for p in files:
        ds = json.loads(p.read_text())
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping"):
            assert ds[k] == "auto", (p.name, k)              # the run config's TrainConfig decides them
        q = tmp_path / p.name
        q.write_text(json.dumps(_filled(ds)))
        paths.append(str(q))
    py = os.environ.get("MMKIT_DEEPSPEED_PYTHON") or sys.executable
    r = subprocess.run([py, "-c", DS_CHECK, *paths], capture_output=True, text=True)
    if r.returncode != 0 and "No module named 'deepspeed'" in r.stderr:
        pytest.skip("deepspeed is not installed (not in requirements.lock); MMKIT_DEEPSPEED_PYTHON names one that has it")
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads(line) for line in r.stdout.strip().splitlines() if line.startswith("{")]
    assert got == [{"stage": 2, "batch": 8, "bf16": True}, {"stage": 3, "batch": 8, "bf16": True}]
