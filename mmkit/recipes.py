"""Recipes: named, reproducible procedures that produce a trained artefact (a checkpoint folder).

A recipe is a function ``train(out_dir: Path, fast: bool) -> dict`` that writes everything into ``out_dir``
(model.safetensors + config.json for models, tokenizer files for tokenizers) and returns the metrics it
measured. ``mmkit train NAME`` runs one; :mod:`mmkit.hub` runs one when a checkpoint is neither shipped
nor cached. Model files register their recipes next to their presets.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmkit.io import atomic_write_json


@dataclass(frozen=True)
class Recipe:
    name: str                                   # the hub name, e.g. "m6-tiny-pretrained"
    description: str                            # one line, shown by `mmkit train --list`
    train: Callable[[Path, bool], dict]         # (out_dir, fast) -> metrics
    config: str | None = None                   # preset whose config the checkpoint must carry (models)
    kind: str = "model"                         # "model" or "tokenizer"


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    _RECIPES[recipe.name] = recipe
    return recipe


def recipe(name: str, description: str, config: str | None = None, kind: str = "model"):
    """Decorator form of :func:`register_recipe`."""
    def wrap(fn: Callable[[Path, bool], dict]) -> Callable[[Path, bool], dict]:
        register_recipe(Recipe(name, description, fn, config, kind))
        return fn
    return wrap


def _ensure_loaded() -> None:
    import mmkit.models  # noqa: F401  (model files register their recipes)


def get_recipe(name: str) -> Recipe:
    _ensure_loaded()
    if name not in _RECIPES:
        raise KeyError(f"no recipe named {name!r}; available: {available_recipes()}")
    return _RECIPES[name]


def available_recipes() -> list[str]:
    _ensure_loaded()
    return sorted(_RECIPES)


def run_recipe(name: str, out_dir: str | Path, fast: bool = False, overwrite: bool = False) -> dict:
    """Run recipe ``name`` into ``out_dir`` atomically: train in a temporary sibling folder, then rename.

    An interrupted run never leaves a half-written checkpoint where the hub would pick it up.
    """
    r = get_recipe(name)
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


# --- the foundation's own recipe: the kit's tokenizer -----------------------------------------------
@recipe("tokenizer-world", "WordPiece tokenizer (EN + ZH by character) trained on the Shapes World's text",
        kind="tokenizer")
def _train_world_tokenizer(out_dir: Path, fast: bool) -> dict:
    from mmkit.tokenizer import train_world_tokenizer

    tok = train_world_tokenizer()          # deterministic and a few seconds: fast mode changes nothing
    tok.save_pretrained(out_dir)
    return {"vocab_size": len(tok)}
