"""Torch datasets over the Shapes World's fixed splits, and the collate function that batches them.

Every item is a deterministic function of ``(split, index, options)``: item ``i`` of a dataset is built
from the scene with seed ``split_seeds(split, n, start)[i]`` (``PairDataset`` uses two consecutive seeds
per item), and every choice of wording (caption style, question, expression, statement, language for
``lang="both"``) is drawn from a generator seeded by that seed, ``text_seed`` and the dataset kind. The
same arguments give the same items on every machine; train, val and test items come from disjoint seed
ranges (``mmkit.data.world.SPLITS``), so nothing leaks between splits.

Items are plain dicts (they go through ``torch.utils.data.DataLoader`` unchanged). ``S`` is
``image_size``; images are float32 in [0, 1], channels first, like ``scene_to_tensor``.

=====================  ============================================================================
dataset                item keys (shape / type)
=====================  ============================================================================
``ImageTextDataset``   image (3, S, S) float32, text str (a caption), lang str, style str,
                       seed int, index int [, scene Scene]
``TextOnlyDataset``    text str (product description or caption), lang str, source str, seed, index
``ImageOnlyDataset``   image (3, S, S), seed, index [, scene]
``VQADataset``         image (3, S, S), question str, answer str, answer_index int (into
                       ``dataset.answers``), qtype str, qtype_index int (into ``QTYPES``), lang, seed,
                       index [, scene]
``GroundingDataset``   image (3, S, S), expression str, box (4,) float32 ``(x0, y0, x1, y1)`` in [0, 1],
                       box_pixels (4,) float32 (= box * S), object_index int, lang, seed, index [, scene]
``PairDataset``        images (2, 3, S, S) (left, right), statement str, label int (1 = true, 0 = false),
                       kind str, lang, seeds (2,) int64, index [, scenes]
``EntailmentDataset``  image (3, S, S), hypothesis str, label int (index into ``ENTAILMENT_LABELS``:
                       0 entailment, 1 neutral, 2 contradiction), label_name str, kind str, lang, seed,
                       index [, scene]
=====================  ============================================================================

Batching: ``collate = make_collate(tokenizer, max_length=32)``, then
``DataLoader(ds, batch_size=B, collate_fn=collate)``. Same-shaped tensors are stacked (image
(B, 3, S, S), images (B, 2, 3, S, S), box (B, 4)), numbers become tensors (labels and indices int64),
strings and scenes stay lists, and the item's text (the first of ``TEXT_KEYS`` it has) is tokenized into
``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) bool (True = real token, may attend: the kit's
mask convention; pass ``mask_dtype=torch.long`` for Hugging Face 0/1 masks), plus ``token_type_ids``
when the tokenizer returns them. ``extra_text_keys=("answer",)`` also tokenizes VQA answers into
``answer_input_ids`` / ``answer_attention_mask`` (generative VQA, M6 §4.2, mPLUG §5.2).

Speed (2 shared cores, one process; measured with ``mmkit.data.world.scenes_per_second`` and by
iterating the datasets): rendering is the cost -- about 2,500 items/s at 32 px and 300-600 items/s at
64 px without a cache. With ``cache_images=True`` each image (and its scene) is made once and kept as
uint8 (3 KB per 32 px image, 12 KB at 64 px: 10,000 64-px images = 120 MB); from the second epoch on
image-only / image-text items cost a copy (roughly 25,000-90,000 and 8,000-35,000 items/s), while VQA,
pair and entailment items stay near 3,000/s, bound by generating their text (0.1-0.3 ms). With
``DataLoader(num_workers>0)`` each worker keeps its own cache: call ``ds.precompute()`` first so the
forked workers share the rendered images.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from mmkit.data.text import (
    CAPTION_STYLES,
    ENTAILMENT_LABELS,
    LANGS,
    QTYPES,
    answer_vocab,
    caption,
    groundings,
    pair_statement,
    product_description,
    sample_hypothesis,
    sample_question,
)
from mmkit.data.scenes import render_uint8
from mmkit.data.world import POSITIONS, SPLITS, Rng, Scene, sample_scene

__all__ = [
    "WorldDataset", "ImageTextDataset", "TextOnlyDataset", "ImageOnlyDataset", "VQADataset",
    "GroundingDataset", "PairDataset", "EntailmentDataset", "DATASETS", "make_dataset",
    "Collator", "make_collate", "TEXT_KEYS", "render_uint8",
]

DATASET_LANGS: tuple[str, ...] = LANGS + ("both",)   # "both": each item draws en or zh from its seed
TEXT_SOURCES: tuple[str, ...] = ("description", "caption")


def _to_float(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (3, S, S) -> float32 in [0, 1]; bit-identical to ``image_to_tensor(render(...))``."""
    return img_u8.float().div_(255.0)


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(allowed)}")


