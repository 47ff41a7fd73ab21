"""The one registry of the kit: model types, presets, recipes, checkpoint loaders and app entries, by name.

It imports nothing of mmkit, so every floor may fill it and every system may register into it without a cycle.
Who fills what:

* each system package (``mmkit/m6``, ``mmkit/vlmo``, ``mmkit/mplug``) and each shared model (``mmkit/vqgan``)
  registers its model types, presets, recipes and app entries when it is imported;
* :mod:`mmkit.tokenizer` registers the ``tokenizer-world`` recipe and the loader of ``"tokenizer"`` checkpoints;
* :mod:`mmkit.zoo` imports every system, so ``mmkit.zoo`` (and ``mmkit.load`` / ``mmkit.build_model`` /
  ``mmkit.load_config``) see every name. A floor module that looks a name up (``mmkit.config``, ``mmkit.hub``)
  sees what has been imported so far, and says so in its error.

    register_model("m6", M6Config, M6Model)          # model_type -> (config class, builder)
    register_preset("m6-tiny", lambda: M6Config())    # name -> config factory
    register_recipe(Recipe("m6-tiny-vqa", "...", train_fn, config="m6-tiny"))
    register_vqa_model(VQAModelEntry(...))            # what apps/vqa.py offers
    register_run_task(RunTask("m6-pretrain", "...", build_fn, model="m6-base"))   # what a run config's task names
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "register_model", "model_entry", "model_types", "register_preset", "preset", "preset_names",
    "Recipe", "register_recipe", "recipe", "get_recipe", "recipe_names",
    "register_loader", "loader",
    "LoadsOnce", "VQAModelEntry", "register_vqa_model", "vqa_entries", "T2IModelEntry", "register_t2i_model", "t2i_entries",
    "SYSTEMS", "missing_hint", "RunTask", "register_run_task", "run_task", "run_task_names",
]

# The systems the kit teaches, as packages of mmkit; mmkit.zoo imports them all.
SYSTEMS: tuple[str, ...] = ("m6", "vlmo", "mplug")


def missing_hint() -> str:
    return "import mmkit.zoo (or use mmkit.load / mmkit.build_model), which imports every system"


# ---------------------------------------------------------------------------------------------------------
# Model types and presets
# ---------------------------------------------------------------------------------------------------------

_MODELS: dict[str, tuple[type, Callable[..., Any]]] = {}   # model_type -> (config class, builder)
_PRESETS: dict[str, Callable[[], Any]] = {}                 # preset name -> config factory


def register_model(model_type: str, config_cls: type, builder: Callable[..., Any]) -> None:
    """Make ``build_model`` able to build ``config_cls`` instances (``config.model_type == model_type``)."""
    _MODELS[model_type] = (config_cls, builder)


def model_entry(model_type: str) -> tuple[type, Callable[..., Any]]:
    """(config class, builder) of a registered model type."""
    if model_type not in _MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; registered: {sorted(_MODELS)}. If it belongs to a "
                         f"system that is not imported yet, {missing_hint()}")
    return _MODELS[model_type]


def model_types() -> list[str]:
    return sorted(_MODELS)


def register_preset(name: str, factory: Callable[[], Any]) -> None:
    """Name a config so ``load_config(name)`` returns ``factory()``."""
    _PRESETS[name] = factory


def preset(name: str) -> Callable[[], Any] | None:
    return _PRESETS.get(name)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


# ---------------------------------------------------------------------------------------------------------
# Recipes: named, reproducible procedures that write a trained artefact into a folder
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    name: str                                   # the hub name, e.g. "m6-tiny-pretrained"
    description: str                            # one line, shown by `mmkit train --list`
    train: Callable[[Path, bool], dict]         # (out_dir, fast) -> metrics; writes model.safetensors + config.json
    config: str | None = None                   # preset whose config the checkpoint carries (models)
    kind: str = "model"                         # "model" or "tokenizer": which loader reads the folder
    needs: tuple[str, ...] = ()                 # checkpoints this recipe starts from (hub names), in order


_RECIPES: dict[str, Recipe] = {}


def register_recipe(r: Recipe) -> Recipe:
    _RECIPES[r.name] = r
    return r


def recipe(name: str, description: str, config: str | None = None, kind: str = "model",
           needs: tuple[str, ...] = ()):
    """Decorator form of :func:`register_recipe`."""
    def wrap(fn: Callable[[Path, bool], dict]) -> Callable[[Path, bool], dict]:
        register_recipe(Recipe(name, description, fn, config, kind, tuple(needs)))
        return fn
    return wrap


def get_recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        raise KeyError(f"no recipe named {name!r}; available: {recipe_names()}. If it belongs to a system that is "
                       f"not imported yet, {missing_hint()}")
    return _RECIPES[name]


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


# ---------------------------------------------------------------------------------------------------------
# Run tasks: what a run config (scaled/configs/runs/*.yaml, mmkit.runs) trains
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunTask:
    name: str                                   # what a run config's ``task:`` names, e.g. "m6-pretrain"
    description: str                            # one line, shown by `mmkit train --list`
    build: Callable[..., Any]                   # (model config, task options dict, RunContext) -> mmkit.runs.RunParts
    model: str | None = None                    # preset of the full-size model it trains by default
    options: Any = None                         # the dataclass of its options (``task_options:``), for checks and docs


_RUN_TASKS: dict[str, RunTask] = {}


def register_run_task(task: RunTask) -> RunTask:
    _RUN_TASKS[task.name] = task
    return task


def run_task(name: str) -> RunTask:
    if name not in _RUN_TASKS:
        raise KeyError(f"no run task named {name!r}; available: {run_task_names()}. If it belongs to a system that is "
                       f"not imported yet, {missing_hint()}")
    return _RUN_TASKS[name]


def run_task_names() -> list[str]:
    return sorted(_RUN_TASKS)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint loaders by kind (hub.load dispatches on recipe.json's "kind")
# ---------------------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., Any]] = {}


def register_loader(kind: str, fn: Callable[..., Any]) -> None:
    """``fn(folder, device) -> object`` loads a checkpoint folder whose recipe.json says ``"kind": kind``."""
    _LOADERS[kind] = fn


def loader(kind: str) -> Callable[..., Any] | None:
    return _LOADERS.get(kind)


# ---------------------------------------------------------------------------------------------------------
# App entries: which models the Gradio apps offer
# ---------------------------------------------------------------------------------------------------------

class LoadsOnce:
    """An app entry's ``model()``: its ``load()`` result, loaded once per process (thread-safe)."""

    def model(self):
        with self.lock:
            if "model" not in self.cache:
                self.cache["model"] = self.load()
            return self.cache["model"]


