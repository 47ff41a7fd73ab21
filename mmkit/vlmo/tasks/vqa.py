"""VLMo visual question answering as classification (VLMo §3.5, §4.3) on the Shapes World.

    model = VLMoForVQA.from_pretrained_vlmo(pretrained, visual_tokens="cells")   # a classifier over the world's answers
    train_cell_namer(model, bank)                                         # stage 0: the cell namer, then fixed
    run = finetune_vqa(model, steps=300, bank=bank)                       # VQARun(model, result, eval)
    a = answer(model, image, "what colour is the circle?")                # VQAAnswer(answer, confidence, alternatives..)
    heat = answer_heatmap(model, image, "what colour is the circle?", a.answer)   # (S, S) in [0, 1]
    ev = evaluate_vqa(model, split="test", n=300)                         # VQAEval(accuracy, per_type, per_lang, ..)

VLMo §4.3: "we convert VQA 2.0 to a classification task, and choose the answer from a shared set ... We use the final
encoding vector of the [T_CLS] token as the representation of the image-question pair and feed it to a classifier
layer". Here the shared set is the world's answer vocabulary, English then Chinese
(``mmkit.data.text.answer_vocab("both")``, 66 answers); the question goes in as [T_CLS] question [T_SEP], fused with
the image, and :class:`mmkit.vlmo.model.VLMoForVQA` classifies the pooled fusion [T_CLS].

The shipped model (``vlmo-tiny-vqa``) reads the image as [I_CLS] + one code token per world cell
(``VLMoForVQA.from_pretrained_vlmo(pretrained, visual_tokens="cells")``, :class:`mmkit.nn.CellTokens`): stage 0,
:func:`train_cell_namer`, teaches its small CNN to name each cell's object; it then stays fixed while
:func:`finetune_vqa` trains the rest (the tuning notes in ``mmkit/vlmo/recipes.py`` say why and what each step gave).

Soft targets (the official code, from ViLT / BAN): a target vector y in [0, 1]^n_answers holds each acceptable answer's
score (VQA v2: min(#annotators who gave it / 3, 1)), and the loss is binary cross-entropy with logits summed over the
answers (the official ``BCE(logits, y) * n_answers``). A world question has one right answer, so y is one-hot;
:func:`soft_targets` takes any (answer, score) lists.

Answering (:func:`answer`): the question's language picks its half of the vocabulary; the answer is the top class
there, its confidence the softmax of the class logits over that half (the alternatives' probabilities sum to 1).

Heat map (:func:`answer_heatmap`): Grad-CAM on the patch embeddings (the linear projections V v_i^p of VLMo §3.1,
before positions are added): relevance of patch n = ReLU(Σ_d ∂logit_answer/∂e_nd · e_nd), upsampled to the image;
``method="saliency"`` is |∂logit/∂pixel|. The same signatures as ``mmkit.m6.tasks.vqa`` so the VQA app can offer both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.preprocess import image_for_model
from mmkit.data.scenes import SceneBank
from mmkit.data.text import answer_vocab
from mmkit.data.vqa import VQASampler, eval_questions, normalise_question, question_language, read_question
from mmkit.evaluation.vqa import VQAAnswer, VQAEval, pixel_saliency, score_answers, unit_heat
from mmkit.tokenizer import world_tokenizer
from mmkit.train import (CELL_NAMER_AUG_FRACTION, CellNamerRun, TrainConfig, evaluating, freeze, namer_parameter_names, scaled_param_groups,
                         train, unwrap)
from mmkit.train import train_cell_namer as train_namer

__all__ = ["ANSWERS", "answer_index", "language_answers", "soft_targets", "vqa_inputs", "vqa_logits", "vqa_loss",
           "answer_batch", "answer", "answer_heatmap", "evaluate_vqa", "evaluate_vqa_images", "VQAFinetuneConfig",
           "VQA_TRAIN", "VQA_TRAIN_FAST", "RECIPE_VQA", "RECIPE_VQA_FAST", "recipe_vqa_config", "VQARun",
           "finetune_vqa", "train_cell_namer", "VQA_RELATION_TRAIN", "VQA_RELATION_TRAIN_FAST", "RECIPE_RELATION"]

# The classes of the VQA head: English answers, then Chinese (VLMoVQAConfig.n_answers = len(ANSWERS)).
ANSWERS: tuple[str, ...] = answer_vocab("both")
_INDEX = {a: i for i, a in enumerate(ANSWERS)}


def answer_index(answer_text: str) -> int:
    """The class of an answer (exact world wording); raises for answers the world never gives."""
    if answer_text not in _INDEX:
        raise ValueError(f"{answer_text!r} is not one of the world's answers (mmkit.data.text.answer_vocab('both'))")
    return _INDEX[answer_text]


def language_answers(lang: str) -> list[int]:
    """Class indices of the answers in ``lang`` ("en" / "zh"): the half of the vocabulary a question may get."""
    vocab = answer_vocab(lang)
    return [_INDEX[a] for a in vocab]


def soft_targets(answers: Sequence[Sequence[tuple[str, float]] | str], n_answers: int = len(ANSWERS)) -> torch.Tensor:
    """(B, n_answers) VQA soft targets: row b holds the score of each of its acceptable answers, 0 elsewhere. An item
    is a list of (answer, score) pairs (VQA v2: score = min(#annotators / 3, 1)) or one answer string (score 1)."""
    y = torch.zeros(len(answers), n_answers)
    for b, item in enumerate(answers):
        pairs = [(item, 1.0)] if isinstance(item, str) else item
        for a, s in pairs:
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"answer scores must be in [0, 1], got {s} for {a!r}")
            y[b, answer_index(a)] = max(y[b, answer_index(a)], s)
    return y


def _check_head(model) -> None:
    n = unwrap(model).config.n_answers if hasattr(unwrap(model).config, "n_answers") else None
    if n != len(ANSWERS):
        raise ValueError(f"this task needs a VLMoForVQA with n_answers={len(ANSWERS)} (the world's answers); got "
                         f"{type(unwrap(model)).__name__} with n_answers={n}. Build it with "
                         "VLMoForVQA.from_pretrained_vlmo(pretrained)")


def vqa_inputs(model, questions: Sequence[str], tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_CLS] question [T_SEP], right-padded: ids (B, T) long, mask (B, T) bool. The question as
    :func:`mmkit.data.vqa.read_question` reads it: normalised, a relation asked in its one direction per axis."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    enc = tok([read_question(q) for q in questions], padding="longest", truncation=True,
              max_length=unwrap(model).config.max_text_len, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].bool()


