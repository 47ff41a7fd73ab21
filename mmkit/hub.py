"""Trained tiny checkpoints by name: shipped with the repository, else cached, else trained once by a recipe.

    model = mmkit.load("m6-tiny-pretrained")           # what users call (mmkit.zoo: every system imported)
    model = mmkit.hub.load("m6-tiny-pretrained")       # the same, for names whose system is already imported
    model = mmkit.hub.load_path("runs/my-checkpoint")  # a folder: a separate, explicit call (names are not paths)

Look-up order for a name:
1. ``mmkit/checkpoints/NAME/`` — shipped in the repository (each holds recipe.json with the exact command
   that reproduced it);
2. ``$MMKIT_CACHE/NAME/`` (default ``~/.cache/mmkit``) — trained earlier on this machine;
3. otherwise the recipe NAME is run (with a progress bar) and its result cached, so notebooks and apps never
   wait twice. In fast mode (``MMKIT_FAST=1``) a missing checkpoint is trained by the recipe's fast path and
   cached separately as ``NAME@fast`` so it never stands in for the full one.

A name is a name (letters, digits, ``-``, ``_``, ``.``, an optional ``@fast``; no path separators, no ``..``):
``load("/any/dir")`` and ``load("../../x")`` are refused; :func:`load_path` reads a folder on purpose.

A folder is read by the loader registered for its ``kind`` (recipe.json): models by :func:`load_model_dir`
(config.json + model.safetensors), the tokenizer by :mod:`mmkit.tokenizer`.

A fine-tune that changed only part of a shipped model is stored as a **delta** over it: ``base.json`` names the
base checkpoint and the sha256 of its weights, and ``model.safetensors`` holds only the tensors that differ
(:func:`mmkit.train.save_checkpoint` ``base=``, :func:`mmkit.train.unchanged_weights`). Loading fills the rest from
the base (found by name, as above) and refuses a base whose weights are not the recorded ones.

Weights are stored in float32, float16, or int8 with one float16 scale per output row (``INT8_FORMAT`` in the file's
metadata; :func:`int8_rows`): every reader here (:func:`load_weights`, a delta's base) turns them back into float32.

Integrity: :func:`run_recipe` records the sha256 of every file it wrote in ``recipe.json`` (``"sha256"``), and
every load checks them (:func:`verify_checkpoint`): a flipped byte or a truncated file is a
:class:`CheckpointError` that names the file and says how to rebuild it, never weights that are silently wrong.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

import mmkit.registry as registry
from mmkit.config import build_model, config_from_dict
from mmkit.io import atomic_write_json, fast_mode, make_tmp_dir, recover_dir, replace_dir, sha256_file, share_files

__all__ = ["SHIPPED_DIR", "NAME_PATTERN", "CheckpointError", "cache_root", "check_name", "find_checkpoint",
           "checkpoint_dir", "load", "load_path", "load_model_dir", "load_weights", "read_json", "run_recipe",
           "read_recipe_info", "recipe_names", "verify_checkpoint", "rebuild_hint", "file_hashes", "check_device",
           "BASE_FILE", "WEIGHTS_FILE", "base_weights", "INT8_FORMAT", "INT8_SCALE", "int8_rows", "from_int8_rows",
           "stored_int8", "read_weights", "is_int8_file"]

SHIPPED_DIR = Path(__file__).parent / "checkpoints"
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
BASE_FILE = "base.json"          # a delta checkpoint's base: {"checkpoint": name, "sha256": of its weights}
# int8 weight storage (mmkit.train.save_checkpoint(weights_dtype=torch.int8)): the safetensors metadata that marks such
# a file, and the suffix of the float16 row scales stored beside each int8 tensor NAME under NAME + INT8_SCALE. That
# name is never a tensor's own: NAME is a parameter or buffer, so no module can sit under it.
INT8_FORMAT = {"mmkit_weights": "int8-rowwise"}
INT8_SCALE = ".int8_scale"
# A checkpoint name: starts with a letter or digit; letters, digits, '.', '_', '-' (no '/', '\\', no '..');
# the hub's own fast-mode cache entries end in '@fast'.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@fast)?$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used as it is (corrupt, truncated, for another model); the message names
    the file and how to rebuild it."""


def cache_root() -> Path:
    return Path(os.environ.get("MMKIT_CACHE") or Path.home() / ".cache" / "mmkit")


