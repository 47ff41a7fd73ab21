"""VLMo stagewise pretraining on the Shapes World (VLMo §3.3-3.4): data, the three stages' losses, which parameters
each stage trains, and a runner.

    cfg = PretrainConfig()
    vqgan = ...                                                   # the image tokenizer, e.g. mmkit.load("vqgan-world-32")
    images = ImageData.build(cfg, vqgan, model.grid_size)         # stage 1: images + their codes + block masks
    run_stage(model, 1, images, TrainConfig(steps=..))            # BEiT masked image modelling: attention + V-FFN
    texts = TextData.build(cfg, tok, model.config.max_text_len)   # stage 2: text-only, whole-word masked
    run_stage(model, 2, texts, TrainConfig(steps=..))             # MLM: the L-FFN (attention, V-FFN frozen)
    pairs = PairData.build(cfg, tok, model.config.max_text_len)   # stage 3: image-caption pairs
    run_stage(model, 3, pairs, TrainConfig(steps=..))             # ITC + ITM (global hard negatives) + MLM

The three stages (VLMo §3.4, Figure 2):

=====  ====================  ==========================================  ===========================================
stage  data                  objective                                   trains (everything else frozen)
=====  ====================  ==========================================  ===========================================
1      images (SceneBank)    BEiT masked image modelling: ~40% of the    image embeddings, attention, V-FFN, final
                             patches, in blocks, replaced by [MASK];     norm, MIM head ("we train the attention
                             predict the image tokenizer's code of       module and vision expert ... as in BEiT")
                             each masked patch
2      texts (descriptions,  MLM with whole-word masking on the          text embeddings, T_type, L-FFN, MLM head
       captions)             text-only route (L-FFN in every layer)      ("we freeze parameters of the attention
                                                                         module and vision expert")
3      image-caption pairs   ITC on [I_CLS]/[T_CLS] + ITM on the fusion  everything but BEiT's [MASK] patch and the
                             [T_CLS] with hard negatives from the ITC    MIM head (unused there)
                             similarities of the GLOBAL batch + MLM on
                             the fusion output (§3.3)
=====  ====================  ==========================================  ===========================================

Shared pieces of the shared attention block (its LayerNorm, the layer-scale gains γ1 and γ2, γ2 scaling whichever
expert ran) count as "attention": frozen in stage 2 with it. The final LayerNorm, shared by every route, is frozen
in stage 2 too, so the image path of stage 1 is left bit-identical (tests/test_vlmo_pretrain.py checks).

MIM targets and the patch grid. BEiT's tokenizer sees the image at a resolution where its code grid equals the
patch grid (224 px in 16 px patches = 14x14 patches; the DALL-E tokenizer downsamples 8x, so it reads 112 px).
Here :func:`mim_codes` resizes the images to ``grid * f`` (f = the VQGAN's downsampling factor) and checks that the
code grid is ``grid x grid``; codes and patches are both in raster order, so code ``i * grid + j`` is the target
of patch ``i * grid + j``. vlmo-tiny (32 px, P = 4: 8x8) with vqgan-world-32 (f = 4) reads the images as they are.

Several processes. Every batch is built whole by ``batch_fn`` (the global batch, masks included) and
:func:`mmkit.train.train` slices it, so the masks do not depend on the number of processes. ITC gathers the
features of every process (:func:`mmkit.objectives.itc_loss`), ITM draws its hard negatives from the global
similarities with a seed the batch carries (every rank draws the same indices), and the MLM losses divide by the
masked-token count of the global batch, so 2 processes compute what 1 process computes on the global batch
(tests/_vlmo_pretrain_worker.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkit.data.datasets import ImageTextDataset, TextOnlyDataset, make_collate
from mmkit.data.scenes import SceneBank
from mmkit.objectives import (IGNORE_INDEX, all_gather_no_grad, itc_loss, itm_labels, itm_loss, mlm_loss, mlm_mask,
                              sample_hard_negatives, world_info)
from mmkit.tokenizer import pad_ids
from mmkit.train import TrainConfig, TrainResult, freeze, train, unwrap
from mmkit.vlmo.masking import block_masks

__all__ = ["STAGES", "STAGE_TRAINS", "PretrainConfig", "StagePlan", "prepare_stage", "copy_expert", "mim_codes",
           "mlm_inputs", "ImageData", "TextData", "PairData", "same_slice", "mim_loss", "text_mlm_loss", "vl_loss",
           "VLLosses", "vl_losses", "run_stage", "StageRun", "stagewise_pretrain"]

STAGES: dict[int, str] = {1: "vision (image-only MIM)", 2: "language (text-only MLM)", 3: "vision-language"}

# VLMo §3.4: the parts (mmkit.vlmo.model.VLMo.parts) each stage trains; every other part is frozen.
STAGE_TRAINS: dict[int, tuple[str, ...]] = {
    1: ("image_embeddings", "mask_token", "type_embeddings", "attention", "vision_ffn", "final_norm", "mim_head"),
    2: ("text_embeddings", "type_embeddings", "language_ffn", "mlm_head"),
    3: ("image_embeddings", "text_embeddings", "type_embeddings", "attention", "vision_ffn", "language_ffn", "vl_ffn",
        "final_norm", "itc", "itm", "mlm_head"),
}


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    # -- the world ----------------------------------------------------------------------------------------
    lang: str = "both"                 # "en", "zh" or "both" (each item draws its language from its seed)
    image_size: int = 64               # must match the model's image_size (vlmo-tiny: 64)
    min_objects: int = 1               # objects per scene
    max_objects: int = 3
    # -- stage 1: BEiT masked image modelling ---------------------------------------------------------------
    n_images: int = 4000               # training scenes (rendered once, their codes computed once)
    mask_ratio: float = 0.4            # share of the patches masked per image (BEiT: 75 of 196 = 0.4)
    min_block: int = 4                 # smallest masked block, in patches (BEiT: 16 of 196; 4 of 64 is the same share)
    max_aspect: float = 3.0            # blocks at most this elongated (BEiT: 1 / 0.3)
    # -- stage 2: text-only MLM -----------------------------------------------------------------------------
    n_texts: int = 4000                # text-only items (product descriptions and captions of other scenes)
    text_sources: tuple = ("description", "caption")   # mmkit.data.datasets.TEXT_SOURCES; descriptions longer
                                       # than the model's max_text_len are cut there
    text_start: int = 50_000           # text-only scenes start here in the split, so they are not the pairs' scenes
    # -- stage 3: image-text pairs ----------------------------------------------------------------------------
    n_pairs: int = 8000                # image-caption pairs (images cached)
    caption_styles: tuple | None = None  # caption styles of the pairs (None = all of CAPTION_STYLES)
    # -- objectives ------------------------------------------------------------------------------------------
    mlm_rate: float = 0.15             # BERT's 15% of the words, whole-word masked, 80/10/10 (§3.3, §4.1)
    itc_weight: float = 1.0            # stage-3 loss = weighted sum; the paper gives no weights (the official code
    itm_weight: float = 1.0            # multiplies its fusion MLM loss by 0.25)
    mlm_weight: float = 1.0
    negative_pool: str = "global"      # where ITM hard negatives come from (Table 6): "global" = the examples of every
                                       # process (VLMo), "local" = only those of the example's own process (ALBEF)
    local_groups: int = 1              # "local" on ONE process: emulate this many processes by mining within equal
                                       # slices of the batch (Table 6 at laptop scale: 4 slices of 8 of a batch of 32)
    # -- expert initialisation between stages (VLMo is silent; the §4.6 image-only ablation initialises all
    #    experts from BEiT's FFN) -----------------------------------------------------------------------------
    language_init: str | None = None   # at stage 2: None (L-FFN keeps its random init, as the official code's
                                       # text pretraining) or "vision" (L-FFN starts as a copy of the V-FFN)
    vl_init: str | None = "vision"     # at stage 3: the VL-FFN starts as a copy of "vision" / "language", or None

    def __post_init__(self) -> None:
        if self.lang not in ("en", "zh", "both"):
            raise ValueError(f"lang must be 'en', 'zh' or 'both', got {self.lang!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.negative_pool not in ("global", "local"):
            raise ValueError(f"negative_pool must be 'global' or 'local' (VLMo Table 6), got {self.negative_pool!r}")
        if self.local_groups < 1:
            raise ValueError(f"local_groups must be >= 1, got {self.local_groups}")
        for name in ("language_init", "vl_init"):
            if getattr(self, name) not in (None, "vision", "language"):
                raise ValueError(f"{name} must be None, 'vision' or 'language', got {getattr(self, name)!r}")
        self.text_sources = tuple(self.text_sources)
        if self.caption_styles is not None:
            self.caption_styles = tuple(self.caption_styles)


# ---------------------------------------------------------------------------------------------------------
# Which parameters each stage trains (VLMo §3.4)
# ---------------------------------------------------------------------------------------------------------

class StagePlan(NamedTuple):
    stage: int
    trained: list                      # parameter names left trainable
    frozen: list                       # parameter names frozen (requires_grad False: no gradient, bit-identical)


def prepare_stage(model, stage: int) -> StagePlan:
    """Make exactly the parts of ``STAGE_TRAINS[stage]`` trainable (through :func:`mmkit.train.freeze`)."""
    if stage not in STAGE_TRAINS:
        raise ValueError(f"stage must be one of {sorted(STAGE_TRAINS)} (VLMo §3.4), got {stage!r}")
    raw = unwrap(model)
    parts = raw.parts()
    covered = tuple(p for prefixes in parts.values() for p in prefixes)
    stray = [n for n, _ in raw.named_parameters() if not n.startswith(covered)]
    if stray:
        raise ValueError(f"parameters {stray[:4]} belong to no part of VLMo.parts(); stagewise pretraining runs on a "
                         "plain VLMo (pretrain first, then build the downstream model with from_pretrained_vlmo)")
    for p in raw.parameters():
        p.requires_grad_(True)
    frozen_prefixes = [p for name, prefixes in parts.items() if name not in STAGE_TRAINS[stage] for p in prefixes]
    frozen = freeze(raw, frozen_prefixes) if frozen_prefixes else []
    trained = [n for n, p in raw.named_parameters() if p.requires_grad]
    return StagePlan(stage, trained, frozen)


@torch.no_grad()
def copy_expert(model, source: str, target: str) -> list[str]:
    """Copy the ``source`` expert ("vision", "language", "vl") into ``target`` in every layer that has both; returns
    the layers' indices as strings. E.g. ``copy_expert(model, "vision", "vl")`` before stage 3."""
    raw = unwrap(model)
    done = []
    for i, block in enumerate(raw.blocks):
        src, dst = getattr(block.ffn, source), getattr(block.ffn, target)
        if src is not None and dst is not None:
            dst.load_state_dict(src.state_dict())
            done.append(str(i))
    return done


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def mim_codes(image_tokenizer, images: torch.Tensor, grid: int, batch_size: int = 256) -> torch.Tensor:
    """The image tokenizer's code of every patch: (B, grid * grid) long, raster order (= the patch order).

    ``image_tokenizer`` is a :class:`mmkit.vqgan.model.VQGAN` (anything with ``downsample_factor`` and ``encode``).
    The images (B, 3, S, S) in [0, 1] are resized to ``grid * f`` px (f = its downsampling factor) so that its code
    grid lines up with the model's patch grid, as BEiT feeds its tokenizer 112 px for 14x14 patches of 224 px.
    """
    f = int(image_tokenizer.downsample_factor)
    side = grid * f
    was_training = getattr(image_tokenizer, "training", False)
    if hasattr(image_tokenizer, "eval"):
        image_tokenizer.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float()
            if x.shape[-1] != side or x.shape[-2] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
                x = x.clamp(0.0, 1.0)
            codes = image_tokenizer.encode(x)                                            # (b, h, w)
            if tuple(codes.shape[1:]) != (grid, grid):
                raise ValueError(f"the image tokenizer gave a {tuple(codes.shape[1:])} code grid for {side} px images, "
                                 f"but the model has a {grid}x{grid} patch grid: MIM needs one code per patch "
                                 "(choose a tokenizer whose downsampling factor divides the image size)")
            out.append(codes.reshape(len(x), grid * grid).long().cpu())
    finally:
        if hasattr(image_tokenizer, "train"):
            image_tokenizer.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, grid * grid, dtype=torch.long)


