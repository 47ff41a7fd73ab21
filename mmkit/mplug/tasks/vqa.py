"""mPLUG visual question answering as open-vocabulary answer generation (mPLUG §5.2.1) on the Shapes World.

    a = answer(model, image, "what colour is the circle?")          # VQAAnswer(answer, confidence, alternatives, ..)
    heat = answer_heatmap(model, image, "what colour is the circle?", a.answer)    # (S, S) in [0, 1]
    texts = answer_batch(model, images, questions)                  # generated answers, greedy or beam search
    loss, metrics = vqa_loss(model, sampler.batch_fn(g, 64))        # teacher forcing (a loss_fn for mmkit.train)
    ev = evaluate_vqa(model, split="test", n=300)                   # VQAEval(accuracy, per_type, per_lang, ...)

The question goes into the text encoder ([CLS] question [SEP]); the fusion network joins it with the image; the
decoder writes the answer after [BOS] and stops with [EOS], attending to [v^L; l^L] (the official
``model_vqa_mplug.py``). §5.2.1: "We treat VQA as an answer generation task and directly use unconstrained
open-vocab generation during inference": :func:`answer_batch` generates freely, nothing restricts the tokens to the
world's answer list. That list appears only afterwards, in :func:`answer`, to show alternatives: every answer of the
question's language is scored by teacher forcing, ``P(a_1 .. a_T [EOS] | image, question)``, on the same scale as
the generated answer's confidence (as ``mmkit.m6.tasks.vqa.answer`` does, so the VQA app treats both alike).

Heat map (:func:`answer_heatmap`): Grad-CAM on the visual encoder's patch tokens v^0, ALBEF's demo applied to
mPLUG: relevance of patch n = ReLU(sum_d dlogP/dv_nd * v_nd), the (H/P x W/P) grid upsampled to the image (a
``vision_stem="cells"`` model: its 3 x 3 cell tokens).

The world VQA model (mplug-tiny-vqa) reads the image as [CLS] + one code token per world cell
(``MPLUGConfig(vision_stem="cells")``, issue 14): stage 0, :func:`train_cell_namer`, trains the cell namer (a small
CNN + one linear head per cell) to name every cell's object; then it stays fixed while :func:`finetune_vqa` trains the
rest. Relation questions are read in one direction per axis ("is A right of B?" -> "is B left of A?",
:func:`mmkit.data.vqa.read_question`, as M6 reads them): the world asks each pair's true relation and its
opposite, an XOR a tiny model does not learn in minutes.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.preprocess import image_for_model
from mmkit.data.scenes import SceneBank
from mmkit.data.vqa import (VQASampler, check_question, eval_questions, normalise_question, question_language,
                            read_question)
from mmkit.evaluation.vqa import (AnswerPrior, VQAAnswer, VQAEval, pixel_saliency, prior_eval, ranked_answer,
                                  score_answers, unit_heat, world_answer_prior)
from mmkit.mplug.model import MPLUG, MPLUGForClassification
from mmkit.mplug.tasks.inputs import encoder_inputs, teacher_forced
from mmkit.objectives.lm import IGNORE_INDEX, sequence_logprob
from mmkit.tokenizer import decode_rows, tokenizer_or_world, world_tokenizer
from mmkit.train import (CELL_NAMER_AUG_FRACTION, CellNamerRun, TrainConfig, evaluating, freeze, namer_parameter_names, scaled_param_groups,
                         train, unwrap)
from mmkit.train import train_cell_namer as train_namer

__all__ = ["VQAConfig", "vqa_bank", "vqa_loss", "answer_batch", "score_candidates", "answer", "answer_heatmap",
           "evaluate_vqa", "evaluate_vqa_images", "VQARun", "finetune_vqa", "fit_answer_prior", "blind_eval",
           "read_question", "namer_prefixes",
           "train_cell_namer"]


@dataclass
class VQAConfig:
    lang: str = "both"               # "en", "zh" or "both" (each question draws its language)
    n_scenes: int = 10_000           # train scenes (rendered once: mmkit.data.scenes.SceneBank)
    n_augmented: int = 0             # scenes that also get a drawn-style view (mmkit.data.augment)
    aug_fraction: float = 0.0        # share of questions asked about the augmented views
    image_size: int = 64             # the model's image size (world images: 64 px)
    min_objects: int = 1
    max_objects: int = 3
    max_question_tokens: int = 48    # [CLS] question [SEP] is cut to this many tokens
    max_answer_tokens: int = 6       # generation budget (world answers: 1-3 tokens + [EOS])
    vision_lr_scale: float = 1.0     # LR multiplier of the visual encoder while fine-tuning (mPLUG Table 11 gives the
                                     # ViT its own LR); 0 freezes it
    augment_seed: int = 0            # seeds the augmented views
    focus_qtype: str | None = None   # a question type asked more often (VQASampler): the relation phase of
    focus_share: float = 0.0         # mplug-tiny-vqa asks relation questions this share of the time


def vqa_bank(config: VQAConfig, split: str = "train", n: int | None = None, start: int = 0) -> SceneBank:
    """``n`` scenes of ``split`` (default ``config.n_scenes``), with ``config.n_augmented`` augmented views."""
    return SceneBank.build(split, config.n_scenes if n is None else n, image_size=config.image_size, start=start,
                           min_objects=config.min_objects, max_objects=config.max_objects,
                           n_augmented=config.n_augmented, augment_seed=config.augment_seed)


def _questions(tok, questions: Sequence[str], max_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    return encoder_inputs(tok, [read_question(q) for q in questions], max_len)


def vqa_loss(model, batch: dict, tokenizer=None, max_len: int = 48):
    """Teacher-forced answer generation: batch {"images" (B, 3, S, S), "questions", "answers"} (what
    :class:`mmkit.data.vqa.VQASampler` builds) -> (loss, {"answer_acc": whole answers right under teacher forcing})."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    c = unwrap(model).config
    ids, mask = _questions(tok, batch["questions"], max_len)
    dec, labels = teacher_forced(tok, batch["answers"], c)
    dev = batch["images"].device
    out = model(batch["images"], ids.to(dev), dec.to(dev), labels.to(dev), encoder_mask=mask.to(dev))
    with torch.no_grad():
        valid = labels != IGNORE_INDEX
        hit = ((out.logits.argmax(-1).cpu() == labels) | ~valid).all(1)
    return out.loss, {"answer_acc": float(hit.float().mean())}


