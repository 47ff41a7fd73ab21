"""Image-text matching data with substituted-caption negatives (M6 §4.6), for any model that scores pairs.

    bank = SceneBank.build("train", 4000, image_size=32)
    data = ITMPairs(bank)                             # twins: a true caption and one with ONE fact substituted
    batch = data.batch_fn(torch.Generator().manual_seed(0), 64)   # {"images", "texts", "labels", "kinds"}
    pairs = data.eval_pairs(n=256)                    # fixed twins per negative kind, languages alternating

M6 §4.6 builds E-Commerce ITM from (product image, query) pairs and makes "negative samples ... by randomly
substituting the query in the original pairs". Here the query is a world caption, and a negative substitutes one
fact of it (:func:`substitute_caption`): one object's colour, shape, size or position (the scene is edited and
re-captioned in the same style and language, so articles and word order stay right), the object count ("two shapes
..." -> "three shapes ..."), or the whole caption (another scene's, "random").
"""
from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple, Sequence

import torch

from mmkit.data.scenes import SceneBank
from mmkit.data.text import NUMBER_WORDS_EN, NUMBER_WORDS_ZH, caption
from mmkit.data.world import COLOURS, POSITIONS, SHAPES, SIZES, Scene

__all__ = ["NEGATIVE_KINDS", "KIND_STYLES", "ITM_STYLES", "Negative", "count_head", "substitute_caption", "ITMPair",
           "itm_pairs", "ITMPairs"]

# -- negatives by substitution ----------------------------------------------------------------------------

# M6 §4.6 "negative samples are constructed by randomly substituting the query": which fact is substituted.
NEGATIVE_KINDS: tuple[str, ...] = ("colour", "shape", "size", "position", "count", "random")
# Caption styles (mmkit.data.text.CAPTION_STYLES) that state each fact: a substitution must change the text.
# "shape_count" ("two circles and a square") names no colour; like the pretraining pairs, ITM leaves it out.
KIND_STYLES: dict[str, tuple[str, ...]] = {
    "colour": ("full", "full_alt", "count_intro", "colour_shape"),
    "shape": ("full", "full_alt", "count_intro", "colour_shape"),
    "size": ("full", "full_alt", "count_intro"),
    "position": ("full", "full_alt"),
    "count": ("count_intro",),
    "random": ("full", "full_alt", "count_intro", "colour_shape"),
}
ITM_STYLES: tuple[str, ...] = ("full", "full_alt", "count_intro", "colour_shape")


class Negative(NamedTuple):
    text: str                 # the substituted caption (false of the scene)
    kind: str                 # one of NEGATIVE_KINDS
    scene: object             # the edited Scene it describes (colour/shape/size/position), the other scene
                              # (random), or None (count: the scene is unchanged, the count word is not)


def count_head(n: int, lang: str) -> str:
    """The head of a "count_intro" caption claiming ``n`` objects (as mmkit.data.text.caption writes it)."""
    if lang == "en":
        return f"{NUMBER_WORDS_EN[n]} shape{'s' if n > 1 else ''} on a white background: "
    return f"白色背景上有{NUMBER_WORDS_ZH[n]}个物体：" if n > 1 else "白色背景上有一个物体："


def substitute_caption(scene, style: str, lang: str, kind: str, rng, other_scene=None) -> Negative:
    """A caption of ``style`` in ``lang`` that is false of ``scene`` because ONE fact was substituted.

    ``rng`` is a ``random.Random`` (or anything with ``choice`` / ``randrange``). colour / shape / size: one
    object gets another value; position: one object moves to an empty cell; count: the number word of a
    "count_intro" caption changes (the listed objects stay); random: ``other_scene``'s caption (it must differ).
    """
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; use one of {NEGATIVE_KINDS}")
    if style not in KIND_STYLES[kind]:
        raise ValueError(f"a {style!r} caption does not state the {kind} (use one of {KIND_STYLES[kind]} for "
                         f"{kind} negatives)")
    positive = caption(scene, style, lang)
    if kind == "random":
        if other_scene is None:
            raise ValueError("random negatives need other_scene (another scene to take the caption from)")
        text = caption(other_scene, style, lang)
        if text == positive:
            raise ValueError("other_scene has the same caption as scene; pass a different scene")
        return Negative(text, kind, other_scene)
    n = len(scene.objects)
    if kind == "count":
        wrong = rng.choice([m for m in range(1, max(4, n + 1) + 1) if m != n])
        body = positive.split(": ", 1)[1] if lang == "en" else positive.split("：", 1)[1]
        return Negative(count_head(wrong, lang) + body, kind, None)
    i = rng.randrange(n)
    obj = scene.objects[i]
    if kind == "position":
        taken = {o.position for o in scene.objects}
        new = dataclasses.replace(obj, position=rng.choice([p for p in POSITIONS if p not in taken]))
    else:
        values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[kind]
        new = dataclasses.replace(obj, **{kind: rng.choice([v for v in values if v != getattr(obj, kind)])})
    edited = Scene(scene.objects[:i] + (new,) + scene.objects[i + 1:], seed=scene.seed)
    return Negative(caption(edited, style, lang), kind, edited)