def check_name(name: str) -> str:
    """``name`` if it is a checkpoint name, else a ValueError that says to use :func:`load_path` for folders."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        pathlike = isinstance(name, os.PathLike) or (isinstance(name, str) and (
            any(c in name for c in "/\\~") or ".." in name))
        hint = " To load a folder, call mmkit.hub.load_path(folder)." if pathlike else ""
        raise ValueError(f"{name!r} is not a checkpoint name: names are letters, digits, '-', '_' and '.' (e.g. "
                         f"'m6-tiny-vqa'), never paths.{hint} Names: {registry.recipe_names()}")
    return name


def is_complete(d: Path) -> bool:
    """A checkpoint folder is complete once its recipe.json exists (written last, atomically)."""
    return (d / RECIPE_FILE).exists()


def find_checkpoint(name: str) -> Path | None:
    """Where ``name`` already is (shipped, cached, or cached fast-mode), or None.

    A cache entry whose writer was killed half-way through replacing it is put back first (:func:`recover_dir`).
    """
    check_name(name)
    candidates = [SHIPPED_DIR / name, cache_root() / name]
    if fast_mode():
        candidates.append(cache_root() / f"{name}@fast")
    for d in candidates:
        if not d.exists():
            recover_dir(d, is_complete, clean=False)      # readers only put back; the writer cleans up
        if is_complete(d):
            return d
    return None


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
    """Load checkpoint ``name`` (see module doc): a model in eval mode with ``.config``, or a tokenizer.

    Names only: a folder is loaded with :func:`load_path`.
    """
    return load_path(checkpoint_dir(check_name(name)), device=check_device(device))


def check_device(device) -> str:
    """``device`` as a string torch accepts and this machine has, or a ValueError that says what is available
    (checked before any file is read, so a wrong device is never mistaken for a damaged checkpoint)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({str(e).splitlines()[0][:100]}); use 'cpu'"
                         f"{' or cuda' if torch.cuda.is_available() else ''}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                         "use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: checkpoints load on 'cpu' or 'cuda', not {dev.type!r}")
    return str(dev)


def load_path(folder: str | Path, device: str = "cpu"):
    """Load the checkpoint folder ``folder`` (explicitly a path) with the loader of its ``kind`` (recipe.json;
    a folder without one is read as a model: config.json + model.safetensors), after checking its sha256s."""
    device = check_device(device)
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a checkpoint folder (it does not exist or is a file)")
    verify_checkpoint(d, warn_unrecorded=True)
    kind = read_recipe_info(d).get("kind", "model")
    if kind == "model":
        return load_model_dir(d, device=device, verify=False)
    fn = registry.loader(kind)
    if fn is None:
        raise ValueError(f"{d}: no loader for checkpoints of kind {kind!r}; {registry.missing_hint()}")
    return fn(d, device)


# ---------------------------------------------------------------------------------------------------------
# Integrity and clear errors
# ---------------------------------------------------------------------------------------------------------

def rebuild_hint(d: str | Path) -> str:
    """How to get a good copy of checkpoint folder ``d`` back (shipped, cached, or any other folder)."""
    d = Path(d)
    info = read_recipe_info(d, missing_ok=True, check=False)
    name = info.get("recipe") if isinstance(info.get("recipe"), str) else None
    fast = " --fast" if info.get("fast") else ""
    try:
        resolved = d.resolve()
        shipped = resolved.parent == SHIPPED_DIR.resolve()
        cached = resolved.parent == cache_root().resolve()
    except OSError:
        shipped = cached = False
    if shipped and name:
        return (f"restore it from git (`git checkout -- mmkit/checkpoints/{d.name}`) or rebuild it with "
                f"`mmkit train {name} --out mmkit/checkpoints/{d.name} --overwrite`")
    if cached and name:
        return (f"rebuild it with `mmkit train {name}{fast} --overwrite`, or delete the cache folder {d} "
                f"(mmkit.load('{name}') then trains it again)")
    if name:
        return f"rebuild it with `mmkit train {name}{fast} --out {d} --overwrite`"
    return "save the checkpoint again (mmkit.train.save_checkpoint) or re-run what wrote it"


