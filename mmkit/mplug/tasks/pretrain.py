"""mPLUG pretraining on the Shapes World (mPLUG §3.3): ITC with momentum encoders and queues, ITM with hard negatives,
MLM and PrefixLM, optimised jointly as one ``loss_fn(model, batch)`` for :func:`mmkit.train.train`.

    data = PretrainData.build(PretrainConfig(), tok, "train")          # rendered images + tokenized captions
    result = train(model, pretrain_loss, data.batch_fn, TrainConfig(steps=..., batch_size=64, lr=...))
    result.history[-1]      # loss, itc, itm, mlm, prefix_lm, itc_i2t_acc, itm_acc, mlm_acc, lm_acc, temperature, ...

One step (:func:`pretrain_step`, run inside ``model(step=...)`` so DDP sees one forward):

1. ``momentum_update``: θ_m <- m θ_m + (1 - m) θ (ALBEF ``_momentum_update``: at the start of the forward, before
   the momentum features of this batch; once per micro-batch under gradient accumulation, as ALBEF).
2. Unimodal encoders: v^0 = ViT(images), l^0 = BERT(caption).
3. ITC (§3.3, ALBEF): online [CLS] features against [momentum batch features + queue], momentum distillation α;
   ``itc_loss_with_queue`` gathers the global batch, so all processes score the same N x (N + K) similarities.
4. ITM (§3.3): for every image one hard negative caption, for every caption one hard negative image, drawn from the
   ITC similarities of the GLOBAL batch (``sample_hard_negatives``; VLMo's global hard negatives; a generator seeded
   by the batch, so every process draws the same); the partners' unimodal states come from every process through
   ``all_gather_with_grad``. B positives + 2B negatives fused, the ITM head on the fused [CLS].
5. MLM (§3.3): 15% whole-word masking with BERT's 80/10/10 (``mlm_mask``, done when the batch is built), masked
   caption -> text encoder -> fusion with v^0 -> MLM head.
6. PrefixLM (§3.3): the caption cut at a random point; [CLS] prefix [SEP] -> text encoder -> fusion with v^0; the
   decoder generates the rest (+ [EOS]) attending to [v^L; l^L].
7. ``queue.enqueue_dequeue`` of this batch's momentum features (after the loss, as ALBEF).

The joint loss is ``itc + itm + mlm + prefix_lm`` (weights in :class:`PretrainConfig`). Every part is a mean over the
GLOBAL batch, whatever the number of processes: ITC is computed on the gathered batch by every process; ITM is a
mean over equal local slices; MLM and PrefixLM divide the local token-loss sum by the global token count
(:func:`global_token_mean`), so 2 processes give exactly the single-process loss and gradients (tested).

From random weights (measured on the tiny world models). mPLUG starts from CLIP-ViT and BERT (§5.1), whose [CLS]
features already tell images and texts apart. Freshly initialised, both encoders' [CLS] features are almost the same
for every input (std ~5e-4 over a batch); the ITC gradient, which moves queries toward keys of the other modality,
is then tiny, and with the momentum keys lagging and MLM / PrefixLM gradients dominating the shared text encoder, ITC
stayed at chance for hundreds of joint steps while MLM and PrefixLM learned (ITM follows ITC: its negatives come from
ITC). A stage of ITC alone (``make_pretrain_loss(PretrainConfig(itm=0, mlm=0, prefix_lm=0))``, a CLIP-style dual
encoder) first gets ITC going in ~50 steps, after which the joint run trains all four (tests/test_mplug_pretrain.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.data.scenes import SceneBank
from mmkit.data.text import CAPTION_STYLES, caption
from mmkit.data.world import COLOURS, SHAPES, SIZES, Rng, object_labels
from mmkit.objectives.itc import all_gather_no_grad, all_gather_with_grad, itc_loss_with_queue, world_info
from mmkit.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from mmkit.objectives.lm import IGNORE_INDEX, split_prefix
from mmkit.objectives.mlm import mlm_mask
from mmkit.mplug.tasks.inputs import decoder_inputs, pad_rows
from mmkit.tokenizer import world_tokenizer
from mmkit.train import TrainConfig, evaluating, train, unwrap

__all__ = ["PretrainConfig", "PretrainData", "BATCH_KEYS", "build_batch", "global_token_mean", "pretrain_step",
           "pretrain_loss", "make_pretrain_loss", "StepParts", "GridProbe", "VisionRun", "pretrain_visual_encoder",
           "StageConfig", "VisionCollapsed", "check_vision", "PretrainRun", "pretrain", "evaluate_pretraining"]

BATCH_KEYS: tuple[str, ...] = ("images", "ids", "text_ids", "text_mask", "mlm_ids", "mlm_labels", "prefix_ids",
                               "prefix_mask", "decoder_input_ids", "decoder_labels", "seed")


@dataclass
class PretrainConfig:
    # -- the four tasks (mPLUG §3.3: "These pre-training tasks are optimized jointly"): loss weights -------
    itc: float = 1.0               # image-text contrast with momentum queues (0 skips it, and ITM with it)
    itm: float = 1.0               # image-text matching on hard negatives
    mlm: float = 1.0               # masked language modelling on the fused text
    prefix_lm: float = 1.0         # the decoder continues the caption from [image; prefix]
    mlm_rate: float = 0.15         # share of words masked ("we randomly mask 15% of tokens", BERT's 80/10/10)
    caption_rate: float = 0.25     # share of rows whose prefix is empty: the decoder writes the whole caption from the
                                   # image alone (what zero-shot captioning asks); the others cut uniformly in the text
    # -- data: Shapes World image-caption pairs ------------------------------------------------------------
    lang: str = "both"             # "en", "zh" or "both" (each pair draws its language)
    image_size: int = 32           # must match the model's image_size
    min_objects: int = 1           # objects per scene
    max_objects: int = 3
    n_pairs: int = 8000            # image-caption pairs (images rendered once, uint8)
    caption_styles: tuple = CAPTION_STYLES   # the styles a pair's caption is drawn from
    max_text_tokens: int = 48      # text-encoder inputs are cut to this many tokens ([CLS] and [SEP] included)
    start: int = 0                 # first scene of the split (to keep train / eval scenes apart inside a split)
    caption_ids: bool = True       # pairs with the same caption share an id (PretrainData.caption_ids): positives of
                                   # each other in ITC, never each other's ITM negatives. False: every pair its own id

    def __post_init__(self) -> None:
        self.caption_styles = tuple(self.caption_styles)
        if min(self.itc, self.itm, self.mlm, self.prefix_lm) < 0 or self.itc + self.itm + self.mlm + self.prefix_lm <= 0:
            raise ValueError("task weights must be >= 0 with a positive sum")
        if self.itm > 0 and self.itc == 0:
            raise ValueError("ITM draws its hard negatives from the ITC similarities: itm > 0 needs itc > 0")
        if not 0 < self.mlm_rate < 1 or not 0 <= self.caption_rate <= 1:
            raise ValueError(f"need 0 < mlm_rate < 1 and 0 <= caption_rate <= 1, got {self.mlm_rate}, {self.caption_rate}")
        if self.lang not in ("en", "zh", "both"):
            raise ValueError(f"lang must be 'en', 'zh' or 'both', got {self.lang!r}")
        if self.max_text_tokens < 4:
            raise ValueError(f"max_text_tokens={self.max_text_tokens} is too short; use e.g. 48")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

class PretrainData:
    """Scenes of one split rendered once (a :class:`SceneBank`) and one tokenized caption per scene.

    ``captions[i]`` (token ids, no specials), ``texts[i]``, ``langs[i]`` belong to ``bank.scenes[i]``: the style and
    language are drawn per scene from its seed, so the same arguments give the same pairs everywhere.
    """

    def __init__(self, config: PretrainConfig, bank: SceneBank, texts: list[str], langs: list[str],
                 captions: list[list[int]], tokenizer):
        self.config, self.bank, self.texts, self.langs, self.captions = config, bank, texts, langs, captions
        self.tok = tokenizer

    @classmethod
    def build(cls, config: PretrainConfig, tokenizer=None, split: str = "train", n: int | None = None,
              start: int | None = None) -> "PretrainData":
        c = config
        tok = tokenizer if tokenizer is not None else world_tokenizer()
        bank = SceneBank.build(split, c.n_pairs if n is None else n, image_size=c.image_size,
                               start=c.start if start is None else start, min_objects=c.min_objects,
                               max_objects=c.max_objects)
        texts, langs = [], []
        for scene in bank.scenes:
            rng = Rng(f"mplug-pretrain-{scene.seed}")
            lang = rng.choice(("en", "zh")) if c.lang == "both" else c.lang
            texts.append(caption(scene, rng.choice(c.caption_styles), lang))
            langs.append(lang)
        limit = c.max_text_tokens - 2                                   # room for [CLS] and [SEP]
        captions = [x[:limit] for x in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
        return cls(c, bank, texts, langs, captions, tok)

    @functools.cached_property
    def caption_ids(self) -> list[int]:
        """Pair i's id for ITC / ITM: the index of the first pair with the same caption. Short world captions repeat
        ("a red circle" describes many scenes), and such pairs are true matches of each other: ITC counts them as
        positives and ITM never draws one as the other's hard negative (``ids`` of :func:`build_batch`)."""
        first: dict[tuple, int] = {}
        return [first.setdefault(tuple(x), i) for i, x in enumerate(self.captions)]

    def __len__(self) -> int:
        return len(self.captions)

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """A global batch for :func:`mmkit.train.train`: ``batch_size`` pairs drawn with ``generator`` (see
        :func:`build_batch` for the keys). Every process builds the same one and keeps its rows."""
        idx = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return build_batch(self, idx, generator)

    def fixed_batch(self, indices: Sequence[int], seed: int = 0) -> dict:
        """The batch of the given pairs with the masking / split / negatives noise of ``seed`` (for evaluation)."""
        return build_batch(self, list(indices), torch.Generator().manual_seed(seed))


