"""Text about Shapes World scenes, in English and Chinese, derived exactly from the objects.

Everything here is a pure function of a :class:`~mmkit.data.world.Scene`: no text generator looks at
pixels, and every sentence is true of the scene (or, for NLVR2 / SNLI-VE examples, correctly labelled).
Where wording varies (paraphrase order, product-description phrasing), the choice is drawn from a
random generator seeded by the scene seed, so the same scene always gets the same text.

What is produced, per scene (``lang`` is ``"en"`` or ``"zh"``):

==========================  ==============================================================  ==========
function                    example (en / zh)                                                used by
==========================  ==============================================================  ==========
``captions``                "a small red circle at the top left and a large blue square     M6, mPLUG
                            in the center" / "左上方有一个小的红色圆形，中间有一个大的
                            蓝色正方形" (5 paraphrases, see ``CAPTION_STYLES``)
``relational_captions``     "a red circle left of a blue square" / "红色圆形在蓝色正方形的   all
                            左边"
``questions``               QA("what colour is the circle?", "red", "colour", "en")          VQA
``groundings``              Grounding("the large blue square", Box(...), 1, "en")           mPLUG
``product_description``     several templated sentences (text-only pretraining)             M6
``poem``                    a Chinese poem obeying M6 §4.5's format constraints              M6
``pair_statement``          NLVR2: ("the left image has more circles than the right         VLMo
                            image", True)
``hypotheses``              SNLI-VE: (hypothesis, "entailment" | "neutral" |                 mPLUG
                            "contradiction")
==========================  ==============================================================  ==========

Semantics (what the words mean in this world):

* position words name the 3x3 grid cell of an object (``POSITIONS``);
* "A left of B" means A's grid column is strictly smaller than B's (rows may differ); "right of",
  "above" (row strictly smaller) and "below" likewise. Objects never overlap, so this holds for pixels;
* "a red circle left of a blue square" in a caption is existential (some red circle is left of some
  blue square); questions and referring expressions use *unique* descriptions ("the red circle"),
  choosing the shortest description that matches exactly one object (``referring_attributes``);
* VQA answers come from a fixed vocabulary per language (``ANSWERS``): colour, shape, size and position
  names, counts ``0``-``9`` (``零个``-``九个``), and yes/no (``有``/``没有`` for existence, ``是``/``不是``
  otherwise, as Chinese answers them);
* SNLI-VE *neutral* hypotheses talk about properties a picture of flat coloured shapes cannot show:
  material ("made of wood"), purpose ("is used as a coaster"), weight, price, origin, owner. The world
  never defines them, so neither they nor their negations follow from the image (``NEUTRAL_*``).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, NamedTuple, Sequence

from mmkit.data.world import (
    COLOURS,
    COLOURS_ZH,
    POSITIONS,
    POSITIONS_ZH,
    SHAPES,
    SHAPES_ZH,
    SIZES,
    SIZES_ZH,
    Box,
    Scene,
    WorldObject,
    Rng,
    object_box,
)

LANGS: tuple[str, ...] = ("en", "zh")


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; use one of {LANGS}")


# --------------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------------
POSITION_PHRASE_EN: dict[str, str] = {   # how a position follows a noun: "a red circle at the top left"
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
SHAPE_PLURAL_EN: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS_EN: tuple[str, ...] = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS_ZH: tuple[str, ...] = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATIONS_ZH: dict[str, str] = {"left of": "左边", "right of": "右边", "above": "上面", "below": "下面"}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# --------------------------------------------------------------------------------------------------
# VQA answer vocabulary (fixed, so VQA can be trained as classification over it)
# --------------------------------------------------------------------------------------------------
QTYPES: tuple[str, ...] = ("colour", "shape", "size", "count", "existence", "position", "relation")
COUNT_ANSWERS_EN: tuple[str, ...] = tuple(str(i) for i in range(10))               # "0" .. "9"
COUNT_ANSWERS_ZH: tuple[str, ...] = tuple(f"{w}个" for w in NUMBER_WORDS_ZH)        # "零个" .. "九个"
YES_NO_EN: tuple[str, str] = ("yes", "no")
EXISTS_ZH: tuple[str, str] = ("有", "没有")     # answers to "图中有…吗？"
IS_ZH: tuple[str, str] = ("是", "不是")         # answers to "…在…的左边吗？"
ANSWERS_EN: tuple[str, ...] = COLOURS + SHAPES + SIZES + POSITIONS + COUNT_ANSWERS_EN + YES_NO_EN
ANSWERS_ZH: tuple[str, ...] = (
    tuple(COLOURS_ZH[c] for c in COLOURS) + tuple(SHAPES_ZH[s] for s in SHAPES)
    + tuple(SIZES_ZH[s] for s in SIZES) + tuple(POSITIONS_ZH[p] for p in POSITIONS)
    + COUNT_ANSWERS_ZH + EXISTS_ZH + IS_ZH
)
ANSWERS: dict[str, tuple[str, ...]] = {"en": ANSWERS_EN, "zh": ANSWERS_ZH}


def answer_vocab(lang: str = "en") -> tuple[str, ...]:
    """The answer list for ``lang``; ``"both"`` is the English list followed by the Chinese one."""
    if lang == "both":
        return ANSWERS_EN + ANSWERS_ZH
    _check_lang(lang)
    return ANSWERS[lang]


class QA(NamedTuple):
    question: str
    answer: str      # always a member of ANSWERS[lang]
    qtype: str       # one of QTYPES
    lang: str


class Relation(NamedTuple):
    subject: int     # index into scene.objects
    relation: str    # one of RELATIONS
    object: int      # index into scene.objects


class Grounding(NamedTuple):
    expression: str  # a referring expression that matches exactly one object
    box: Box         # that object's box, in pixels for the requested image size
    index: int       # index into scene.objects
    lang: str


class PairStatement(NamedTuple):
    statement: str   # about a (left, right) pair of scenes, NLVR2 style
    label: bool      # True if the statement holds for the pair
    lang: str
    kind: str        # template family: "compare_more", "compare_fewer", "compare_same", "both", ...


ENTAILMENT_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")


class Hypothesis(NamedTuple):
    hypothesis: str
    label: str       # one of ENTAILMENT_LABELS
    lang: str
    kind: str        # what the sentence is about: "exists", "count", "position", "material", ...


# --------------------------------------------------------------------------------------------------
# Noun phrases and unique descriptions
# --------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase_en(obj: WorldObject, attrs: Sequence[str], article: str = "the") -> str:
    """English noun phrase naming ``attrs`` of ``obj`` (a subset of shape/colour/size/position).

    ``noun_phrase_en(o, ("size", "colour", "shape", "position"), "a")`` -> "a small red circle at the top left";
    without "shape" the noun is "object": ``("colour",)`` -> "the red object".
    """
    words = [getattr(obj, a) for a in ("size", "colour") if a in attrs]
    words.append(obj.shape if "shape" in attrs else "object")
    text = " ".join(words)
    if article == "a":
        text = f"{_article(text)} {text}"
    elif article:
        text = f"{article} {text}"
    if "position" in attrs:
        text += " " + POSITION_PHRASE_EN[obj.position]
    return text


def noun_phrase_zh(obj: WorldObject, attrs: Sequence[str]) -> str:
    """Chinese noun phrase: ``("position", "size", "colour", "shape")`` -> "左上方的小的红色圆形";
    without a shape the noun is 物体: ``("colour",)`` -> "红色的物体"."""
    text = ""
    if "position" in attrs:
        text += POSITIONS_ZH[obj.position] + "的"
    if "size" in attrs:
        text += SIZES_ZH[obj.size] + "的"
    if "colour" in attrs:
        text += COLOURS_ZH[obj.colour]
    if "shape" in attrs:
        text += SHAPES_ZH[obj.shape]
    else:
        text += ("的" if "colour" in attrs else "") + "物体"
    return text


def noun_phrase(obj: WorldObject, attrs: Sequence[str], lang: str, article: str = "the") -> str:
    return noun_phrase_en(obj, attrs, article) if lang == "en" else noun_phrase_zh(obj, attrs)


# Candidate attribute sets for a unique description, shortest first. Position is unique by itself
# (one object per cell), so the last candidates always succeed.
REFERRING_ATTRIBUTE_SETS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
    ("shape", "position"),
    ("colour", "shape", "position"),
    ("size", "colour", "shape", "position"),
)


def _matches(a: WorldObject, b: WorldObject, attrs: Sequence[str]) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k in attrs)


def is_unique(scene: Scene, index: int, attrs: Sequence[str]) -> bool:
    """True if exactly one object of ``scene`` (the one at ``index``) has ``index``'s values of ``attrs``."""
    target = scene.objects[index]
    return sum(_matches(target, o, attrs) for o in scene.objects) == 1