def mlm_inputs(input_ids: torch.Tensor, tokenizer, generator: torch.Generator, rate: float = 0.15):
    """BERT MLM inputs with whole-word masking (VLMo §4.1) for padded ``input_ids`` (B, T): words come from the
    WordPiece tokens (a ``##`` piece continues its word; a Chinese character is a word); [CLS], [SEP], [PAD] are
    never chosen; random replacements are real tokens of the tokenizer. Returns :class:`mmkit.objectives.MLMOutput`."""
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()]
    return mlm_mask(input_ids, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                    special_ids=tokenizer.all_special_ids, generator=generator, tokens=tokens, rate=rate)


def _draw(n: int, batch_size: int, generator: torch.Generator) -> list[int]:
    return torch.randint(n, (batch_size,), generator=generator).tolist()


class ImageData:
    """Stage 1: rendered scenes, their MIM codes (computed once) and fresh block masks per batch."""

    def __init__(self, bank: SceneBank, codes: torch.Tensor, grid: int, config: PretrainConfig):
        if codes.shape != (len(bank), grid * grid):
            raise ValueError(f"codes {tuple(codes.shape)} must be (scenes, grid * grid) = {(len(bank), grid * grid)}")
        self.bank, self.codes, self.grid, self.config = bank, codes, grid, config

    @classmethod
    def build(cls, config: PretrainConfig, image_tokenizer, grid: int, split: str = "train", n: int | None = None,
              start: int = 0) -> "ImageData":
        bank = SceneBank.build(split, config.n_images if n is None else n, image_size=config.image_size, start=start,
                               min_objects=config.min_objects, max_objects=config.max_objects)
        return cls(bank, mim_codes(image_tokenizer, bank.images(range(len(bank))), grid), grid, config)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> dict:
        c = self.config
        return {"images": self.bank.images(indices),                                       # (B, 3, S, S)
                "codes": self.codes[list(indices)],                                        # (B, N) targets
                "bool_masked_pos": block_masks(len(indices), (self.grid, self.grid), c.mask_ratio,
                                               min_block=c.min_block, max_aspect=c.max_aspect,
                                               generator=generator)}                      # (B, N)

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """``batch_fn`` for :func:`mmkit.train.train`: {"images", "codes", "bool_masked_pos"}."""
        return self.batch(_draw(len(self.bank), batch_size, generator), generator)


