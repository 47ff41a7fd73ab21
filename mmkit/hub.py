"""Trained tiny checkpoints by name: shipped with the repository, else cached, else trained once.

    model = mmkit.hub.load("m6-tiny-pretrained")   # an nn.Module in eval mode, with .config

Look-up order for a name:
1. ``mmkit/checkpoints/NAME/`` — shipped in the repository (each holds recipe.json with the exact command
   that reproduced it);
2. ``$MMKIT_CACHE/NAME/`` (default ``~/.cache/mmkit``) — trained earlier on this machine;
3. otherwise the recipe NAME is run (with a progress bar) and its result cached, so notebooks and apps never
   wait twice. In fast mode (``MMKIT_FAST=1``) a missing checkpoint is trained by the recipe's fast path and
   cached separately as ``NAME@fast`` so it never stands in for the full one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmkit.io import fast_mode

SHIPPED_DIR = Path(__file__).parent / "checkpoints"


def cache_root() -> Path:
    return Path(os.environ.get("MMKIT_CACHE") or Path.home() / ".cache" / "mmkit")


def _complete(d: Path) -> bool:
    return (d / "recipe.json").exists()


def find_checkpoint(name: str) -> Path | None:
    """Where ``name`` already is (shipped, cached, or cached fast-mode), or None."""
    candidates = [SHIPPED_DIR / name, cache_root() / name]
    if fast_mode():
        candidates.append(cache_root() / f"{name}@fast")
    return next((d for d in candidates if _complete(d)), None)


def checkpoint_dir(name: str, train_if_missing: bool = True) -> Path:
    """The folder holding checkpoint ``name``; trains it (and caches it) if it is nowhere yet."""
    found = find_checkpoint(name)
    if found is not None:
        return found
    from mmkit.recipes import available_recipes, run_recipe

    if not train_if_missing:
        raise FileNotFoundError(f"checkpoint {name!r} is neither shipped nor cached; run `mmkit train {name}`")
    if name not in available_recipes():
        raise KeyError(f"unknown checkpoint {name!r}: no shipped folder, no cache entry, no recipe. "
                       f"Recipes: {available_recipes()}")
    fast = fast_mode()
    out = cache_root() / (f"{name}@fast" if fast else name)
    print(f"mmkit.hub: {name!r} is not cached yet; training it once{' (fast mode)' if fast else ''} -> {out}")
    run_recipe(name, out, fast=fast, overwrite=True)
    return out


def load(name: str, device: str = "cpu"):
    """Load a model checkpoint by name (see module doc) as an eval-mode module with ``.config``."""
    from mmkit.recipes import read_recipe_info

    d = checkpoint_dir(name)
    info = read_recipe_info(d)
    if info.get("kind") == "tokenizer":
        from mmkit.tokenizer import load_tokenizer
        return load_tokenizer(d)
    return load_model_dir(d, device=device)


def load_model_dir(d: str | Path, device: str = "cpu"):
    """Build the model that ``config.json`` describes and load ``model.safetensors`` into it (strict)."""
    from safetensors.torch import load_model

    from mmkit.config import build_model, config_from_dict

    d = Path(d)
    cfg_file, weights = d / "config.json", d / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{d} is not a model checkpoint: {f.name} is missing")
    cfg = config_from_dict(json.loads(cfg_file.read_text(encoding="utf-8")), source=str(cfg_file))
    model = build_model(cfg)
    missing, unexpected = load_model(model, weights, strict=False, device=device)
    if missing or unexpected:
        raise RuntimeError(f"{weights} does not match {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}. Was it saved by another version of the model?")
    model.config = cfg
    return model.to(device).eval()