def referring_attributes(
    scene: Scene, index: int, candidates: Sequence[Sequence[str]] = REFERRING_ATTRIBUTE_SETS
) -> tuple[str, ...] | None:
    """The first attribute set in ``candidates`` that singles out object ``index`` (None if none does)."""
    for attrs in candidates:
        if is_unique(scene, index, attrs):
            return tuple(attrs)
    return None


def referring_expression(scene: Scene, index: int, lang: str = "en", full: bool = False) -> str:
    """A description matching only object ``index``: the shortest one, or with ``full=True`` the one
    naming size, colour and shape ("the large blue square"; plus the position if that is not unique)."""
    _check_lang(lang)
    if full:
        attrs = ("size", "colour", "shape")
        if not is_unique(scene, index, attrs):
            attrs = ("size", "colour", "shape", "position")
    else:
        attrs = referring_attributes(scene, index)  # never None: position is unique
    return noun_phrase(scene.objects[index], attrs, lang)


def groundings(scene: Scene, image_size: int = 64, lang: str = "en") -> list[Grounding]:
    """Referring expressions with boxes: per object the shortest unique description, the full
    size-colour-shape one, and one with the position (duplicates removed)."""
    _check_lang(lang)
    out = []
    for i, obj in enumerate(scene.objects):
        box = object_box(obj, image_size)
        seen = []
        for expr in (
            referring_expression(scene, i, lang),
            referring_expression(scene, i, lang, full=True),
            noun_phrase(obj, ("size", "colour", "shape", "position"), lang),
        ):
            if expr not in seen:
                seen.append(expr)
                out.append(Grounding(expr, box, i, lang))
    return out


