"""mmkit: M6, VLMo and mPLUG at laptop scale, in readable PyTorch.

    import mmkit
    model = mmkit.load("m6-tiny-vqa")                    # a trained checkpoint by name
    cfg = mmkit.load_config("m6-base")                   # a preset or a YAML file
    model = mmkit.build_model(cfg, device="meta")        # counted without memory

These names come from :mod:`mmkit.zoo`, which imports every system; it is imported on first use, so
``import mmkit.data.world`` alone stays light.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "load_config", "build_model", "available_configs"]


# Submodules reachable as attributes after a bare ``import mmkit`` (``mmkit.hub.load(...)``), imported on first use.
_SUBMODULES = ("hub", "zoo", "registry", "config", "data", "nn", "objectives", "evaluation", "tokenizer", "train",
               "generation", "io", "params", "viz", "m6", "vqgan", "bench")


def __getattr__(name: str):
    if name in __all__:
        import mmkit.zoo as zoo
        return getattr(zoo, name)
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"mmkit.{name}")
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