def _as_tuple(value: str | Sequence[str] | None, default: Sequence[str], allowed: Sequence[str],
              what: str) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    values = (value,) if isinstance(value, str) else tuple(value)
    if not values:
        raise ValueError(f"need at least one {what}; use some of {tuple(allowed)}")
    for v in values:
        _check_choice(v, allowed, what)
    return values


class WorldDataset(Dataset):
    """Common machinery: seeds of a split, scene sampling, rendering with an optional in-memory cache.

    Args:
        split: "train", "val" or "test" (``SPLITS``).
        n: number of items.
        start: first item's offset inside the split (items use seeds ``start .. start + n - 1``, times
            ``scenes_per_item`` for pairs), so ``start`` lets two datasets of one split stay disjoint.
        image_size: side of the rendered images in pixels (32 or 64 are typical; >= 8).
        min_objects / max_objects: objects per scene (1-9, default 1-3).
        cache_images: render each image once and keep it in memory (uint8).
        return_scene: also return the :class:`Scene` (``"scene"``; ``"scenes"`` for pairs).
        text_seed: changes every text choice (caption style, question, ...) but not the images; e.g.
            pass the epoch number to see new sentences about the same pictures.
    """

    kind = "world"          # mixed into the text generators' seeds, so datasets differ in their choices
    scenes_per_item = 1     # PairDataset: 2
    has_images = True

    def __init__(self, split: str = "train", n: int = 1000, *, start: int = 0, image_size: int = 64,
                 min_objects: int = 1, max_objects: int = 3, cache_images: bool = False,
                 return_scene: bool = False, text_seed: int = 0):
        _check_choice(split, tuple(SPLITS), "split")
        lo, hi = SPLITS[split]
        capacity = (hi - lo) // self.scenes_per_item
        if not isinstance(n, int) or not isinstance(start, int) or n < 0 or start < 0 or start + n > capacity:
            per = f" ({self.scenes_per_item} scenes per item)" if self.scenes_per_item > 1 else ""
            raise ValueError(
                f"{type(self).__name__}: split {split!r} holds {capacity} items{per}; start={start}, n={n} does "
                f"not fit. Use integers with 0 <= start and start + n <= {capacity}.")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8 (32 or 64 are typical), got {image_size!r}")
        if not 1 <= min_objects <= max_objects <= len(POSITIONS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(POSITIONS)} (one object per grid "
                             f"cell), got min_objects={min_objects}, max_objects={max_objects}")
        self.split, self.n, self.start = split, n, start
        self.image_size = image_size
        self.min_objects, self.max_objects = min_objects, max_objects
        self.cache_images, self.return_scene, self.text_seed = cache_images, return_scene, text_seed
        self._first_seed = lo + start * self.scenes_per_item
        self._cache: dict[int, torch.Tensor] = {}   # seed -> uint8 (3, S, S)
        self._scenes: dict[int, Scene] = {}         # seed -> Scene (with cache_images)

    # -- indexing ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def _index(self, index: int) -> int:
        if not isinstance(index, int):
            index = int(index)   # numpy / torch integers from samplers
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {self.n} items")
        return index

    def seeds(self, index: int) -> tuple[int, ...]:
        """The scene seed(s) item ``index`` is built from (inside ``SPLITS[split]``)."""
        index = self._index(index)
        first = self._first_seed + index * self.scenes_per_item
        return tuple(range(first, first + self.scenes_per_item))

    def seed(self, index: int) -> int:
        return self.seeds(index)[0]

    def scene(self, index: int) -> Scene:
        return self._scene_of_seed(self.seed(index))

    def _scene_of_seed(self, seed: int) -> Scene:
        if not self.cache_images:
            return sample_scene(seed, self.min_objects, self.max_objects)
        scene = self._scenes.get(seed)          # sampling costs ~0.1 ms: cached along with the image
        if scene is None:
            scene = self._scenes[seed] = sample_scene(seed, self.min_objects, self.max_objects)
        return scene

    def _rng(self, seed: int, what: str = "") -> Rng:
        return Rng(f"{self.kind}-{what}-{seed}-{self.text_seed}")

    def _lang(self, lang: str, seed: int) -> str:
        return self._rng(seed, "lang").choice(LANGS) if lang == "both" else lang

    # -- images -----------------------------------------------------------------------------------
    def _image(self, scene: Scene) -> torch.Tensor:
        """float32 (3, S, S) in [0, 1] for ``scene`` (cached by seed when ``cache_images``)."""
        if not self.cache_images:
            return _to_float(render_uint8(scene, self.image_size))
        img = self._cache.get(scene.seed)
        if img is None:
            img = self._cache[scene.seed] = render_uint8(scene, self.image_size)
        return _to_float(img)

    def precompute(self, progress: bool = False) -> "WorldDataset":
        """Render every image into the cache now (turns ``cache_images`` on). Call it before making a
        multi-worker DataLoader so the forked workers share one cache. Returns ``self``."""
        if not self.has_images:
            return self
        self.cache_images = True
        indices = range(self.n)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"rendering {type(self).__name__}")
        for i in indices:
            for seed in self.seeds(i):
                if seed not in self._cache:
                    self._cache[seed] = render_uint8(self._scene_of_seed(seed), self.image_size)
        return self

    @property
    def cache_bytes(self) -> int:
        """Memory held by the image cache."""
        return sum(t.numel() * t.element_size() for t in self._cache.values())

    def clear_cache(self) -> None:
        self._cache.clear()
        self._scenes.clear()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={self.n}, start={self.start}, "
                f"image_size={self.image_size}, objects={self.min_objects}-{self.max_objects}"
                f"{', cached' if self.cache_images else ''})")

    def _base(self, index: int, scene: Scene) -> dict[str, Any]:
        item: dict[str, Any] = {"seed": scene.seed, "index": index}
        if self.return_scene:
            item["scene"] = scene
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:  # pragma: no cover - subclasses
        raise NotImplementedError