class TextData:
    """Stage 2: tokenized text-only items ([CLS] .. [SEP], cut at ``max_len``), whole-word masked per batch."""

    def __init__(self, ids: list[list[int]], tokenizer, config: PretrainConfig):
        self.ids, self.tok, self.config = ids, tokenizer, config

    @classmethod
    def build(cls, config: PretrainConfig, tokenizer, max_len: int, split: str = "train", n: int | None = None,
              start: int | None = None) -> "TextData":
        ds = TextOnlyDataset(split, config.n_texts if n is None else n,
                             start=config.text_start if start is None else start, lang=config.lang,
                             sources=config.text_sources, min_objects=config.min_objects,
                             max_objects=config.max_objects)
        texts = [ds[i]["text"] for i in range(len(ds))]
        ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        return cls(ids, tokenizer, config)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> dict:
        ids = pad_ids([self.ids[i] for i in indices], self.tok.pad_token_id)       # (B, T) right-padded
        m = mlm_inputs(ids, self.tok, generator, self.config.mlm_rate)
        return {"input_ids": ids, "attention_mask": ids != self.tok.pad_token_id,
                "mlm_input_ids": m.input_ids, "mlm_labels": m.labels}

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """``batch_fn`` for :func:`mmkit.train.train`: {"input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"}."""
        return self.batch(_draw(len(self.ids), batch_size, generator), generator)


