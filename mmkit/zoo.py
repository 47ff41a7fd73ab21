"""The one module that imports every system: names -> configs, models, checkpoints, apps.

    import mmkit
    mmkit.load_config("vlmo-tiny")            # = mmkit.zoo.load_config: every system's presets are registered
    mmkit.build_model("m6-base", device="meta")
    mmkit.load("m6-tiny-vqa")                 # a shipped / cached checkpoint (trained once by its recipe if missing)
    mmkit.zoo.vqa_models()                    # what apps/vqa.py offers (checkpoint shipped or cached)

The floors (:mod:`mmkit.config`, :mod:`mmkit.hub`, :mod:`mmkit.registry`) know no system; each system registers
itself when imported. This module imports them all, so the CLI, the apps, the benchmarks and notebooks that go
through it (or through ``mmkit.load`` / ``mmkit.build_model`` / ``mmkit.load_config``) see every name.
"""
from __future__ import annotations

from typing import Any

import mmkit.hub as hub
import mmkit.m6  # noqa: F401  (registers M6, M6-MoE, the ITM head, the text-to-image code LM and their recipes)
import mmkit.vlmo  # noqa: F401  (registers VLMo, its downstream heads (VQA, NLVR2, image classification) and app entry)
import mmkit.vlmo.runs  # noqa: F401  (VLMo's run tasks for scaled/: mmkit train RUN.yaml)
import mmkit.mplug  # noqa: F401  (registers mPLUG, its classifiers and its VQA app entry)
import mmkit.mplug.runs  # noqa: F401  (mPLUG's run tasks for scaled/: mmkit train RUN.yaml)
import mmkit.registry as registry
import mmkit.tokenizer  # noqa: F401  (registers the tokenizer-world recipe and the tokenizer loader)
import mmkit.vqgan  # noqa: F401  (registers the VQGAN and its vqgan-world recipe)
from mmkit.config import available_configs, build_model, load_config

__all__ = ["load", "load_config", "build_model", "available_configs", "recipe_names", "get_recipe", "vqa_models",
           "t2i_models", "run_recipe"]


def load(name: str, device: str = "cpu") -> Any:
    """A trained checkpoint by name (shipped, cached, else trained once by its recipe): see :mod:`mmkit.hub`."""
    return hub.load(name, device=device)


def recipe_names() -> list[str]:
    """Every recipe of every system."""
    return registry.recipe_names()


def get_recipe(name: str) -> registry.Recipe:
    return registry.get_recipe(name)


def run_recipe(name: str, out_dir, fast: bool = False, overwrite: bool = False) -> dict:
    return hub.run_recipe(name, out_dir, fast=fast, overwrite=overwrite)


def vqa_models(available_only: bool = True) -> list[registry.VQAModelEntry]:
    """VQA models of every system, in registration order (only those whose checkpoint is here, by default)."""
    return [e for e in registry.vqa_entries()
            if not available_only or e.checkpoint is None or hub.find_checkpoint(e.checkpoint) is not None]


def t2i_models(available_only: bool = True) -> list[registry.T2IModelEntry]:
    """Text-to-image generators of every system (only those whose checkpoints are all here, by default)."""
    return [e for e in registry.t2i_entries()
            if not available_only or all(hub.find_checkpoint(c) is not None for c in e.checkpoints)]