class ImageTextDataset(WorldDataset):
    """Image + one caption (ITC / ITM / MLM / captioning: M6 §3.3, VLMo §3.3, mPLUG §3.3).

    Extra args: ``lang`` ("en", "zh", "both"), ``styles`` (subset of ``CAPTION_STYLES``; one is drawn per
    item). Item: image (3, S, S), text, lang, style, seed, index [, scene].
    """

    kind = "image_text"

    def __init__(self, split: str = "train", n: int = 1000, *, lang: str = "en",
                 styles: str | Sequence[str] | None = None, **kw):
        super().__init__(split, n, **kw)
        _check_choice(lang, DATASET_LANGS, "language")
        self.lang = lang
        self.styles = _as_tuple(styles, CAPTION_STYLES, CAPTION_STYLES, "caption style")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        scene = self.scene(index)
        lang = self._lang(self.lang, scene.seed)
        style = self._rng(scene.seed, "style").choice(self.styles)
        return {"image": self._image(scene), "text": caption(scene, style, lang), "lang": lang,
                "style": style, **self._base(index, scene)}


class TextOnlyDataset(WorldDataset):
    """Text alone, for text-only pretraining (M6 §2.3 uses product descriptions): no rendering at all.

    Extra args: ``lang``, ``sources`` (subset of ``TEXT_SOURCES`` = ("description", "caption"); one is
    drawn per item), ``styles`` (caption styles for the "caption" source).
    Item: text, lang, source, seed, index [, scene].
    """

    kind = "text_only"
    has_images = False

    def __init__(self, split: str = "train", n: int = 1000, *, lang: str = "en",
                 sources: str | Sequence[str] | None = ("description",),
                 styles: str | Sequence[str] | None = None, **kw):
        kw.pop("cache_images", None)   # nothing to render
        super().__init__(split, n, **kw)
        _check_choice(lang, DATASET_LANGS, "language")
        self.lang = lang
        self.sources = _as_tuple(sources, TEXT_SOURCES, TEXT_SOURCES, "text source")
        self.styles = _as_tuple(styles, CAPTION_STYLES, CAPTION_STYLES, "caption style")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        scene = self.scene(index)
        lang = self._lang(self.lang, scene.seed)
        rng = self._rng(scene.seed, "source")
        source = rng.choice(self.sources)
        if source == "description":
            text = product_description(scene, lang)
        else:
            text = caption(scene, rng.choice(self.styles), lang)
        return {"text": text, "lang": lang, "source": source, **self._base(index, scene)}