def vqa_logits(model, images: torch.Tensor, questions: Sequence[str], tokenizer=None) -> torch.Tensor:
    """(B, n_answers) class logits for questions[b] about images[b] (B, 3, S, S) in [0, 1] (one fusion pass)."""
    dev = unwrap(model).type_embed.weight.device
    ids, am = vqa_inputs(model, questions, tokenizer)
    return model(images.to(dev), ids.to(dev), am.to(dev)).logits


def vqa_loss(model, batch: dict, tokenizer=None, loss: str = "bce"):
    """``loss_fn`` for :func:`mmkit.train.train` on a :class:`mmkit.data.vqa.VQASampler` batch, and the accuracy of
    the top class. ``loss="bce"``: soft-target binary cross-entropy summed over the answers (mean over questions);
    ``"ce"``: softmax cross-entropy against the soft targets normalised to sum 1 (one right answer: its -log p)."""
    _check_head(model)
    logits = vqa_logits(model, batch["images"], batch["questions"], tokenizer).float()   # (B, n_answers)
    y = soft_targets(batch.get("answer_scores") or batch["answers"], logits.shape[1]).to(logits.device)
    if loss == "ce":
        loss = -(y / y.sum(1, keepdim=True).clamp_min(1e-12) * logits.log_softmax(1)).sum(1).mean()
    else:
        loss = F.binary_cross_entropy_with_logits(logits, y) * y.shape[1]                 # official scaling
    with torch.no_grad():
        acc = y.gather(1, logits.argmax(1, keepdim=True)).mean().item()                   # VQA score of the top class
    return loss, {"vqa_score": acc}


@torch.no_grad()
def answer_batch(model, images: torch.Tensor, questions: Sequence[str], tokenizer=None,
                 batch_size: int = 256) -> list[str]:
    """The top class among the answers of each question's language: the fast path for evaluation."""
    _check_head(model)
    out = []
    with evaluating(model):
        for i in range(0, len(questions), batch_size):
            qs = questions[i:i + batch_size]
            logits = vqa_logits(model, images[i:i + batch_size], qs, tokenizer).float().cpu()
            for row, q in zip(logits, qs):
                allowed = language_answers(question_language(normalise_question(q)))
                out.append(ANSWERS[allowed[int(row[allowed].argmax())]])
    return out


