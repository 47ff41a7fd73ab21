"""M6 downstream (M6 §4.2-4.6) on the Shapes World: image-text matching, captioning, long-answer text QA, poems.

    model = mmkit.hub.load("m6-tiny-itm")                        # M6 §4.6, fine-tuned from m6-tiny-pretrained
    p = itm_scores(model, images, ["a red circle at the top", "一个蓝色正方形"], tok)   # (B,) match probability
    ev = evaluate_itm(model, tok, split="test", n=256)           # ITMEval(accuracy, per_kind, ranking, ...)

    m6 = mmkit.hub.load("m6-tiny-pretrained")
    caps = decode_captions(m6, images, tok, "beam", langs=["en"] * B)   # M6 §4.3: image in, no prompt
    caption_scores(caps, scenes, langs)                          # CaptionScores(bleu4, cider, attr_acc, ...)
    evaluate_captioning(m6, tok, "test", n=128)                  # greedy / beam / sample side by side

    qas, data = qa_data("train", 2000, start=50_000)             # M6 §4.4: "{description} {question}? answer:"
    finetune_text(m6, data, TrainConfig(steps=150, batch_size=32, lr=2e-3))
    evaluate_text_qa(m6, tok)                                    # QAEval(exact, facts, bleu4, answers)

    _, poems = poem_data("train", 2000, start=50_000)            # M6 §4.5: caption as title -> world poem
    finetune_text(m6, poems, TrainConfig(steps=60, batch_size=32, lr=2e-3))
    evaluate_poems(m6, tok, method="sample")                     # PoemEval(rule_ok, fact_precision, ...)

Decoding everywhere goes through transformers' ``generate()`` (:func:`hf_generate`: "greedy", "beam", "sample" =
top-k / top-p) via :class:`mmkit.generation.HFGenerationAdapter`. Generative VQA (M6 §4.2) is
:mod:`mmkit.models.m6_vqa`.

Image-text matching (M6 §4.6). The paper builds E-Commerce ITM from (product image, query) pairs and makes
"negative samples ... by randomly substituting the query in the original pairs"; the model "perform[s] binary
classification to discriminate positive and negative samples". Here the query is a world caption, and the
negatives substitute one fact of it (:func:`substitute_caption`): one object's colour, shape, size or position
(the scene is edited and re-captioned in the same style and language, so articles and word order stay right),
the object count ("two shapes ..." -> "three shapes ..."), or the whole caption (another scene's, "random").

The head (the paper does not say where it reads). M6 §3.3 makes every task "... to text", so the caption is
read as in image captioning: the image in the visual block, ``[BOS] caption [EOS]`` in the decoder block. A small
pooler + linear layer reads the final state of the closing [EOS] (which has attended to the image and the whole
caption) plus the min and mean log-probability M6 gives the caption's tokens (measured: zero-shot, that
likelihood alone puts the true caption above its substituted twin 97-100% of the time on 128 test scenes per
kind; the head turns it, with the [EOS] state, into a probability). ``M6ForImageTextMatching`` is an
:class:`M6Model` plus that head, so the fine-tuned model still captions and generates.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LogitsProcessor

from mmkit.config import register_model, register_preset
from mmkit.models.m6 import M6Config, M6Model
from mmkit.recipes import recipe

__all__ = [
    "NEGATIVE_KINDS", "KIND_STYLES", "ITM_STYLES", "Negative", "substitute_caption", "ITMPair", "itm_pairs",
    "M6ITMConfig", "M6ForImageTextMatching", "MatchOutput", "CaptionLikelihood", "caption_likelihood",
    "zero_shot_itm_ranking", "ITMData", "itm_loss", "itm_scores", "ITMEval", "evaluate_itm",
    "ITM_TRAIN", "ITM_TRAIN_FAST", "finetune_itm", "ITMRun", "tokenize_batch", "eval_pairs",
    "itm_model_from_pretrained",
    "DECODING", "caption_references", "metric_tokens", "CaptionScores", "caption_scores", "FirstTokenLanguage",
    "hf_generate", "decode_captions", "CaptionEval", "evaluate_captioning",
    "QA_PROMPT", "QA_KINDS", "TextQA", "text_qa", "seq2seq_example", "Seq2SeqData", "seq2seq_loss", "qa_data",
    "answer_facts", "QAEval", "evaluate_text_qa", "finetune_text",
    "POEM_PROMPT", "poem_data", "poem_facts", "PoemEval", "evaluate_poems",
]


# =========================================================================================================
# Part 1: Image-text matching (M6 §4.6)
# =========================================================================================================

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


def _count_head(n: int, lang: str) -> str:
    """The head of a "count_intro" caption claiming ``n`` objects (as mmkit.data.text.caption writes it)."""
    from mmkit.data.text import NUMBER_WORDS_EN, NUMBER_WORDS_ZH

    if lang == "en":
        return f"{NUMBER_WORDS_EN[n]} shape{'s' if n > 1 else ''} on a white background: "
    return f"白色背景上有{NUMBER_WORDS_ZH[n]}个物体：" if n > 1 else "白色背景上有一个物体："


def substitute_caption(scene, style: str, lang: str, kind: str, rng, other_scene=None) -> Negative:
    """A caption of ``style`` in ``lang`` that is false of ``scene`` because ONE fact was substituted.

    ``rng`` is a ``random.Random`` (or anything with ``choice`` / ``randrange``). colour / shape / size: one
    object gets another value; position: one object moves to an empty cell; count: the number word of a
    "count_intro" caption changes (the listed objects stay); random: ``other_scene``'s caption (it must differ).
    """
    from mmkit.data.text import caption
    from mmkit.data.world import COLOURS, POSITIONS, SHAPES, SIZES, Scene

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
        return Negative(_count_head(wrong, lang) + body, kind, None)
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
    from mmkit.data.text import caption

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


# -- the model ---------------------------------------------------------------------------------------------

@dataclass
class M6ITMConfig(M6Config):
    model_type: str = "m6_itm"       # M6 + an image-text matching head (M6 §4.6); every M6Config field applies
    itm_likelihood: bool = True      # also give the head the caption's token log-likelihoods under the image
                                     # (min and mean over tokens): M6's own image-to-text score. Measured on
                                     # m6-tiny-pretrained, zero-shot: the true caption out-scores its substituted
                                     # twin 97-100% of the time per kind; the head learns to calibrate it
    itm_pooler: bool = True          # BERT-style pooler (Linear + tanh) before the 1-logit classifier; False =
                                     # one Linear on the features


class MatchOutput(NamedTuple):
    logits: torch.Tensor              # (B,) match logits (sigmoid = probability)
    token_logprobs: torch.Tensor      # (B, W + 1) log p(caption token | image, earlier tokens), [EOS] last; 0 at pads
    state: torch.Tensor               # (B, D) final state of the closing [EOS] input


class CaptionLikelihood(NamedTuple):
    token_logprobs: torch.Tensor      # (B, W + 1) log p(token | image, earlier tokens), [EOS] last; 0 at pads
    worst: torch.Tensor               # (B,) the least likely token's log-probability
    mean: torch.Tensor                # (B,) mean log-probability per token ([EOS] included)
    state: torch.Tensor               # (B, D) final state of the closing [EOS] input


def caption_likelihood(model, images: torch.Tensor, caption_ids: torch.Tensor) -> CaptionLikelihood:
    """How likely any M6 finds each caption given its image: M6 §3.3 image-to-text, teacher-forced.

    Decoder input ``[BOS] c_1 .. c_L [EOS]``, targets ``c_1 .. c_L [EOS]``; caption_ids (B, W) right-padded with
    [PAD]. Zero-shot (the pretrained model), ``mean`` already ranks a caption above its substituted twin.
    """
    c = model.config
    B, W = caption_ids.shape
    dev = caption_ids.device
    lengths = (caption_ids != c.pad_token_id).sum(1)                              # (B,)
    rows = torch.arange(B, device=dev)
    dec = torch.full((B, W + 2), c.pad_token_id, dtype=torch.long, device=dev)    # [BOS] c_1 .. c_L [EOS] [PAD]..
    dec[:, 0] = c.bos_token_id
    dec[:, 1:W + 1] = caption_ids
    dec[rows, lengths + 1] = c.eos_token_id
    target = dec[:, 1:W + 2]                                                       # (B, W + 1)
    out = model.forward(images, None, dec)                                         # logits (B, W + 2, V)
    logp = out.logits[:, :W + 1].float().log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)
    valid = target != c.pad_token_id                                               # (B, W + 1): tokens + [EOS]
    logp = logp * valid
    state = out.hidden_states[:, -dec.shape[1]:][rows, lengths + 1]               # (B, D): the [EOS] input
    return CaptionLikelihood(logp, logp.masked_fill(~valid, 0.0).min(1).values,
                             logp.sum(1) / valid.sum(1).clamp(min=1), state)


class M6ForImageTextMatching(M6Model):
    """M6 with a binary match head (M6 §4.6). ``match(images, caption_ids) -> MatchOutput``.

    M6 §3.3 makes every task "... to text", so the caption is read the way M6 reads it in image captioning:
    image in the visual block, ``[BOS] caption [EOS]`` in the decoder block (causal, teacher-forced). The head
    sees the final state of the closing [EOS] (it has attended to the image and the whole caption) and, with
    ``itm_likelihood``, the min / mean log-probability the model gave the caption's tokens.
    """

    def __init__(self, config: M6ITMConfig, **kw):
        super().__init__(config, **kw)
        D = config.d_model
        F_in = D + (2 if config.itm_likelihood else 0)
        # M6 §4.6 "binary classification": pooler + one logit on the [EOS] state (+ likelihood features).
        layers = [nn.Linear(F_in, D), nn.Tanh(), nn.Linear(D, 1)] if config.itm_pooler else [nn.Linear(F_in, 1)]
        self.itm_head = nn.Sequential(*layers)
        for m in self.itm_head:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.init_std)
                nn.init.zeros_(m.bias)

    def match(self, images: torch.Tensor, caption_ids: torch.Tensor) -> MatchOutput:
        """images (B, C, H, W) in [0, 1], caption_ids (B, W) plain ids, right-padded with [PAD] -> MatchOutput."""
        r = caption_likelihood(self, images, caption_ids)
        feats = [r.state]
        if self.config.itm_likelihood:
            feats += [r.worst[:, None] * 0.1, r.mean[:, None]]                    # ~unit scale
        logits = self.itm_head(torch.cat(feats, dim=-1).to(r.state.dtype)).squeeze(-1)   # (B,)
        return MatchOutput(logits, r.token_logprobs, r.state)

    def match_logits(self, images: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """(B,) match logits (see :meth:`match`)."""
        return self.match(images, caption_ids).logits


register_model("m6_itm", M6ITMConfig, M6ForImageTextMatching)
register_preset("m6-tiny-itm", lambda: M6ITMConfig())


def _check_itm_model(model) -> None:
    if not hasattr(model, "match_logits"):
        raise TypeError(f"{type(model).__name__} has no image-text matching head; load one with "
                        "mmkit.hub.load('m6-tiny-itm') or build M6ForImageTextMatching(M6ITMConfig())")


def tokenize_batch(tok, texts: Sequence[str], max_len: int, pad_id: int) -> torch.Tensor:
    """Plain text ids (no specials) of ``texts``, cut at ``max_len``, right-padded with ``pad_id``: (B, W) long."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str (one caption per image), e.g. ['a red circle at the top']")
    ids = [x[:max_len] for x in tok(list(texts), add_special_tokens=False)["input_ids"]]
    out = torch.full((len(ids), max(1, max((len(x) for x in ids), default=1))), pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out


def _check_images(model, images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError("images must be a float tensor (B, 3, H, W) in [0, 1] (as the world datasets give them), got "
                        f"{type(images).__name__}{tuple(getattr(images, 'shape', ()))}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must lie in [0, 1] (the model normalises them itself), got values in "
                         f"[{lo:.2f}, {hi:.2f}]: pass raw pixels / 255, not normalised ones")


@torch.no_grad()
def itm_scores(model, images: torch.Tensor, texts: Sequence[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
    """M6 §4.6: the probability that ``texts[b]`` describes ``images[b]``: (B,) in [0, 1].

    ``images`` float (B, 3, H, W) in [0, 1]; ``texts`` a list of B strings (English or Chinese); ``model`` an
    :class:`M6ForImageTextMatching` (``mmkit.hub.load("m6-tiny-itm")``).
    """
    _check_itm_model(model)
    _check_images(model, images)
    if isinstance(texts, str) or len(texts) != images.shape[0]:
        raise ValueError(f"need one text per image: got {images.shape[0]} images and "
                         f"{'a single str' if isinstance(texts, str) else len(texts)} texts (pass a list)")
    c = model.config
    dev = model.wte.weight.device
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenize_batch(tokenizer, texts[i:i + batch_size], c.max_text_len - 2, c.pad_token_id).to(dev)
            out.append(torch.sigmoid(model.match_logits(images[i:i + batch_size].to(dev), enc).float()))
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0)


# -- data, loss, evaluation --------------------------------------------------------------------------------

class ITMData:
    """Scenes + cached uint8 images of one split, and the ITM ``batch_fn`` (twins of positive + negative)."""

    def __init__(self, scenes, images_u8: torch.Tensor, split: str, kinds: Sequence[str] = NEGATIVE_KINDS,
                 lang: str = "both"):
        self.scenes, self.images_u8, self.split = list(scenes), images_u8, split
        self.kinds, self.lang = tuple(kinds), lang
        bad = [k for k in self.kinds if k not in NEGATIVE_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown negative kinds {bad}; use a non-empty subset of {NEGATIVE_KINDS}")

    @classmethod
    def build(cls, split: str = "train", n: int = 4000, image_size: int = 32, start: int = 0,
              max_objects: int = 3, **kw) -> "ITMData":
        """Render ``n`` scenes of ``split`` (from offset ``start``) at ``image_size`` px (~2,500 images/s)."""
        from mmkit.data.datasets import render_uint8
        from mmkit.data.world import sample_scene, split_seeds

        scenes = [sample_scene(s, 1, max_objects) for s in split_seeds(split, n, start=start)]
        images = torch.stack([render_uint8(s, image_size) for s in scenes]) if scenes else \
            torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        return cls(scenes, images, split, **kw)

    def __len__(self) -> int:
        return len(self.scenes)

    def images(self, indices) -> torch.Tensor:
        """float32 (b, 3, S, S) in [0, 1]."""
        return self.images_u8[list(indices)].float().div_(255.0)

    def pairs(self, n_scenes: int, rng) -> list[ITMPair]:
        """Twins (positive, negative) for ``n_scenes`` random scenes, each with a random negative kind."""
        out = []
        for _ in range(n_scenes):
            i = rng.randrange(len(self.scenes))
            lang = None if self.lang == "both" else self.lang
            out += itm_pairs(self.scenes, i, rng.choice(self.kinds), rng, lang)
        return out

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """``batch_fn`` for :func:`mmkit.train.train`: ``batch_size // 2`` twins. Returns {"images": (B, 3, S, S),
        "texts": [str], "labels": (B,) float, "kinds": [str]}."""
        import random

        if batch_size % 2:
            raise ValueError(f"ITM batches hold (positive, negative) twins: batch_size must be even, got {batch_size}")
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        return self.collate(self.pairs(batch_size // 2, rng))

    def collate(self, pairs: Sequence[ITMPair]) -> dict:
        return {"images": self.images([p.index for p in pairs]), "texts": [p.text for p in pairs],
                "labels": torch.tensor([float(p.label) for p in pairs]), "kinds": [p.kind for p in pairs]}


def itm_loss(model, batch: dict, tokenizer=None):
    """``loss_fn`` for :func:`mmkit.train.train`: binary cross-entropy of the match logit (M6 §4.6)."""
    from mmkit.train import unwrap

    raw = unwrap(model)
    tok = tokenizer if tokenizer is not None else _world_tokenizer()
    dev = raw.wte.weight.device
    enc = tokenize_batch(tok, batch["texts"], raw.config.max_text_len - 2, raw.config.pad_token_id).to(dev)
    logits = raw.match_logits(batch["images"].to(dev), enc)                    # (B,); one process (no DDP hooks)
    y = batch["labels"].to(dev)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    acc = float(((logits > 0).float() == y).float().mean())
    return loss, {"acc": acc}


_TOK = {}


def _world_tokenizer():
    if "world" not in _TOK:
        from mmkit.tokenizer import load_tokenizer
        _TOK["world"] = load_tokenizer("world")
    return _TOK["world"]


class ITMEval(NamedTuple):
    accuracy: float           # mean of per_kind (balanced pairs: chance 0.5)
    per_kind: dict            # {kind: accuracy over its n positives + n negatives, threshold 0.5}
    ranking: dict             # {kind: fraction of twins where the positive scores above its negative}
    positive_acc: float       # accuracy on the positives alone
    n: int                    # scenes per kind
    scores: list              # [(ITMPair, score)] of every pair scored


def eval_pairs(data: ITMData, n: int, seed: int = 0) -> list[ITMPair]:
    """Fixed twins for evaluation: for each of the first ``n`` scenes one twin per negative kind (languages
    alternate between scenes, the style is drawn per twin)."""
    import random

    rng = random.Random(seed)
    out = []
    for kind in data.kinds:
        for i in range(min(n, len(data))):
            out += itm_pairs(data.scenes, i, kind, rng, ("en", "zh")[i % 2])
    return out


@torch.no_grad()
def evaluate_itm(model, tokenizer=None, split: str = "test", n: int = 256, seed: int = 0,
                 data: ITMData | None = None) -> ITMEval:
    """Balanced ITM accuracy (chance 0.5) on ``n`` held-out scenes per negative kind (M6 §4.6, Table 7 style)."""
    tok = tokenizer if tokenizer is not None else _world_tokenizer()
    data = data if data is not None else ITMData.build(split, n, image_size=model.config.image_size)
    pairs = eval_pairs(data, n, seed)
    scores = itm_scores(model, data.images([p.index for p in pairs]), [p.text for p in pairs], tok)
    per_kind, ranking = {}, {}
    for kind in data.kinds:
        idx = [k for k, p in enumerate(pairs) if p.kind == kind]
        per_kind[kind] = sum(int((scores[k] > 0.5) == bool(pairs[k].label)) for k in idx) / len(idx)
        pos, neg = scores[idx[0::2]], scores[idx[1::2]]                   # twins are stored (positive, negative)
        ranking[kind] = float((pos > neg).float().mean())
    pos_idx = [k for k, p in enumerate(pairs) if p.label]
    pos_acc = float((scores[pos_idx] > 0.5).float().mean())
    return ITMEval(sum(per_kind.values()) / len(per_kind), per_kind, ranking, pos_acc, min(n, len(data)),
                   list(zip(pairs, scores.tolist())))


@torch.no_grad()
def zero_shot_itm_ranking(model, tokenizer=None, data: ITMData | None = None, n: int = 128, seed: int = 0) -> dict:
    """M6 without an ITM head: {kind: fraction of twins whose true caption has the higher mean token
    log-likelihood under the image} (:func:`caption_likelihood`; same twins as :func:`evaluate_itm`)."""
    tok = tokenizer if tokenizer is not None else _world_tokenizer()
    data = data if data is not None else ITMData.build("test", n, image_size=model.config.image_size)
    pairs = eval_pairs(data, n, seed)
    c = model.config
    was_training = model.training
    model.eval()
    try:
        mean = torch.cat([caption_likelihood(model, data.images([p.index for p in pairs[i:i + 256]]),
                                             tokenize_batch(tok, [p.text for p in pairs[i:i + 256]],
                                                            c.max_text_len - 2, c.pad_token_id)).mean
                          for i in range(0, len(pairs), 256)])
    finally:
        model.train(was_training)
    out = {}
    for kind in data.kinds:
        idx = [k for k, p in enumerate(pairs) if p.kind == kind]
        out[kind] = float((mean[idx[0::2]] > mean[idx[1::2]]).float().mean())
    return out


# -- fine-tuning and the recipe ------------------------------------------------------------------------

# Measured on 2 shared CPU cores, one torch thread (two threads on a loaded machine were 5x slower): 300 steps of 64
# in 291 s reach 0.889 balanced test accuracy (recipe.json); 500 steps at LR 2e-3 reached 0.875 (shape 0.75 vs
# 0.83). 40 steps of 32 reach 0.62 at LR 1e-3, 0.70 at 3e-3.
ITM_TRAIN = dict(steps=300, batch_size=64, lr=1e-3, warmup_steps=30, min_lr_ratio=0.05, weight_decay=0.01,
                 mixed_precision="no", eval_every=0, log_every=25, seed=0)
ITM_TRAIN_FAST = dict(ITM_TRAIN, steps=120, warmup_steps=20)


def itm_model_from_pretrained(pretrained=None) -> M6ForImageTextMatching:
    """An :class:`M6ForImageTextMatching` carrying ``pretrained``'s M6 weights (default m6-tiny-pretrained) and a
    fresh head."""
    from mmkit import hub

    src = pretrained if pretrained is not None else hub.load("m6-tiny-pretrained")
    cfg = M6ITMConfig(**{k: v for k, v in asdict(src.config).items() if k != "model_type"})
    model = M6ForImageTextMatching(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not k.startswith("itm_head.") for k in missing):
        raise RuntimeError(f"{type(src).__name__} is not an M6 checkpoint: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model


class ITMRun(NamedTuple):
    model: M6ForImageTextMatching     # the fine-tuned model (trained in place)
    result: object                    # mmkit.train.TrainResult
    eval: ITMEval | None              # held-out evaluation (if n_eval)
    seconds: float


def finetune_itm(model: M6ForImageTextMatching | None = None, train_config=None, data: ITMData | None = None,
                 n_train: int = 4000, n_eval: int = 256, image_lr_scale: float = 0.0, eval_split: str = "test",
                 tokenizer=None, **train_kw) -> ITMRun:
    """Fine-tune M6 for image-text matching (M6 §4.6) and evaluate it on ``n_eval`` held-out scenes per kind.

    ``image_lr_scale`` multiplies the image side's LR (0 = frozen feature extractor, as in pretraining).
    """
    from mmkit.models.m6_pretrain import image_side_param_groups
    from mmkit.train import TrainConfig, train

    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else _world_tokenizer()
    model = model if model is not None else itm_model_from_pretrained()
    tcfg = train_config if train_config is not None else TrainConfig(**ITM_TRAIN)
    data = data if data is not None else ITMData.build("train", n_train, image_size=model.config.image_size)
    if image_lr_scale != 1.0 and "param_groups_fn" not in train_kw:
        train_kw["param_groups_fn"] = lambda m: image_side_param_groups(m, tcfg, image_lr_scale)
    result = train(model, lambda m, b: itm_loss(m, b, tok), data.batch_fn, tcfg, **train_kw)
    ev = evaluate_itm(model, tok, eval_split, n_eval) if n_eval else None
    model.eval()
    return ITMRun(model, result, ev, time.perf_counter() - t0)


@recipe("m6-tiny-itm", "M6 tiny fine-tuned for image-text matching (M6 §4.6): substituted-caption negatives",
        config="m6-tiny-itm")
def _train_m6_tiny_itm(out_dir: Path, fast: bool) -> dict:
    from mmkit.train import TrainConfig, save_checkpoint

    tcfg = TrainConfig(**(ITM_TRAIN_FAST if fast else ITM_TRAIN))
    torch.manual_seed(tcfg.seed)
    run = finetune_itm(train_config=tcfg, n_train=1000 if fast else 4000, n_eval=128 if fast else 512)
    hist = run.result.history
    save_checkpoint(out_dir, run.model, step=run.result.step, train_config=tcfg,
                    history=hist[::10] + ([hist[-1]] if len(hist) % 10 != 1 else []))   # every 10th step: small
    ev = run.eval
    metrics = {"itm_acc": round(ev.accuracy, 4), "positive_acc": round(ev.positive_acc, 4), "n_eval": ev.n,
               **{f"acc_{k}": round(v, 4) for k, v in ev.per_kind.items()},
               **{f"ranking_{k}": round(v, 4) for k, v in ev.ranking.items()},
               "steps": run.result.step, "first_loss": round(hist[0]["loss"], 4),
               "last_loss": round(sum(h["loss"] for h in hist[-20:]) / len(hist[-20:]), 4),
               "train_seconds": round(run.result.seconds, 1), "wall_seconds": round(run.seconds, 1),
               "torch_threads": torch.get_num_threads()}
    return metrics


# =========================================================================================================
# Part 2: Image captioning (M6 §4.3): image in, no prompt; BLEU-4 / CIDEr against every reference caption
# =========================================================================================================

DECODING: tuple[str, ...] = ("greedy", "beam", "sample")   # the decoding methods decode_captions / decode_texts offer


def caption_references(scene, lang: str) -> list[str]:
    """The world's reference captions of ``scene`` in ``lang``: one per style of ``CAPTION_STYLES`` (5)."""
    from mmkit.data.text import captions

    return captions(scene, lang)


def metric_tokens(text: str, lang: str | None = None) -> str:
    """Text as space-separated tokens for BLEU / CIDEr: lower-cased English words; Chinese by character (the
    usual practice for Chinese captioning metrics); punctuation dropped."""
    import re

    text = text.lower()
    toks = re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", text)
    return " ".join(toks)


class CaptionScores(NamedTuple):
    bleu4: float              # corpus BLEU-4 (pycocoevalcap Bleu(4)), all references of each image
    cider: float              # CIDEr-D (pycocoevalcap Cider; IDF over this evaluation's references), 0-10
    attr_acc: float           # m6_pretrain.attribute_scores: objects whose colour + shape the caption names
    attr_precision: float     # named (colour, shape) that are in the scene
    exact_objects: float      # captions naming exactly the scene's (colour, shape) multiset
    n: int                    # captions scored


def caption_scores(candidates: Sequence[str], scenes: Sequence, langs: Sequence[str]) -> CaptionScores:
    """BLEU-4 and CIDEr (pycocoevalcap's pure-Python scorers) of ``candidates`` against each scene's reference
    captions in its language (:func:`caption_references`), plus attribute accuracy against the scene's objects."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from mmkit.models.m6_pretrain import attribute_scores

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


class FirstTokenLanguage(LogitsProcessor):
    """transformers ``LogitsProcessor``: row ``b``'s first generated token is in ``langs[b // expand]`` (see
    :func:`mmkit.models.m6_pretrain.first_token_language`); ``expand`` = beams x returned sequences."""

    def __init__(self, tok, langs: Sequence[str | None], vocab_size: int, expand: int = 1):
        from mmkit.models.m6_pretrain import first_token_language

        self.fn = first_token_language(tok, [lg for lg in langs for _ in range(expand)], vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.fn(input_ids[:, 1:], scores)          # transformers passes [BOS] + generated ids


def _generation_kwargs(method: str, num_beams: int, top_k: int, top_p: float, temperature: float) -> dict:
    if method == "greedy":
        return dict(do_sample=False, num_beams=1)
    if method == "beam":
        return dict(do_sample=False, num_beams=num_beams, early_stopping=True)
    if method == "sample":
        return dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature)
    raise ValueError(f"unknown decoding method {method!r}; use one of {DECODING}")


@torch.no_grad()
def hf_generate(model, tok, *, images=None, encoder_ids=None, method: str = "greedy", max_new_tokens: int = 48,
                num_beams: int = 4, top_k: int = 20, top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                langs: Sequence[str | None] | None = None, logits_processor=None) -> list[str]:
    """Decode with transformers' ``generate()`` through :class:`mmkit.generation.HFGenerationAdapter`: greedy,
    beam search (``num_beams``) or top-k / top-p sampling; returns the decoded texts (up to [EOS])."""
    from transformers import LogitsProcessorList

    from mmkit.generation import HFGenerationAdapter
    from mmkit.models.m6_pretrain import _decode_rows

    kw = _generation_kwargs(method, num_beams, top_k, top_p, temperature)
    procs = list(logits_processor or [])
    if langs is not None:
        procs.append(FirstTokenLanguage(tok, langs, model.config.vocab_size, kw.get("num_beams", 1)))
    torch.manual_seed(seed)
    hf = HFGenerationAdapter(model)
    out = hf.generate(images=images, encoder_ids=encoder_ids, max_new_tokens=max_new_tokens,
                      logits_processor=LogitsProcessorList(procs), **kw)            # (B, 1 + T)
    return _decode_rows(tok, out[:, 1:], model.config.eos_token_id)


@torch.no_grad()
def decode_captions(model, images: torch.Tensor, tok, method: str = "greedy", langs: Sequence[str] | None = None,
                    batch_size: int = 64, **kw) -> list[str]:
    """M6 §4.3 captioning: "we only use the image feature as input and provide no prompt". ``langs`` fixes each
    caption's language through its first token (None = the model's choice)."""
    out = []
    for i in range(0, len(images), batch_size):
        out += hf_generate(model, tok, images=images[i:i + batch_size], method=method,
                           langs=None if langs is None else langs[i:i + batch_size], **kw)
    return out


class CaptionEval(NamedTuple):
    scores: dict              # {method: CaptionScores}
    captions: dict            # {method: [str]}
    scenes: list
    langs: list


def evaluate_captioning(model, tok=None, split: str = "test", n: int = 128, methods: Sequence[str] = DECODING,
                        **kw) -> CaptionEval:
    """Caption ``n`` held-out images (languages alternate EN / ZH) with each decoding method and score them."""
    tok = tok if tok is not None else _world_tokenizer()
    data = ITMData.build(split, n, image_size=model.config.image_size)
    images = data.images(range(len(data)))
    langs = [("en", "zh")[i % 2] for i in range(len(data))]
    caps = {m: decode_captions(model, images, tok, m, langs, **kw) for m in methods}
    return CaptionEval({m: caption_scores(c, data.scenes, langs) for m, c in caps.items()}, caps, data.scenes, langs)


# =========================================================================================================
# Part 3: Question answering with long answers on text (M6 §4.4), and the shared text-to-text fine-tuning
# =========================================================================================================

# M6 §4.4: "At the stage of inference, we append a question mark and a token 'Answer:' in the prompt, which better
# triggers the model to generate an answer." Here the question is about a product description given as context.
# English only: the world tokenizer has no 回 / 答 (its vocabulary comes from the world's text).
QA_PROMPT = "{context} {question}? answer:"
QA_KINDS: tuple[str, ...] = ("contents", "where")


class TextQA(NamedTuple):
    prompt: str               # QA_PROMPT filled: description, question, "? answer:"
    answer: str               # the long reference answer
    kind: str                 # "contents" (every object, ~20-40 tokens) or "where" (one object)
    scene: object


def _description_order(scene, description: str) -> list:
    """The scene's objects in the order the product description mentions them (one sentence each)."""
    import re

    from mmkit.data.text import POSITION_PHRASE_EN, _FULL, noun_phrase_en

    sents = [s.lower() for s in re.split(r"(?<=[.!?])\s+", description)]
    where = {}
    for o in scene.objects:
        np_, at = noun_phrase_en(o, _FULL, "a").split(" ", 1)[1], POSITION_PHRASE_EN[o.position]
        pat = re.compile(re.escape(at) + r"(?! left| right)\b")
        where[id(o)] = next((k for k, s in enumerate(sents) if np_ in s and pat.search(s)), len(sents))
    return sorted(scene.objects, key=lambda o: where[id(o)])


def text_qa(scene, kind: str = "contents", index: int = 0) -> TextQA:
    """A text QA example about ``scene``'s English product description (M6 §4.4 prompt pattern).

    contents: "what is in this set?" -> "this set has a small red circle at the top left, ... and a large blue
    square in the center." (objects in the order the description gives them); where: "where is the red circle?"
    -> "the red circle is at the top left, and it is small." (object ``index``).
    """
    from mmkit.data.text import POSITION_PHRASE_EN, _FULL, _join_en, noun_phrase_en, product_description, \
        referring_expression

    if kind not in QA_KINDS:
        raise ValueError(f"unknown QA kind {kind!r}; use one of {QA_KINDS}")
    context = product_description(scene, "en")
    if kind == "contents":
        question = "what is in this set"
        objs = _description_order(scene, context)
        answer = "this set has " + _join_en([noun_phrase_en(o, _FULL + ("position",), "a") for o in objs]) + "."
    else:
        index = index % len(scene.objects)
        o, ref = scene.objects[index], referring_expression(scene, index, "en")
        question = f"where is {ref}"
        answer = f"{ref} is {POSITION_PHRASE_EN[o.position]}, and it is {o.size}."
    return TextQA(QA_PROMPT.format(context=context, question=question), answer, kind, scene)


def seq2seq_example(encoder_ids, target_ids, special, task: str = "text_to_text", n_visual: int = 0):
    """A :class:`mmkit.masking.TaskExample` with a given encoder text and decoder target (fine-tuning M6 on any
    "... to text" task, M6 §3.3): decoder input [BOS] + target, labels target + [EOS]."""
    from mmkit.masking import TaskExample

    enc = torch.as_tensor(encoder_ids, dtype=torch.long)
    tgt = torch.as_tensor(target_ids, dtype=torch.long)
    dec = torch.cat([tgt.new_tensor([special.bos_id]), tgt])
    lab = torch.cat([tgt, tgt.new_tensor([special.eos_id])])
    return TaskExample(task, enc, dec, lab, n_visual, len(enc), len(dec), torch.zeros(len(tgt), dtype=torch.bool))


class Seq2SeqData:
    """(prompt, target) text pairs tokenized once, and a ``batch_fn`` of :class:`TaskExample` s (text only)."""

    def __init__(self, prompts: Sequence[str], targets: Sequence[str], tok=None, max_len: int = 200):
        from mmkit.masking import SpecialIds

        tok = tok if tok is not None else _world_tokenizer()
        self.special = SpecialIds.from_tokenizer(tok)
        self.prompts, self.targets = list(prompts), list(targets)
        enc = tok(self.prompts, add_special_tokens=False)["input_ids"]
        tgt = tok(self.targets, add_special_tokens=False)["input_ids"]
        self.examples = [seq2seq_example(e[-max_len:], t[:max_len], self.special) for e, t in zip(enc, tgt)]

    def __len__(self) -> int:
        return len(self.examples)

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> list:
        idx = torch.randint(len(self.examples), (batch_size,), generator=generator).tolist()
        return [self.examples[i] for i in idx]


def seq2seq_loss(model, examples: list):
    """``loss_fn`` for :func:`mmkit.train.train`: mean token cross-entropy of the targets (M6 §3.3 "... to text")."""
    from mmkit.masking import collate
    from mmkit.train import unwrap

    tb = collate(examples, pad_id=unwrap(model).config.pad_token_id)
    dev = unwrap(model).wte.weight.device
    out = model(None, tb.encoder_ids.to(dev), tb.decoder_input_ids.to(dev), tb.labels.to(dev),
                mask=tb.mask.to(dev))
    return out.loss


def qa_data(split: str, n: int, start: int = 0, kinds: Sequence[str] = QA_KINDS, tok=None) -> tuple[list, Seq2SeqData]:
    """``n`` scenes of ``split`` -> one QA example each (kinds alternate): (list of TextQA, Seq2SeqData)."""
    from mmkit.data.world import sample_scene, split_seeds

    qas = [text_qa(sample_scene(s), kinds[k % len(kinds)], index=s)
           for k, s in enumerate(split_seeds(split, n, start=start))]
    return qas, Seq2SeqData([q.prompt for q in qas], [q.answer for q in qas], tok)


def answer_facts(answer: str, scene) -> float:
    """Fraction of the scene's objects whose full fact (size, colour, shape, position: "a small red circle at the
    top left") the answer states: the *content* of a "contents" answer, whatever its order and wording around it."""
    import re

    from mmkit.data.text import _FULL, noun_phrase_en

    a = answer.lower()
    hits = sum(bool(re.search(re.escape(noun_phrase_en(o, _FULL + ("position",), "a").split(" ", 1)[1])
                              + r"(?! left| right)\b", a)) for o in scene.objects)
    return hits / len(scene.objects)


class QAEval(NamedTuple):
    exact: dict               # {kind: fraction of answers equal to the reference}
    facts: float              # mean answer_facts of the "contents" answers (object facts stated, 0-1)
    bleu4: float              # corpus BLEU-4 of every answer against its reference
    answers: list             # [(TextQA, generated answer)]


@torch.no_grad()
def evaluate_text_qa(model, tok=None, split: str = "test", n: int = 64, method: str = "greedy",
                     max_new_tokens: int = 64, **kw) -> QAEval:
    """Answer ``n`` held-out questions (M6 §4.4 prompt) and score them: exact match per kind, facts, BLEU-4."""
    from pycocoevalcap.bleu.bleu import Bleu

    tok = tok if tok is not None else _world_tokenizer()
    qas, data = qa_data(split, n, tok=tok)
    outs = []
    for i in range(0, n, 32):
        enc = tokenize_batch(tok, [q.prompt for q in qas[i:i + 32]], model.config.max_text_len, model.config.pad_token_id)
        outs += hf_generate(model, tok, encoder_ids=enc, method=method, max_new_tokens=max_new_tokens, **kw)
    exact = {k: sum(o.strip() == q.answer for q, o in zip(qas, outs) if q.kind == k) /
             max(1, sum(q.kind == k for q in qas)) for k in QA_KINDS}
    facts = [answer_facts(o, q.scene) for q, o in zip(qas, outs) if q.kind == "contents"]
    bleu, _ = Bleu(4).compute_score({i: [metric_tokens(q.answer)] for i, q in enumerate(qas)},
                                    {i: [metric_tokens(o) or "<empty>"] for i, o in enumerate(outs)}, verbose=0)
    return QAEval(exact, sum(facts) / max(1, len(facts)), float(bleu[3]), list(zip(qas, outs)))


def finetune_text(model, data: Seq2SeqData, train_config, **train_kw):
    """Fine-tune M6 on text-to-text pairs (the four-task model's decoder keeps its weights; nothing new)."""
    from mmkit.train import train

    result = train(model, seq2seq_loss, data.batch_fn, train_config, **train_kw)
    model.eval()
    return result


# =========================================================================================================
# Part 4: Poem generation under format constraints (M6 §4.5)
# =========================================================================================================

# M6 Figure 11 prompts with "title author text:"; a world poem's "title" is the scene's Chinese caption.
POEM_PROMPT = "{title}："


def poem_data(split: str, n: int, start: int = 0, tok=None) -> tuple[list, Seq2SeqData]:
    """``n`` scenes -> (scenes, Seq2SeqData of POEM_PROMPT(caption) -> the world's poem, 5 and 7 characters alternating)."""
    from mmkit.data.text import caption, poem
    from mmkit.data.world import sample_scene, split_seeds

    scenes = [sample_scene(s) for s in split_seeds(split, n, start=start)]
    prompts = [POEM_PROMPT.format(title=caption(s, "full", "zh")) for s in scenes]
    return scenes, Seq2SeqData(prompts, [poem(s, (5, 7)[k % 2]) for k, s in enumerate(scenes)], tok)


def poem_facts(text: str, scene) -> tuple[int, int, int]:
    """(object lines, true object lines, scene objects named). An object line is a world-poem line naming colour +
    shape + position ("红圆居左上", 7 characters with the size: "小小红圆居左上"); it is true when the scene has that
    object (and size, when named) there."""
    from mmkit.data.text import _COLOUR_1, _POSITION_2, _SHAPE_1, _SIZE_2
    from mmkit.generation import poem_lines

    inv_c, inv_s = {v: k for k, v in _COLOUR_1.items()}, {v: k for k, v in _SHAPE_1.items()}
    inv_p, inv_z = {v: k for k, v in _POSITION_2.items()}, {v: k for k, v in _SIZE_2.items()}
    claims = named = 0
    true_objects = set()
    for line in poem_lines(text)[0]:
        size = inv_z.get(line[:2]) if len(line) == 7 else None
        core = line[2:] if len(line) == 7 else line
        if len(core) != 5 or core[0] not in inv_c or core[1] not in inv_s or core[3:] not in inv_p:
            continue
        claims += 1
        o = scene.object_at(inv_p[core[3:]])
        if o is not None and (o.colour, o.shape) == (inv_c[core[0]], inv_s[core[1]]) and size in (None, o.size):
            named += 1
            true_objects.add(o.position)
    return claims, named, len(true_objects)


class PoemEval(NamedTuple):
    rule_ok: float            # fraction of poems obeying every M6 §4.5 rule (check_poem(...) == [])
    fact_precision: float     # true object lines / object lines (poem_facts)
    fact_recall: float        # scene objects a true line names / scene objects
    poems: list               # [(prompt, poem)]


@torch.no_grad()
def evaluate_poems(model, tok=None, split: str = "test", n: int = 16, method: str = "greedy", **kw) -> PoemEval:
    """Generate ``n`` poems for held-out scenes under :class:`mmkit.generation.PoemFormatProcessor` and score them."""
    from mmkit.generation import PoemFormatProcessor, check_poem

    tok = tok if tok is not None else _world_tokenizer()
    scenes, data = poem_data(split, n, tok=tok)
    proc = PoemFormatProcessor(tok, alternate=True)
    enc = tokenize_batch(tok, data.prompts, model.config.max_text_len, model.config.pad_token_id)
    poems = hf_generate(model, tok, encoder_ids=enc, method=method, max_new_tokens=proc.max_new_tokens,
                        logits_processor=[proc], **kw)
    facts = [poem_facts(p, s) for p, s in zip(poems, scenes)]
    claims, true = sum(f[0] for f in facts), sum(f[1] for f in facts)
    return PoemEval(sum(not check_poem(p) for p in poems) / len(poems), true / max(claims, 1),
                    sum(f[2] for f in facts) / sum(len(s.objects) for s in scenes), list(zip(data.prompts, poems)))