class ImageOnlyDataset(WorldDataset):
    """Images alone (e.g. VQ autoencoder training for text-to-image, M6 §4.1). Item: image, seed, index."""

    kind = "image_only"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        scene = self.scene(index)
        return {"image": self._image(scene), **self._base(index, scene)}


class VQADataset(WorldDataset):
    """Image, question, answer (M6 §4.2, VLMo §4, mPLUG §5.2 VQA).

    Extra args: ``lang`` ("en", "zh", "both"), ``qtypes`` (subset of ``QTYPES``; a type is drawn uniformly
    among those the scene has, then a question of it). Only-"relation" datasets need two objects per
    scene, so ``min_objects`` is raised to 2 for them.

    ``dataset.answers`` is ``answer_vocab(lang)`` (for "both": English then Chinese answers), the
    classification targets; item ``answer_index`` indexes it. Item: image (3, S, S), question, answer,
    answer_index, qtype, qtype_index, lang, seed, index [, scene].
    """

    kind = "vqa"

    def __init__(self, split: str = "train", n: int = 1000, *, lang: str = "en",
                 qtypes: str | Sequence[str] | None = None, **kw):
        self.qtypes = _as_tuple(qtypes, QTYPES, QTYPES, "question type")
        if set(self.qtypes) == {"relation"}:          # relation questions need a pair of objects
            if kw.get("max_objects", 3) < 2:
                raise ValueError("qtypes=('relation',) needs scenes of 2+ objects, got max_objects="
                                 f"{kw['max_objects']}; use max_objects >= 2 or add other question types")
            kw["min_objects"] = max(2, kw.get("min_objects", 1))
        super().__init__(split, n, **kw)
        _check_choice(lang, DATASET_LANGS, "language")
        self.lang = lang
        self.answers: tuple[str, ...] = answer_vocab(lang)
        self.answer_to_index: dict[str, int] = {a: i for i, a in enumerate(self.answers)}

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        scene = self.scene(index)
        lang = self._lang(self.lang, scene.seed)
        qa = sample_question(scene, lang, seed=f"{self.kind}-{self.text_seed}", qtypes=self.qtypes)
        return {"image": self._image(scene), "question": qa.question, "answer": qa.answer,
                "answer_index": self.answer_to_index[qa.answer], "qtype": qa.qtype,
                "qtype_index": QTYPES.index(qa.qtype), "lang": lang, **self._base(index, scene)}


class GroundingDataset(WorldDataset):
    """Image, referring expression, the box of the object it names (mPLUG §5.2 visual grounding).

    Extra arg: ``lang``. One of ``groundings(scene)`` (shortest unique description, full description,
    description with position) is drawn per item. Item: image (3, S, S), expression, box (4,) float32
    (x0, y0, x1, y1) normalised to [0, 1], box_pixels (4,) float32 in pixels of the S x S image
    (= box * S), object_index, lang, seed, index [, scene].
    """

    kind = "grounding"

    def __init__(self, split: str = "train", n: int = 1000, *, lang: str = "en", **kw):
        super().__init__(split, n, **kw)
        _check_choice(lang, DATASET_LANGS, "language")
        self.lang = lang

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        scene = self.scene(index)
        lang = self._lang(self.lang, scene.seed)
        g = self._rng(scene.seed, "expression").choice(groundings(scene, self.image_size, lang))
        pixels = torch.tensor(tuple(g.box), dtype=torch.float32)                       # (4,)
        normalised = torch.tensor(tuple(g.box.normalised(self.image_size)), dtype=torch.float32)
        return {"image": self._image(scene), "expression": g.expression, "box": normalised,
                "box_pixels": pixels, "object_index": g.index, "lang": lang, **self._base(index, scene)}