# --------------------------------------------------------------------------------------------------
# Relations
# --------------------------------------------------------------------------------------------------
def relation_holds(a: WorldObject, relation: str, b: WorldObject) -> bool:
    """Grid semantics: "left of" = strictly smaller column; "above" = strictly smaller row."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")


def relations(scene: Scene) -> list[Relation]:
    """Every true (subject, relation, object) triple between two different objects."""
    return [
        Relation(i, r, j)
        for i, a in enumerate(scene.objects)
        for j, b in enumerate(scene.objects)
        if i != j
        for r in RELATIONS
        if relation_holds(a, r, b)
    ]


_CANONICAL_EN = re.compile(r"is (.+) (right of|below) (.+)\?")
_CANONICAL_ZH = re.compile(r"(.+)在(.+)的(右边|下面)吗？")


def canonical_question(question: str) -> str:
    """A relation question asked in its one direction per axis: "is A right of B?" -> "is B left of A?", "is A below
    B?" -> "is B above A?" (Chinese: "A在B的右边吗？" -> "B在A的左边吗？"); the answer is the same, other questions are
    returned unchanged. Why: the world asks each pair's true relation and its opposite, so the yes / no answer is an
    XOR of the asked direction and the one that holds, which no input predicts alone and a tiny model does not learn
    in minutes; in one direction the answer follows from the two objects' cells (notebook 04, section 6)."""
    m = _CANONICAL_EN.fullmatch(question)
    if m:
        return f"is {m.group(3)} {'left of' if m.group(2) == 'right of' else 'above'} {m.group(1)}?"
    m = _CANONICAL_ZH.fullmatch(question)
    if m:
        return f"{m.group(2)}在{m.group(1)}的{'左边' if m.group(3) == '右边' else '上面'}吗？"
    return question


def relation_sentence(subject: str, relation: str, obj: str, lang: str) -> str:
    """"{subject} left of {obj}" / "{subject}在{obj}的左边" (no final punctuation)."""
    if lang == "en":
        return f"{subject} {relation} {obj}"
    return f"{subject}在{obj}的{RELATIONS_ZH[relation]}"


def relational_captions(scene: Scene, lang: str = "en") -> list[str]:
    """One caption per pair of objects and axis on which they differ, e.g. "a red circle left of a
    blue square" (existential: indefinite articles). The direction (left of / right of) is chosen by
    the scene's seed. Empty for one-object scenes."""
    _check_lang(lang)
    rng = Rng(f"relational-{scene.seed}-{lang}")
    objs = scene.objects
    out = []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            for axis in (("left of", "right of"), ("above", "below")):
                rel = next((r for r in axis if relation_holds(objs[i], r, objs[j])), None)
                if rel is None:
                    continue  # same column (or row): no relation on this axis
                a, b = (i, j) if rng.random() < 0.5 else (j, i)
                if a == j:
                    rel = _OPPOSITE[rel]
                attrs = ("colour", "shape")
                out.append(relation_sentence(noun_phrase(objs[a], attrs, lang, "a"), rel,
                                             noun_phrase(objs[b], attrs, lang, "a"), lang))
    return out


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------
CAPTION_STYLES: tuple[str, ...] = (
    "full",          # every attribute of every object, reading order
    "full_alt",      # every attribute, other word order
    "count_intro",   # "two shapes on a white background: a small red circle and ..." (no positions)
    "colour_shape",  # "a red circle and a blue square" (colour + shape only)
    "shape_count",   # "two circles and one square" (shape counts only)
)
FULL_ATTRIBUTES = ("size", "colour", "shape")


def _join_en(items: Sequence[str], sep: str = ", ") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return sep.join(items[:-1]) + " and " + items[-1]