class ITMPair(NamedTuple):
    index: int                # which scene / image of the pool
    text: str
    label: int                # 1 = the text matches the image, 0 = a substituted negative
    kind: str                 # the negative kind this pair belongs to (a positive carries its twin's kind)
    lang: str
    style: str


def itm_pairs(scenes: Sequence, index: int, kind: str, rng, lang: str | None = None) -> tuple[ITMPair, ITMPair]:
    """(positive, negative) for scene ``index`` of ``scenes``: same style and language, the negative of ``kind``.

    Positives and negatives come in twins so every style and language is exactly as often true as false: the
    classifier cannot read the answer off the wording.
    """
    scene = scenes[index]
    lang = lang or rng.choice(("en", "zh"))
    style = rng.choice(KIND_STYLES[kind])
    other = None
    if kind == "random":
        pos = caption(scene, style, lang)
        for _ in range(16):
            j = rng.randrange(len(scenes))
            if j != index and caption(scenes[j], style, lang) != pos:
                other = scenes[j]
                break
        if other is None:
            raise ValueError("could not find another scene with a different caption; use more scenes")
    neg = substitute_caption(scene, style, lang, kind, rng, other)
    return (ITMPair(index, caption(scene, style, lang), 1, kind, lang, style),
            ITMPair(index, neg.text, 0, kind, lang, style))


class ITMPairs:
    """Twins (positive, negative) over a :class:`SceneBank`: the ITM ``batch_fn`` and fixed evaluation pairs."""

    def __init__(self, bank: SceneBank, kinds: Sequence[str] = NEGATIVE_KINDS, lang: str = "both"):
        self.bank, self.kinds, self.lang = bank, tuple(kinds), lang
        bad = [k for k in self.kinds if k not in NEGATIVE_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown negative kinds {bad}; use a non-empty subset of {NEGATIVE_KINDS}")
        if lang not in ("en", "zh", "both"):
            raise ValueError(f"lang must be 'en', 'zh' or 'both', got {lang!r}")

    def __len__(self) -> int:
        return len(self.bank)

    def pairs(self, n_scenes: int, rng) -> list[ITMPair]:
        """Twins for ``n_scenes`` random scenes, each with a random negative kind."""
        out = []
        for _ in range(n_scenes):
            i = rng.randrange(len(self.bank))
            lang = None if self.lang == "both" else self.lang
            out += itm_pairs(self.bank.scenes, i, rng.choice(self.kinds), rng, lang)
        return out

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """``batch_fn`` for :func:`mmkit.train.train`: ``batch_size // 2`` twins. Returns {"images": (B, 3, S, S),
        "texts": [str], "labels": (B,) float, "kinds": [str]}."""
        if batch_size % 2:
            raise ValueError(f"ITM batches hold (positive, negative) twins: batch_size must be even, got {batch_size}")
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        return self.collate(self.pairs(batch_size // 2, rng))

    def collate(self, pairs: Sequence[ITMPair]) -> dict:
        return {"images": self.bank.images([p.index for p in pairs]), "texts": [p.text for p in pairs],
                "labels": torch.tensor([float(p.label) for p in pairs]), "kinds": [p.kind for p in pairs]}

    def eval_pairs(self, n: int, seed: int = 0) -> list[ITMPair]:
        """Fixed twins for evaluation: for each of the first ``n`` scenes one twin per negative kind (languages
        alternate between scenes, the style is drawn per twin)."""
        rng = random.Random(seed)
        out = []
        for kind in self.kinds:
            for i in range(min(n, len(self.bank))):
                out += itm_pairs(self.bank.scenes, i, kind, rng, ("en", "zh")[i % 2])
        return out
