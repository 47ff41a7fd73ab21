"""Captioning metrics for any captioner: BLEU-4 and CIDEr against the world's references, and attributes.

    s = caption_scores(captions, scenes, langs)      # CaptionScores(bleu4, cider, attr_acc, attr_precision, ...)
    attribute_scores(captions, scenes)               # which (colour, shape) a caption names vs the scene
    word_categories(tok.convert_ids_to_tokens(ids))  # "colour" / "shape" / "size" / "position" / "other" per token

BLEU-4 and CIDEr-D come from pycocoevalcap's pure-Python scorers (the COCO caption evaluation every paper of the
kit reports, mPLUG §5.2.2); every image is scored against all five reference captions of its scene in its
language (one per caption style). Chinese is scored by character, the usual practice for Chinese captions.
Attribute accuracy reads what BLEU cannot: whether the named colours and shapes are the scene's.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mmkit.data.text import captions
from mmkit.data.world import COLOURS, COLOURS_ZH, POSITIONS_ZH, SHAPES, SHAPES_ZH, SIZES, SIZES_ZH

__all__ = ["caption_references", "metric_tokens", "CaptionScores", "caption_scores", "caption_mentions",
           "attribute_scores", "word_categories", "bleu4"]


def caption_references(scene, lang: str) -> list[str]:
    """The world's reference captions of ``scene`` in ``lang``: one per style of ``CAPTION_STYLES`` (5)."""
    return captions(scene, lang)


def metric_tokens(text: str, lang: str | None = None) -> str:
    """Text as space-separated tokens for BLEU / CIDEr: lower-cased English words; Chinese by character (the
    usual practice for Chinese captioning metrics); punctuation dropped."""
    text = text.lower()
    toks = re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", text)
    return " ".join(toks)


class CaptionScores(NamedTuple):
    bleu4: float              # corpus BLEU-4 (pycocoevalcap Bleu(4)), all references of each image
    cider: float              # CIDEr-D (pycocoevalcap Cider; IDF over this evaluation's references), 0-10
    attr_acc: float           # attribute_scores: objects whose colour + shape the caption names
    attr_precision: float     # named (colour, shape) that are in the scene
    exact_objects: float      # captions naming exactly the scene's (colour, shape) multiset
    n: int                    # captions scored


def caption_scores(candidates: Sequence[str], scenes: Sequence, langs: Sequence[str]) -> CaptionScores:
    """BLEU-4 and CIDEr (pycocoevalcap's pure-Python scorers) of ``candidates`` against each scene's reference
    captions in its language (:func:`caption_references`), plus attribute accuracy against the scene's objects."""
    if not (len(candidates) == len(scenes) == len(langs)) or not candidates:
        raise ValueError(f"need one candidate, scene and language per image (non-empty), got {len(candidates)}, "
                         f"{len(scenes)}, {len(langs)}")
    gts = {i: [metric_tokens(r, lg) for r in caption_references(s, lg)] for i, (s, lg) in enumerate(zip(scenes, langs))}
    res = {i: [metric_tokens(c, lg) or "<empty>"] for i, (c, lg) in enumerate(zip(candidates, langs))}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    attr = attribute_scores(candidates, scenes)
    return CaptionScores(float(bleu[3]), float(cider), attr["attr_acc"], attr["attr_precision"],
                         attr["exact_objects"], len(candidates))


def _colour_shape_patterns():
    en = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
    zh = re.compile("(" + "|".join(COLOURS_ZH.values()) + ")(" + "|".join(SHAPES_ZH.values()) + ")")
    inv_c = {v: k for k, v in COLOURS_ZH.items()}
    inv_s = {v: k for k, v in SHAPES_ZH.items()}
    return en, zh, inv_c, inv_s


def caption_mentions(text: str) -> list[tuple[str, str]]:
    """Every (colour, shape) a caption names, in English names: "a small red circle and 一个大的蓝色正方形" ->
    [("red", "circle"), ("blue", "square")]. Words without both (e.g. "two circles") name nothing."""
    en, zh, inv_c, inv_s = _colour_shape_patterns()
    found = [(m.start(), m.group(1), m.group(2)) for m in en.finditer(text.lower())]
    found += [(m.start(), inv_c[m.group(1)], inv_s[m.group(2)]) for m in zh.finditer(text)]
    return [(c, s) for _, c, s in sorted(found)]


def attribute_scores(captions: Sequence[str], scenes) -> dict[str, float]:
    """Caption attribute accuracy against the scenes' objects (multiset matching of (colour, shape)).

    ``attr_acc``: fraction of objects whose colour and shape are both named (recall); ``attr_precision``:
    fraction of named (colour, shape) that are in the scene (hallucinations lower it); ``exact_objects``:
    fraction of captions naming exactly the scene's multiset of (colour, shape).
    """
    objects = matched = mentioned = exact = 0
    for text, scene in zip(captions, scenes):
        truth = Counter((o.colour, o.shape) for o in scene.objects)
        named = Counter(caption_mentions(text))
        hit = sum((truth & named).values())
        objects += sum(truth.values())
        mentioned += sum(named.values())
        matched += hit
        exact += int(truth == named)
    return {"attr_acc": matched / max(objects, 1), "attr_precision": matched / max(mentioned, 1),
            "exact_objects": exact / max(len(captions), 1)}


def word_categories(tokens: Sequence[str]) -> list[str]:
    """What each token of a caption names: "colour", "shape", "size", "position" or "other".

    English attribute words are whole tokens. Chinese ones are characters, some shared
    (正 in 正方形 and 正上方, 三 in 三角形 and 三个), so Chinese words are found as spans:
    the characters of 圆形 / 正方形 / 三角形 (except the common 形) are "shape",
    those of a position (左上方 -> 左上, 中间, ...; 方 excepted) "position".
    """
    en = {**{w: "colour" for w in COLOURS}, **{w: "shape" for w in SHAPES}, **{w: "size" for w in SIZES},
          **{w: "position" for w in ("top", "bottom", "left", "right", "center")}}
    zh_single = {**{c[0]: "colour" for c in COLOURS_ZH.values()}, **{c: "size" for c in SIZES_ZH.values()}}
    spans = [(w, "shape") for w in SHAPES_ZH.values()] + [(w, "position") for w in POSITIONS_ZH.values()]
    out = [en.get(t, zh_single.get(t, "other")) for t in tokens]
    for i in range(len(tokens)):
        for word, cat in spans:
            if "".join(tokens[i:i + len(word)]) == word:
                for j in range(i, i + len(word)):
                    if tokens[j] not in ("形", "方"):
                        out[j] = cat
    return out


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (pycocoevalcap) of ``candidates[i]`` against ``references[i]`` (lists of strings)."""
    score, _ = Bleu(4).compute_score({i: [metric_tokens(r) for r in refs] for i, refs in enumerate(references)},
                                     {i: [metric_tokens(c) or "<empty>"] for i, c in enumerate(candidates)}, verbose=0)
    return float(score[3])