def _join_zh(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return "、".join(items[:-1]) + "和" + items[-1]


def reading_order(scene: Scene) -> list[WorldObject]:
    """Objects sorted top-to-bottom, left-to-right (by grid cell)."""
    return sorted(scene.objects, key=lambda o: POSITIONS.index(o.position))


def _shape_counts(scene: Scene) -> list[tuple[str, int]]:
    counts = Counter(o.shape for o in scene.objects)
    return [(s, counts[s]) for s in SHAPES if counts[s]]


def caption(scene: Scene, style: str = "full", lang: str = "en") -> str:
    """One caption of the given ``style`` (see ``CAPTION_STYLES``); no final punctuation."""
    _check_lang(lang)
    ordered = reading_order(scene)
    shuffled = Rng(f"caption-{scene.seed}-{lang}").shuffle(list(scene.objects))
    n = len(scene.objects)
    if lang == "en":
        if style == "full":
            return _join_en([noun_phrase_en(o, FULL_ATTRIBUTES + ("position",), "a") for o in ordered])
        if style == "full_alt":
            parts = [f"{POSITION_PHRASE_EN[o.position]} there is {noun_phrase_en(o, FULL_ATTRIBUTES, 'a')}" for o in ordered]
            return _join_en(parts, sep=", ") if n < 3 else ", ".join(parts[:-1]) + ", and " + parts[-1]
        if style == "count_intro":
            head = f"{NUMBER_WORDS_EN[n]} shape{'s' if n > 1 else ''} on a white background"
            return head + ": " + _join_en([noun_phrase_en(o, FULL_ATTRIBUTES, "a") for o in shuffled])
        if style == "colour_shape":
            return _join_en([noun_phrase_en(o, ("colour", "shape"), "a") for o in shuffled])
        if style == "shape_count":
            return _join_en([f"{NUMBER_WORDS_EN[k]} {SHAPE_PLURAL_EN[s] if k > 1 else s}" for s, k in _shape_counts(scene)])
    else:
        if style == "full":
            return "，".join(f"{POSITIONS_ZH[o.position]}有一个{noun_phrase_zh(o, FULL_ATTRIBUTES)}" for o in ordered)
        if style == "full_alt":
            return "，".join(f"一个{noun_phrase_zh(o, FULL_ATTRIBUTES)}位于{POSITIONS_ZH[o.position]}" for o in ordered)
        if style == "count_intro":
            return (f"白色背景上有{NUMBER_WORDS_ZH[n]}个物体：" if n > 1 else "白色背景上有一个物体：") + _join_zh(
                [f"一个{noun_phrase_zh(o, FULL_ATTRIBUTES)}" for o in shuffled])
        if style == "colour_shape":
            return _join_zh([f"一个{noun_phrase_zh(o, ('colour', 'shape'))}" for o in shuffled])
        if style == "shape_count":
            return _join_zh([f"{NUMBER_WORDS_ZH[k]}个{SHAPES_ZH[s]}" for s, k in _shape_counts(scene)])
    raise ValueError(f"unknown caption style {style!r}; use one of {CAPTION_STYLES}")


def captions(scene: Scene, lang: str = "en") -> list[str]:
    """All caption paraphrases of ``scene``, one per style in ``CAPTION_STYLES`` (same order)."""
    return [caption(scene, style, lang) for style in CAPTION_STYLES]


# --------------------------------------------------------------------------------------------------
# Questions and answers
# --------------------------------------------------------------------------------------------------
# Descriptions that do not give the answer away: a colour question may not name the colour, etc.
_REFS_WITHOUT = {
    "colour": (("shape",), ("size", "shape"), ("shape", "position")),
    "shape": (("colour",), ("size", "colour"), ("position",)),
    "size": (("shape",), ("colour", "shape"), ("shape", "position")),
    "position": (("shape",), ("colour", "shape"), ("size", "colour", "shape")),
}


def _ref(scene: Scene, i: int, lang: str, candidates=REFERRING_ATTRIBUTE_SETS) -> str | None:
    attrs = referring_attributes(scene, i, candidates)
    return None if attrs is None else noun_phrase(scene.objects[i], attrs, lang)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def questions(scene: Scene, lang: str = "en") -> list[QA]:
    """Every question this module can ask about ``scene``, with its answer (deterministic order).

    Types (``QTYPES``): colour, shape, size and position of each object (when a description without
    the asked attribute singles it out), counts (all objects; each shape; each colour present; one absent
    shape if any), existence (each present colour+shape, the same number of absent ones), and relations
    (for each pair and axis, the true relation and its false opposite: answers are balanced yes/no).
    """
    _check_lang(lang)
    en = lang == "en"
    out: list[QA] = []
    objs = scene.objects

    def add(q: str, a: str, t: str) -> None:
        out.append(QA(q, a, t, lang))

    for i, o in enumerate(objs):
        ref = _ref(scene, i, lang, _REFS_WITHOUT["colour"])
        if ref:
            add(f"what colour is {ref}?" if en else f"{ref}是什么颜色的？", o.colour if en else COLOURS_ZH[o.colour], "colour")
        ref = _ref(scene, i, lang, _REFS_WITHOUT["shape"])
        if ref:
            add(f"what shape is {ref}?" if en else f"{ref}是什么形状的？", o.shape if en else SHAPES_ZH[o.shape], "shape")
        ref = _ref(scene, i, lang, _REFS_WITHOUT["size"])
        if ref:
            add(f"is {ref} small or large?" if en else f"{ref}是大的还是小的？", o.size if en else SIZES_ZH[o.size], "size")
        ref = _ref(scene, i, lang, _REFS_WITHOUT["position"])
        if ref:
            add(f"where is {ref}?" if en else f"{ref}在哪里？", o.position if en else POSITIONS_ZH[o.position], "position")

    # Counts: the answer is a count word from the fixed vocabulary.
    def count_answer(k: int) -> str:
        return COUNT_ANSWERS_EN[k] if en else COUNT_ANSWERS_ZH[k]

    add("how many objects are there?" if en else "图中一共有几个物体？", count_answer(len(objs)), "count")
    shape_counts = Counter(o.shape for o in objs)
    absent_shapes = [s for s in SHAPES if not shape_counts[s]]
    for s in [s for s in SHAPES if shape_counts[s]] + absent_shapes[:1]:
        add(f"how many {SHAPE_PLURAL_EN[s]} are there?" if en else f"图中有几个{SHAPES_ZH[s]}？", count_answer(shape_counts[s]), "count")
    colour_counts = Counter(o.colour for o in objs)
    for c in [c for c in COLOURS if colour_counts[c]]:
        add(f"how many {c} objects are there?" if en else f"图中有几个{COLOURS_ZH[c]}的物体？", count_answer(colour_counts[c]), "count")

    # Existence: each present colour+shape (yes) and as many absent ones (no), chosen by the seed.
    present = sorted({(o.colour, o.shape) for o in objs}, key=lambda cs: (COLOURS.index(cs[0]), SHAPES.index(cs[1])))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    absent = Rng(f"existence-{scene.seed}").sample(absent, len(present))
    for (c, s), exists in [(cs, True) for cs in present] + [(cs, False) for cs in absent]:
        if en:
            add(f"is there {_article(c)} {c} {s}?", "yes" if exists else "no", "existence")
        else:
            add(f"图中有{COLOURS_ZH[c]}{SHAPES_ZH[s]}吗？", EXISTS_ZH[0] if exists else EXISTS_ZH[1], "existence")

    # Relations: for each pair and axis on which they differ, ask the true relation and its opposite.
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = _ref(scene, i, lang), _ref(scene, j, lang)
            for axis in (("left of", "right of"), ("above", "below")):
                rel = next((r for r in axis if relation_holds(objs[i], r, objs[j])), None)
                if rel is None:
                    continue
                for r, truth in ((rel, True), (_OPPOSITE[rel], False)):
                    if en:
                        add(f"is {a} {r} {b}?", "yes" if truth else "no", "relation")
                    else:
                        add(relation_sentence(a, r, b, lang) + "吗？", IS_ZH[0] if truth else IS_ZH[1], "relation")
    return out


def sample_question(scene: Scene, lang: str = "en", seed: int | str = 0, qtypes: Sequence[str] | None = None) -> QA:
    """One question: a question type uniformly among those available (optionally restricted to
    ``qtypes``), then a question of that type uniformly. Deterministic in (scene, lang, seed)."""
    rng = Rng(f"qa-{scene.seed}-{lang}-{seed}")
    by_type: dict[str, list[QA]] = {}
    for qa in questions(scene, lang):
        if qtypes is None or qa.qtype in qtypes:
            by_type.setdefault(qa.qtype, []).append(qa)
    if not by_type:
        raise ValueError(f"scene {scene.seed} has no question of types {qtypes}; "
                         f"(relation questions need 2+ objects); choose from {QTYPES}")
    qtype = rng.choice([t for t in QTYPES if t in by_type])
    return rng.choice(by_type[qtype])


# --------------------------------------------------------------------------------------------------
# Product descriptions (text-only pretraining, M6 §2.3: "product description" is one of its sources)
# --------------------------------------------------------------------------------------------------
_OPEN_EN = (
    "This minimalist set shows {n} on a clean white background.",
    "Simple shapes, bold colours: {n} photographed on white.",
    "Our studio shot features {n} against a plain white backdrop.",
    "Here {verb_n} {n}, neatly arranged on a white surface.",
)
_OBJ_EN = (
    "{A} sits {at}.", "{A} is placed {at}.", "You can see {a} {at}.", "{At}, there is {a}.", "{A} rests {at}.",
)
_CLOSE_EN = (
    "Clean lines and bright colours make it easy on the eye.",
    "A simple, modern look for any desk or shelf.",
    "Each piece has a crisp, flat finish.",
    "Bright, cheerful and simple.",
    "Great as a small gift for friends who love design.",
    "The layout is tidy and balanced.",
)
_OPEN_ZH = (
    "这款简约套装在白色背景上展示了{n}。",
    "简单的形状，鲜明的颜色：白色背景上摆放着{n}。",
    "本店实拍图，纯白背景上共有{n}。",
    "画面干净整洁，白色台面上整齐地放着{n}。",
)
_OBJ_ZH = (
    "{pos}有一个{np}。", "一个{np}摆放在{pos}。", "{pos}可以看到一个{np}。", "一个{np}位于{pos}。",
)
_CLOSE_ZH = (
    "线条简洁，色彩明快，看起来十分舒服。",
    "简约现代的风格，放在书桌或者书架上都很合适。",
    "每一件都做工平整，边缘清晰。",
    "颜色鲜艳，造型简单大方。",
    "送给喜欢设计的朋友也是不错的小礼物。",
    "整体布局整齐，疏密有致。",
)


def _colour_summary(scene: Scene, lang: str) -> str:
    colours = [c for c in COLOURS if any(o.colour == c for o in scene.objects)]
    if lang == "en":
        if len(colours) == 1:
            return f"Everything here is {colours[0]}."
        return f"The colours are {_join_en(colours)}."
    if len(colours) == 1:
        return f"所有物体都是{COLOURS_ZH[colours[0]]}的。"
    return f"颜色有{_join_zh([COLOURS_ZH[c] for c in colours])}。"


def product_description(scene: Scene, lang: str = "en") -> str:
    """A product-page style paragraph: an opening, one sentence per object, a colour and a shape
    summary (all true), and one or two closing sentences of generic praise that state no visual fact.
    Wording is drawn from a generator seeded by the scene seed."""
    _check_lang(lang)
    rng = Rng(f"description-{scene.seed}-{lang}")
    n = len(scene.objects)
    objs = rng.shuffle(list(scene.objects))
    counts = _shape_counts(scene)
    if lang == "en":
        n_phrase = f"{NUMBER_WORDS_EN[n]} object{'s' if n > 1 else ''}"
        sents = [rng.choice(_OPEN_EN).format(n=n_phrase, verb_n="are" if n > 1 else "is")]
        for o in objs:
            a = noun_phrase_en(o, FULL_ATTRIBUTES, "a")
            at = POSITION_PHRASE_EN[o.position]
            sents.append(rng.choice(_OBJ_EN).format(A=_cap(a), a=a, at=at, At=_cap(at)))
        sents.append(_colour_summary(scene, lang))
        if n > 1:
            shapes = _join_en([f"{NUMBER_WORDS_EN[k]} {SHAPE_PLURAL_EN[s] if k > 1 else s}" for s, k in counts])
            sents.append(f"In total the set has {shapes}.")
        sents.extend(rng.sample(_CLOSE_EN, 1 + rng.randint(0, 1)))
        return " ".join(sents)
    n_phrase = f"{NUMBER_WORDS_ZH[n]}个物体" if n > 1 else "一个物体"
    sents = [rng.choice(_OPEN_ZH).format(n=n_phrase)]
    for o in objs:
        sents.append(rng.choice(_OBJ_ZH).format(pos=POSITIONS_ZH[o.position], np=noun_phrase_zh(o, FULL_ATTRIBUTES)))
    sents.append(_colour_summary(scene, lang))
    if n > 1:
        sents.append("一共有" + _join_zh([f"{NUMBER_WORDS_ZH[k]}个{SHAPES_ZH[s]}" for s, k in counts]) + "。")
    sents.extend(rng.sample(_CLOSE_ZH, 1 + rng.randint(0, 1)))
    return "".join(sents)


# --------------------------------------------------------------------------------------------------
# Chinese poems with M6's format constraints (M6 §4.5)
# --------------------------------------------------------------------------------------------------
POEM_COLOUR = {"red": "红", "green": "绿", "blue": "蓝", "yellow": "黄", "purple": "紫", "orange": "橙"}
POEM_SHAPE = {"circle": "圆", "square": "方", "triangle": "角"}
POEM_SIZE = {"small": "小小", "large": "大大"}
POEM_POSITION = {
    "top left": "左上", "top": "正上", "top right": "右上", "left": "左侧", "center": "中央",
    "right": "右侧", "bottom left": "左下", "bottom": "正下", "bottom right": "右下",
}
_POEM_VERBS = ("居", "在", "立", "卧")
_POEM_FILL_5 = ("白底映清光", "素净无尘埃", "静看形与色", "简约见匠心", "清简自成章", "色彩自分明")
_POEM_FILL_7 = ("白底素净映清光", "素雅清新入眼来", "简约之中见匠心", "色彩斑斓入画来", "静看形色自成章", "一幅小景动人心")
POEM_MAX_LINES = 16  # M6 §4.5 stops generation after 16 lines


def poem(scene: Scene, line_chars: int = 5) -> str:
    """A Chinese poem about the scene that satisfies M6 §4.5's format constraints: at least 4 lines,
    an even number of lines, every line exactly ``line_chars`` (5 or 7) characters (punctuation not
    counted), lines ending in "，" and "。" alternately and separated by newlines.

    One line per object ("红圆居左上": red circle rests at the top left; 7-character lines add the size:
    "小小红圆居左上"), padded with scenic lines that state no visual fact ("白底映清光")."""
    if line_chars not in (5, 7):
        raise ValueError(f"line_chars must be 5 or 7 (M6 §4.5 format constraints), got {line_chars}")
    rng = Rng(f"poem-{scene.seed}-{line_chars}")
    lines = []
    for o in reading_order(scene):
        core = POEM_COLOUR[o.colour] + POEM_SHAPE[o.shape] + rng.choice(_POEM_VERBS) + POEM_POSITION[o.position]
        lines.append(core if line_chars == 5 else POEM_SIZE[o.size] + core)
    fillers = rng.shuffle(list(_POEM_FILL_5 if line_chars == 5 else _POEM_FILL_7))
    while len(lines) < 4 or len(lines) % 2:
        lines.append(fillers.pop())
    return "\n".join(line + ("，" if k % 2 == 0 else "。") for k, line in enumerate(lines))


# --------------------------------------------------------------------------------------------------
# NLVR2-style statements about a pair of scenes (VLMo §4, NLVR2)
# --------------------------------------------------------------------------------------------------
def _count(scene: Scene, pred: Callable[[WorldObject], bool]) -> int:
    return sum(1 for o in scene.objects if pred(o))


def pair_statements(left: Scene, right: Scene, lang: str = "en") -> list[PairStatement]:
    """Every statement the templates can make about (left, right), each with its truth value.

    Properties P are "objects", each shape ("circles") and each colour ("red objects") that occurs in
    at least one image. Families: compare_more / compare_fewer / compare_same (counts of P), exactly
    (the left or right image has exactly k of P), and for each colour+shape in either image: both,
    only_left, only_right, neither (the last also for a few absent combinations).
    """
    _check_lang(lang)
    en = lang == "en"
    out: list[PairStatement] = []

    def add(text: str, label: bool, kind: str) -> None:
        out.append(PairStatement(text, bool(label), lang, kind))

    # (English singular, English plural, Chinese, predicate)
    props: list[tuple[str, str, str, Callable[[WorldObject], bool]]] = [("object", "objects", "物体", lambda o: True)]
    props += [(s, SHAPE_PLURAL_EN[s], SHAPES_ZH[s], (lambda o, s=s: o.shape == s)) for s in SHAPES]
    props += [(f"{c} object", f"{c} objects", f"{COLOURS_ZH[c]}物体", (lambda o, c=c: o.colour == c)) for c in COLOURS]
    for name_1, name_en, name_zh, pred in props:
        nl, nr = _count(left, pred), _count(right, pred)
        if nl + nr == 0:
            continue
        if en:
            add(f"the left image has more {name_en} than the right image", nl > nr, "compare_more")
            add(f"the left image has fewer {name_en} than the right image", nl < nr, "compare_fewer")
            add(f"both images have the same number of {name_en}", nl == nr, "compare_same")
        else:
            add(f"左图中的{name_zh}比右图多", nl > nr, "compare_more")
            add(f"左图中的{name_zh}比右图少", nl < nr, "compare_fewer")
            add(f"两张图中{name_zh}的数量相同", nl == nr, "compare_same")
        for side, k in (("left", nl), ("right", nr)):
            for claim in {k, max(0, k - 1), k + 1} - {0}:
                if en:
                    noun = name_en if claim > 1 else name_1
                    add(f"the {side} image contains exactly {NUMBER_WORDS_EN[claim]} {noun}", claim == k, "exactly")
                else:
                    side_zh = "左图" if side == "left" else "右图"
                    add(f"{side_zh}中恰好有{NUMBER_WORDS_ZH[claim]}个{name_zh}", claim == k, "exactly")

    combos = sorted({(o.colour, o.shape) for o in left.objects + right.objects},
                    key=lambda cs: (COLOURS.index(cs[0]), SHAPES.index(cs[1])))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combos]
    absent = Rng(f"pair-absent-{left.seed}-{right.seed}").sample(absent, 2)
    for c, s in combos + absent:
        in_l = any(o.colour == c and o.shape == s for o in left.objects)
        in_r = any(o.colour == c and o.shape == s for o in right.objects)
        thing_en, thing_zh = f"{_article(c)} {c} {s}", f"{COLOURS_ZH[c]}{SHAPES_ZH[s]}"
        if en:
            add(f"both images contain {thing_en}", in_l and in_r, "both")
            add(f"only the left image contains {thing_en}", in_l and not in_r, "only_left")
            add(f"only the right image contains {thing_en}", in_r and not in_l, "only_right")
            add(f"neither image contains {thing_en}", not in_l and not in_r, "neither")
        else:
            add(f"两张图中都有{thing_zh}", in_l and in_r, "both")
            add(f"只有左图中有{thing_zh}", in_l and not in_r, "only_left")
            add(f"只有右图中有{thing_zh}", in_r and not in_l, "only_right")
            add(f"两张图中都没有{thing_zh}", not in_l and not in_r, "neither")
    return out


