"""scaled/: run configs chain checkpoints through one entry point (tiny overrides of the full-size run configs).

The 2-process launcher equivalences live in tests/test_scaled_dist.py; launch templates in test_scaled_launch.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmkit.zoo as zoo
from mmkit.runs import load_run_config, resolve_checkpoint, run
from mmkit.train import end_training

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "scaled" / "configs" / "runs"
TINY = RUNS / "tiny"


def _run(name: str, tmp: Path, init: str | None, **extra):
    ov = [f"out_dir={tmp / name}"] + ([f"init_from={tmp / init}"] if init else []) + [f"{k}={v}" for k, v in extra.items()]
    cfg = load_run_config(TINY / f"{name}.yaml", ov)
    try:
        return run(cfg, load=zoo.load)
    finally:
        end_training()


def test_every_run_config_loads_and_names_a_registered_task():
    names = sorted(p.name for p in RUNS.glob("*.yaml"))
    assert len(names) >= 15
    for p in RUNS.glob("*.yaml"):
        cfg = load_run_config(p)
        assert cfg.task in zoo.registry.run_task_names(), p
        assert cfg.out_dir and Path(cfg.out_dir).is_absolute()
        tcfg = cfg.train_config()
        assert tcfg.mixed_precision == "bf16" and tcfg.steps >= 1000, p     # full size: not the tiny values
    # every full-size config has a tiny override of the same run, which changes only sizes and paths
    for p in TINY.glob("*.yaml"):
        full, tiny = load_run_config(RUNS / p.name), load_run_config(p)
        assert tiny.task == full.task and tiny.expert_parallel == full.expert_parallel


def test_overrides_and_bad_input_name_the_fix(tmp_path):
    cfg = load_run_config(TINY / "m6_base_pretrain.yaml", ["train.steps=7", "model_overrides.d_model=16"])
    assert cfg.train["steps"] == 7 and cfg.model_overrides["d_model"] == 16 and cfg.train["batch_size"] == 8
    with pytest.raises(ValueError, match="not a run config key"):
        load_run_config(TINY / "m6_base_pretrain.yaml", ["stepz=3"])
    with pytest.raises(ValueError, match="unknown train field"):
        load_run_config(TINY / "m6_base_pretrain.yaml", ["train.stepz=3"]).train_config()
    bad = tmp_path / "loop.yaml"
    bad.write_text("base: loop.yaml\ntask: m6-pretrain\n")
    with pytest.raises(ValueError, match="leads back to itself"):
        load_run_config(bad)
    with pytest.raises(FileNotFoundError, match="run the previous stage first"):
        resolve_checkpoint(tmp_path / "nothing-here")


def test_m6_chain_stage0_pretrain_downstream(tmp_path):
    """M6 stage 0 -> pretraining -> VQA / text QA / poems: each stage starts from the previous one's latest checkpoint."""
    s0 = _run("m6_base_stage0", tmp_path, None)
    assert s0.result.step == 4 and s0.init is None
    pre = _run("m6_base_pretrain", tmp_path, "m6_base_stage0")
    # stage 0 trained the probe around M6 ("m6." prefix): every M6 weight came from it, its head was left out
    assert pre.init.loaded > 0 and pre.init.new == [] and all(k.startswith("head") for k in pre.init.dropped)
    # the image side is frozen in pretraining (extractor_lr_scale 0): stage 0's weights, unchanged by 4 steps
    w0 = load_file(str(resolve_checkpoint(tmp_path / "m6_base_stage0") / "model.safetensors"))
    w1 = load_file(str(resolve_checkpoint(tmp_path / "m6_base_pretrain") / "model.safetensors"))
    conv = [k for k in w1 if k.startswith("feature_extractor.")]
    assert conv and all(torch.equal(w0["m6." + k], w1[k]) for k in conv)
    moved = [k for k in w1 if k.startswith("blocks.") and not torch.equal(w0["m6." + k], w1[k])]
    assert moved, "pretraining must change the transformer"
    assert len(list((tmp_path / "m6_base_pretrain").glob("checkpoint-*"))) == 2      # save_every 2: steps 2 and 4
    for task in ("m6_base_vqa", "m6_base_text_qa", "m6_base_poems"):
        r = _run(task, tmp_path, "m6_base_pretrain")
        assert r.init.loaded == len(w1) and r.init.new == [] and r.init.dropped == [], task
        assert r.init.folder.endswith("checkpoint-4") and r.result.step == 3


def test_vlmo_chain_stage1_2_3_vqa(tmp_path):
    """VLMo §3.4: stage 1 (MIM) -> 2 (text MLM, attention frozen) -> 3 (pairs) -> VQA (a new head)."""
    _run("vlmo_base_stage1", tmp_path, None)
    s2 = _run("vlmo_base_stage2", tmp_path, "vlmo_base_stage1")
    w1 = load_file(str(resolve_checkpoint(tmp_path / "vlmo_base_stage1") / "model.safetensors"))
    w2 = load_file(str(resolve_checkpoint(tmp_path / "vlmo_base_stage2") / "model.safetensors"))
    attn = [k for k in w2 if ".self_attn." in k or ".ffn.vision." in k]
    assert attn and all(torch.equal(w1[k], w2[k]) for k in attn)        # stage 2 freezes attention and V-FFN
    assert any(not torch.equal(w1[k], w2[k]) for k in w2 if "language" in k)   # and trains the L-FFN
    assert s2.init.loaded == len(w1)
    s3 = _run("vlmo_base_stage3", tmp_path, "vlmo_base_stage2")
    assert s3.init.loaded == len(w2)
    vqa = _run("vlmo_base_vqa", tmp_path, "vlmo_base_stage3")
    assert vqa.init.new and all(k.startswith("vqa_head.") for k in vqa.init.new)


def test_mplug_chain_pretrain_vqa(tmp_path):
    _run("mplug_base_pretrain", tmp_path, None)
    vqa = _run("mplug_base_vqa", tmp_path, "mplug_base_pretrain")
    w = load_file(str(resolve_checkpoint(tmp_path / "mplug_base_pretrain") / "model.safetensors"))
    assert vqa.init.loaded == len(w) and vqa.init.new == []


def test_mmkit_params_lists_every_full_size_config_against_its_paper(capsys):
    from mmkit.cli import main
    from mmkit.scale import PAPER_PARAMS

    assert main(["params"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(lines) == sorted(PAPER_PARAMS) and len(lines) == 7
    for name, line in lines.items():
        counted = int(line.split()[1].replace(",", ""))
        assert abs(counted / PAPER_PARAMS[name][0] - 1) < 0.06, line       # every count within 6% of its paper
        assert f"{100 * (counted / PAPER_PARAMS[name][0] - 1):+.1f}%" in line