def _generate(model, images, ids, mask, max_new_tokens: int, num_beams: int) -> torch.Tensor:
    """(B, T) generated ids without [BOS]: the model's KV-cached greedy loop, or transformers' beam search."""
    if num_beams <= 1:
        return model.generate(images, ids, max_new_tokens, encoder_mask=mask).sequences
    out = model.hf_generator().generate(images=images, encoder_ids=ids, num_beams=num_beams,
                                        max_new_tokens=max_new_tokens)
    return out[:, 1:]


@torch.no_grad()
def answer_batch(model, images: torch.Tensor, questions: Sequence[str], tokenizer=None, max_new_tokens: int = 6,
                 num_beams: int = 1, batch_size: int = 256) -> list[str]:
    """Generated answers (free text) to ``questions[b]`` about ``images[b]`` (B, 3, S, S) in [0, 1]."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: give one question per image")
    out = []
    with evaluating(model):
        for i in range(0, len(questions), batch_size):
            ids, mask = _questions(tok, questions[i:i + batch_size])
            if num_beams > 1:
                mask = None                      # transformers' path pads with [PAD]: the mask is rebuilt from ids
            seqs = _generate(model, images[i:i + batch_size].to(model.device), ids.to(model.device),
                             None if mask is None else mask.to(model.device), max_new_tokens, num_beams)
            out += decode_rows(tok, seqs.cpu(), model.config.eos_token_id)
    return out


@torch.no_grad()
def score_candidates(model, images: torch.Tensor, questions: Sequence[str], candidates: Sequence[Sequence[str]],
                     tokenizer=None) -> list[torch.Tensor]:
    """log P(candidate + [EOS] | image, question) of every candidate of every question: the context is encoded once
    per question and every candidate decoded against it (teacher forcing). Returns B tensors (len(candidates[b]),)."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    out = []
    for b, q in enumerate(questions):
        ids, mask = _questions(tok, [q])
        ctx = model.context(images[b:b + 1].to(model.device), ids.to(model.device), mask.to(model.device))
        K = len(candidates[b])
        ctx = ctx._replace(states=ctx.states.expand(K, -1, -1), mask=ctx.mask.expand(K, -1))
        dec, labels = teacher_forced(tok, list(candidates[b]), model.config)
        logits = model.decode(dec.to(model.device), ctx)                               # (K, T, V)
        out.append(sequence_logprob(logits, labels.to(model.device)).cpu())
    return out