class PairData:
    """Stage 3: image-caption pairs (``ImageTextDataset``, images cached), collated with the kit's collate, whole-word
    masked for MLM, carrying the pair ids (the scene seeds: equal ids are positives in ITC / never hard negatives) and
    the seed every process uses to draw the ITM hard negatives."""

    def __init__(self, dataset: ImageTextDataset, tokenizer, max_len: int, config: PretrainConfig):
        self.ds, self.tok, self.config = dataset, tokenizer, config
        self.collate = make_collate(tokenizer, max_length=max_len)

    @classmethod
    def build(cls, config: PretrainConfig, tokenizer, max_len: int, split: str = "train", n: int | None = None,
              start: int = 0) -> "PairData":
        ds = ImageTextDataset(split, config.n_pairs if n is None else n, start=start, lang=config.lang,
                              styles=config.caption_styles, image_size=config.image_size,
                              min_objects=config.min_objects, max_objects=config.max_objects, cache_images=True)
        return cls(ds.precompute(), tokenizer, max_len, config)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> dict:
        b = self.collate([self.ds[i] for i in indices])
        m = mlm_inputs(b["input_ids"], self.tok, generator, self.config.mlm_rate)
        return {"images": b["image"], "texts": b["text"], "input_ids": b["input_ids"],
                "attention_mask": b["attention_mask"], "mlm_input_ids": m.input_ids, "mlm_labels": m.labels,
                "pair_ids": b["seed"], "negative_seed": int(torch.randint(2**62, (), generator=generator))}

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """``batch_fn`` for :func:`mmkit.train.train` (see :meth:`batch`)."""
        return self.batch(_draw(len(self.ds), batch_size, generator), generator)


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------