class PairDataset(WorldDataset):
    """NLVR2-style: two images and a statement about them, true or false (VLMo §4).

    Item ``i`` uses the consecutive seeds ``2 (start + i)`` and ``2 (start + i) + 1`` of the split (left,
    right). The label is a fair coin per item (``pair_statement``), so labels are balanced. Extra arg:
    ``lang``. Item: images (2, 3, S, S) (left, right), statement, label int (1 = true), kind, lang,
    seeds (2,) int64, index [, scenes (left, right)]. Collated: images (B, 2, 3, S, S); the left images
    are ``batch["images"][:, 0]``.
    """

    kind = "pair"
    scenes_per_item = 2

    def __init__(self, split: str = "train", n: int = 1000, *, lang: str = "en", **kw):
        super().__init__(split, n, **kw)
        _check_choice(lang, DATASET_LANGS, "language")
        self.lang = lang

    def scenes(self, index: int) -> tuple[Scene, Scene]:
        left, right = self.seeds(index)
        return self._scene_of_seed(left), self._scene_of_seed(right)

    def scene(self, index: int) -> Scene:
        """The left scene (see :meth:`scenes` for both)."""
        return self.scenes(index)[0]

    def text_item(self, index: int) -> dict[str, Any]:
        """Item ``index`` without its images (statement, label, kind, lang): what a text-only baseline reads,
        about 30x faster than rendering the pair."""
        index = self._index(index)
        return self._text_fields(index, *self.scenes(index))

    def _text_fields(self, index: int, left: Scene, right: Scene) -> dict[str, Any]:
        lang = self._lang(self.lang, left.seed)
        st = pair_statement(left, right, lang, seed=f"{self.kind}-{self.text_seed}")
        return {"statement": st.statement, "label": int(st.label), "kind": st.kind, "lang": lang, "index": index}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        left, right = self.scenes(index)
        item = self._text_fields(index, left, right)
        item["images"] = torch.stack([self._image(left), self._image(right)])   # (2, 3, S, S)
        item["seeds"] = torch.tensor([left.seed, right.seed], dtype=torch.int64)
        if self.return_scene:
            item["scenes"] = (left, right)
        return item


class EntailmentDataset(WorldDataset):
    """SNLI-VE: image premise, text hypothesis, label entailment / neutral / contradiction (mPLUG §5.2).

    Labels are drawn uniformly per item (``sample_hypothesis``), so the three classes are balanced.
    Extra arg: ``lang``. Item: image (3, S, S), hypothesis, label int (index into ``ENTAILMENT_LABELS``),
    label_name, kind, lang, seed, index [, scene].
    """

    kind = "entailment"
    labels = ENTAILMENT_LABELS

    def __init__(self, split: str = "train", n: int = 1000, *, lang: str = "en", **kw):
        super().__init__(split, n, **kw)
        _check_choice(lang, DATASET_LANGS, "language")
        self.lang = lang

    def text_item(self, index: int) -> dict[str, Any]:
        """Item ``index`` without its image (hypothesis, label, label_name, kind, lang): what a text-only
        baseline reads."""
        index = self._index(index)
        return self._text_fields(index, self.scene(index))

    def _text_fields(self, index: int, scene: Scene) -> dict[str, Any]:
        lang = self._lang(self.lang, scene.seed)
        h = sample_hypothesis(scene, lang, seed=f"{self.kind}-{self.text_seed}")
        return {"hypothesis": h.hypothesis, "label": ENTAILMENT_LABELS.index(h.label), "label_name": h.label,
                "kind": h.kind, "lang": lang, "index": index}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        scene = self.scene(index)
        return {"image": self._image(scene), **self._text_fields(index, scene), **self._base(index, scene)}


DATASETS: dict[str, type[WorldDataset]] = {
    "image_text": ImageTextDataset,
    "text": TextOnlyDataset,
    "image": ImageOnlyDataset,
    "vqa": VQADataset,
    "grounding": GroundingDataset,
    "pair": PairDataset,          # NLVR2
    "entailment": EntailmentDataset,   # SNLI-VE
}


def make_dataset(task: str, split: str = "train", n: int = 1000, **options) -> WorldDataset:
    """``make_dataset("vqa", "val", 500, image_size=32)``: the dataset class of ``task`` (``DATASETS``)."""
    _check_choice(task, tuple(DATASETS), "dataset task")
    return DATASETS[task](split, n, **options)


