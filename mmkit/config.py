"""One way to get any model: configs as dataclasses, presets by name, YAML files, and `build_model`.

Every model file in `mmkit/models/` defines a dataclass config (commented defaults, nanoGPT style) and
registers it with :func:`register_model`. A config can then come from

* a preset name:          ``load_config("m6-tiny")``        (registered in code or ``mmkit/presets/*.yaml``)
* a YAML file:            ``load_config("scaled/configs/m6_base.yaml")``
* a dataclass instance:   passed through unchanged

YAML files carry a ``model_type`` key that names the registered model, plus any fields to override; a
``base`` key names a preset to start from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

_MODELS: dict[str, tuple[type, Callable[..., Any]]] = {}   # model_type -> (config class, builder)
_PRESETS: dict[str, Callable[[], Any]] = {}                 # preset name -> config factory
_PRESET_DIR = Path(__file__).parent / "presets"


def register_model(model_type: str, config_cls: type, builder: Callable[..., Any]) -> None:
    """Make ``build_model`` able to build ``config_cls`` instances (``config.model_type == model_type``)."""
    _MODELS[model_type] = (config_cls, builder)


def register_preset(name: str, factory: Callable[[], Any]) -> None:
    """Name a config so ``load_config(name)`` returns ``factory()``."""
    _PRESETS[name] = factory


def _ensure_models_imported() -> None:
    # Importing the models package registers every model and preset (each model file calls register_*).
    import mmkit.models  # noqa: F401


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> Any:
    """Build a registered config dataclass from a plain dict (the parsed YAML)."""
    _ensure_models_imported()
    d = dict(d)
    base = d.pop("base", None)
    if base is not None:
        cfg = load_config(base)
        model_type = d.pop("model_type", cfg.model_type)
        if model_type != cfg.model_type:
            raise ValueError(f"{source}: model_type {model_type!r} differs from its base {base!r} ({cfg.model_type!r})")
        return replace_config(cfg, **d)
    if "model_type" not in d:
        raise ValueError(f"{source}: a config needs a 'model_type' key (one of {sorted(_MODELS)}) or a 'base' preset")
    model_type = d.pop("model_type")
    if model_type not in _MODELS:
        raise ValueError(f"{source}: unknown model_type {model_type!r}; known: {sorted(_MODELS)}")
    cls = _MODELS[model_type][0]
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
    _ensure_models_imported()
    s = str(name_or_path)
    if s in _PRESETS:
        return _PRESETS[s]()
    preset_file = _PRESET_DIR / f"{s}.yaml"
    p = Path(s)
    if not p.exists() and preset_file.exists():
        p = preset_file
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist; presets are: {available_configs()}")
        with open(p, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of config fields, got {type(d).__name__}")
        return config_from_dict(d, source=str(p))
    raise ValueError(f"unknown config {s!r}: not a preset and not a file. Presets: {available_configs()}")


def available_configs() -> list[str]:
    _ensure_models_imported()
    names = set(_PRESETS) | {p.stem for p in _PRESET_DIR.glob("*.yaml")}
    return sorted(names)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form (tuples as lists) of a config, suitable for JSON / YAML."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Any, path: str | Path) -> None:
    from mmkit.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def build_model(config: Any, device: Any = None):
    """Instantiate the module for ``config`` (a config, preset name or YAML path).

    ``device="meta"`` builds without allocating memory: how full-size configs (10B, 100B) are inspected.
    """
    import torch

    cfg = load_config(config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _MODELS:
        raise ValueError(f"config {type(cfg).__name__} has model_type {model_type!r}, not a registered model; known: {sorted(_MODELS)}")
    builder = _MODELS[model_type][1]
    if device is None:
        return builder(cfg)
    with torch.device(device):
        return builder(cfg)