@dataclass(frozen=True)
class VQAModelEntry(LoadsOnce):
    """A model that ``apps/vqa.py`` can ask.

    ``answer(model, image, question)`` takes ``image`` as a float (3, S, S) tensor in [0, 1] (what
    :func:`mmkit.data.preprocess.preprocess_image` returns) and returns an object with the fields of
    :class:`mmkit.evaluation.vqa.VQAAnswer` (answer, confidence, alternatives, question, lang, in_vocabulary);
    ``heatmap(model, image, question, answer)`` returns an (S, S) tensor in [0, 1].
    """
    name: str                                        # shown in the app's model choice; unique
    description: str                                 # one line: what the model is
    load: Callable[[], Any]                          # () -> eval-mode model (a visible hub.load call)
    answer: Callable[..., Any]                       # (model, image (3, S, S), question) -> VQAAnswer-like
    heatmap: Callable[..., Any]                      # (model, image, question, answer) -> (S, S) tensor in [0, 1]
    checkpoint: str | None = None                    # hub name whose presence makes the model available
    image_size: int = 32                             # the side of the images the model reads
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)


@dataclass(frozen=True)
class T2IModelEntry(LoadsOnce):
    """A text-to-image generator that ``apps/text_to_image.py`` can run.

    ``load()`` returns whatever the functions need (e.g. the code LM, the VQGAN, the tokenizer, a reranker);
    ``samples(loaded, prompt, n_samples=, top_k=, temperature=, seed=)`` yields (3, S, S) images in [0, 1] one at a
    time; ``score(loaded, images (N, 3, S, S), prompt)`` returns (N,) match scores to rerank them, and
    ``can_score(loaded)`` says whether the loaded generator has a scorer. ``checkpoints`` must be shipped or cached
    for the entry to be available.
    """
    name: str
    description: str
    load: Callable[[], Any]
    samples: Callable[..., Any]
    score: Callable[..., Any]
    can_score: Callable[[Any], bool]
    checkpoints: tuple[str, ...] = ()
    image_size: int = 32                             # the side of the images it draws
    n_codes: int = 256                               # image codes the sampler chooses from (the app's top-k maximum)
    code_grid: int = 8                               # codes per image side
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)


_VQA: dict[str, VQAModelEntry] = {}
_T2I: dict[str, T2IModelEntry] = {}


def register_vqa_model(entry: VQAModelEntry) -> VQAModelEntry:
    """Add (or replace) a VQA model under ``entry.name``."""
    _VQA[entry.name] = entry
    return entry


def vqa_entries() -> list[VQAModelEntry]:
    """Every registered VQA model, in registration order."""
    return list(_VQA.values())


def register_t2i_model(entry: T2IModelEntry) -> T2IModelEntry:
    _T2I[entry.name] = entry
    return entry


def t2i_entries() -> list[T2IModelEntry]:
    return list(_T2I.values())
