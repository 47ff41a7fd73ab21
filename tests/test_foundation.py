"""Configs, build_model, parameter counts, the hub cache, recipes, the CLI and the install files."""
from __future__ import annotations

import dataclasses
import json
import re
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
from mmkit import io as mio
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
    # hidden folders are saves in progress (mmkit.io.make_tmp_dir), not shipped checkpoints
    shipped = ([d for d in hub.SHIPPED_DIR.iterdir() if d.is_dir() and not d.name.startswith(".")]
               if hub.SHIPPED_DIR.exists() else [])
    assert shipped, "the repository ships at least the kit's tokenizer"
    # the size budget of each system's shipped checkpoints (M6's includes the shared tokenizer and VQGAN)
    budgets_mb = {"vlmo": 10, "mplug": 12, "m6": 25}
    sizes: dict[str, int] = {}
    for d in shipped:
        system = d.name.split("-")[0] if d.name.split("-")[0] in budgets_mb else "m6"
        sizes[system] = sizes.get(system, 0) + sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    for system, total in sizes.items():
        assert total < budgets_mb[system] * 2**20, \
            f"{system}'s shipped checkpoints take {total / 2**20:.1f} MB; its budget is {budgets_mb[system]} MB"
    # issue 12: all of them together at most 25 MB (decimal: what a clone downloads)
    assert sum(sizes.values()) <= 25e6, f"the shipped checkpoints take {sum(sizes.values()) / 1e6:.2f} MB of 25"
    for d in shipped:
        info = hub.read_recipe_info(d)
        assert info, f"{d} has no recipe.json saying how it was made"
        assert info["recipe"] == d.name and not info["fast"]
        assert info["command"] == f"mmkit train {d.name} --out mmkit/checkpoints/{d.name}"
        r = zoo.get_recipe(d.name)
        obj = zoo.load(d.name)
        if r.kind == "model":
            got, preset = dataclasses.asdict(obj.config), dataclasses.asdict(mmkit.load_config(r.config))
            if got.get("model_type", "").startswith("mplug"):
                # mPLUG checkpoints are stored without the momentum encoders (a training device, mplug/recipes.py)
                assert got["momentum_encoders"] is False
                preset["momentum_encoders"] = False
            assert got == preset, d.name


def test_hub_loads_names_only_and_folders_through_load_path(tmp_path, monkeypatch):
    """Issue 17: hub.load("/any/dir") and hub.load("../../x") loaded any folder holding a recipe.json."""
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    hub.run_recipe("toy-test-recipe", tmp_path / "elsewhere" / "toy")
    for bad in (str(tmp_path / "elsewhere" / "toy"), "../../x", "../elsewhere/toy", "a/b", "~/toy", "..", ".hidden",
                "toy\\x", "", "x" * 200, tmp_path / "elsewhere" / "toy", None):
        with pytest.raises(ValueError, match="is not a checkpoint name.*never paths"):
            hub.load(bad)
    with pytest.raises(ValueError, match="load_path"):
        zoo.load(str(tmp_path / "elsewhere" / "toy"))
    with pytest.raises(ValueError, match="not a checkpoint name"):
        hub.find_checkpoint("../../etc")
    m = hub.load_path(tmp_path / "elsewhere" / "toy")                   # a folder: the explicit call
    assert isinstance(m, ToyModel) and not m.training
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        hub.load_path(tmp_path / "nowhere")
    assert hub.check_name("m6-tiny-vqa") == "m6-tiny-vqa" and hub.check_name("m6-tiny-vqa@fast")