@torch.no_grad()
def answer(model, image, question: str, tokenizer=None, top_k: int = 5, num_beams: int = 1,
           max_new_tokens: int = 6) -> VQAAnswer:
    """Answer one question about one image (mPLUG §5.2.1): the generated answer, its probability, and the world's
    answers of the question's language ranked by the same probability (the app's alternatives).

    ``image``: float (3, S, S) in [0, 1] or anything :func:`mmkit.data.preprocess.preprocess_image` opens.
    """
    question = check_question(question)
    if not isinstance(unwrap(model), MPLUG) or isinstance(unwrap(model), MPLUGForClassification):
        raise ValueError(f"answer() needs an mPLUG model with its text decoder, e.g. mmkit.load('mplug-tiny-vqa'); "
                         f"got {type(unwrap(model)).__name__}")
    tok = tokenizer_or_world(tokenizer)
    x = image_for_model(image, model.config.image_size)[None]                            # (1, 3, S, S)
    q = normalise_question(question)
    lang = question_language(q)
    with evaluating(model):
        text = answer_batch(model, x, [q], tok, max_new_tokens, num_beams)[0]
        return ranked_answer(text, q, lang, lambda cands: score_candidates(model, x, [q], [cands], tok)[0], top_k)


def answer_heatmap(model, image, question: str, answer_text: str, tokenizer=None,
                   method: str = "gradcam") -> torch.Tensor:
    """Where ``answer_text`` came from: (S, S) float in [0, 1] (1 = most relevant), 0 everywhere if nothing is.

    ``"gradcam"``: relevance of patch n = ReLU(sum_d dlogP/dv_nd * v_nd) on the visual encoder's patch tokens v^0
    (the [CLS] token left out; with ``vision_stem="cells"`` the 3 x 3 cell tokens), bilinearly upsampled;
    ``"saliency"``: |dlogP/dpixel| (max over colour) smoothed by a
    3x3 average. logP = log P(answer + [EOS] | image, question) under teacher forcing.
    """
    if method not in ("gradcam", "saliency"):
        raise ValueError(f"method must be 'gradcam' or 'saliency', got {method!r}")
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    c = model.config
    x = image_for_model(image, c.image_size)[None].clone().to(model.device)           # (1, 3, S, S)
    S, g = c.image_size, c.grid_size                       # patches per side; "cells": the 3 x 3 cell tokens
    ids, mask = _questions(tok, [question])
    dec, labels = teacher_forced(tok, [answer_text or ""], c)
    with evaluating(model), torch.enable_grad():
        if method == "saliency":
            x.requires_grad_(True)
            logp = sequence_logprob(model(x, ids, dec, encoder_mask=mask).logits, labels)[0]
            (grad,) = torch.autograd.grad(logp, x)
            heat = pixel_saliency(grad)
        else:
            v = model.embed_image(x).detach().requires_grad_(True)                     # (1, 1 + N, D) v^0
            logp = sequence_logprob(model(None, ids, dec, encoder_mask=mask, image_embeds=v).logits, labels)[0]
            (grad,) = torch.autograd.grad(logp, v)
            cam = (grad * v)[0, 1:].sum(-1).relu().view(1, 1, g, g)                     # patches only, (1, 1, g, g)
            heat = F.interpolate(cam, size=(S, S), mode="bilinear", align_corners=False)[0, 0]
    return unit_heat(heat.cpu())


@torch.no_grad()
def evaluate_vqa_images(model, images: torch.Tensor, items: Sequence[tuple[str, str, str, str]], tokenizer=None,
                        num_beams: int = 1) -> VQAEval:
    """Exact-match accuracy on given images and ``items`` [(question, gold, qtype, lang)], one per image."""
    preds = answer_batch(model, images, [it[0] for it in items], tokenizer, num_beams=num_beams)
    return score_answers([(q, a, p, t, lg) for (q, a, t, lg), p in zip(items, preds)])


@torch.no_grad()
def evaluate_vqa(model, split: str = "test", n: int = 300, *, seed: int = 0, tokenizer=None, num_beams: int = 1,
                 start: int = 0, augmented_seed: int | None = None) -> VQAEval:
    """Accuracy of generated answers on ``n`` held-out scenes of ``split``, one question of every available type per
    scene, EN and ZH alternating (:func:`mmkit.data.vqa.eval_questions`). ``augmented_seed``: ask about drawn-style
    views of the scenes (:mod:`mmkit.data.augment`, seeded by it) instead of the world's renderings."""
    bank = vqa_bank(VQAConfig(image_size=model.config.image_size), split, n, start=start)
    if augmented_seed is not None:
        bank = bank.with_augmented(augmented_seed)
    qs = eval_questions(bank.scenes, seed)
    images = torch.stack([bank.image(i, augmented_seed is not None) for i, _ in qs])
    return evaluate_vqa_images(model, images, [(qa.question, qa.answer, qa.qtype, qa.lang) for _, qa in qs],
                               tokenizer, num_beams)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning (mPLUG §5.2.1, §7.1) and the blind baseline
# ---------------------------------------------------------------------------------------------------------