def pair_statement(left: Scene, right: Scene, lang: str = "en", seed: int | str = 0) -> PairStatement:
    """One NLVR2 example: the label is a fair coin (True/False balanced), then a statement with that
    label is drawn uniformly from ``pair_statements`` (the other label only if none exists)."""
    rng = Rng(f"pair-{left.seed}-{right.seed}-{lang}-{seed}")
    candidates = pair_statements(left, right, lang)
    want = rng.random() < 0.5
    pool = [s for s in candidates if s.label == want] or [s for s in candidates if s.label != want]
    return rng.choice(pool)


# --------------------------------------------------------------------------------------------------
# SNLI-VE style hypotheses (mPLUG §5.2, visual entailment)
# --------------------------------------------------------------------------------------------------
NEUTRAL_MATERIALS_EN = ("wood", "plastic", "glass", "metal", "paper", "ceramic", "felt", "rubber")
NEUTRAL_MATERIALS_ZH = ("木头", "塑料", "玻璃", "金属", "纸", "陶瓷", "毛毡", "橡胶")
NEUTRAL_PURPOSES_EN = ("a coaster", "a fridge magnet", "a toy for children", "a paperweight", "a button", "a game piece")
NEUTRAL_PURPOSES_ZH = ("杯垫", "冰箱贴", "儿童玩具", "镇纸", "纽扣", "棋子")
NEUTRAL_SCENE_EN = (
    "the set costs ten dollars", "the shapes were made in Italy", "the photo was taken in the morning",
    "the shapes belong to a child", "this set is sold out", "the set comes in a gift box",
)
NEUTRAL_SCENE_ZH = (
    "这套物品售价十元", "这些形状产自意大利", "这张照片是早上拍的", "这些形状属于一个孩子", "这套物品已经卖完了", "这套物品装在礼盒里",
)
NEUTRAL_WEIGHTS_EN = ("weighs one kilogram", "is very light", "is heavy")
NEUTRAL_WEIGHTS_ZH = ("重一公斤", "非常轻", "很重")