def _global_mlm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """:func:`mmkit.objectives.mlm_loss`, re-weighted so that the mean DDP takes over W processes is the mean over every
    masked token of the global batch: (local mean) x (local tokens) x W / (global tokens). Exactly mlm_loss on one
    process."""
    loss, metrics = mlm_loss(logits, labels)
    world, _ = world_info()
    if world > 1:
        n = (labels != IGNORE_INDEX).sum().to(torch.float64)
        total = n.clone()
        dist.all_reduce(total)
        loss = loss * (n * world / total.clamp(min=1)).to(loss.dtype)
    return loss, metrics


def mim_loss(model, batch: dict):
    """Stage 1 (BEiT): cross-entropy of the tokenizer's code at every masked patch, from the image-only route.
    ``(loss, {"mim_acc": ..})``. Every row masks the same number of patches, so this is also the mean of row means."""
    dev = unwrap(model).type_embed.weight.device
    masked = batch["bool_masked_pos"].to(dev)                                   # (B, N)
    out = model(batch["images"].to(dev), bool_masked_pos=masked)
    logits = out.mim_logits[masked]                                             # (M, n_codes) the masked patches
    target = batch["codes"].to(dev)[masked]                                     # (M,)
    if target.numel() and int(target.max()) >= logits.shape[-1]:
        raise ValueError(f"image codes reach {int(target.max())} but the model predicts {logits.shape[-1]} codes: "
                         "build it with n_image_codes = the tokenizer's codebook size")
    loss = F.cross_entropy(logits.float(), target)
    with torch.no_grad():
        acc = (logits.argmax(-1) == target).float().mean().item()
    return loss, {"mim_acc": acc}