class VQARun(NamedTuple):
    model: torch.nn.Module
    result: object                 # mmkit.train.TrainResult
    eval: VQAEval | None           # held-out test scenes (world renderings)
    eval_augmented: VQAEval | None # the same scenes drawn in the augmentations' style
    cpu_seconds: float             # process CPU time of the fine-tuning (every thread), data building included
    wall_seconds: float


def finetune_vqa(model, config: VQAConfig | None = None, train_config: TrainConfig | None = None, *,
                 n_eval: int = 300, eval_fn=None, tokenizer=None, bank: SceneBank | None = None) -> VQARun:
    """Fine-tune ``model`` (a pretrained mPLUG, trained in place) on generated answers: teacher forcing of
    ``answer [EOS]`` after [BOS] from [v^L; l^L] of (image, question) (mPLUG §5.2.1), questions of every type in
    English and Chinese, drawn-style views for ``config.aug_fraction`` of them; then evaluate on ``n_eval`` held-out
    test scenes, rendered and drawn (``n_eval=0`` skips it). ``bank``: the training scenes (default
    ``vqa_bank(config)``, e.g. the one :func:`train_cell_namer` used). A ``vision_stem="cells"`` model keeps its cell
    namer fixed (stage 0 trained it: its codes mean objects); the rest of the visual encoder moves at
    ``config.vision_lr_scale``."""
    cfg = config or VQAConfig(image_size=unwrap(model).config.image_size)
    tcfg = train_config or TrainConfig(steps=600, batch_size=64, lr=1e-3, warmup_steps=50, mixed_precision="no")
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    t0, c0 = time.perf_counter(), time.process_time()
    sampler = VQASampler(bank if bank is not None else vqa_bank(cfg), lang=cfg.lang, aug_fraction=cfg.aug_fraction,
                         focus_qtype=cfg.focus_qtype, focus_share=cfg.focus_share)
    raw = unwrap(model)
    if raw.config.vision_stem == "cells":
        freeze(raw, namer_prefixes(raw))
    kw = {}
    if cfg.vision_lr_scale != 1.0:
        kw["param_groups_fn"] = lambda m: scaled_param_groups(m, tcfg.weight_decay, tcfg.lr,
                                                              {"vision.": cfg.vision_lr_scale})
    result = train(model, functools.partial(vqa_loss, tokenizer=tok, max_len=cfg.max_question_tokens),
                   sampler.batch_fn, tcfg, eval_fn=eval_fn, **kw)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    ev = evaluate_vqa(raw, "test", n_eval, tokenizer=tok) if n_eval else None
    ev_aug = evaluate_vqa(raw, "test", n_eval, tokenizer=tok, augmented_seed=1) if n_eval else None
    return VQARun(raw, result, ev, ev_aug, cpu, wall)


def fit_answer_prior(n_scenes: int = 6000, draws: int = 4, seed: int = 0) -> AnswerPrior:
    """The blind baseline's prior fitted on what :class:`VQASampler` draws from ``n_scenes`` train scenes
    (:func:`mmkit.evaluation.vqa.world_answer_prior`, with the 6000 scenes the VQA tests use)."""
    return world_answer_prior(n_scenes, draws, seed)


def blind_eval(prior: AnswerPrior, ev: VQAEval) -> VQAEval:
    """What the prior (no image) scores on exactly the questions of ``ev``."""
    return prior_eval(prior, ev)


# ---------------------------------------------------------------------------------------------------------
# Stage 0 of a vision_stem="cells" model: the cell namer
# ---------------------------------------------------------------------------------------------------------

def namer_prefixes(model) -> tuple[str, ...]:
    """Parameter names of the cell namer of a ``vision_stem="cells"`` mPLUG (its CNN and per-cell heads; the code
    tables and cell vectors are not the namer's: they stay as drawn in stage 0 and learn with the VQA)."""
    raw = unwrap(model)
    if raw.config.vision_stem != "cells":
        raise ValueError("this mPLUG reads patches, not cells: build it with "
                         "pretrained.with_config(vision_stem='cells', momentum_encoders=False)")
    return namer_parameter_names(raw, raw.vision.embeddings.patch)


def train_cell_namer(model, bank: SceneBank, train_config: TrainConfig | None = None,
                     aug_fraction: float = CELL_NAMER_AUG_FRACTION, test_bank: SceneBank | None = None) -> CellNamerRun:
    """Stage 0 of a ``vision_stem="cells"`` mPLUG: its cell namer learns which object each cell of ``bank``'s scenes
    holds; nothing else moves (:func:`mmkit.train.train_cell_namer`)."""
    raw = unwrap(model)
    namer_prefixes(raw)                                                          # a clear error for a patch model
    return train_namer(raw, raw.vision.embeddings.patch, bank, train_config, aug_fraction, test_bank)