def read_json(path: str | Path, what: str = "file", hint: str | None = None):
    """``json.loads`` of a file, with a message that names the file (and the fix) when it is not valid JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path}: this {what} is not valid JSON{where}. "
                              f"{(hint or 'Fix or rewrite it').rstrip('.')}.") from None


def read_recipe_info(ckpt_dir: str | Path, missing_ok: bool = True, check: bool = True) -> dict:
    """recipe.json of a checkpoint folder ({} if there is none)."""
    p = Path(ckpt_dir) / RECIPE_FILE
    if not p.exists():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"{p} does not exist")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if not check:
            return {}
        raise CheckpointError(f"{p} is not valid JSON ({e}); the folder cannot be trusted: "
                              f"{rebuild_hint(ckpt_dir)}") from None
    if not isinstance(info, dict):
        if not check:
            return {}
        raise CheckpointError(f"{p} holds {type(info).__name__}, not a JSON object; {rebuild_hint(ckpt_dir)}")
    return info


def file_hashes(d: str | Path) -> dict[str, str]:
    """{file name: sha256} of every regular file in folder ``d`` except recipe.json (what run_recipe records)."""
    d = Path(d)
    return {f.name: sha256_file(f) for f in sorted(d.iterdir())
            if f.is_file() and f.name != RECIPE_FILE and not f.name.startswith(".")}


def verify_checkpoint(d: str | Path, warn_unrecorded: bool = False) -> None:
    """Check every file whose sha256 the folder records: in recipe.json (:func:`run_recipe`) and in
    trainer_state.json (``mmkit.train.save_checkpoint``); raise :class:`CheckpointError` naming the first bad one.

    A folder that records no hashes (written before they were recorded, or with its records removed) cannot be
    checked and passes; with ``warn_unrecorded`` (loading a model folder by path) it says so in a warning.
    """
    d = Path(d)
    records = [(RECIPE_FILE, read_recipe_info(d).get("sha256"))]
    state = d / "trainer_state.json"
    if state.is_file():
        info = read_json(state, "trainer state", rebuild_hint(d))
        records.append((state.name, info.get("sha256") if isinstance(info, dict) else None))
    if warn_unrecorded and not any(h for _, h in records):
        warnings.warn(f"{d}: no sha256 is recorded for its files (no recipe.json / trainer_state.json record), so a "
                      "damaged file cannot be detected; save it again with mmkit.train.save_checkpoint to record them",
                      stacklevel=3)
    for source, hashes in records:
        if not hashes:
            continue
        if not isinstance(hashes, dict):
            raise CheckpointError(f"{d / source}: 'sha256' must map file names to hashes; {rebuild_hint(d)}")
        for fname, want in hashes.items():
            f = d / fname
            if "/" in fname or "\\" in fname or fname.startswith("."):
                raise CheckpointError(f"{d / source}: {fname!r} is not a file name of the folder; {rebuild_hint(d)}")
            if not f.is_file():
                raise CheckpointError(f"{f} is missing ({source} records it); {rebuild_hint(d)}")
            got = sha256_file(f)
            if got != want:
                raise CheckpointError(f"{f} is corrupt: its sha256 is {got[:16]}..., {source} records "
                                      f"{str(want)[:16]}... (a damaged, truncated or replaced file). "
                                      f"{rebuild_hint(d)[:1].upper()}{rebuild_hint(d)[1:]}.")


# ---------------------------------------------------------------------------------------------------------
# int8 weight storage
# ---------------------------------------------------------------------------------------------------------

def stored_int8(t: torch.Tensor) -> bool:
    """Whether ``save_checkpoint(weights_dtype=torch.int8)`` stores ``t`` as int8 rows: a finite float32 tensor of
    2+ dimensions (matrices, embeddings, conv kernels: almost all of a model's bytes). Norms, biases and gains are
    1-D, few, and sensitive, so they stay float16; a tensor holding inf / nan (a mask buffer) would have no scale."""
    return t.dtype == torch.float32 and t.ndim >= 2 and t.numel() > 0 and bool(torch.isfinite(t).all())


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (float, 2+ dims) -> (int8 q of w's shape, float16 scale of shape (rows,)), one scale per output row
    (dim 0): scale = max |row| / 127 (1 for an all-zero row, whose q is 0), q = round(w / scale) in [-127, 127].
    Per row because rows differ in range by orders of magnitude (one scale for a whole matrix would flatten its
    small rows to 0); the scale is rounded to float16 first, so q is computed with the scale that is stored and
    every element comes back within scale / 2. A scale is at least 2**-14, float16's smallest normal number: below
    it float16 loses precision (and reaches 0), and q would no longer fit the row."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, (amax / 127).clamp(min=2.0 ** -14), torch.ones_like(amax)).half()
    q = torch.round(rows / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def from_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 tensor that :func:`int8_rows` stored as ``(q, scale)``: q * its row's scale."""
    return (q.float().reshape(q.shape[0], -1) * scale.float()[:, None]).reshape(q.shape)


def is_int8_file(fh) -> bool:
    """Whether the open safetensors file ``fh`` was written with int8 rows (its metadata holds ``INT8_FORMAT``)."""
    return all((fh.metadata() or {}).get(k) == v for k, v in INT8_FORMAT.items())


def read_weights(fh, names=None) -> dict[str, torch.Tensor]:
    """The tensors of an open safetensors file ``fh`` (``safe_open``), int8 rows turned back into float32 (when the
    file's metadata is ``INT8_FORMAT``); ``names``: only those (the ones the file holds), else every tensor."""
    int8 = is_int8_file(fh)
    keys = set(fh.keys())
    own = [k for k in keys if not (int8 and k.endswith(INT8_SCALE))]
    out = {}
    for k in own if names is None else [k for k in names if k in own]:
        t = fh.get_tensor(k)
        if int8 and k + INT8_SCALE in keys:
            t = from_int8_rows(t, fh.get_tensor(k + INT8_SCALE))
        out[k] = t
    return out


def load_weights(model, weights: str | Path, device: str = "cpu", hint: str | None = None,
                 base: str | Path | None = None) -> None:
    """Load ``weights`` (safetensors) into ``model`` strictly, with errors that name the file and the fix:
    unreadable / truncated files, missing or unexpected keys (another model's weights), shape mismatches.

    ``base``: the weights file of a delta checkpoint's base; the tensors ``weights`` lacks are read from it, and every
    tensor of ``model`` must come from one of the two (the base may hold others, of other shapes, that are not read)."""
    weights = Path(weights)
    fix = hint or rebuild_hint(weights.parent)
    missing, unexpected = _load_safetensors(model, weights, device, fix)
    if base is not None:
        missing = _fill_from_base(model, Path(base), set(missing), fix)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match {type(model).__name__}: missing {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                              f"{sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}). "
                              "Was it saved from another model, or by another version of this one?")


def _load_safetensors(model, weights: Path, device: str, fix: str) -> tuple[list, list]:
    """safetensors' non-strict load -> (missing, unexpected) names, its errors turned into CheckpointErrors. An int8
    file (``INT8_FORMAT``) is read back to float32 first (:func:`_load_int8`)."""
    try:
        with safe_open(str(weights), "pt") as fh:
            state = read_weights(fh) if is_int8_file(fh) else None        # one read: the format, then the tensors
        if state is not None:
            return _load_int8(model, state)
        return load_model(model, str(weights), strict=False, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{weights} cannot be read as safetensors ({e}): the file is truncated or damaged. "
                              f"{fix[:1].upper()}{fix[1:]}.") from None
    except RuntimeError as e:             # load_state_dict: size mismatch for ...
        lines = [l.strip() for l in str(e).splitlines() if "size mismatch" in l][:3]
        raise CheckpointError(f"{weights} does not fit {type(model).__name__}: {'; '.join(lines) or e}. It was saved "
                              "from a model with another config (check config.json) or another version of it.") \
            from None


def _load_int8(model, state: dict) -> tuple[list, list]:
    """What ``safetensors.torch.load_model(strict=False)`` does, for an int8 file's tensors already turned back into
    float32 (``state``): load them, then report (missing, unexpected) with tied weights counted as safetensors counts
    them (stored under one of their names: the others are not missing; a second name of a tied group in the file is
    unexpected)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    for names in _tied_groups(model):
        stored = sorted(n for n in names if n in state)
        if stored:
            missing = [n for n in missing if n not in names]
            unexpected = list(unexpected) + stored[1:]
    return missing, unexpected


def _tied_groups(model) -> list[set]:
    """The parameter names of ``model`` grouped by the tensor they name (a tied weight: one group of several)."""
    groups: dict[int, set] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(n)
    return list(groups.values())


def _fill_from_base(model, base: Path, missing: set, fix: str) -> list:
    """Load the ``missing`` tensors of ``model`` from its base's weights file; -> those the base lacks too (a tied
    group counts as loaded when one of its names was). Only the missing ones are read: the base may hold others of
    another shape (a head the fine-tune rebuilt)."""
    tied = {n: g for g in _tied_groups(model) for n in g}
    wanted = set().union(*(tied.get(k, {k}) for k in missing)) if missing else set()
    try:
        with safe_open(str(base), "pt") as f:
            found = read_weights(f, wanted)                 # int8 rows come back as float32
    except SafetensorError as e:
        raise CheckpointError(f"{base} cannot be read as safetensors ({e}): the base checkpoint is damaged. "
                              f"{fix[:1].upper()}{fix[1:]}.") from None
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in found.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{base} does not fit {type(model).__name__} where the delta relies on it: "
                              f"{'; '.join(wrong[:3])}. {fix[:1].upper()}{fix[1:]}.")
    model.load_state_dict(found, strict=False)
    return sorted(k for k in missing if not (tied.get(k, {k}) & set(found)))


def base_weights(d: str | Path) -> Path | None:
    """The weights file of delta checkpoint ``d``'s base (``base.json``), or None for a whole checkpoint. The base
    is found by name like any checkpoint (trained by its recipe if it is nowhere yet); its sha256 must be the one
    ``base.json`` records, else the delta would land on other weights than it was trained from."""
    f = Path(d) / BASE_FILE
    if not f.is_file():
        return None
    info = read_json(f, "delta checkpoint base", rebuild_hint(d))
    if not isinstance(info, dict) or not isinstance(info.get("checkpoint"), str) or not info.get("sha256"):
        raise CheckpointError(f"{f} must hold {{\"checkpoint\": name, \"sha256\": hash}}; {rebuild_hint(d)}")
    name = check_name(info["checkpoint"])
    weights = checkpoint_dir(name) / WEIGHTS_FILE
    got = sha256_file(weights)
    if got != info["sha256"]:
        raise CheckpointError(f"{Path(d).name} stores only what it changed over {name!r}, but {weights} is not the "
                              f"{name} it was trained from (sha256 {got[:16]}..., {BASE_FILE} records "
                              f"{str(info['sha256'])[:16]}...): put the shipped {name} back, or rebuild "
                              f"{Path(d).name} from this one ({rebuild_hint(d)})")
    return weights


def load_model_dir(d: str | Path, device: str = "cpu", verify: bool = True):
    """Build the model that ``config.json`` describes and load ``model.safetensors`` into it (strict)."""
    d = Path(d)
    cfg_file, weights = d / "config.json", d / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{d} is not a model checkpoint: {f.name} is missing")
    if verify:
        verify_checkpoint(d)
    cfg_dict = read_json(cfg_file, "model config", rebuild_hint(d))
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{cfg_file} holds {type(cfg_dict).__name__}, not a JSON object of config fields; "
                              f"{rebuild_hint(d)}")
    cfg = config_from_dict(cfg_dict, source=str(cfg_file))
    model = build_model(cfg)
    load_weights(model, weights, device, base=base_weights(d))
    model.config = cfg
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Running recipes
# ---------------------------------------------------------------------------------------------------------

def run_recipe(name: str, out_dir: str | Path, fast: bool = False, overwrite: bool = False) -> dict:
    """Run recipe ``name`` into ``out_dir`` atomically: train in a temporary sibling folder, then swap it in
    (:func:`mmkit.io.replace_dir`: rolled back if the swap fails, recoverable if the process is killed in it).

    recipe.json (written last) records the command, the metrics and the sha256 of every file.
    """
    r = registry.get_recipe(name)
    out_dir = Path(out_dir)
    recover_dir(out_dir, is_complete)                     # leftovers of a killed earlier run: put back / delete
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; give a folder for the checkpoint")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    tmp = make_tmp_dir(out_dir)
    try:
        t0 = time.time()
        metrics = r.train(tmp, fast) or {}
        share_files(tmp)                                  # safetensors / mkstemp write 0600 files
        command = f"mmkit train {name} --out {out_dir}" + (" --fast" if fast else "")
        atomic_write_json(tmp / RECIPE_FILE, {
            "recipe": name, "fast": fast, "config": r.config, "kind": r.kind, "command": command,
            "seconds": round(time.time() - t0, 1), "metrics": metrics, "sha256": file_hashes(tmp),
        })
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)            # only left when something above failed
    return metrics
