"""Trained tiny checkpoints by name: shipped with the repository, else cached, else trained once by a recipe.

    model = mmkit.load("m6-tiny-pretrained")           # what users call (mmkit.zoo: every system imported)
    model = mmkit.hub.load("m6-tiny-pretrained")       # the same, for names whose system is already imported

Look-up order for a name:
1. ``mmkit/checkpoints/NAME/`` — shipped in the repository (each holds recipe.json with the exact command
   that reproduced it);
2. ``$MMKIT_CACHE/NAME/`` (default ``~/.cache/mmkit``) — trained earlier on this machine;
3. otherwise the recipe NAME is run (with a progress bar) and its result cached, so notebooks and apps never
   wait twice. In fast mode (``MMKIT_FAST=1``) a missing checkpoint is trained by the recipe's fast path and
   cached separately as ``NAME@fast`` so it never stands in for the full one.

A folder is read by the loader registered for its ``kind`` (recipe.json): models by :func:`load_model_dir`
(config.json + model.safetensors), the tokenizer by :mod:`mmkit.tokenizer`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_model

import mmkit.registry as registry
from mmkit.config import build_model, config_from_dict
from mmkit.io import atomic_write_json, fast_mode

__all__ = ["SHIPPED_DIR", "cache_root", "find_checkpoint", "checkpoint_dir", "load", "load_model_dir", "run_recipe",
           "read_recipe_info", "recipe_names"]

SHIPPED_DIR = Path(__file__).parent / "checkpoints"


def cache_root() -> Path:
    return Path(os.environ.get("MMKIT_CACHE") or Path.home() / ".cache" / "mmkit")


def is_complete(d: Path) -> bool:
    """A checkpoint folder is complete once its recipe.json exists (written last, atomically)."""
    return (d / "recipe.json").exists()


def find_checkpoint(name: str) -> Path | None:
    """Where ``name`` already is (shipped, cached, or cached fast-mode), or None."""
    candidates = [SHIPPED_DIR / name, cache_root() / name]
    if fast_mode():
        candidates.append(cache_root() / f"{name}@fast")
    return next((d for d in candidates if is_complete(d)), None)


def recipe_names() -> list[str]:
    """Recipes of the systems imported so far (``mmkit.zoo.recipe_names()`` lists every one)."""
    return registry.recipe_names()


def checkpoint_dir(name: str, train_if_missing: bool = True) -> Path:
    """The folder holding checkpoint ``name``; trains it (and caches it) if it is nowhere yet."""
    found = find_checkpoint(name)
    if found is not None:
        return found
    if not train_if_missing:
        raise FileNotFoundError(f"checkpoint {name!r} is neither shipped nor cached; run `mmkit train {name}`")
    if name not in registry.recipe_names():
        raise KeyError(f"unknown checkpoint {name!r}: no shipped folder, no cache entry, no recipe. "
                       f"Recipes: {registry.recipe_names()}")
    fast = fast_mode()
    out = cache_root() / (f"{name}@fast" if fast else name)
    print(f"mmkit.hub: {name!r} is not cached yet; training it once{' (fast mode)' if fast else ''} -> {out}")
    run_recipe(name, out, fast=fast, overwrite=True)
    return out


def load(name: str, device: str = "cpu"):
    """Load checkpoint ``name`` (see module doc): a model in eval mode with ``.config``, or a tokenizer."""
    d = checkpoint_dir(name)
    kind = read_recipe_info(d).get("kind", "model")
    if kind == "model":
        return load_model_dir(d, device=device)
    fn = registry.loader(kind)
    if fn is None:
        raise ValueError(f"{d}: no loader for checkpoints of kind {kind!r}; {registry.missing_hint()}")
    return fn(d, device)


def load_model_dir(d: str | Path, device: str = "cpu"):
    """Build the model that ``config.json`` describes and load ``model.safetensors`` into it (strict)."""
    d = Path(d)
    cfg_file, weights = d / "config.json", d / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{d} is not a model checkpoint: {f.name} is missing")
    cfg = config_from_dict(json.loads(cfg_file.read_text(encoding="utf-8")), source=str(cfg_file))
    model = build_model(cfg)
    missing, unexpected = load_model(model, weights, strict=False, device=device)
    if missing or unexpected:
        raise RuntimeError(f"{weights} does not match {type(model).__name__}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}. Was it saved by another version of the model?")
    model.config = cfg
    return model.to(device).eval()


def run_recipe(name: str, out_dir: str | Path, fast: bool = False, overwrite: bool = False) -> dict:
    """Run recipe ``name`` into ``out_dir`` atomically: train in a temporary sibling folder, then rename.

    An interrupted run never leaves a half-written checkpoint where the hub would pick it up.
    """
    r = registry.get_recipe(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        t0 = time.time()
        tmp.chmod(0o755)                    # mkdtemp makes 0700 folders; checkpoints are readable like any file
        metrics = r.train(tmp, fast) or {}
        command = f"mmkit train {name} --out {out_dir}" + (" --fast" if fast else "")
        atomic_write_json(tmp / "recipe.json", {
            "recipe": name, "fast": fast, "config": r.config, "kind": r.kind, "command": command,
            "seconds": round(time.time() - t0, 1), "metrics": metrics,
        })
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def read_recipe_info(ckpt_dir: str | Path) -> dict:
    p = Path(ckpt_dir) / "recipe.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}
