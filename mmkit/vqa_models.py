"""The VQA model registry: what the VQA app (``apps/vqa.py``) and benchmark can ask, by name.

    from mmkit.vqa_models import VQAModelEntry, register_vqa_model, vqa_models, get_vqa_model

    entry = get_vqa_model("M6-tiny VQA")             # a VQAModelEntry
    model = entry.load()                             # an eval-mode nn.Module (cached: loaded once per process)
    a = entry.answer(model, image, "what colour is the circle?")   # -> mmkit.models.m6_vqa.VQAAnswer
    heat = entry.heatmap(model, image, a.question, a.answer)       # (S, S) float in [0, 1]
    [e.name for e in vqa_models()]                   # the registered models whose checkpoint is here

Another model plugs in with a few lines, in its own model file (imported by ``mmkit.models``)::

    register_vqa_model(VQAModelEntry(
        name="VLMo-tiny VQA", description="VLMo §4 classifier over the answer list", checkpoint="vlmo-tiny-vqa",
        load=lambda: hub.load("vlmo-tiny-vqa"), answer=vlmo_answer, heatmap=vlmo_heatmap, image_size=32))

``answer(model, image, question)`` takes ``image`` as a float (3, S, S) tensor in [0, 1] (what
:func:`mmkit.data.preprocess.preprocess_image` returns) and returns anything with the fields of
:class:`mmkit.models.m6_vqa.VQAAnswer` (answer, confidence, alternatives, question, lang, in_vocabulary).
A model is *available* when its checkpoint is shipped or cached (:func:`mmkit.hub.find_checkpoint`): the app never
starts a training run.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["VQAModelEntry", "register_vqa_model", "vqa_models", "get_vqa_model"]


@dataclass(frozen=True)
class VQAModelEntry:
    name: str                                        # shown in the app's model choice; unique
    description: str                                 # one line: what the model is
    load: Callable[[], Any]                          # () -> eval-mode model
    answer: Callable[..., Any]                       # (model, image (3, S, S), question) -> VQAAnswer-like
    heatmap: Callable[..., Any]                      # (model, image, question, answer) -> (S, S) tensor in [0, 1]
    checkpoint: str | None = None                    # hub name whose presence makes the model available
    image_size: int = 32                             # the side of the images the model reads
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)

    def available(self) -> bool:
        """True when the checkpoint is shipped or cached (or the entry needs none)."""
        if self.checkpoint is None:
            return True
        from mmkit.hub import find_checkpoint

        return find_checkpoint(self.checkpoint) is not None

    def model(self):
        """The loaded model, loaded once per process (thread-safe)."""
        with self._lock:
            if "model" not in self._cache:
                self._cache["model"] = self.load()
            return self._cache["model"]


_MODELS: dict[str, VQAModelEntry] = {}


def register_vqa_model(entry: VQAModelEntry) -> VQAModelEntry:
    """Add (or replace) a model under ``entry.name``."""
    _MODELS[entry.name] = entry
    return entry


def _ensure_loaded() -> None:
    import mmkit.models  # noqa: F401  (model files register their VQA models)


def vqa_models(available_only: bool = True) -> list[VQAModelEntry]:
    """Registered models in registration order (only those whose checkpoint is here, by default)."""
    _ensure_loaded()
    return [e for e in _MODELS.values() if e.available() or not available_only]


def get_vqa_model(name: str) -> VQAModelEntry:
    _ensure_loaded()
    if name not in _MODELS:
        raise KeyError(f"no VQA model named {name!r}; registered: {list(_MODELS)}")
    return _MODELS[name]
