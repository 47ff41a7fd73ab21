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

import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.scenes import SceneBank
from mmkit.data.text import CAPTION_STYLES, caption
from mmkit.data.world import Rng
from mmkit.objectives.itc import all_gather_no_grad, all_gather_with_grad, itc_loss_with_queue, world_info
from mmkit.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from mmkit.objectives.lm import IGNORE_INDEX, split_prefix
from mmkit.objectives.mlm import mlm_mask
from mmkit.mplug.tasks.inputs import decoder_inputs, pad_rows
from mmkit.tokenizer import world_tokenizer

__all__ = ["PretrainConfig", "PretrainData", "BATCH_KEYS", "build_batch", "global_token_mean", "pretrain_step",
           "pretrain_loss", "make_pretrain_loss", "StepParts"]

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

    images (B, 3, S, S) float; ids (B,) the pair indices (equal ids = the same pair: positives of each other in ITC,
    never each other's hard negatives); text_ids / text_mask (B, L) ``[CLS] caption [SEP]``; mlm_ids / mlm_labels
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
    return {"images": images, "ids": torch.tensor(indices, dtype=torch.long), "text_ids": text, "text_mask": mask,
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