def build_batch(data: PretrainData, indices: Sequence[int], generator: torch.Generator) -> dict:
    """The pretraining batch of pairs ``indices`` (every random choice from ``generator``), rows aligned:

    images (B, 3, S, S) float; ids (B,) the pairs' caption ids (equal ids = the same caption: positives of each other
    in ITC, never each other's hard negatives; the pair indices with ``caption_ids=False``); text_ids / text_mask (B, L) ``[CLS] caption [SEP]``; mlm_ids / mlm_labels
    (B, L); prefix_ids / prefix_mask (B, Lp) ``[CLS] prefix [SEP]``; decoder_input_ids / decoder_labels (B, Ls)
    ``[BOS] rest`` / ``rest [EOS]``; seed (int) the hard-negative sampling seed. L, Lp, Ls: the longest row of the
    whole batch (so every process's slice has the same widths, which the ITM gathers need)."""
    c, tok = data.config, data.tok
    indices = list(indices)
    if not indices:
        raise ValueError("a batch needs at least one pair")
    caps = [data.captions[i] for i in indices]
    text = pad_rows([[tok.cls_token_id] + x + [tok.sep_token_id] for x in caps], tok.pad_token_id)   # (B, L)
    mask = text != tok.pad_token_id
    tokens = [tok.convert_ids_to_tokens(row) for row in text.tolist()]
    mlm = mlm_mask(text, mask_id=tok.mask_token_id, vocab_size=len(tok), special_ids=tok.all_special_ids,
                   generator=generator, tokens=tokens, rate=c.mlm_rate)
    prefixes, rests = [], []
    for x in caps:                                                   # mPLUG §3.3 PrefixLM: cut at a random point
        x = torch.tensor(x, dtype=torch.long)
        if len(x) < 2 or float(torch.rand((), generator=generator)) < c.caption_rate:
            pre, rest = x[:0], x                                     # whole caption from the image
        else:
            pre, rest, _ = split_prefix(x, generator=generator, min_prefix=1, min_suffix=1)
        prefixes.append([tok.cls_token_id] + pre.tolist() + [tok.sep_token_id])
        rests.append(rest.tolist())
    prefix = pad_rows(prefixes, tok.pad_token_id)
    dec, labels = decoder_inputs(rests, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                 max_len=c.max_text_tokens)
    images = data.bank.images(indices)
    seed = int(torch.randint(2**62, (), generator=generator))
    ids = [data.caption_ids[i] for i in indices] if c.caption_ids else indices
    return {"images": images, "ids": torch.tensor(ids, dtype=torch.long), "text_ids": text, "text_mask": mask,
            "mlm_ids": mlm.input_ids, "mlm_labels": mlm.labels, "prefix_ids": prefix,
            "prefix_mask": prefix != tok.pad_token_id, "decoder_input_ids": dec, "decoder_labels": labels,
            "seed": seed}


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------