@torch.no_grad()
def answer(model, image, question: str, tokenizer=None, top_k: int = 5) -> VQAAnswer:
    """Answer one question about one image (VLMo §4.3, classification): the top answer of the question's language,
    its probability (softmax over that language's answers) and the ``top_k`` alternatives.

    ``image``: float (3, S, S) in [0, 1] or anything :func:`mmkit.data.preprocess.preprocess_image` opens.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty; ask e.g. 'what colour is the circle?' or '圆形是什么颜色的？'")
    _check_head(model)
    x = image_for_model(image, unwrap(model).config.image_size)[None]                    # (1, 3, S, S)
    q = normalise_question(question)
    lang = question_language(q)
    allowed = language_answers(lang)
    with evaluating(model):
        logits = vqa_logits(model, x, [q], tokenizer)[0].float().cpu()                   # (n_answers,)
    probs = logits[allowed].softmax(-1)                                                  # over this language's answers
    order = probs.argsort(descending=True).tolist()
    alts = [(ANSWERS[allowed[k]], float(probs[k])) for k in order[:top_k]]
    return VQAAnswer(alts[0][0], alts[0][1], alts, q, lang, True)


def answer_heatmap(model, image, question: str, answer_text: str, tokenizer=None,
                   method: str = "gradcam") -> torch.Tensor:
    """Where ``answer_text`` came from: (S, S) float in [0, 1] (Grad-CAM on the patch embeddings, or pixel saliency).

    The score differentiated is the answer's class logit; an answer outside the vocabulary falls back to the
    model's own top answer.
    """
    if method not in ("gradcam", "saliency"):
        raise ValueError(f"method must be 'gradcam' or 'saliency', got {method!r}")
    _check_head(model)
    raw = unwrap(model)
    x = image_for_model(image, raw.config.image_size)[None].clone()                      # (1, 3, S, S)
    S, g = x.shape[-1], raw.config.grid_size
    kept = {}

    def hook(module, inputs, output):           # the patch embeddings (1, N, D) as a leaf to differentiate against
        kept["e"] = output.detach().requires_grad_(True)
        return kept["e"]

    handle = raw.image_embed.patch.register_forward_hook(hook) if method == "gradcam" else None
    try:
        with evaluating(model), torch.enable_grad():
            if method == "saliency":
                x.requires_grad_(True)
            logits = vqa_logits(model, x, [question], tokenizer)[0]                      # (n_answers,)
            k = _INDEX.get(answer_text, int(logits.argmax()))
            if method == "gradcam":
                e = kept["e"]
                (grad,) = torch.autograd.grad(logits[k], e)
                cam = (grad * e).sum(-1).relu().view(1, 1, g, g)                         # (1, 1, g, g)
                heat = F.interpolate(cam, size=(S, S), mode="bilinear", align_corners=False)[0, 0]
            else:
                (grad,) = torch.autograd.grad(logits[k], x)
                heat = pixel_saliency(grad)
    finally:
        if handle is not None:
            handle.remove()
    return unit_heat(heat)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_vqa_images(model, images: torch.Tensor, items: Sequence[tuple[str, str, str, str]],
                        tokenizer=None) -> VQAEval:
    """Accuracy on given images (B, 3, S, S) and ``items`` [(question, gold answer, qtype, lang)], one per image."""
    preds = answer_batch(model, images, [it[0] for it in items], tokenizer)
    return score_answers([(q, a, p, t, l) for (q, a, t, l), p in zip(items, preds)])


@torch.no_grad()
def evaluate_vqa(model, split: str = "test", n: int = 300, *, seed: int = 0, tokenizer=None, start: int = 0,
                 augmented: bool = False) -> VQAEval:
    """Exact-match accuracy on ``n`` held-out scenes of ``split``: one question of every available type per scene,
    English and Chinese alternating (:func:`mmkit.data.vqa.eval_questions`, the questions M6 is scored on)."""
    size = unwrap(model).config.image_size
    bank = SceneBank.build(split, n, image_size=size, start=start)
    if augmented:
        bank = bank.with_augmented(seed=seed + 12345)
    qs = eval_questions(bank.scenes, seed)
    images = torch.stack([bank.image(i, augmented) for i, _ in qs])
    return evaluate_vqa_images(model, images, [(qa.question, qa.answer, qa.qtype, qa.lang) for _, qa in qs], tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------------

@dataclass
class VQAFinetuneConfig:
    lang: str = "both"               # "en", "zh" or "both"
    n_scenes: int = 10_000           # training scenes (cached)
    n_augmented: int = 0             # scenes that also get a drawn-style view (mmkit.data.augment)
    aug_fraction: float = 0.0        # share of questions asked about the augmented view
    min_objects: int = 1
    max_objects: int = 3
    augment_seed: int = 0
    loss: str = "bce"                # "bce": soft-target binary cross-entropy (VLMo / ViLT, VQA v2's several scored
                                     # answers); "ce": softmax cross-entropy, the likelihood when one answer is right
    vision_lr_scale: float = 1.0     # LR multiplier of the vision path (image embeddings + V-FFN) while fine-tuning
    layer_scale_lr_scale: float = 1.0  # LR multiplier of the layer-scale gains γ of every block (see VQA_TRAIN)
    focus_qtype: str | None = None   # ask this question type ...
    focus_share: float = 0.0         # ... this share of the time (the recipe: relations, 0.25)

    def __post_init__(self) -> None:
        if self.loss not in ("bce", "ce"):
            raise ValueError(f"loss must be 'bce' or 'ce', got {self.loss!r}")


# The recipe (mmkit/vlmo/recipes.py "vlmo-tiny-vqa"; tuning notes there): a visual_tokens="cells" model whose namer
# (stage 0, mmkit.train.train_cell_namer) is trained and then fixed, then 4000 steps of batch 64 at 1e-3 with the
# layer-scale gains γ at 30x the LR: the pretrained blocks add only γ ~ 0.05-0.1 of their output to the residual
# stream (BEiT's init, kept by the short stage 3), so at 1x the fusion learns to read the image ~10x slower (held-out
# 0.680 at 2500 steps vs 0.871 with 30x; the γ grow to 0.2-1.3).
VQA_TRAIN = dict(steps=4000, batch_size=64, lr=1e-3, warmup_steps=60, min_lr_ratio=0.05, weight_decay=0.01,
                 mixed_precision="no", log_every=50, seed=0)
VQA_TRAIN_FAST = dict(VQA_TRAIN, steps=150, warmup_steps=20)
# Scenes: 10k clean ones, 6k of them with a drawn-style view asked about in 0.3 of the questions. Relation questions
# get a quarter of the draws throughout: read in one direction per axis (mmkit.data.vqa.read_question) the answer
# follows from the two cells, but it is the last type the fusion learns (a relation phase straight after 2500 steps
# of the other types made the model forget existence and count: 0.87 -> 0.72, 0.90 -> 0.81).
RECIPE_VQA = dict(n_scenes=10_000, n_augmented=6_000, aug_fraction=0.3, loss="ce", layer_scale_lr_scale=30.0,
                  focus_qtype="relation", focus_share=0.25)
RECIPE_VQA_FAST = dict(RECIPE_VQA, n_scenes=2_000, n_augmented=1_000)
# Then the relation phase (M6's and mPLUG's): after the 4000 steps every type is >= 0.94 but relation (0.61); with
# half of the questions relations for 1200 more steps it reached 0.89 while every other type stayed >= 0.89.
VQA_RELATION_TRAIN = dict(VQA_TRAIN, steps=1200, warmup_steps=20, min_lr_ratio=0.5, seed=1)
VQA_RELATION_TRAIN_FAST = dict(VQA_RELATION_TRAIN, steps=60, warmup_steps=5)
RECIPE_RELATION = dict(focus_share=0.5)


def train_cell_namer(model, bank: SceneBank, train_config: TrainConfig | None = None,
                     aug_fraction: float = CELL_NAMER_AUG_FRACTION, test_bank: SceneBank | None = None) -> CellNamerRun:
    """Stage 0 of a ``visual_tokens="cells"`` VLMo (e.g. ``VLMoForVQA.from_pretrained_vlmo(pretrained,
    visual_tokens="cells")``): its cell namer learns which object each cell of ``bank``'s scenes holds; nothing else
    moves (:func:`mmkit.train.train_cell_namer`)."""
    raw = unwrap(model)
    if raw.config.visual_tokens != "cells":
        raise ValueError("this VLMo reads patches, not cells: build it with "
                         "VLMoForVQA.from_pretrained_vlmo(pretrained, visual_tokens='cells')")
    return train_namer(raw, raw.image_embed.patch, bank, train_config, aug_fraction, test_bank)


def recipe_vqa_config(fast: bool = False, relation: bool = False) -> VQAFinetuneConfig:
    """The fine-tuning data of the ``vlmo-tiny-vqa`` recipe (fast mode: fewer scenes; ``relation``: its second
    phase)."""
    return VQAFinetuneConfig(**{**(RECIPE_VQA_FAST if fast else RECIPE_VQA), **(RECIPE_RELATION if relation else {})})


class VQARun(NamedTuple):
    model: torch.nn.Module           # the fine-tuned VLMoForVQA (trained in place)
    result: object                   # mmkit.train.TrainResult
    eval: VQAEval | None             # held-out accuracy (n_eval > 0)
    seconds: float


def finetune_vqa(model, steps: int | None = None, train_config: TrainConfig | None = None,
                 config: VQAFinetuneConfig | None = None, bank: SceneBank | None = None, n_eval: int = 200,
                 eval_split: str = "test", tokenizer=None, **train_kw) -> VQARun:
    """Fine-tune a :class:`VLMoForVQA` (VLMo §4.3: the whole model + the classifier) and evaluate it. The pretraining
    heads VQA does not read (ITC projections, temperature, ITM / MLM / MIM heads, [MASK]) are frozen meanwhile."""
    _check_head(model)
    t0 = time.perf_counter()
    cfg = config or VQAFinetuneConfig()
    tcfg = train_config if train_config is not None else TrainConfig(**dict(VQA_TRAIN, **(
        {"steps": steps, "warmup_steps": min(VQA_TRAIN["warmup_steps"], max(1, steps // 10))} if steps else {})))
    raw = unwrap(model)
    if bank is None:
        bank = SceneBank.build("train", cfg.n_scenes, image_size=raw.config.image_size, min_objects=cfg.min_objects,
                               max_objects=cfg.max_objects, n_augmented=cfg.n_augmented, augment_seed=cfg.augment_seed)
    sampler = VQASampler(bank, cfg.lang, cfg.aug_fraction, cfg.focus_qtype, cfg.focus_share)
    unused = ("itc_image_proj.", "itc_text_proj.", "temperature.", "itm_head.", "mlm_head.", "mim_head.",
              "image_embed.mask_token")
    for p in raw.parameters():
        p.requires_grad_(True)
    if raw.config.visual_tokens == "cells":      # the namer of stage 0 stays fixed: its codes mean objects
        unused += namer_parameter_names(raw, raw.image_embed.patch)
    freeze(raw, unused)
    scales = {}
    if cfg.vision_lr_scale != 1.0:
        parts = raw.parts()
        scales.update({q: cfg.vision_lr_scale for q in parts["image_embeddings"] + parts["vision_ffn"]})
    if cfg.layer_scale_lr_scale != 1.0:
        if raw.config.layer_scale_init is None:
            raise ValueError("layer_scale_lr_scale needs a VLMo with layer scale (layer_scale_init is None)")
        scales.update({f"blocks.{i}.{g}": cfg.layer_scale_lr_scale for i in range(raw.config.n_layers)
                       for g in ("self_attn_scale", "ffn_scale")})
    if scales and "param_groups_fn" not in train_kw:
        train_kw["param_groups_fn"] = lambda m: scaled_param_groups(m, tcfg.weight_decay, tcfg.lr, scales)
    try:
        result = train(model, lambda m, b: vqa_loss(m, b, tokenizer, cfg.loss), sampler.batch_fn, tcfg, **train_kw)
    finally:
        for p in raw.parameters():
            p.requires_grad_(True)
    raw.eval()
    ev = evaluate_vqa(raw, eval_split, n_eval, tokenizer=tokenizer) if n_eval else None
    return VQARun(raw, result, ev, time.perf_counter() - t0)