def _flip(path: Path, offset_from_end: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40                                       # one data byte: a weight changes, the
    path.write_bytes(bytes(data))                                        # file still parses


def test_recipes_record_sha256_and_loads_refuse_damaged_files(tmp_path, monkeypatch):
    """Issue 17: a safetensors file with flipped data bytes loaded silently (weights off by ~1e6); a truncated one gave a
    raw SafetensorError without the file name or a fix."""
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMKIT_FAST", "0")
    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    d = tmp_path / "cache" / "toy-test-recipe"
    hub.load("toy-test-recipe")
    info = hub.read_recipe_info(d)
    assert set(info["sha256"]) == {"config.json", "model.safetensors"}
    assert info["sha256"]["model.safetensors"] == mio.sha256_file(d / "model.safetensors")
    _flip(d / "model.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"toy-test-recipe/model\.safetensors is corrupt.*"
                                                  r"mmkit train toy-test-recipe --overwrite.*delete the cache folder"):
        hub.load("toy-test-recipe")
    # without the recorded hash the flipped byte would have gone unnoticed: the weights really are different
    from safetensors.torch import load_file
    hub.run_recipe("toy-test-recipe", tmp_path / "good")
    flipped, good = load_file(d / "model.safetensors"), load_file(tmp_path / "good" / "model.safetensors")
    assert flipped.keys() == good.keys() and any(not torch.equal(flipped[k], good[k]) for k in good)
    # truncated: a CheckpointError naming the file and the fix, also when no hash was recorded
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    (tmp_path / "good" / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(hub.CheckpointError, match="model.safetensors is corrupt"):
        hub.load_path(tmp_path / "good")
    (tmp_path / "good" / "recipe.json").unlink()
    with pytest.raises(hub.CheckpointError, match=r"good/model\.safetensors cannot be read as safetensors.*truncated"):
        hub.load_path(tmp_path / "good")
    # a missing recorded file, a malformed config.json
    hub.run_recipe("toy-test-recipe", tmp_path / "c2")
    (tmp_path / "c2" / "config.json").unlink()
    with pytest.raises(hub.CheckpointError, match=r"c2/config\.json is missing \(recipe\.json records it\)"):
        hub.load_path(tmp_path / "c2")
    hub.run_recipe("toy-test-recipe", tmp_path / "c3")
    (tmp_path / "c3" / "recipe.json").write_text(json.dumps({"recipe": "toy-test-recipe", "kind": "model"}))
    (tmp_path / "c3" / "config.json").write_text('{"model_type": "toy-test", "d_model": 4,')
    with pytest.raises(hub.CheckpointError, match=r"c3/config\.json: this model config is not valid JSON \(line 1.*"
                                                  r"mmkit train toy-test-recipe"):
        hub.load_path(tmp_path / "c3")


def test_shipped_recipes_record_every_files_sha256():
    for d in (p for p in hub.SHIPPED_DIR.iterdir() if p.is_dir() and not p.name.startswith(".")):
        recorded = hub.read_recipe_info(d).get("sha256")
        assert recorded == hub.file_hashes(d), f"{d.name}: recipe.json's sha256 do not match its files"
        hub.verify_checkpoint(d)


def test_weights_that_do_not_fit_the_model_are_a_clear_error(tmp_path):
    """Issue 17: another model's folder / one extra layer crashed with "TypeError: 'set' object is not subscriptable"."""
    from safetensors.torch import save_model

    def folder(name, model, cfg):
        d = tmp_path / name
        d.mkdir()
        save_model(model, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfgmod.config_to_dict(cfg)))
        return d

    class Extra(ToyModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.extra = nn.Linear(2, 2)

    d = folder("extra", Extra(ToyConfig()), ToyConfig())                 # one extra layer
    with pytest.raises(hub.CheckpointError, match=r"does not match ToyModel: missing \[\].*unexpected "
                                                  r"\['extra.bias', 'extra.weight'\]"):
        hub.load_model_dir(d)
    d = folder("other", nn.Sequential(nn.Linear(2, 2)), ToyConfig())     # another model's weights
    with pytest.raises(hub.CheckpointError, match=r"missing \['attn.0.bias', .*unexpected \['0.bias', '0.weight'\]"):
        hub.load_model_dir(d)
    d = folder("wide", ToyModel(ToyConfig(d_model=8)), ToyConfig())      # another width, same names
    with pytest.raises(hub.CheckpointError, match="does not fit ToyModel: size mismatch"):
        hub.load_model_dir(d)


_KILL_RECIPE = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_foundation                                            # registers toy-test-recipe
from mmkit import hub
out = Path({out!r})
hub.run_recipe("toy-test-recipe", out)
real = Path.rename
def rename(self, target):
    real(self, target)
    if self.name == out.name:
        os._exit(9)                                               # killed between the two renames
    return target
Path.rename = rename
hub.run_recipe("toy-test-recipe", out, overwrite=True)
"""


def test_a_recipe_killed_between_its_renames_is_recovered_and_a_failed_swap_rolled_back(tmp_path, monkeypatch):
    out = tmp_path / "cache" / "toy-test-recipe"
    code = _KILL_RECIPE.format(tests=str(Path(__file__).parent), out=str(out))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 9, r.stderr[-2000:]
    assert not out.exists() and len(list(out.parent.iterdir())) == 2    # only the hidden .tmp and .old copies
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMKIT_FAST", "0")
    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    _calls["n"] = 0
    assert hub.find_checkpoint("toy-test-recipe") == out                 # put back: not retrained, not lost
    hub.load("toy-test-recipe")
    assert _calls["n"] == 0
    hub.run_recipe("toy-test-recipe", out, overwrite=True)               # the writer cleans what is left
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy-test-recipe"]
    # the second rename fails: the previous checkpoint is put back
    before = (out / "recipe.json").read_text()
    real = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp") and Path(target) == out:
            raise OSError("rename failed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        hub.run_recipe("toy-test-recipe", out, overwrite=True)
    monkeypatch.setattr(Path, "rename", real)
    assert (out / "recipe.json").read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy-test-recipe"]


def test_atomic_writes_get_normal_permissions(tmp_path):
    """Issue 17: files written by atomic_write_* got mode 0600 (mkstemp's)."""
    import os

    old = os.umask(0o022)
    try:
        mio.atomic_write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "b.txt").write_text("old")
        os.chmod(tmp_path / "b.txt", 0o640)
        mio.atomic_write_text(tmp_path / "b.txt", "new")                # an existing file keeps its mode
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640 and (tmp_path / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]


# --- configs: types, ranges, bases ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"d_model": "128"}, r"d_model must be a whole number.*got str '128'"),
    ({"n_layers": -1}, r"n_layers must be >= 1; got int -1"),
    ({"n_layers": 0}, r"n_layers must be >= 1"),
    ({"d_model": 4.5}, r"d_model must be a whole number"),
    ({"d_model": True}, r"d_model must be a whole number"),
    ({"widths": 16}, r"widths must be a list \(e\.g\. \[4, 4\]\)"),
    ({"widths": [4, "x"]}, r"widths item 1 \('x'\) must be a whole number"),
    ({"vocab_size": None}, r"vocab_size must be a whole number"),
])
def test_config_values_are_type_checked(tmp_path, fields, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model_type": "toy-test", **fields}))
    with pytest.raises(ValueError, match=r"c\.yaml: ToyConfig\." + message):
        mmkit.load_config(f)


def test_m6_config_values_from_the_issue_are_refused():
    for fields, message in ((dict(d_model="128"), "d_model must be a whole number"),
                            (dict(n_layers=-1), "n_layers must be >= 1"),
                            (dict(tie_word_embeddings="no"), "tie_word_embeddings must be true or false"),
                            (dict(feature_channels=16), "feature_channels must be a list"),
                            (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
                            (dict(layer_norm_eps=float("nan")), "must be a finite number")):
        with pytest.raises(ValueError, match=message):
            cfgmod.config_from_dict({"base": "m6-tiny", **fields})
    with pytest.raises(ValueError, match="n_layers must be >= 1"):                    # instances built in Python too
        mmkit.build_model(dataclasses.replace(mmkit.load_config("m6-tiny"), n_layers=-1), device="meta")
    assert cfgmod.config_from_dict({"base": "m6-tiny", "attn_dropout": None, "dropout": 0}).dropout == 0


def test_config_base_loops_and_bad_yaml_are_clear(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ValueError, match=r"'base' leads back to itself \(self\.yaml -> self\.yaml\)"):
        mmkit.load_config(tmp_path / "self.yaml")                       # used to recurse until RecursionError
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nn_layers: 3\n")
    with pytest.raises(ValueError, match=r"a\.yaml -> b\.yaml -> a\.yaml"):
        mmkit.load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: toy-test-small\nn_layers: 3\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")                   # a file base, relative to the file's folder
    assert mmkit.load_config(tmp_path / "d.yaml") == ToyConfig(n_layers=3)
    (tmp_path / "bad.yaml").write_text("model_type: toy-test\n  d_model: [1,\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML \(line 2"):
        mmkit.load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        mmkit.load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="'base' must name a preset"):
        cfgmod.config_from_dict({"base": 5})


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


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path):
    r = _cli("params", "no-such-config")
    assert r.returncode == 2 and "unknown config" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bench", "no-such-bench")
    assert r.returncode == 2 and "unknown benchmark" in r.stderr
    # issue 17: --out DIR gave a traceback, --size 20000 a misleading error, --n 3000000 ran with no limit
    for args, message in ((["--out", str(tmp_path)], "is a folder; give a file name"),
                          (["--out", str(tmp_path / "grid.jpg")], "written as PNG"),
                          (["--size", "20000"], "--size 20000: give 8 to 512 pixels"),
                          (["--n", "3000000"], "--n 3000000: give 1 to 1024 scenes"),
                          (["--n", "0"], "give 1 to 1024"),
                          (["--max-objects", "12"], "give 1 to 9"),
                          (["--seed", "-4"], "--seed -4")):
        r = _cli("world", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    (tmp_path / "bad.yaml").write_text("model_type: m6\nd_model: '128'\n")
    r = _cli("params", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "d_model must be a whole number" in r.stderr and "Traceback" not in r.stderr


def test_environment_yml_matches_the_lock_file():
    """conda users get exactly the pinned stack setup.sh installs (taming is installed --no-deps by hand)."""
    lock = [l.strip() for l in (ROOT / "requirements.lock").read_text().splitlines() if l.strip() and not l.startswith("#")]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(l for l in lock if not l.startswith("taming-transformers"))
    assert "torch==2.13.0" in lock, "torch must stay pinned to the local CPU build"
    assert not any(l.startswith(("torchvision", "nvidia-", "pytorch-lightning")) for l in lock)


def test_a_wrong_device_is_named_before_any_file_is_read():
    """Issue 17 sweep: mmkit.load(name, device='cuda') on a machine without a GPU blamed the weights ("does not fit ...
    saved from a model with another config"); device='tpu' called the shipped file truncated."""
    import torch

    import mmkit

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda': this machine has no CUDA GPU.*use device='cpu'"):
            mmkit.load("m6-tiny-vqa", device="cuda")
    for bad in ("tpu", "gpu0", 3.5):
        with pytest.raises(ValueError, match=rf"device={bad!r} is not a torch device.*use 'cpu'"):
            mmkit.load("m6-tiny-vqa", device=bad)
    with pytest.raises(ValueError, match="checkpoints load on 'cpu' or 'cuda', not 'meta'"):
        mmkit.load("m6-tiny-vqa", device="meta")


@pytest.mark.parametrize("args,words", [
    (("bench", "precision", "--widths", "-1", "--layers", "1"), "argument --widths: -1 must be at least 1"),
    (("bench", "m6", "--batch", "-1", "--repeats", "1"), "argument --batch: -1 must be at least 1"),
    (("bench", "t2i", "--batch", "0", "--repeats", "1", "--no-vqgan"), "argument --batch: 0 must be at least 1"),
    (("bench", "moe", "--threads", "-2"), "argument --threads: -2 must be 0 or more"),
    (("train", "scaled/configs/runs/m6_base_vqa.yaml", "train.steps=-1", "--dry-run"),
     "TrainConfig: steps must be a positive whole number, got -1"),
    (("train", "scaled/configs/runs/m6_base_vqa.yaml", "train.lr=abc", "--dry-run"),
     "TrainConfig: lr must be a number > 0 .*got 'abc'"),
])
def test_cli_sizes_and_train_values_are_checked_up_front(args, words):
    """Issue 17 sweep: negative benchmark sizes ended in 'negative dimension' tracebacks, --batch 0 blamed the
    prompts, and --dry-run printed train.steps=-1 / train.lr=abc and exited 0 (the real run then failed)."""
    r = subprocess.run([sys.executable, "-m", "mmkit.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode != 0 and re.search(words, r.stderr), (r.returncode, r.stderr[-600:])
    assert "Traceback" not in r.stderr


def test_a_folder_without_recorded_hashes_says_it_cannot_be_checked(tmp_path):
    """Issue 17 sweep: a checkpoint copy without recipe.json and with a flipped byte loaded silently. Nothing is left
    to check it against, so load_path says so; a folder with records is checked (see the corrupt-file tests)."""
    import shutil
    import warnings

    src = hub.checkpoint_dir("m6-tiny-vqa")
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # the recorded folder loads without a warning
        hub.load_path(d)
    (d / "recipe.json").unlink()
    state = json.loads((d / "trainer_state.json").read_text())
    state.pop("sha256", None)
    (d / "trainer_state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="no sha256 is recorded for its files .* cannot be detected"):
        hub.load_path(d)