def global_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Token cross-entropy averaged over the labelled tokens of the GLOBAL batch: (loss, accuracy, tokens).

    On W processes each returns ``W * (sum of its token losses) / (global token count)``; DDP averages gradients
    over processes, so the update is exactly the one-process gradient of the global mean, even when the processes
    hold different numbers of labelled tokens (random MLM masks, random prefix cuts). Accuracy and count are global.
    (A floor candidate: mmkit.objectives.lm.)
    """
    world, _ = world_info()
    V = logits.shape[-1]
    z, y = logits.float().reshape(-1, V), labels.reshape(-1).long()
    real = y != IGNORE_INDEX
    total = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")        # local Σ -log p
    with torch.no_grad():
        correct = ((z.argmax(-1) == y) & real).sum()
        counts = all_gather_no_grad(torch.stack([real.sum(), correct]).reshape(1, 2)).sum(0)   # global n, hits
    n = int(counts[0])
    return total * world / max(n, 1), float(counts[1]) / max(n, 1), n


class StepParts(NamedTuple):
    """What :func:`pretrain_step` computed (``return_parts=True``), for tests and notebooks."""
    loss: torch.Tensor
    metrics: dict
    itc: object                        # mmkit.objectives.itc.ITCOutput
    image_feat_m: torch.Tensor         # (B, embed_dim) the momentum features that were enqueued
    text_feat_m: torch.Tensor


def pretrain_step(model, batch: dict, config: PretrainConfig | None = None, return_parts: bool = False):
    """One mPLUG §3.3 pretraining step on ``batch`` (see the module doc): returns ``(loss, metrics)``.

    ``model`` is the (unwrapped) :class:`mmkit.mplug.model.MPLUG`; call this through ``model(step=...)`` (what
    :func:`pretrain_loss` does) so that under DDP it runs inside one forward. In training mode the momentum encoders
    are updated first and the queue receives this batch's momentum features last; in eval mode neither changes.
    """
    cfg = config or PretrainConfig()
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"the pretraining batch lacks {missing}: build it with PretrainData.batch_fn / build_batch")
    c = model.config
    if cfg.itc > 0 and model.momentum_model is None:
        raise ValueError("ITC needs momentum encoders and queues: build the model with momentum_encoders=True")
    images, ids, text, tmask = batch["images"], batch["ids"], batch["text_ids"], batch["text_mask"]
    B = images.shape[0]
    training = model.training
    if training and cfg.itc > 0:
        model.momentum_update()                         # ALBEF: before this batch's momentum features
    v = model.embed_image(images)                       # (B, Nv, D) v^0
    total = v.new_zeros(())
    metrics: dict[str, float] = {}
    itc = feat_m = None

    if cfg.itc > 0 or cfg.itm > 0:
        l = model.embed_text(text, tmask)               # (B, L, D) l^0
        # mPLUG §3.3 ITC: queues of momentum features "to increase the number of negative examples as MoCo"
        img_f, txt_f = model.itc_features(v, l)
        feat_m = model.momentum_features(images, text, tmask)
        itc = itc_loss_with_queue(img_f, txt_f, model.temperature(), model.queue, ids=ids, image_feat_m=feat_m[0],
                                  text_feat_m=feat_m[1], alpha=c.distill_alpha)
        total = total + cfg.itc * itc.loss
        metrics.update(itc=float(itc.loss.detach()), itc_i2t_acc=itc.metrics["i2t_acc"],
                       itc_t2i_acc=itc.metrics["t2i_acc"], temperature=model.temperature.temperature,
                       queue_size=float(itc.metrics["queue_size"]))
        if cfg.itm > 0:
            # mPLUG §3.3 ITM with hard negatives "based on the contrastive text-image similarity" (global batch)
            g = torch.Generator().manual_seed(int(batch["seed"]))
            neg = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, itc.ids, generator=g)
            r = itc.local_rows
            v_all, l_all, m_all = all_gather_with_grad(v), all_gather_with_grad(l), all_gather_no_grad(tmask)
            t_neg = neg.text_for_image[r].to(v.device)          # a negative caption for each local image
            i_neg = neg.image_for_text[r].to(v.device)          # a negative image for each local caption
            fused = model.fuse(torch.cat([v, v, v_all[i_neg]]), torch.cat([l, l_all[t_neg], l]),
                               torch.cat([tmask, m_all[t_neg], tmask]))            # 3B pairs
            loss, m = itm_loss(model.itm_logits(fused.text), itm_labels(B, 2 * B, device=v.device))
            total = total + cfg.itm * loss
            metrics.update(itm=float(loss.detach()), **m)

    if cfg.mlm > 0:
        # mPLUG §3.3 MLM: predict the masked words "with the cross-modal representations"
        lm = model.embed_text(batch["mlm_ids"], tmask)
        fused = model.fuse(v, lm, tmask)
        loss, acc, _ = global_token_mean(model.mlm_logits(fused.text), batch["mlm_labels"])
        total = total + cfg.mlm * loss
        metrics.update(mlm=float(loss.detach()), mlm_acc=acc)

    if cfg.prefix_lm > 0:
        # mPLUG §3.3 PrefixLM: the decoder generates the rest of the caption from [v^L; l^L] of image + prefix
        pmask = batch["prefix_mask"]
        fused = model.fuse(v, model.embed_text(batch["prefix_ids"], pmask), pmask)
        states = torch.cat([fused.image, fused.text], 1)
        smask = torch.cat([torch.ones(B, v.shape[1], dtype=torch.bool, device=v.device), pmask.bool()], 1)
        logits = model.decoder(batch["decoder_input_ids"], states, smask)          # (B, Ls, V)
        loss, acc, _ = global_token_mean(logits, batch["decoder_labels"])
        total = total + cfg.prefix_lm * loss
        metrics.update(prefix_lm=float(loss.detach()), lm_acc=acc)

    if training and feat_m is not None:
        model.queue.enqueue_dequeue(feat_m[0], feat_m[1], ids)   # ALBEF: after the loss of this batch
    if return_parts:
        return StepParts(total, metrics, itc, *(feat_m or (None, None)))
    return total, metrics


def pretrain_loss(model, batch: dict, config: PretrainConfig | None = None):
    """``loss_fn(model, batch) -> (loss, metrics)`` for :func:`mmkit.train.train`: :func:`pretrain_step` inside one
    ``model(...)`` call (``model`` may be the DDP wrapper)."""
    return model(step=functools.partial(pretrain_step, batch=batch, config=config))


def make_pretrain_loss(config: PretrainConfig):
    """:func:`pretrain_loss` with other task weights / masking rates."""
    return functools.partial(pretrain_loss, config=config)



# ---------------------------------------------------------------------------------------------------------
# Stage 0: a trained visual encoder (the world's stand-in for CLIP-ViT, mPLUG §5.1)
# ---------------------------------------------------------------------------------------------------------

class GridProbe(nn.Module):
    """Linear heads that name the object in every cell of the 3 x 3 grid from the visual encoder's patch tokens:
    its colour, shape and size, or "empty" (labels of :func:`mmkit.data.world.object_labels`, 0 = empty).

    The patch tokens v^0[1:] (B, N, D) are laid out on their (g x g) grid and average-pooled to 3 x 3 cells
    (``adaptive_avg_pool2d``), one feature per cell; each attribute has its own Linear head. Thrown away after
    stage 0: only the encoder it trained stays.
    """

    ATTRIBUTES = ("colour", "shape", "size")

    def __init__(self, model, n_values: tuple[int, ...] = (len(COLOURS), len(SHAPES), len(SIZES))):
        super().__init__()
        self.model = model
        D = model.config.d_model
        self.heads = nn.ModuleList(nn.Linear(D, n + 1) for n in n_values)           # + 1: the empty cell

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 9, D) one pooled patch feature per grid cell, row-major like ``POSITIONS``."""
        v = self.model.embed_image(images)[:, 1:]                                     # (B, N, D) patches
        B, N, D = v.shape
        g = int(round(N ** 0.5))
        grid = v.transpose(1, 2).reshape(B, D, g, g)                                  # (B, D, g, g)
        return F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)             # (B, 9, D)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum of the three cross-entropies over every cell -> (loss, {attribute: accuracy over occupied cells})."""
        x = self.cells(images)
        occupied = labels[..., 0] > 0                                                 # (B, 9)
        loss, metrics = x.new_zeros(()), {}
        for k, (name, head) in enumerate(zip(self.ATTRIBUTES, self.heads)):
            logits = head(x)                                                          # (B, 9, n + 1)
            loss = loss + F.cross_entropy(logits.flatten(0, 1).float(), labels[..., k].flatten())
            hit = logits.argmax(-1) == labels[..., k]
            metrics[f"{name}_acc"] = float(hit[occupied].float().mean()) if occupied.any() else 0.0
        return loss, metrics


