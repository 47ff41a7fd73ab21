"""Configs, build_model, parameter counts, the hub cache, recipes, the CLI and the install files."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import mmkit
from mmkit import config as cfgmod
from mmkit import hub, registry, zoo
from mmkit.params import component_of, count_parameters

ROOT = Path(__file__).resolve().parents[1]


# --- a toy model registered only for these tests -------------------------------------------------------
@dataclass
class ToyConfig:
    model_type: str = "toy-test"
    vocab_size: int = 10        # rows of the tied embedding / output layer
    d_model: int = 4            # width
    n_layers: int = 2           # number of (attention, ffn) pairs
    widths: tuple = (4, 4)      # a tuple field, to check YAML lists come back as tuples


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.attn = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model) for _ in range(cfg.n_layers))
        self.ffn = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model, bias=False) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight      # tied, as M6's output layer


registry.register_model("toy-test", ToyConfig, ToyModel)
registry.register_preset("toy-test-small", lambda: ToyConfig(d_model=4))


def test_load_config_from_preset_yaml_and_base(tmp_path):
    assert mmkit.load_config("toy-test-small") == ToyConfig()
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model_type": "toy-test", "d_model": 8, "widths": [1, 2]}))
    c = mmkit.load_config(f)
    assert c.d_model == 8 and c.widths == (1, 2)
    f2 = tmp_path / "c2.yaml"
    f2.write_text(yaml.safe_dump({"base": "toy-test-small", "n_layers": 5}))
    assert mmkit.load_config(str(f2)) == ToyConfig(n_layers=5)
    # a config instance passes through unchanged
    same = ToyConfig(d_model=3)
    assert mmkit.load_config(same) is same


def test_load_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        mmkit.load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_type": "toy-test", "d_modle": 8}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['d_modle'\]"):
        mmkit.load_config(bad)
    nt = tmp_path / "nt.yaml"
    nt.write_text(yaml.safe_dump({"d_model": 8}))
    with pytest.raises(ValueError, match="model_type"):
        mmkit.load_config(nt)
    with pytest.raises(FileNotFoundError):
        mmkit.load_config(tmp_path / "missing.yaml")


def test_every_scaled_config_loads_and_builds_on_meta():
    files = sorted((ROOT / "scaled" / "configs").glob("*.yaml"))
    for f in files:
        cfg = mmkit.load_config(f)
        model = mmkit.build_model(cfg, device="meta")
        p = next(model.parameters())
        assert p.device.type == "meta", f"{f.name} built real tensors"


def test_build_model_on_meta_allocates_nothing():
    m = mmkit.build_model("toy-test-small", device="meta")
    assert all(p.is_meta for p in m.parameters())


def test_param_counts_by_component_and_tied_weights_once():
    cfg = ToyConfig(vocab_size=10, d_model=4, n_layers=2)
    counts = count_parameters(ToyModel(cfg))
    assert counts["embeddings"] == 10 * 4                  # tied lm_head not counted again
    assert counts["attention"] == 2 * (4 * 4 + 4)
    assert counts["ffn"] == 2 * 4 * 4
    assert counts["norms"] == 8
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert component_of("blocks.0.moe.experts.w1") == "experts"
    assert component_of("blocks.0.moe.router.weight") == "router"
    assert component_of("itm_head.weight") == "heads"


# --- hub + recipes ---------------------------------------------------------------------------------------
_calls = {"n": 0}


@registry.recipe("toy-test-recipe", "toy model for the hub tests", config="toy-test-small")
def _toy_recipe(out_dir: Path, fast: bool) -> dict:
    from safetensors.torch import save_model

    _calls["n"] += 1
    torch.manual_seed(0)
    model = ToyModel(ToyConfig())
    save_model(model, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfgmod.config_to_dict(model_cfg := ToyConfig())))
    return {"fast": fast, "d_model": model_cfg.d_model}


def test_hub_trains_once_then_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMKIT_FAST", "0")
    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    _calls["n"] = 0
    m1 = hub.load("toy-test-recipe")
    assert _calls["n"] == 1 and isinstance(m1, ToyModel) and not m1.training
    m2 = hub.load("toy-test-recipe")
    assert _calls["n"] == 1, "the second load must come from the cache, not retrain"
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert m2.lm_head.weight.data_ptr() == m2.embed.weight.data_ptr(), "tied weights stay tied after loading"
    info = hub.read_recipe_info(tmp_path / "cache" / "toy-test-recipe")
    assert info["command"].startswith("mmkit train toy-test-recipe") and info["metrics"]["d_model"] == 4


def test_hub_fast_mode_caches_separately_and_prefers_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setenv("MMKIT_FAST", "1")
    _calls["n"] = 0
    hub.load("toy-test-recipe")
    assert (tmp_path / "cache" / "toy-test-recipe@fast" / "recipe.json").exists()
    assert not (tmp_path / "cache" / "toy-test-recipe").exists()
    # a shipped copy wins over the cache
    hub.run_recipe("toy-test-recipe", tmp_path / "shipped" / "toy-test-recipe")
    assert hub.find_checkpoint("toy-test-recipe") == tmp_path / "shipped" / "toy-test-recipe"


def test_run_recipe_is_atomic(tmp_path):
    def boom(out_dir: Path, fast: bool) -> dict:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    registry.register_recipe(registry.Recipe("toy-test-boom", "fails halfway", boom))
    with pytest.raises(RuntimeError, match="interrupted"):
        hub.run_recipe("toy-test-boom", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [], "no temporary folder is left behind"


def test_hub_unknown_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path))
    with pytest.raises(KeyError, match="unknown checkpoint 'no-such-model'"):
        hub.load("no-such-model")


def test_shipped_checkpoints_load_and_match_their_recipe():
    shipped = [d for d in hub.SHIPPED_DIR.iterdir() if d.is_dir()] if hub.SHIPPED_DIR.exists() else []
    assert shipped, "the repository ships at least the kit's tokenizer"
    total = sum(f.stat().st_size for d in shipped for f in d.rglob("*") if f.is_file())
    assert total < 25 * 2**20, f"shipped checkpoints take {total / 2**20:.1f} MB; the budget is 25 MB"
    for d in shipped:
        info = hub.read_recipe_info(d)
        assert info, f"{d} has no recipe.json saying how it was made"
        assert info["recipe"] == d.name and not info["fast"]
        assert info["command"] == f"mmkit train {d.name} --out mmkit/checkpoints/{d.name}"
        r = zoo.get_recipe(d.name)
        obj = zoo.load(d.name)
        if r.kind == "model":
            assert dataclasses.asdict(obj.config) == dataclasses.asdict(mmkit.load_config(r.config))


# --- CLI and install files -------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmkit.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_explains_every_command():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("world", "train", "params", "bench", "configs", "tokenize"):
        assert cmd in r.stdout
    r = _cli("world", "--help")
    assert "--n" in r.stdout and "--out" in r.stdout


def test_cli_world_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    r = _cli("world", "--n", "4", "--size", "32", "--out", str(out), "--captions")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    img = Image.open(out)
    assert img.size[0] > 4 * 32 and "scenes/s" in r.stdout


def test_cli_bad_input_is_a_message_not_a_traceback():
    r = _cli("params", "no-such-config")
    assert r.returncode == 2 and "unknown config" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bench", "no-such-bench")
    assert r.returncode == 2 and "unknown benchmark" in r.stderr


def test_environment_yml_matches_the_lock_file():
    """conda users get exactly the pinned stack setup.sh installs (taming is installed --no-deps by hand)."""
    lock = [l.strip() for l in (ROOT / "requirements.lock").read_text().splitlines() if l.strip() and not l.startswith("#")]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(l for l in lock if not l.startswith("taming-transformers"))
    assert "torch==2.13.0" in lock, "torch must stay pinned to the local CPU build"
    assert not any(l.startswith(("torchvision", "nvidia-", "pytorch-lightning")) for l in lock)