def hypotheses(scene: Scene, lang: str = "en") -> list[Hypothesis]:
    """Labelled hypotheses about ``scene`` (deterministic list, every label present).

    entailment:    true facts (an object exists, the object count, an object's position, size and
                   colour, a true relation, an absent shape);
    contradiction: the same kinds of facts made false (an absent colour+shape, a wrong count, a wrong
                   position / size, the opposite relation, a present shape said to be absent);
    neutral:       facts about existing objects that the picture cannot settle (material, purpose,
                   weight) and about the product (price, origin, owner, when the photo was taken).
    """
    _check_lang(lang)
    en = lang == "en"
    rng = Rng(f"hypotheses-{scene.seed}-{lang}")
    out: list[Hypothesis] = []
    objs = scene.objects
    n = len(objs)

    def add(text: str, label: str, kind: str) -> None:
        out.append(Hypothesis(text, label, lang, kind))

    def there_is(o_attrs: tuple[str, str]) -> str:
        c, s = o_attrs
        return f"there is {_article(c)} {c} {s}" if en else f"图中有一个{COLOURS_ZH[c]}{SHAPES_ZH[s]}"

    def n_objects(k: int) -> str:
        return f"the image shows {NUMBER_WORDS_EN[k]} object{'s' if k != 1 else ''}" if en else f"图中有{NUMBER_WORDS_ZH[k]}个物体"

    # Existence of colour+shape.
    present = sorted({(o.colour, o.shape) for o in objs}, key=lambda cs: (COLOURS.index(cs[0]), SHAPES.index(cs[1])))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    for cs in present:
        add(there_is(cs), "entailment", "exists")
    for cs in rng.sample(absent, len(present)):
        add(there_is(cs), "contradiction", "exists")
    # Object count.
    add(n_objects(n), "entailment", "count")
    add(n_objects(n + 1 if n < 9 and (n == 1 or rng.random() < 0.5) else n - 1), "contradiction", "count")
    # Absent / present shapes.
    shapes_here = {o.shape for o in objs}
    for s in SHAPES:
        text = f"there are no {SHAPE_PLURAL_EN[s]}" if en else f"图中没有{SHAPES_ZH[s]}"
        add(text, "contradiction" if s in shapes_here else "entailment", "no_shape")
    # Per object: position, size (with descriptions that do not give the answer away), neutral facts.
    for i, o in enumerate(objs):
        ref = _ref(scene, i, lang, _REFS_WITHOUT["position"])
        if ref:
            wrong = rng.choice([p for p in POSITIONS if p != o.position])
            for p, label in ((o.position, "entailment"), (wrong, "contradiction")):
                add(f"{ref} is {POSITION_PHRASE_EN[p]}" if en else f"{ref}在{POSITIONS_ZH[p]}", label, "position")
        ref = _ref(scene, i, lang, _REFS_WITHOUT["size"])
        if ref:
            other = "large" if o.size == "small" else "small"
            for sz, label in ((o.size, "entailment"), (other, "contradiction")):
                add(f"{ref} is {sz}" if en else f"{ref}是{SIZES_ZH[sz]}的", label, "size")
        ref = _ref(scene, i, lang)
        k = rng.randint(0, len(NEUTRAL_MATERIALS_EN) - 1)
        add(f"{ref} is made of {NEUTRAL_MATERIALS_EN[k]}" if en else f"{ref}是{NEUTRAL_MATERIALS_ZH[k]}做的", "neutral", "material")
        k = rng.randint(0, len(NEUTRAL_PURPOSES_EN) - 1)
        add(f"{ref} is used as {NEUTRAL_PURPOSES_EN[k]}" if en else f"{ref}是用来做{NEUTRAL_PURPOSES_ZH[k]}的", "neutral", "purpose")
        k = rng.randint(0, len(NEUTRAL_WEIGHTS_EN) - 1)
        add(f"{ref} {NEUTRAL_WEIGHTS_EN[k]}" if en else f"{ref}{NEUTRAL_WEIGHTS_ZH[k]}", "neutral", "weight")
    for k in rng.sample(range(len(NEUTRAL_SCENE_EN)), 2):
        add(NEUTRAL_SCENE_EN[k] if en else NEUTRAL_SCENE_ZH[k], "neutral", "product")
    # Relations: the true one and its opposite.
    for rel in relations(scene):
        if rel.subject > rel.object:
            continue
        a, b = _ref(scene, rel.subject, lang), _ref(scene, rel.object, lang)
        if en:
            add(f"{a} is {rel.relation} {b}", "entailment", "relation")
            add(f"{a} is {_OPPOSITE[rel.relation]} {b}", "contradiction", "relation")
        else:
            add(relation_sentence(a, rel.relation, b, lang), "entailment", "relation")
            add(relation_sentence(a, _OPPOSITE[rel.relation], b, lang), "contradiction", "relation")
    return out