def text_mlm_loss(model, batch: dict):
    """Stage 2: masked language modelling on the text-only route (L-FFN in every layer). ``(loss, {"mlm_acc", ..})``."""
    dev = unwrap(model).type_embed.weight.device
    out = model(input_ids=batch["mlm_input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), mlm=True)
    return _global_mlm(out.mlm_logits, batch["mlm_labels"].to(dev))


def _common_length(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, T) ids / mask on the right to the longest T of all processes (all_gather needs equal shapes)."""
    world, _ = world_info()
    if world == 1:
        return ids, mask
    T = torch.tensor([ids.shape[1]], device=ids.device)
    dist.all_reduce(T, op=dist.ReduceOp.MAX)
    extra = int(T) - ids.shape[1]
    if extra:
        ids = F.pad(ids, (0, extra), value=pad_id)
        mask = F.pad(mask, (0, extra), value=False)
    return ids, mask


class VLLosses(NamedTuple):
    loss: torch.Tensor             # () weighted sum (what stage 3 minimises)
    itc: torch.Tensor              # () ITC of the global batch (the same on every process)
    itm: torch.Tensor              # () ITM of this process's B positives + 2B hard negatives
    mlm: torch.Tensor              # () fusion MLM (global-token re-weighting, see _global_mlm)
    metrics: dict                  # itc / itm / mlm losses and accuracies, logit scale
    text_for_image: torch.Tensor   # (B,) global index of the hard negative text drawn for each local image
    image_for_text: torch.Tensor   # (B,) global index of the hard negative image drawn for each local text


def same_slice(n: int, groups: int, device=None) -> torch.Tensor:
    """(n, n) bool: rows i, j of a global batch of ``n`` lie in the same of ``groups`` equal consecutive slices (the
    examples of one process; VLMo Table 6's "local" hard-negative pool)."""
    if n % groups:
        raise ValueError(f"a global batch of {n} does not split into {groups} equal slices (processes x local_groups)")
    g = torch.arange(n, device=device) // (n // groups)
    return g[:, None] == g[None, :]


def vl_losses(model, batch: dict, config: PretrainConfig | None = None) -> VLLosses:
    """Stage 3 (VLMo §3.3): ITC + ITM with global hard negatives + MLM, on a :meth:`PairData.batch` (this process's
    slice). ``model`` may be DDP-wrapped: it is called, never reached into, except for the temperature."""
    cfg = config or PretrainConfig()
    raw = unwrap(model)
    dev = raw.type_embed.weight.device
    images = batch["images"].to(dev)
    ids, am = _common_length(batch["input_ids"].to(dev), batch["attention_mask"].to(dev).bool(),
                             raw.config.pad_token_id)
    B = len(images)

    # ITC (§3.3, eq. (3)-(4)): separately encoded [I_CLS] (V-FFN) and [T_CLS] (L-FFN), negatives from every process
    img = model(images, itc=True)
    txt = model(input_ids=ids, attention_mask=am, itc=True)
    pair_ids = batch.get("pair_ids")
    itc = itc_loss(img.features, txt.features, raw.temperature(),
                   ids=None if pair_ids is None else pair_ids.to(dev).long())

    # MLM (§3.3): predict the masked words from the other words and the image (fusion route)
    mlm_ids = batch["mlm_input_ids"].to(dev)
    mlm_labels = batch["mlm_labels"].to(dev)
    if mlm_ids.shape[1] < ids.shape[1]:                               # padded to the common length above
        mlm_ids = F.pad(mlm_ids, (0, ids.shape[1] - mlm_ids.shape[1]), value=raw.config.pad_token_id)
        mlm_labels = F.pad(mlm_labels, (0, ids.shape[1] - mlm_labels.shape[1]), value=IGNORE_INDEX)
    fused = model(images, mlm_ids, am, mlm=True)
    mlm, mlm_m = _global_mlm(fused.mlm_logits, mlm_labels)

    # ITM (§3.3, Table 6): one hard negative text per image and one hard negative image per text, drawn from the ITC
    # similarities of the GLOBAL batch (the same seed on every process -> the same global indices)
    g = torch.Generator().manual_seed(int(batch.get("negative_seed", 0)))
    sim_i2t, sim_t2i = itc.sim_i2t, itc.sim_t2i
    if cfg.negative_pool == "local":                                  # Table 6: candidates of the own slice only
        outside = ~same_slice(sim_i2t.shape[0], world_info()[0] * cfg.local_groups, sim_i2t.device)
        sim_i2t, sim_t2i = sim_i2t.masked_fill(outside, float("-inf")), sim_t2i.masked_fill(outside, float("-inf"))
    neg = sample_hard_negatives(sim_i2t, sim_t2i, itc.ids, generator=g)
    rows = itc.local_rows
    text_for_image, image_for_text = neg.text_for_image[rows], neg.image_for_text[rows]   # (B,) global indices
    all_images, all_ids, all_am = all_gather_no_grad(images), all_gather_no_grad(ids), all_gather_no_grad(am)
    pair_images = torch.cat([images, all_images[image_for_text], images])              # (3B, 3, S, S)
    pair_ids_ = torch.cat([ids, ids, all_ids[text_for_image]])                          # (3B, T)
    pair_am = torch.cat([am, am, all_am[text_for_image]])
    out = model(pair_images, pair_ids_, pair_am, itm=True)                               # the fused [T_CLS]
    itm, itm_m = itm_loss(out.itm_logits, itm_labels(B, 2 * B, device=dev))             # B positives, 2B negatives

    loss = cfg.itc_weight * itc.loss + cfg.itm_weight * itm + cfg.mlm_weight * mlm
    metrics = {"itc": float(itc.loss.detach()), "itm": float(itm.detach()), "mlm": float(mlm.detach()),
               **itc.metrics, **itm_m, **mlm_m}
    metrics.pop("queue_size", None)
    return VLLosses(loss, itc.loss, itm, mlm, metrics, text_for_image, image_for_text)


def vl_loss(model, batch: dict, config: PretrainConfig | None = None):
    """``loss_fn`` for :func:`mmkit.train.train` in stage 3: ``(loss, metrics)`` (see :func:`vl_losses`)."""
    r = vl_losses(model, batch, config)
    return r.loss, r.metrics


# ---------------------------------------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------------------------------------

class StageRun(NamedTuple):
    stage: int
    plan: StagePlan                # which parameters trained / stayed frozen
    result: TrainResult            # mmkit.train.train's history (loss + each stage's metrics per step), ...
    seconds: float


def run_stage(model, stage: int, data, train_config: TrainConfig, config: PretrainConfig | None = None,
              **train_kw) -> StageRun:
    """One stage of VLMo §3.4 on ``data`` (the stage's :class:`ImageData` / :class:`TextData` / :class:`PairData`).

    Initialises experts as ``config`` says (``language_init`` before stage 2, ``vl_init`` before stage 3), freezes
    everything the stage does not train (:func:`prepare_stage`), trains with :func:`mmkit.train.train`, and leaves
    every parameter trainable again afterwards.
    """
    cfg = config or PretrainConfig()
    t0 = time.perf_counter()
    if stage == 2 and cfg.language_init:
        copy_expert(model, cfg.language_init, "language")
    if stage == 3 and cfg.vl_init:
        copy_expert(model, cfg.vl_init, "vl")
    plan = prepare_stage(model, stage)
    loss_fn = {1: mim_loss, 2: text_mlm_loss, 3: lambda m, b: vl_loss(m, b, cfg)}[stage]
    try:
        result = train(model, loss_fn, data.batch_fn, train_config, **train_kw)
    finally:
        for p in unwrap(model).parameters():
            p.requires_grad_(True)
    return StageRun(stage, plan, result, time.perf_counter() - t0)


def stagewise_pretrain(model, config: PretrainConfig, train_configs: dict[int, TrainConfig], tokenizer,
                       image_tokenizer=None, stages: Sequence[int] = (1, 2, 3), **train_kw) -> list[StageRun]:
    """VLMo §3.4 end to end: build each stage's data and run the ``stages`` in order (stage 1 needs the image
    tokenizer). ``train_configs[s]`` is the :class:`mmkit.train.TrainConfig` of stage ``s``."""
    c = model.config
    if config.image_size != c.image_size:
        raise ValueError(f"PretrainConfig.image_size={config.image_size} but the model reads {c.image_size} px images")
    runs = []
    for s in stages:
        if s == 1:
            if image_tokenizer is None:
                raise ValueError("stage 1 (masked image modelling) needs the image tokenizer, e.g. "
                                 "mmkit.load('vqgan-world-32')")
            data = ImageData.build(config, image_tokenizer, c.grid_size)
        elif s == 2:
            data = TextData.build(config, tokenizer, c.max_text_len)
        else:
            data = PairData.build(config, tokenizer, c.max_text_len)
        runs.append(run_stage(model, s, data, train_configs[s], config, **train_kw))
    return runs


# ---------------------------------------------------------------------------------------------------------
# Baselines and held-out evaluation: what each stage's loss is measured against
# ---------------------------------------------------------------------------------------------------------

# ITM's prior: B positives and 2B hard negatives per batch, so "always not matched" scores this loss (and 2/3 accuracy).
ITM_PRIOR_LOSS: float = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))


def _entropy(values: torch.Tensor) -> float:
    c = torch.bincount(values.flatten().long()).float()
    p = c[c > 0] / c.sum()
    return float(-(p * p.log()).sum())


def code_prior(data: ImageData, n: int = 2000, seed: int = 9) -> float:
    """Stage 1's blind baseline: the loss of predicting every masked patch's code from the codes' frequencies alone
    (their entropy, in nats), on ``n`` masked patches' worth of images."""
    b = data.batch_fn(torch.Generator().manual_seed(seed), min(n, len(data.bank)))
    return _entropy(b["codes"][b["bool_masked_pos"]])


def token_prior(data, n: int = 2000, seed: int = 9) -> float:
    """Stages 2-3's blind baseline for MLM: the entropy of the masked words (the loss of predicting each from the
    word frequencies, without reading the sentence or the image)."""
    size = len(data.ids) if isinstance(data, TextData) else len(data.ds)
    b = data.batch_fn(torch.Generator().manual_seed(seed), min(n, size))
    return _entropy(b["mlm_labels"][b["mlm_labels"] != IGNORE_INDEX])


def itc_chance(batch_size: int) -> float:
    """ITC's chance level: log(B), the loss of uniform similarities over a batch of B pairs."""
    return math.log(batch_size)


@torch.no_grad()
def evaluate_pretraining(model, tokenizer, n: int = 256, batch_size: int = 32, split: str = "test",
                         config: PretrainConfig | None = None, seed: int = 0) -> dict:
    """Stage-3 losses and accuracies on ``n`` held-out pairs of ``split`` (batches of ``batch_size``, hard negatives
    drawn as in training): itc, i2t_acc, t2i_acc, itm, itm_acc (positives 1/3, hard negatives 2/3 of the rows),
    mlm, mlm_acc. Averaged over batches."""
    cfg = config or PretrainConfig(image_size=model.config.image_size)
    data = PairData.build(cfg, tokenizer, model.config.max_text_len, split=split, n=n)
    g = torch.Generator().manual_seed(seed)
    sums: dict = {}
    was = model.training
    model.eval()
    try:
        batches = 0
        for i in range(0, n - batch_size + 1, batch_size):
            r = vl_losses(model, data.batch(range(i, i + batch_size), g), cfg)
            for k in ("itc", "i2t_acc", "t2i_acc", "itm", "itm_acc", "mlm", "mlm_acc"):
                sums[k] = sums.get(k, 0.0) + float(r.metrics[k])
            batches += 1
    finally:
        model.train(was)
    return {k: v / max(batches, 1) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------
# The recipes' settings (mmkit/vlmo/recipes.py), tuned on vlmo-tiny (see the tuning notes there)
# ---------------------------------------------------------------------------------------------------------

RECIPE_PRETRAIN = dict(n_images=4000, n_texts=4000, n_pairs=8000)
RECIPE_PRETRAIN_FAST = dict(n_images=400, n_texts=400, n_pairs=400)
_COMMON = dict(min_lr_ratio=0.05, weight_decay=0.01, betas=(0.9, 0.98), mixed_precision="no", log_every=50, seed=0)
# Sized for a shared 2-core laptop (the whole chain stage 1 -> VQA in ~30 CPU-min of one thread): stage 1
# 400 x 64 images, stage 2 200 x 64 texts, stage 3 150 x 16 pairs (ITC leaves chance after ~100 steps from cold).
RECIPE_TRAIN: dict[int, dict] = {
    1: dict(_COMMON, steps=400, batch_size=64, lr=2e-3, warmup_steps=40),
    2: dict(_COMMON, steps=200, batch_size=64, lr=2e-3, warmup_steps=20),
    3: dict(_COMMON, steps=150, batch_size=16, lr=1e-3, warmup_steps=15),
}
RECIPE_TRAIN_FAST: dict[int, dict] = {s: dict(t, steps=30, warmup_steps=5, batch_size=16) for s, t in RECIPE_TRAIN.items()}


def recipe_pretrain_config(fast: bool = False) -> PretrainConfig:
    return PretrainConfig(**(RECIPE_PRETRAIN_FAST if fast else RECIPE_PRETRAIN))


def recipe_train(stage: int, fast: bool = False) -> dict:
    """TrainConfig fields of ``stage`` in the recipes (``progress_bar`` off in fast mode)."""
    return dict((RECIPE_TRAIN_FAST if fast else RECIPE_TRAIN)[stage], progress_bar=not fast)
