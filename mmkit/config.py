"""Configs as dataclasses: from presets, YAML files or dicts, back to dicts, and `build_model`.

Every system's ``model.py`` defines dataclass configs (commented defaults, nanoGPT style) and registers them in
:mod:`mmkit.registry`. A config can then come from

* a preset name:          ``load_config("m6-tiny")``        (a registered preset)
* a YAML file:            ``load_config("scaled/configs/m6_base.yaml")``
* a dataclass instance:   passed through unchanged

YAML files carry a ``model_type`` key that names the registered model, plus any fields to override; a
``base`` key names a preset to start from. These functions see the systems imported so far; ``mmkit.zoo``
(what ``mmkit.load_config`` / ``mmkit.build_model`` use) imports them all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import mmkit.registry as registry
from mmkit.io import atomic_write_text

__all__ = ["config_from_dict", "replace_config", "load_config", "available_configs", "config_to_dict",
           "save_config", "build_model"]


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> Any:
    """Build a registered config dataclass from a plain dict (the parsed YAML)."""
    d = dict(d)
    base = d.pop("base", None)
    if base is not None:
        cfg = load_config(base)
        model_type = d.pop("model_type", cfg.model_type)
        if model_type != cfg.model_type:
            raise ValueError(f"{source}: model_type {model_type!r} differs from its base {base!r} ({cfg.model_type!r})")
        return replace_config(cfg, **d)
    if "model_type" not in d:
        raise ValueError(f"{source}: a config needs a 'model_type' key (one of {registry.model_types()}) or a "
                         "'base' preset")
    model_type = d.pop("model_type")
    try:
        cls = registry.model_entry(model_type)[0]
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    _check_fields(cls, d, source)
    return cls(**_coerce(cls, d))


def replace_config(cfg: Any, **overrides: Any) -> Any:
    """``dataclasses.replace`` with a clear error for unknown fields."""
    _check_fields(type(cfg), overrides, type(cfg).__name__)
    return dataclasses.replace(cfg, **_coerce(type(cfg), overrides))


def _check_fields(cls: type, d: dict[str, Any], source: str) -> None:
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(names)}")


def _coerce(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    # YAML gives lists where configs use tuples; keep configs hashable and comparable.
    out = {}
    types = {f.name: f.type for f in fields(cls)}
    for k, v in d.items():
        if isinstance(v, list) and "tuple" in str(types.get(k, "")):
            v = tuple(v)
        out[k] = v
    return out


def load_config(name_or_path: Any) -> Any:
    """Return the dataclass config for a preset name, a YAML path, or a config instance."""
    if is_dataclass(name_or_path) and not isinstance(name_or_path, type):
        return name_or_path
    if isinstance(name_or_path, dict):
        return config_from_dict(name_or_path)
    s = str(name_or_path)
    factory = registry.preset(s)
    if factory is not None:
        return factory()
    p = Path(s)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist; presets are: {available_configs()}")
        with open(p, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of config fields, got {type(d).__name__}")
        return config_from_dict(d, source=str(p))
    raise ValueError(f"unknown config {s!r}: not a preset and not a file. Presets: {available_configs()}. If it "
                     f"belongs to a system that is not imported yet, {registry.missing_hint()}")


def available_configs() -> list[str]:
    """The registered preset names."""
    return registry.preset_names()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form (tuples as lists) of a config, suitable for JSON / YAML."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def build_model(config: Any, device: Any = None):
    """Instantiate the module for ``config`` (a config, preset name or YAML path).

    ``device="meta"`` builds without allocating memory: how full-size configs (10B, 100B) are inspected.
    """
    cfg = load_config(config)
    builder = registry.model_entry(getattr(cfg, "model_type", None))[1]
    if device is None:
        return builder(cfg)
    with torch.device(device):
        return builder(cfg)