def sample_hypothesis(scene: Scene, lang: str = "en", seed: int | str = 0) -> Hypothesis:
    """One SNLI-VE example with a uniformly drawn label (balanced over ``ENTAILMENT_LABELS``)."""
    rng = Rng(f"ve-{scene.seed}-{lang}-{seed}")
    by_label: dict[str, list[Hypothesis]] = {}
    for h in hypotheses(scene, lang):
        by_label.setdefault(h.label, []).append(h)
    return rng.choice(by_label[rng.choice(ENTAILMENT_LABELS)])


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------
def scene_texts(scene: Scene, lang: str = "en") -> list[str]:
    """Every text about one scene (captions, relational captions, "question answer" lines, referring
    expressions, the product description, and for Chinese the poems): a tokenizer-training corpus."""
    _check_lang(lang)
    texts = captions(scene, lang) + relational_captions(scene, lang)
    sep = " " if lang == "en" else ""  # Chinese is written without spaces ("…是什么颜色的？橙色")
    texts += [f"{qa.question}{sep}{qa.answer}" for qa in questions(scene, lang)]
    texts += [g.expression for g in groundings(scene, 64, lang)]
    texts.append(product_description(scene, lang))
    if lang == "zh":
        texts += [poem(scene, 5), poem(scene, 7)]
    return texts