class VisionRun(NamedTuple):
    """What stage 0 measured."""
    history: list                  # per step: loss, colour_acc, shape_acc, size_acc (training batches)
    accuracy: dict                 # {colour_acc, shape_acc, size_acc} over occupied cells of held-out images
    cpu_seconds: float


def pretrain_visual_encoder(model, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 400,
                            batch_size: int = 128, lr: float = 2e-3, seed: int = 0, heldout: int = 256) -> VisionRun:
    """Stage 0: train ``model.vision`` to name the object of every grid cell (a :class:`GridProbe`) through the kit's
    one training loop, then drop the probe.

    mPLUG §5.1 initialises its visual encoder from CLIP-ViT; the world has no such network, and a ViT that has to
    discover colours and shapes while also learning to align them with words (ITC) and to bind them (ITM, MLM)
    learns all of it late. This supervised stage stands in for that pretrained encoder (as M6's stage 0 does for its
    ResNet). ``images`` (N, 3, S, S) float in [0, 1] or uint8, ``labels`` (N, 9, 3) from ``object_labels``; the last
    ``heldout`` are held out for the reported accuracy. Only ``model.vision`` gets gradients (its momentum copy is
    refreshed by the caller, e.g. :func:`pretrain`).
    """
    c0 = time.process_time()
    raw = unwrap(model)
    n = len(images)
    n_train = n - min(heldout, n // 4)
    torch.manual_seed(seed)
    probe = _VisionOnly(raw, GridProbe(raw))

    def as_float(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def batch_fn(g: torch.Generator, b: int) -> dict:
        idx = torch.randint(n_train, (b,), generator=g)
        return {"images": as_float(images[idx]), "labels": labels[idx]}

    was_training = raw.training
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, betas=(0.9, 0.999),
                       warmup_steps=min(20, steps), min_lr_ratio=0.0, clip_grad_norm=None, mixed_precision="no",
                       seed=seed, progress_bar=False, log_every=0)
    result = train(probe, lambda m, b: m(b["images"], b["labels"]), batch_fn, tcfg)
    acc = {}
    if n > n_train:
        with torch.no_grad(), evaluating(probe):
            _, acc = probe(as_float(images[n_train:]), labels[n_train:])
    raw.train(was_training)
    for p in raw.parameters():
        p.grad = None
    return VisionRun([{k: round(v, 4) for k, v in h.items()} for h in result.history], acc, time.process_time() - c0)


class _VisionOnly(nn.Module):
    """The probe with only the visual encoder's and the heads' parameters visible to the optimizer."""

    def __init__(self, model, probe: GridProbe):
        super().__init__()
        self.vision, self.heads = model.vision, probe.heads
        self._probe = [probe]                                   # not a submodule: its model is not trained here

    def forward(self, images, labels):
        return self._probe[0](images, labels)


# ---------------------------------------------------------------------------------------------------------
# The whole pretraining: stage 0 (visual encoder), stage 1 (ITC alone), stage 2 (the four tasks jointly)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StageConfig:
    vision_steps: int = 400        # stage 0: steps naming the objects of each grid cell (GridProbe), batch 128
    vision_lr: float = 2e-3        # its peak LR (warmup 20, cosine to 0, AdamW without decay)
    itc_steps: int = 60            # stage 1: ITC alone (a CLIP-style dual encoder) before the joint run: from fresh
                                   # text weights ITC stayed at chance for hundreds of joint steps (module notes)
    itc_lr: float | None = None    # stage 1 peak LR (None: the joint run's)
    n_val: int = 256               # held-out val pairs for the evaluation (evaluate_pretraining)
    vision_floor: dict | None = None   # stage 0 must reach these held-out accuracies over occupied cells, e.g.
                                   # {"colour_acc": 0.5}, before stage 1 starts (VisionCollapsed otherwise): a stage 0
                                   # that collapsed to "empty" (0 on occupied cells) must not pass silently


class VisionCollapsed(RuntimeError):
    """Stage 0 ended below :attr:`StageConfig.vision_floor`: the visual encoder did not learn."""


def check_vision(run: "VisionRun", floor: dict | None) -> None:
    """Raise :class:`VisionCollapsed` if ``run``'s held-out accuracies miss ``floor`` ({attribute_acc: minimum})."""
    if not floor:
        return
    if not run.accuracy:
        raise VisionCollapsed("stage 0 has no held-out accuracy to check (fewer than 2 images?); give it more images")
    low = {k: (round(run.accuracy.get(k, 0.0), 4), v) for k, v in floor.items() if run.accuracy.get(k, 0.0) < v}
    if low:
        measured = {k: round(v, 4) for k, v in run.accuracy.items()}
        raise VisionCollapsed(
            f"stage 0 (visual encoder) did not learn: held-out accuracy over occupied grid cells {low} "
            f"(measured, floor); all: {measured}. A run that names every cell 'empty' scores 0. Lower "
            f"StageConfig.vision_lr (4e-3 collapsed, 1e-3 learns) or raise vision_steps; the later stages were not "
            f"started")


class PretrainRun(NamedTuple):
    model: nn.Module
    vision: VisionRun | None       # stage 0
    itc: object | None             # stage 1 TrainResult
    result: object                 # stage 2 TrainResult (history: loss and every task's metrics per step)
    evaluation: dict               # evaluate_pretraining on held-out pairs after stage 2
    cpu_seconds: float             # process CPU time of the three stages (every thread)
    wall_seconds: float


def pretrain(model, config: PretrainConfig, train_config: TrainConfig, stages: StageConfig | None = None,
             data: "PretrainData | None" = None, val: "PretrainData | None" = None,
             eval_fn=None) -> PretrainRun:
    """mPLUG pretraining on the world, in three stages (``model`` trained in place, in train mode):

    0. :func:`pretrain_visual_encoder` (``stages.vision_steps``; 0 skips it): the stand-in for CLIP-ViT; its
       held-out accuracy is checked against ``stages.vision_floor`` (:func:`check_vision` raises
       :class:`VisionCollapsed`) before stage 1 starts;
    1. ITC alone for ``stages.itc_steps`` (CLIP-style), the momentum encoders reset to the online ones first;
    2. the four tasks of §3.3 jointly (``config``'s weights) for ``train_config.steps``.

    The queue is emptied between stages 1 and 2 only by its own FIFO: its keys come from the same momentum encoders.
    """
    st = stages or StageConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    raw = unwrap(model)
    data = data if data is not None else PretrainData.build(config)
    val = val if val is not None else PretrainData.build(config, data.tok, "val", n=st.n_val)
    vision = None
    if st.vision_steps:
        vision = pretrain_visual_encoder(raw, data.bank.images_u8, object_labels(data.bank.scenes),
                                         steps=st.vision_steps, lr=st.vision_lr, seed=train_config.seed)
        check_vision(vision, st.vision_floor)              # fail loudly before stages 1-2 spend their time
    raw.reset_momentum()
    itc = None
    if st.itc_steps:
        itc_cfg = dataclasses.replace(train_config, steps=st.itc_steps, warmup_steps=min(10, st.itc_steps),
                                      lr=st.itc_lr or train_config.lr, eval_every=0, out_dir=None,
                                      min_lr_ratio=1.0)
        itc = train(model, make_pretrain_loss(dataclasses.replace(config, itm=0.0, mlm=0.0, prefix_lm=0.0)),
                    data.batch_fn, itc_cfg)
    result = train(model, make_pretrain_loss(config), data.batch_fn, train_config, eval_fn=eval_fn)
    ev = evaluate_pretraining(raw, val)
    return PretrainRun(model, vision, itc, result, ev, time.process_time() - c0, time.perf_counter() - t0)


@torch.no_grad()
def evaluate_pretraining(model, val: "PretrainData", batch_size: int = 64, seed: int = 0) -> dict:
    """Held-out numbers of the four tasks beside what a model that ignores the image gets.

    Every val pair is scored twice in eval mode (no momentum update, no enqueue), once with its own image and once
    with the image of the next pair in the batch (``shuffled_*``): what the text alone allows. ITC accuracies are
    in-batch (chance 1 / batch), ITM accuracy is over the B positives and 2B hard negatives of each batch.
    """
    raw = unwrap(model)
    sums: dict[str, float] = {}
    n = 0
    with evaluating(raw):
        for i in range(0, len(val) - 1, batch_size):
            idx = list(range(i, min(i + batch_size, len(val))))
            if len(idx) < 2:
                break
            batch = val.fixed_batch(idx, seed=seed + i)
            rolled = dict(batch, images=batch["images"].roll(1, 0))
            for prefix, b in (("", batch), ("shuffled_", rolled)):
                _, m = pretrain_step(raw, b, val.config)
                for k, v in m.items():
                    sums[prefix + k] = sums.get(prefix + k, 0.0) + v * len(idx)
            n += len(idx)
    out = {k: v / max(n, 1) for k, v in sums.items() if not k.endswith("queue_size") and "temperature" not in k}
    out["itc_chance"] = 1.0 / min(batch_size, len(val))
    return out
