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
import math
import numbers
import re
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import mmkit.registry as registry
from mmkit.io import atomic_write_text

__all__ = ["config_from_dict", "replace_config", "load_config", "available_configs", "config_to_dict",
           "save_config", "build_model", "check_config"]


def config_from_dict(d: dict[str, Any], source: str = "<dict>", _chain: tuple = ()) -> Any:
    """Build a registered config dataclass from a plain dict (the parsed YAML / config.json).

    Every value is checked against its field's type (and the obvious ranges: no negative sizes, no zero layers),
    so a typo such as ``d_model: "128"`` or ``tie_word_embeddings: 'no'`` is an error naming the field, not a crash
    deep inside the model or a silently wrong model.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a config is a mapping of field names to values, got {type(d).__name__}")
    d = dict(d)
    base = d.pop("base", None)
    if base is not None:
        cfg = _load_base(base, source, _chain)
        model_type = d.pop("model_type", cfg.model_type)
        if model_type != cfg.model_type:
            raise ValueError(f"{source}: model_type {model_type!r} differs from its base {base!r} ({cfg.model_type!r})")
        return replace_config(cfg, _source=source, **d)
    if "model_type" not in d:
        raise ValueError(f"{source}: a config needs a 'model_type' key (one of {registry.model_types()}) or a "
                         "'base' preset")
    model_type = d.pop("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{source}: model_type must be a string (one of {registry.model_types()}), got "
                         f"{model_type!r}")
    try:
        cls = registry.model_entry(model_type)[0]
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    _check_fields(cls, d, source)
    values = _coerce(cls, d)
    _check_types(cls, values, source)
    return cls(**values)


MAX_BASE_DEPTH = 16          # a chain of YAML files each naming the next as its base


def _load_base(base: Any, source: str, chain: tuple) -> Any:
    """The config a ``base:`` key names (a preset, or a YAML file, relative to the naming file's folder if it is not
    found as given); refuses a file that is its own base, directly or through others."""
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{source}: 'base' must name a preset (e.g. 'm6-tiny') or a YAML file, got {base!r}")
    if registry.preset(base) is None:
        p = Path(base)
        here = Path(source).parent if source not in ("<dict>", "") else None
        if not p.is_absolute() and not p.exists() and here is not None and (here / p).exists():
            p = here / p
        if p.exists():
            key = str(p.resolve())
            if key in chain:
                loop = " -> ".join([Path(c).name for c in chain[chain.index(key):]] + [p.name])
                raise ValueError(f"{source}: 'base' leads back to itself ({loop}); a config's base must be a preset "
                                 "or another file that does not name this one")
            if len(chain) >= MAX_BASE_DEPTH:
                raise ValueError(f"{source}: more than {MAX_BASE_DEPTH} nested 'base' files; flatten the chain")
            return load_config(p, _chain=chain)
    return load_config(base, _chain=chain)


def replace_config(cfg: Any, _source: str | None = None, **overrides: Any) -> Any:
    """``dataclasses.replace`` with a clear error for unknown fields and values of the wrong type."""
    source = _source or type(cfg).__name__
    _check_fields(type(cfg), overrides, source)
    values = _coerce(type(cfg), overrides)
    _check_types(type(cfg), values, source)
    return dataclasses.replace(cfg, **values)


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


# --- type and range checks of config values ----------------------------------------------------------------
# Sizes and counts that must be at least 1 (a model with n_layers=0 or d_model=0 builds, and is nothing).
_AT_LEAST_ONE = re.compile(r"^(n|d|num)_|_(heads|dim|width|channels|grid)$|^(vocab_size|image_size|patch_size|"
                           r"type_vocab_size|max_text_len|max_prompt_tokens|resolution|ch)$")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:                     # an annotation that does not resolve: check nothing rather than crash
        return {}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _element_type(tp: Any, default: Any) -> Any:
    """The element type of a tuple field: from ``tuple[int, ...]`` / ``tuple[float, float]``, else from its default."""
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if args and all(a is args[0] for a in args):
        return args[0]
    if isinstance(default, tuple) and default:
        if all(isinstance(x, bool) for x in default):
            return bool
        if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in default):
            return int
        if all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in default):
            return float
        if all(isinstance(x, str) for x in default):
            return str
    return None


def _value_problem(name: str, value: Any, tp: Any, default: Any) -> str | None:
    """Why ``value`` cannot be field ``name`` of type ``tp`` (None when it can)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        problems = [_value_problem(name, value, a, default) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return next((p for p in problems if p), None) if len(problems) == 1 else \
            f"must be {' or '.join(_type_name(a) for a in args)}"
    if tp is bool:
        if not isinstance(value, bool):
            return "must be true or false (a YAML / JSON boolean, not a string or a number)"
        return None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"must be a whole number (e.g. {default if isinstance(default, int) else 1})"
        lo = 1 if _AT_LEAST_ONE.search(name) else (0 if not (isinstance(default, int) and default < 0) else None)
        if lo is not None and value < lo:
            return f"must be >= {lo}"
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number (e.g. {default if isinstance(default, float) else 0.1})"
        if not math.isfinite(float(value)):
            return "must be a finite number"
        if "dropout" in name and not 0.0 <= float(value) < 1.0:
            return "must be in [0, 1) (a probability of dropping)"
        return None
    if tp is str:
        return None if isinstance(value, str) else "must be a string"
    if tp is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            example = list(default) if isinstance(default, tuple) and default else "[...]"
            return f"must be a list (e.g. {example})"
        et = _element_type(tp, default)
        for i, x in enumerate(value):
            p = _value_problem(name, x, et, None) if et is not None else None
            if p is None and et is int and x < 1:
                p = "must be >= 1"
            if p is not None:
                return f"item {i} ({x!r}) {p}"
        return None
    return None                               # other annotations (dicts, modules, callables): not checked here


def _check_types(cls: type, values: dict[str, Any], source: str) -> None:
    """Raise ValueError naming the field when a value does not fit its annotation."""
    hints = _hints(cls)
    defaults = {f.name: f.default for f in fields(cls)}
    for name, value in values.items():
        if name not in hints:
            continue
        problem = _value_problem(name, value, hints[name], defaults.get(name))
        if problem:
            raise ValueError(f"{source}: {cls.__name__}.{name} {problem}; got {type(value).__name__} {value!r}")


def check_config(cfg: Any, source: str | None = None) -> Any:
    """Check every field of a config instance (what :func:`build_model` does first); returns it."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        _check_types(type(cfg), {f.name: getattr(cfg, f.name) for f in fields(cfg)}, source or type(cfg).__name__)
    return cfg


def load_config(name_or_path: Any, _chain: tuple = ()) -> Any:
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
        if p.is_dir():
            raise ValueError(f"{p} is a folder; give a YAML config file or a preset name ({available_configs()})")
        try:
            with open(p, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{p}: not a text file (UTF-8); give a YAML config file") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of config fields, got {type(d).__name__}")
        return config_from_dict(d, source=str(p), _chain=_chain + (str(p.resolve()),))
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
    cfg = check_config(load_config(config))
    builder = registry.model_entry(getattr(cfg, "model_type", None))[1]
    if device is None:
        return builder(cfg)
    with torch.device(device):
        return builder(cfg)