# --------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------
TEXT_KEYS: tuple[str, ...] = ("text", "question", "expression", "statement", "hypothesis", "caption")


class Collator:
    """Batch a list of item dicts: stack tensors, tensorise numbers, tokenize the text.

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. ``load_tokenizer("world")``); None = no tokenization.
        max_length: texts are truncated to this many tokens (special tokens included).
        text_key: which key is the model's text input; default the first of ``TEXT_KEYS`` present.
        extra_text_keys: more string keys to tokenize, into ``{key}_input_ids`` / ``{key}_attention_mask``
            (e.g. ``("answer",)`` for generative VQA).
        pad_to_max_length: pad every batch to ``max_length`` instead of its longest text.
        mask_dtype: dtype of the attention masks; bool (True = real token) is the kit's convention,
            ``torch.long`` gives Hugging Face style 1/0.

    Output: every key of the items. Tensors of equal shape are stacked ((B, ...)); bools, ints and
    floats become tensors (bool, int64, float32); strings, scenes and everything else are lists.
    Tokenized text adds input_ids (B, L) int64, attention_mask (B, L), and token_type_ids (B, L) if
    the tokenizer returns them. Padding is on the right with ``tokenizer.pad_token_id``.
    """

    def __init__(self, tokenizer=None, max_length: int = 64, text_key: str | None = None,
                 extra_text_keys: Sequence[str] = (), pad_to_max_length: bool = False,
                 mask_dtype: torch.dtype = torch.bool):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for [CLS] text [SEP]; use >= 2 (e.g. 32)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_key = text_key
        self.extra_text_keys = tuple(extra_text_keys)
        self.pad_to_max_length = pad_to_max_length
        self.mask_dtype = mask_dtype

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize a list of strings: input_ids (B, L) int64, attention_mask (B, L)[, token_type_ids]."""
        if self.tokenizer is None:
            raise ValueError("this Collator has no tokenizer; pass make_collate(tokenizer, ...) "
                             "(e.g. mmkit.tokenizer.load_tokenizer('world'))")
        enc = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max_length else "longest",
                             truncation=self.max_length is not None, max_length=self.max_length,
                             return_tensors="pt")
        out = {"input_ids": enc["input_ids"].long(),
               "attention_mask": enc["attention_mask"].to(self.mask_dtype)}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"].long()
        return out

    def _text_key(self, item: dict) -> str | None:
        if self.text_key is not None:
            if self.text_key not in item:
                raise KeyError(f"items have no text key {self.text_key!r}; they have {sorted(item)}")
            return self.text_key
        return next((k for k in TEXT_KEYS if isinstance(item.get(k), str)), None)

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        keys = list(items[0])
        for it in items[1:]:
            if list(it) != keys and set(it) != set(keys):
                raise ValueError(f"items of one batch must share their keys, got {sorted(keys)} and {sorted(it)}")
        batch: dict[str, Any] = {k: _stack([it[k] for it in items], k) for k in keys}
        if self.tokenizer is not None:
            key = self._text_key(items[0])
            if key is not None:
                batch.update(self.tokenize(batch[key]))
            for extra in self.extra_text_keys:
                if extra not in batch:
                    raise KeyError(f"extra_text_keys names {extra!r}, but items have {sorted(keys)}")
                batch.update({f"{extra}_{k}": v for k, v in self.tokenize(batch[extra]).items()})
        return batch


def _stack(values: list, key: str) -> Any:
    v0 = values[0]
    if isinstance(v0, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack {key!r}: tensors of shapes {sorted(shapes)} in one batch "
                             "(mix of image sizes? use one image_size per DataLoader)")
        return torch.stack(values)
    if isinstance(v0, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(v0, int):
        return torch.tensor(values, dtype=torch.int64)
    if isinstance(v0, float):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)


def make_collate(tokenizer=None, max_length: int = 64, **kw) -> Callable[[Sequence[dict]], dict[str, Any]]:
    """A :class:`Collator` for ``DataLoader(..., collate_fn=make_collate(tok, max_length=32))``."""
    return Collator(tokenizer, max_length=max_length, **kw)