# --------------------------------------------------------------------------------------------------
# Questions about a product description, with long answers (M6 §4.4 text QA)
# --------------------------------------------------------------------------------------------------
DESCRIPTION_QA_KINDS: tuple[str, ...] = ("contents", "where")


class DescriptionQA(NamedTuple):
    context: str          # the scene's English product description
    question: str         # "what is in this set" / "where is the red circle" (no question mark)
    answer: str           # the long reference answer
    kind: str             # "contents" (every object, ~20-40 tokens) or "where" (one object)
    scene: Scene


def description_order(scene: Scene, description: str) -> list[WorldObject]:
    """The scene's objects in the order the product description mentions them (one sentence each)."""
    import re

    sents = [s.lower() for s in re.split(r"(?<=[.!?])\s+", description)]
    where = {}
    for o in scene.objects:
        np_, at = noun_phrase_en(o, FULL_ATTRIBUTES, "a").split(" ", 1)[1], POSITION_PHRASE_EN[o.position]
        pat = re.compile(re.escape(at) + r"(?! left| right)\b")
        where[id(o)] = next((k for k, s in enumerate(sents) if np_ in s and pat.search(s)), len(sents))
    return sorted(scene.objects, key=lambda o: where[id(o)])


def description_question(scene: Scene, kind: str = "contents", index: int = 0) -> DescriptionQA:
    """A question about ``scene``'s English product description with a long answer (M6 §4.4).

    contents: "what is in this set" -> "this set has a small red circle at the top left, ... and a large blue
    square in the center." (objects in the order the description gives them); where: "where is the red circle"
    -> "the red circle is at the top left, and it is small." (object ``index``).
    """
    if kind not in DESCRIPTION_QA_KINDS:
        raise ValueError(f"unknown QA kind {kind!r}; use one of {DESCRIPTION_QA_KINDS}")
    context = product_description(scene, "en")
    if kind == "contents":
        question = "what is in this set"
        objs = description_order(scene, context)
        answer = "this set has " + _join_en([noun_phrase_en(o, FULL_ATTRIBUTES + ("position",), "a")
                                             for o in objs]) + "."
    else:
        index = index % len(scene.objects)
        o, ref = scene.objects[index], referring_expression(scene, index, "en")
        question = f"where is {ref}"
        answer = f"{ref} is {POSITION_PHRASE_EN[o.position]}, and it is {o.size}."
    return DescriptionQA(context, question, answer, kind, scene)


def answer_facts(answer: str, scene: Scene) -> float:
    """Fraction of the scene's objects whose full fact (size, colour, shape, position: "a small red circle at the
    top left") the answer states: the *content* of a "contents" answer, whatever its order and wording around it."""
    import re

    a = answer.lower()
    hits = sum(bool(re.search(re.escape(noun_phrase_en(o, FULL_ATTRIBUTES + ("position",), "a").split(" ", 1)[1])
                              + r"(?! left| right)\b", a)) for o in scene.objects)
    return hits / len(scene.objects)
