"""mPLUG (Li et al. 2022): two unimodal encoders, the cross-modal skip-connected network, a text decoder.

    model = mmkit.build_model("mplug-tiny")                         # MPLUG(MPLUGConfig())
    out = model(images, encoder_ids, decoder_input_ids, labels)     # MPLUGOutput(loss, logits, context)
    gen = model.generate(images, encoder_ids, max_new_tokens=8)     # Generation(sequences, logits), KV-cached
    ids = model.hf_generator().generate(images=images, encoder_ids=encoder_ids, num_beams=3)  # transformers

The model, top to bottom (mPLUG §3.1-3.2, Figure 2):

    images (B, 3, H, W) --ViT on P x P patches + [CLS]--> v^0 (B, 1 + N, D)                 §3.1 visual encoder
    [CLS] w_1 .. w_M [SEP] --BERT layers--> l^0 (B, L, D)                                     §3.1 text encoder
    ITC: Linear([CLS] of v^0), Linear([CLS] of l^0), queues of momentum features             §3.3 ITC (ALBEF)
    fusion: N blocks of (S asymmetric co-attention layers + 1 connected-attention layer)     §3.2 eq. (1)-(5)
        -> (v^L, l^L); the ITM head reads l^L's [CLS], the MLM head every l^L token          §3.3 ITM, MLM
    decoder: [BOS] y_1 .. y_T, causal self-attention, cross-attention to [v^L; l^L], FFN      §3.1, §3.3 PrefixLM
        -> LM head tied to the decoder's word embedding

The fusion variants of Figure 1 / Figure 4 are config choices (``fusion``): "skip" (mPLUG), "connected" (every
layer self-attends over [v; l], Fig. 1a), "co_attention" (text and image each cross-attend to the other, Fig. 1b)
and "asymmetric" (text cross-attends to the image, the image never changes: ALBEF / BLIP). All build on the shared
:class:`mmkit.nn.TransformerBlock` (post-norm, as BERT and mPLUG §3.2 write it: ``x = LN(x + sublayer(x))``).

Notes for readers: where the official code (X-PLUG/mPLUG, fine-tuning code only) differs from the paper
-------------------------------------------------------------------------------------------------------
* Where the connected layers are. §3.2 describes N blocks of S co-attention layers followed by one connected
  layer (N (S + 1) layers). The official ``FusionEncoder`` numbers its ``fusion_layers`` = 6 layers k = 0..5 and
  makes layer k connected-attention iff ``k != 0 and k % stride_layer == 0``, otherwise asymmetric co-attention.
  With ``config_bert_stride3.json`` (the base pretraining / VQA configs) that is ``co co co CONN co co``: one
  connected layer, in the middle of the stack. With ``config_bert.json`` (``stride_layer`` 6, the large configs)
  ``k % 6 == 0`` holds only for k = 0, which is excluded: **the released large model never reaches a
  connected-attention layer**; its fusion is pure asymmetric co-attention (ALBEF / BLIP style), although §5.3.1
  says S = 6 was chosen for mPLUG_ViT-L. ``skip_layout="official"`` reproduces that rule, ``"paper"`` the §3.2
  blocks (the default).
* How the image re-enters. Eq. (5) gives the connected layer's image half as the new image features, v^n.
  The official code adds it to the old ones instead, ``v^n = v^{n-1} + [connected layer output]_v``: a second,
  summed skip around a post-norm layer that already has its residuals (so the image side is no longer
  layer-normalised). ``image_skip_residual=True`` reproduces it; the default follows eq. (5).
* What a connected layer holds. Officially every fusion layer is the same ``FusionLayer`` module, so the connected
  one carries cross-attention weights it never uses (2.4M at base). Here a connected layer is SA + FFN only.
* What the fusion module holds. The official ``FusionModel`` is built with all 12 BERT layers and its own
  embedding table and runs only the last ``fusion_layers`` = 6 of them (``start_layer = 12 - fusion_layers``):
  BERT's last 6 layers initialise the 6 that run (as §5.1 says); the first 6 and the table are never used.
* The image features. Official code calls CLIP's ``visual(image, skip_last_layer=True)``: despite the name every
  layer runs; the flag applies ``ln_post`` to *every* token and skips CLIP's projection ``proj``. ViT-L (1024 wide)
  is bridged to the 768-wide text side by ``visn_fc`` (Linear) + LayerNorm + dropout. Here: ``post_norm`` on every
  token and a ``bridge`` when ``vision_width != d_model``.
* Captioning. The official fine-tuned captioner (``model_caption_mplug.py``) decodes from the image embeddings
  alone: no text encoder, no fusion. VQA and grounding decode from ``[fused image; fused text]`` (concatenated in
  that order). Here every generative task decodes from the fused context; captions get an empty prompt
  ([CLS] [SEP]) or §5.4's "a picture of".
* The decoder is a ``BertLMHeadModel`` with its own embeddings, initialised from BERT (all 12 layers), BOS =
  [CLS], EOS = [SEP]. Here the world tokenizer's [BOS] / [EOS] (the full-size presets use [CLS] / [SEP]).
* Official pretraining code was never released: the ITC / ITM / MLM / PrefixLM wiring of ``tasks/pretrain.py``
  follows §3.3 and ALBEF (whose retrieval fine-tuning code the official repository keeps).

Parameter counts (``MPLUG.parameter_counts``; README of X-PLUG/mPLUG: base 350M, large 600M): see the presets at
the end of this file and scaled/configs/mplug_base.yaml.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from mmkit.generation import HFGenerationAdapter, MMKitGenerationConfig, register_cached_forward, sample_next
from mmkit.nn import (ACTIVATIONS, CellTokens, ConvFeatureExtractor, FeedForward, ImageEmbeddings, KVCache,
                      TextEmbeddings, TransformerBlock, init_weights, padding_mask)
from mmkit.objectives.itc import (FeatureQueue, QueueConfig, Temperature, TemperatureConfig, momentum_copy,
                                  momentum_update)
from mmkit.objectives.lm import IGNORE_INDEX, sequence_logprob, token_cross_entropy
from mmkit.registry import register_model, register_preset
from mmkit.tokenizer import word_ids, world_tokenizer

__all__ = [
    "MPLUGConfig", "MPLUG", "MPLUGOutput", "Context", "FusionOutput", "Generation", "FUSIONS", "fusion_plan",
    "QuickGELU", "feed_forward", "ConvPatches", "VisionEncoder", "TextEncoder", "FusionNetwork", "CoAttentionLayer", "TextDecoder",
    "LMHead", "ClassifierHead", "ContextCache", "MOMENTUM_PARTS", "MPLUGClassifierConfig", "MPLUGForClassification",
    "FULL_SIZE", "OFFICIAL_PARAMS", "TINY", "TINY_CELLS", "VISION_STEMS", "FRONT_END_PREFIXES",
]

FUSIONS: tuple[str, ...] = ("skip", "connected", "co_attention", "asymmetric")   # Figure 1 (a)-(c), Figure 4
VISION_ACTIVATIONS: tuple[str, ...] = tuple(ACTIVATIONS) + ("quick_gelu",)
MOMENTUM_PARTS: tuple[str, ...] = ("vision", "text", "vision_proj", "text_proj")  # ALBEF's model_pairs for ITC
VISION_STEMS: tuple[str, ...] = ("patch", "conv", "cells")                      # MPLUGConfig.vision_stem
# The image front end of the visual encoder (patch projection / conv stem / cell namer, and the image positions):
# what changes shape or meaning when vision_stem changes, so with_config leaves it fresh then.
FRONT_END_PREFIXES: tuple[str, ...] = ("vision.embeddings.patch.", "vision.embeddings.pos_embed.")


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

@dataclass
class MPLUGConfig:
    model_type: str = "mplug"
    # -- text: BERT-style WordPiece ids (the world tokenizer: mmkit.tokenizer.world_tokenizer()) ---------------
    vocab_size: int = 512          # rows of the word embeddings. The world tokenizer has 384 ids; 512 leaves room
                                   # for the grounding coordinate tokens <loc_k> (mmkit.tokenizer.add_coordinate_tokens;
                                   # 33 bins at 32 px, 65 at 64 px). BERT-base-uncased: 30522 at full size
    max_text_len: int = 64         # 1-D positions of the text encoder and of the decoder (BERT: 512). World captions
                                   # are <= 46 tokens with [CLS] / [SEP]
    type_vocab_size: int = 2       # BERT segment types (only type 0 is used; kept so BERT weights load 1:1)
    pad_token_id: int = 0          # [PAD]: padding of encoder inputs (masked out) and decoder inputs
    cls_token_id: int = 2          # [CLS]: first text-encoder token; its state feeds ITC, ITM and the classifiers
    sep_token_id: int = 3          # [SEP]: closes a text-encoder input
    mask_token_id: int = 4         # [MASK]: MLM (mPLUG §3.3)
    bos_token_id: int = 5          # [BOS]: first decoder input (official code: [CLS])
    eos_token_id: int = 6          # [EOS]: the decoder's last target; generation stops after it (official: [SEP])
    # -- the text side: text encoder, fusion network and decoder share one width (BERT-base: 768) ----------
    d_model: int = 128             # hidden width D of the text encoder, the fusion network and the decoder
    n_heads: int = 4               # attention heads of those layers (BERT-base: 12)
    d_ff: int = 256                # FFN hidden width (2 D for the tiny world model, which is limited by steps, not
                                   # capacity; BERT: 4 D = 3072)
    activation: str = "gelu"       # FFN non-linearity of the text side (BERT's exact GELU)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon of the text side (BERT)
    dropout: float = 0.0           # residual / embedding dropout (BERT: 0.1 at full size; 0 for the tiny model,
                                   # which is limited by steps, not data)
    attn_dropout: float | None = None  # dropout on attention probabilities; None = dropout
    text_layers: int = 2           # text encoder layers (mPLUG §5.1: 6, the first 6 of BERT-base)
    # -- the cross-modal fusion network (mPLUG §3.2, Figure 1) --------------------------------------------
    fusion: str = "skip"           # "skip" (mPLUG, Fig. 1c), "connected" (Fig. 1a), "co_attention" (Fig. 1b),
                                   # "asymmetric" (ALBEF / BLIP): the Figure 4 comparison, same layer count
    fusion_layers: int = 4         # total fusion layers (mPLUG §5.1: 6, the last 6 of BERT-base)
    stride: int = 3                # S: asymmetric co-attention layers before each connected-attention layer ("skip";
                                   # 3 as mPLUG-base; the tiny model: co co co CONN, one block)
    skip_layout: str = "paper"     # "paper": fusion_layers / (S + 1) = N blocks of S co-attention layers + 1
                                   # connected layer (§3.2). "official": layer k (0-based) is connected iff k > 0
                                   # and k % S == 0 (X-PLUG/mPLUG FusionEncoder; see the module notes). "blocks":
                                   # fusion_layers co-attention layers, one connected layer after every S of them
                                   # (fusion_layers + fusion_layers / S layers; §5.3.1's S = 1, 2, 3, 6 "divisible by
                                   # the total number of cross-modal fusion layers", 6)
    image_skip_residual: bool = False  # False: v^n = the connected layer's image output (eq. (5)); True: v^n =
                                   # v^{n-1} + that output (the official code's extra summed skip)
    decoder_layers: int = 2        # text decoder layers (mPLUG §5.1: 12); 0 = no decoder (classification models)
    # -- vision: a ViT on patches with [CLS] (mPLUG §3.1; CLIP ViT-B/16 or ViT-L/14 at full size) ----------
    image_size: int = 64           # input images are image_size x image_size (world images: 64 px)
    patch_size: int = 8            # P: (64 / 8)^2 = 64 patches + [CLS] (CLIP: 16 or 14)
    in_channels: int = 3           # RGB
    vision_width: int = 128        # ViT width (CLIP ViT-B: 768, ViT-L: 1024); != d_model adds a Linear bridge
    vision_layers: int = 2         # ViT layers (CLIP: 12 / 24)
    vision_heads: int = 4          # ViT heads (CLIP: 12 / 16)
    vision_d_ff: int = 256         # ViT FFN width (CLIP: 3072 / 4096)
    vision_activation: str = "gelu"    # CLIP: "quick_gelu" (x * sigmoid(1.702 x)); ViT: "gelu"
    vision_layer_norm_eps: float = 1e-5  # CLIP / PyTorch LayerNorm epsilon (HF ViT: 1e-12)
    vision_pre_norm: bool = True   # a LayerNorm on the embedded patches before the first layer (CLIP's ln_pre)
    vision_patch_bias: bool = False    # bias in the patch projection (CLIP: none; ViT: yes)
    vision_stem: str = "patch"     # "patch": ViT's linear P x P patch projection (CLIP); "conv": ViT-Hybrid (Dosovitskiy
                                   # et al. §3.1): a small strided CNN (mmkit.nn.ConvFeatureExtractor) makes the grid of
                                   # patch features, one per P x P patch, so the sequence is the same length
                                   # "cells": [CLS] + one token per world cell, a code of which object the cell holds,
                                   # from a small CNN with one linear head per cell (mmkit.nn.CellTokens; the kit's VQA
                                   # departure, issue 14: the tiny ViT's patch tokens hardly carry shape and the fusion
                                   # never learns to bind question words to 64 patches in CPU-minutes). Its namer is
                                   # trained first and then kept fixed (mmkit.mplug.tasks.vqa.train_cell_namer)
    vision_stem_channels: tuple = (32, 64, 128)  # "conv": channels of its stride-2 stages (log2(P) stages); "cells":
                                   # those of the namer's CNN (64 px -> an 8x8 feature grid read by the cell heads)
    cell_grid: int = 3             # "cells": cells per side (the Shapes World's 3x3 grid) -> 9 image tokens + [CLS]
    image_mean: tuple = (0.5, 0.5, 0.5)  # images arrive in [0, 1]; the ViT reads (x - mean) / std. CLIP:
    image_std: tuple = (0.5, 0.5, 0.5)   # mean (0.4815, 0.4578, 0.4082), std (0.2686, 0.2613, 0.2758)
    # -- heads: ITC with momentum encoders and queues (mPLUG §3.3, ALBEF) ---------------------------------
    embed_dim: int = 64            # ITC projection width (ALBEF / mPLUG: 256)
    temperature: float = 0.07      # initial ITC temperature σ (learned, clamped to [0.001, 0.5] as ALBEF)
    queue_size: int = 512          # K momentum features per modality in the queues (mPLUG §5.1: 65,536); the
                                   # tiny batches (32-64) keep ~10 batches of keys
    momentum: float = 0.995        # m of θ_m <- m θ_m + (1 - m) θ (mPLUG §5.1)
    distill_alpha: float = 0.4     # momentum distillation weight α of the ITC targets (ALBEF; 0 = one-hot)
    momentum_encoders: bool = True     # keep frozen momentum copies of the unimodal encoders + projections
                                   # (False: no copies, no queue: fine-tuning models and parameter counting)
    init_std: float = 0.02         # N(0, std) initialisation of every layer (BERT's initializer_range)
    # -- efficiency switches (mPLUG §4, Table 6) ----------------------------------------------------------
    gradient_checkpointing: bool = False   # recompute each layer's activations in backward (torch.utils.checkpoint,
                                   # non-reentrant): less memory, ~30% more compute, the same numbers
    bf16: bool = False             # run every transformer stack under bf16 autocast (their outputs return as fp32;
                                   # losses are computed in fp32 by mmkit.objectives)

    def __post_init__(self) -> None:
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.vision_stem_channels = tuple(self.vision_stem_channels)
        if self.vision_stem not in VISION_STEMS:
            raise ValueError(f"vision_stem must be one of {VISION_STEMS}, got {self.vision_stem!r}")
        if self.vision_stem == "cells" and self.cell_grid < 1:
            raise ValueError(f"cell_grid must be >= 1, got {self.cell_grid}")
        if self.vision_stem == "conv" and 2 ** len(self.vision_stem_channels) != self.patch_size:
            raise ValueError(f"vision_stem='conv' halves the image once per stage: {len(self.vision_stem_channels)} "
                             f"stages make {2 ** len(self.vision_stem_channels)} x {2 ** len(self.vision_stem_channels)}"
                             f" patches, but patch_size={self.patch_size}; give log2(patch_size) vision_stem_channels")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width={self.vision_width} is not divisible by vision_heads={self.vision_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                             "choose a patch size that divides the image side (32 px: 4, 64 px: 8)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {FUSIONS}")
        if self.skip_layout not in ("paper", "official", "blocks"):
            raise ValueError(f"skip_layout must be 'paper', 'official' or 'blocks', got {self.skip_layout!r}")
        if self.stride < 1 or self.fusion_layers < 1 or self.text_layers < 1 or self.vision_layers < 1:
            raise ValueError("stride, fusion_layers, text_layers and vision_layers must be >= 1")
        if self.decoder_layers < 0:
            raise ValueError(f"decoder_layers must be >= 0 (0 = no decoder), got {self.decoder_layers}")
        if self.fusion == "skip" and self.skip_layout == "paper" and self.fusion_layers % (self.stride + 1):
            raise ValueError(f"skip_layout='paper' stacks N blocks of stride={self.stride} co-attention layers + 1 "
                             f"connected layer, so fusion_layers must be a multiple of {self.stride + 1}; got "
                             f"{self.fusion_layers}. Use fusion_layers={self.stride + 1} * N, or skip_layout='official'")
        if self.fusion == "skip" and self.skip_layout == "blocks" and self.fusion_layers % self.stride:
            raise ValueError(f"skip_layout='blocks' puts a connected layer after every stride={self.stride} co-attention "
                             f"layers, so fusion_layers must be a multiple of {self.stride}; got {self.fusion_layers}")
        for name, act, allowed in (("activation", self.activation, VISION_ACTIVATIONS),
                                   ("vision_activation", self.vision_activation, VISION_ACTIVATIONS)):
            if act not in allowed:
                raise ValueError(f"unknown {name} {act!r}; choose one of {allowed}")
        if len(self.image_mean) != self.in_channels or len(self.image_std) != self.in_channels:
            raise ValueError(f"image_mean / image_std need in_channels={self.in_channels} entries")
        ids = dict(pad=self.pad_token_id, cls=self.cls_token_id, sep=self.sep_token_id, mask=self.mask_token_id,
                   bos=self.bos_token_id, eos=self.eos_token_id)
        bad = {k: v for k, v in ids.items() if not 0 <= v < self.vocab_size}
        if bad:
            raise ValueError(f"special token ids {bad} do not fit vocab_size={self.vocab_size}")
        if self.queue_size < 1 or self.embed_dim < 1:
            raise ValueError("queue_size and embed_dim must be >= 1")

    @property
    def grid_size(self) -> int:
        """Image tokens per side: image_size / patch_size (8 for 64 px, P = 8); "cells": cell_grid (3)."""
        return self.cell_grid if self.vision_stem == "cells" else self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_image_tokens(self) -> int:
        """[CLS] + patches: the length of v^0 for one image."""
        return 1 + self.num_patches


def fusion_plan(config: MPLUGConfig) -> tuple[str, ...]:
    """The kind of every fusion layer, bottom to top: "asym" (asymmetric co-attention, mPLUG §3.2 eq. (1)-(3)),
    "connected" (connected attention, eq. (4)-(5)) or "co" (co-attention on both sides, Figure 1b).

    ``fusion_plan(MPLUGConfig(fusion_layers=4, stride=1))`` = ("asym", "connected", "asym", "connected");
    the official base layout ``(fusion_layers=6, stride=3, skip_layout="official")`` = asym asym asym connected asym
    asym; the official large one ``(6, 6, "official")`` has no connected layer at all; ``(6, 2, "blocks")`` = asym
    asym connected, three times (9 layers).
    """
    c = config
    L, S = c.fusion_layers, c.stride
    if c.fusion == "connected":
        return ("connected",) * L
    if c.fusion == "co_attention":
        return ("co",) * L
    if c.fusion == "asymmetric":
        return ("asym",) * L
    if c.skip_layout == "paper":
        return (("asym",) * S + ("connected",)) * (L // (S + 1))                  # N blocks of S + 1 layers
    if c.skip_layout == "blocks":
        return (("asym",) * S + ("connected",)) * (L // S)                        # L co-attention + L / S connected
    return tuple("connected" if k > 0 and k % S == 0 else "asym" for k in range(L))   # FusionEncoder's rule


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

class FusionOutput(NamedTuple):
    image: torch.Tensor                 # (B, Nv, D) v^L: the image side after the fusion network
    text: torch.Tensor                  # (B, L, D) l^L: the text side ([CLS] first)


class Context(NamedTuple):
    states: torch.Tensor                # (B, Nv + L, D) [v^L; l^L]: what the decoder cross-attends to
    mask: torch.Tensor                  # (B, Nv + L) bool, True = real token (text padding False)
    image: torch.Tensor                 # (B, Nv, D) v^0, the visual encoder's output (before fusion)
    text: torch.Tensor                  # (B, L, D) l^0, the text encoder's output
    fused: FusionOutput                 # (v^L, l^L)


class MPLUGOutput(NamedTuple):
    loss: torch.Tensor | None           # mean token CE over labels != -100 (None without labels)
    logits: torch.Tensor | None         # (B, T, V) decoder logits (None without decoder_input_ids)
    context: Context                    # everything the decoder read


class Generation(NamedTuple):
    sequences: torch.Tensor             # (B, T) generated ids (no [BOS]); [PAD] after a row's [EOS]
    logits: torch.Tensor                # (B, T, V) raw next-token logits of each step (before any processor)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x). (mmkit.nn.ACTIVATIONS lacks it: it should move down there.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else ACTIVATIONS[name]()


def feed_forward(d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0) -> FeedForward:
    """The shared :class:`mmkit.nn.FeedForward`, also with CLIP's "quick_gelu"."""
    ffn = FeedForward(d_model, d_ff, "gelu" if activation == "quick_gelu" else activation, dropout)
    if activation == "quick_gelu":
        ffn.act = QuickGELU()
    return ffn


def _block(c: MPLUGConfig, d_model: int, n_heads: int, d_ff: int, activation: str, *, norm_first: bool, eps: float,
           cross_attention: bool = False) -> TransformerBlock:
    return TransformerBlock(d_model, n_heads, dropout=c.dropout, attn_dropout=c.attn_dropout, norm_first=norm_first,
                            layer_norm_eps=eps, cross_attention=cross_attention,
                            ffn=feed_forward(d_model, d_ff, activation))


def _text_block(c: MPLUGConfig, cross_attention: bool = False) -> TransformerBlock:
    """A BERT layer: post-norm, x = LN(x + SA(x)) [; x = LN(x + CA(x, ctx))]; x = LN(x + FFN(x))."""
    return _block(c, c.d_model, c.n_heads, c.d_ff, c.activation, norm_first=False, eps=c.layer_norm_eps,
                  cross_attention=cross_attention)


class _Stack(nn.Module):
    """What every transformer stack here shares: the §4 switches (gradient checkpointing, bf16 autocast)."""

    def _switches(self, c: MPLUGConfig) -> None:
        self.checkpointing, self.bf16 = bool(c.gradient_checkpointing), bool(c.bf16)

    def _run(self, block: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
        """block(x, **kw), recomputed in backward when gradient checkpointing is on (mPLUG §4)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(functools.partial(block, **kw), x, use_reentrant=False)
        return block(x, **kw)

    def _autocast(self, x: torch.Tensor):
        """bf16 autocast around the stack (mPLUG §4 BF16), or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=torch.bfloat16)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.bf16 else x


class ConvPatches(nn.Module):
    """ViT-Hybrid patch features (Dosovitskiy et al. 2021, §3.1 "Hybrid Architecture"): a small strided CNN
    (:class:`mmkit.nn.ConvFeatureExtractor`, stride 2 per stage) in place of the linear patch projection, one feature
    per P x P patch. Same interface as :class:`mmkit.nn.PatchEmbedding`: images (B, C, H, W) -> (B, N, D) row-major.

    Why the tiny world model uses it (``vision_stem="conv"``): mPLUG starts from CLIP-ViT, whose patch features already
    tell shapes apart; a linear 8 x 8 projection trained from scratch named the colour of a grid cell after 200 steps
    but not its shape (0.44, chance 0.33), so shapes, which most questions use to refer to objects, came late.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, channels: tuple, d_model: int):
        super().__init__()
        self.cnn = ConvFeatureExtractor(in_channels, tuple(channels), d_model=d_model)
        self.grid_size = self.cnn.grid_size(image_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if self.grid_size != (image_size // patch_size,) * 2:
            raise ValueError(f"the conv stem makes a {self.grid_size} grid, not {image_size // patch_size} x "
                             f"{image_size // patch_size}: give log2(patch_size) stages")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cnn(images).features                                     # (B, N, D)


class VisionEncoder(_Stack):
    """mPLUG §3.1 visual encoder: a ViT on the image patches with an extra [CLS] (CLIP-ViT at full size).

    pixels (B, 3, H, W), already normalised -> (B, 1 + N, D): ImageEmbeddings ([CLS] + patches + positions,
    CLIP's ln_pre), pre-norm blocks, a LayerNorm on every token (CLIP's ln_post as mPLUG applies it / ViT's final
    layernorm) and, when the ViT is wider than the text side, a Linear + LayerNorm bridge (mPLUG's ``visn_fc``).
    """

    def __init__(self, c: MPLUGConfig):
        super().__init__()
        W = c.vision_width
        cells = CellTokens(c.image_size, c.in_channels, c.vision_stem_channels, d_model=W, cell_grid=c.cell_grid) \
            if c.vision_stem == "cells" else None                       # one code token per world cell (the config)
        self.embeddings = ImageEmbeddings(c.image_size, c.patch_size, c.in_channels, d_model=W,
                                          patch_bias=c.vision_patch_bias, pre_norm=c.vision_pre_norm,
                                          layer_norm_eps=c.vision_layer_norm_eps, dropout=c.dropout, patch=cells)
        if c.vision_stem == "conv":                                      # ViT-Hybrid: CNN patch features
            self.embeddings.patch = ConvPatches(c.image_size, c.patch_size, c.in_channels, c.vision_stem_channels, W)
        self.blocks = nn.ModuleList(_block(c, W, c.vision_heads, c.vision_d_ff, c.vision_activation, norm_first=True,
                                           eps=c.vision_layer_norm_eps) for _ in range(c.vision_layers))
        self.post_norm = nn.LayerNorm(W, eps=c.vision_layer_norm_eps)
        self.bridge = (nn.Sequential(nn.Linear(W, c.d_model), nn.LayerNorm(c.d_model, eps=c.layer_norm_eps),
                                     nn.Dropout(c.dropout)) if W != c.d_model else None)
        self._switches(c)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast(pixels):
            x = self.embeddings(pixels)                                  # (B, 1 + N, W)
            for block in self.blocks:
                x = self._run(block, x)                                  # (B, 1 + N, W)
            x = self.post_norm(x)
            if self.bridge is not None:
                x = self.bridge(x)                                       # (B, 1 + N, D)
        return self._out(x)


class TextEncoder(_Stack):
    """mPLUG §3.1 text encoder: BERT embeddings + post-norm BERT layers (the first 6 of BERT-base at full size).

    ids (B, L) ([CLS] ... [SEP], right-padded), mask (B, L) bool (True = real token) -> l^0 (B, L, D).
    """

    def __init__(self, c: MPLUGConfig, n_layers: int):
        super().__init__()
        self.embeddings = TextEmbeddings(c.vocab_size, c.d_model, max_len=c.max_text_len, n_types=c.type_vocab_size,
                                         pad_token_id=c.pad_token_id, layer_norm_eps=c.layer_norm_eps,
                                         dropout=c.dropout)
        self.blocks = nn.ModuleList(_text_block(c) for _ in range(n_layers))
        self._switches(c)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keys = padding_mask(mask)                                        # (B, 1, 1, L): padding is no key
        with self._autocast(ids):
            x = self.embeddings(ids)                                     # (B, L, D)
            for block in self.blocks:
                x = self._run(block, x, mask=keys)
        return self._out(x)


class CoAttentionLayer(nn.Module):
    """Co-attention on both sides (Figure 1b, METER-style): the text cross-attends to the image and the image to the
    text, each with its own SA / CA / FFN, both reading the previous layer's (v, l)."""

    def __init__(self, c: MPLUGConfig):
        super().__init__()
        self.text = _text_block(c, cross_attention=True)
        self.image = _text_block(c, cross_attention=True)


class FusionNetwork(_Stack):
    """mPLUG §3.2: the cross-modal skip-connected network (and the other fusion variants of Figure 1 / 4).

    ``forward(image (B, Nv, D), text (B, L, D), text_mask (B, L), image_mask (B, Nv) or None)`` -> FusionOutput.
    ``plan`` (from :func:`fusion_plan`) names each layer's kind.
    """

    def __init__(self, c: MPLUGConfig):
        super().__init__()
        self.plan = fusion_plan(c)
        self.image_skip_residual = c.image_skip_residual
        layers = []
        for kind in self.plan:
            if kind == "asym":
                layers.append(_text_block(c, cross_attention=True))      # SA, CA to the image, FFN: eq. (1)-(3)
            elif kind == "connected":
                layers.append(_text_block(c))                            # SA + FFN over [v; l]: eq. (4)-(5)
            else:
                layers.append(CoAttentionLayer(c))                       # Figure 1b
        self.layers = nn.ModuleList(layers)
        self._switches(c)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> FusionOutput:
        B, Nv, _ = image.shape
        L = text.shape[1]
        if image_mask is None:
            image_mask = torch.ones(B, Nv, dtype=torch.bool, device=image.device)
        t_keys = padding_mask(text_mask)                                  # (B, 1, 1, L)
        v_keys = padding_mask(image_mask)                                 # (B, 1, 1, Nv)
        both_keys = padding_mask(torch.cat([image_mask, text_mask.bool()], 1))   # (B, 1, 1, Nv + L)
        v, l = image, text
        with self._autocast(text):
            for kind, layer in zip(self.plan, self.layers):
                if kind == "asym":
                    # mPLUG §3.2 eq. (1)-(3): l_SA = LN(SA(l) + l); l_CA = LN(CA(l_SA, v) + l_SA);
                    # l = LN(FFN(l_CA) + l_CA). The image side skips the layer: v is unchanged.
                    l = self._run(layer, l, mask=t_keys, context=v, context_mask=v_keys)
                elif kind == "connected":
                    # mPLUG §3.2 eq. (4)-(5): [v_SA; l_SA] = LN(SA([v; l]) + [v; l]);
                    # [v; l] = LN(FFN([v_SA; l_SA]) + [v_SA; l_SA])
                    out = self._run(layer, torch.cat([v, l], 1), mask=both_keys)  # (B, Nv + L, D)
                    v_new, l = out.split([Nv, L], dim=1)
                    v = v + v_new if self.image_skip_residual else v_new   # official: summed skip; paper: eq. (5)
                else:
                    # Figure 1b co-attention: both sides read the previous (v, l)
                    v, l = (self._run(layer.image, v, mask=v_keys, context=l, context_mask=t_keys),
                            self._run(layer.text, l, mask=t_keys, context=v, context_mask=v_keys))
        return FusionOutput(self._out(v), self._out(l))


class LMHead(nn.Module):
    """BERT's prediction head: dense + activation + LayerNorm, then a decoder tied to a word embedding (+ bias).

    Used twice: the MLM head on the fused text (tied to the text encoder's words) and the decoder's LM head
    (tied to the decoder's own words). (B, L, D) -> (B, L, V).
    """

    def __init__(self, d_model: int, vocab_size: int, activation: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.act = _activation(activation)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.decoder = nn.Linear(d_model, vocab_size)                 # weight tied by the owner after init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class ContextCache:
    """A decoder layer's :class:`mmkit.nn.KVCache` interface over two slots of a layered cache.

    transformers' ``generate()`` (through :class:`mmkit.generation.HFGenerationAdapter`) keeps one cache layer per
    ``num_hidden_layers``; :meth:`MPLUG.hf_generator` asks for twice the decoder layers. Slot i holds layer i's
    self-attention keys / values (they grow by one position per step); slot n + i holds the context's
    cross-attention keys / values, written on the first step and read back afterwards. Beam search reorders every
    slot, so the context follows its beams. Only the interface ``length`` / ``append`` of the slots is used.
    """

    def __init__(self, own, context, empty: torch.Tensor):
        self.own, self.context, self.empty = own, context, empty        # empty: (B, H, 0, hd)
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.own.length

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.own.append(key, value)

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._kv is None and self.context.length:
            self._kv = self.context.append(self.empty, self.empty)      # appending nothing returns what is there
        return self._kv

    @property
    def cross_key(self) -> torch.Tensor | None:
        kv = self._stored()
        return None if kv is None else kv[0]

    @cross_key.setter
    def cross_key(self, key: torch.Tensor) -> None:
        self._pending = key                                              # MultiHeadAttention sets key, then value

    @property
    def cross_value(self) -> torch.Tensor | None:
        kv = self._stored()
        return None if kv is None else kv[1]

    @cross_value.setter
    def cross_value(self, value: torch.Tensor) -> None:
        self._kv = self.context.append(self._pending, value)
        self._pending = None


class TextDecoder(_Stack):
    """mPLUG §3.1: "a transformer decoder for sequence to sequence learning" (BertLMHeadModel in the official code).

    ids (B, T) -> logits (B, T, V): its own BERT embeddings, post-norm layers with causal self-attention and
    cross-attention to the fused context [v^L; l^L], and an LM head tied to its word embedding. ``caches`` (one
    :class:`mmkit.nn.KVCache`-like object per layer) and ``offset`` (positions already cached) decode incrementally.
    """

    def __init__(self, c: MPLUGConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(c.vocab_size, c.d_model, max_len=c.max_text_len, n_types=c.type_vocab_size,
                                         pad_token_id=c.pad_token_id, layer_norm_eps=c.layer_norm_eps,
                                         dropout=c.dropout)
        self.blocks = nn.ModuleList(_text_block(c, cross_attention=True) for _ in range(c.decoder_layers))
        self.head = LMHead(c.d_model, c.vocab_size, c.activation, c.layer_norm_eps)
        self._switches(c)

    def forward(self, ids: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                caches: list | None = None, offset: int = 0, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with ``return_hidden`` the last block's states (B, T, D) instead (a classifier's input)."""
        ckeys = None if context_mask is None else padding_mask(context_mask)        # (B, 1, 1, Nc)
        with self._autocast(ids):
            x = self.embeddings(ids, offset=offset)                                 # (B, T, D)
            for i, block in enumerate(self.blocks):
                cache = None if caches is None else caches[i]
                if cache is None:
                    x = self._run(block, x, context=context, context_mask=ckeys, is_causal=True)
                else:
                    x = block(x, context=context, context_mask=ckeys, is_causal=True, cache=cache)
            if return_hidden:
                return self._out(x)
            logits = self.head(x)                                                   # (B, T, V)
        return self._out(logits)


class ClassifierHead(nn.Module):
    """An MLP on a fused [CLS] state: Linear -> GELU -> Linear (SNLI-VE 3 classes, NLVR2 2; mPLUG §5.2.5)."""

    def __init__(self, d_in: int, d_hidden: int, n_classes: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class MPLUG(nn.Module):
    """mPLUG (Li et al. 2022): ViT + BERT encoders, the skip-connected fusion network, a text decoder and the
    pretraining heads (ITC projections + temperature + momentum encoders + queues, ITM, MLM).

    Entry points (all take images (B, 3, S, S) in [0, 1] and text-encoder ids ([CLS] ... [SEP], right-padded
    with [PAD]); ``encoder_mask`` defaults to ids != [PAD]):

    * ``embed_image`` / ``embed_text`` / ``fuse`` / ``context`` / ``decode``: the pieces (tasks compose them);
    * ``forward(images, encoder_ids, decoder_input_ids, labels)``: the generative path -> MPLUGOutput;
      ``forward(step=fn)`` runs ``fn(model)`` inside one forward (multi-pass training steps under DDP);
    * ``itc_features`` / ``momentum_features`` / ``momentum_update``; ``itm_logits``; ``mlm_logits``;
    * ``generate`` (greedy / sampling, KV-cached) and ``hf_generator()`` (transformers' ``generate()``).
    """

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.config = c = config
        D = c.d_model
        # mPLUG §3.1: two unimodal encoders
        self.vision = VisionEncoder(c)
        self.text = TextEncoder(c, c.text_layers)
        # mPLUG §3.3 ITC: [CLS] projections and a learned temperature (ALBEF: temp 0.07, clamped to [0.001, 0.5])
        self.vision_proj = nn.Linear(D, c.embed_dim)
        self.text_proj = nn.Linear(D, c.embed_dim)
        self.temperature = Temperature(TemperatureConfig(init=c.temperature, min=0.001, max=0.5))
        # mPLUG §3.2: the cross-modal skip-connected network
        self.fusion = FusionNetwork(c)
        # mPLUG §3.3 ITM (2-way on the fused [CLS]) and MLM (BERT head on the fused text)
        self.itm_head = nn.Linear(D, 2)
        self.mlm_head = LMHead(D, c.vocab_size, c.activation, c.layer_norm_eps)
        # mPLUG §3.1 / §3.3 PrefixLM: the text decoder
        self.decoder = TextDecoder(c) if c.decoder_layers else None
        init_weights(self, std=c.init_std)
        if c.vision_stem in ("conv", "cells"):   # conv stems learn faster with PyTorch's default init (DEVELOPING.md)
            for m in self.vision.embeddings.patch.modules():
                if isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                    m.reset_parameters()
        self.mlm_head.decoder.weight = self.text.embeddings.word.weight          # tied (BERT's MLM head)
        if self.decoder is not None:
            self.decoder.head.decoder.weight = self.decoder.embeddings.word.weight   # tied (BertLMHeadModel)
        # mPLUG §3.3 / §5.1 ITC "two dynamic memory queues (text, image)" of momentum features (MoCo, ALBEF)
        self.queue = FeatureQueue(QueueConfig(size=c.queue_size, dim=c.embed_dim, momentum=c.momentum,
                                              alpha=c.distill_alpha)) if c.momentum_encoders else None
        self.momentum_model = (nn.ModuleDict({name: momentum_copy(getattr(self, name)) for name in MOMENTUM_PARTS})
                               if c.momentum_encoders else None)
        self.register_buffer("image_mean", torch.tensor(c.image_mean, dtype=torch.float).view(1, -1, 1, 1),
                             persistent=False)                                   # (1, C, 1, 1)
        self.register_buffer("image_std", torch.tensor(c.image_std, dtype=torch.float).view(1, -1, 1, 1),
                             persistent=False)

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Tokens per image in v^0: [CLS] + (image_size / patch_size)^2 patches ("cells": [CLS] + cell_grid^2)."""
        return self.config.num_image_tokens

    @property
    def device(self) -> torch.device:
        return self.text_proj.weight.device

    # -- the pieces ------------------------------------------------------------------------------------------
    def embed_image(self, images: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> v^0 (B, 1 + N, D) (mPLUG §3.1). ``encoder``: e.g. the momentum copy."""
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"images must be (B, {c.in_channels}, H, W), got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (c.image_size, c.image_size):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but this mPLUG was built for "
                             f"image_size={c.image_size}: resize them or build the model with image_size="
                             f"{images.shape[-1]} (and a patch_size dividing it)")
        pixels = (images.to(self.image_mean.dtype) - self.image_mean) / self.image_std
        return (encoder or self.vision)(pixels)

    def encoder_inputs(self, encoder_ids: torch.Tensor | None, batch_size: int,
                       encoder_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the text encoder; no ids = the empty text [CLS] [SEP] (captioning without a prompt)."""
        c = self.config
        if encoder_ids is None:
            ids = torch.tensor([[c.cls_token_id, c.sep_token_id]], device=self.device).expand(batch_size, 2)
            return ids, torch.ones_like(ids, dtype=torch.bool)
        if encoder_ids.dim() != 2:
            raise ValueError(f"encoder_ids must be (B, L) text-encoder ids ([CLS] ... [SEP]), got "
                             f"{tuple(encoder_ids.shape)}")
        if encoder_ids.shape[1] > c.max_text_len:
            raise ValueError(f"the text has {encoder_ids.shape[1]} tokens but max_text_len={c.max_text_len}: "
                             "truncate it or build the model with a larger max_text_len")
        mask = encoder_ids != c.pad_token_id if encoder_mask is None else encoder_mask.bool()
        if mask.shape != encoder_ids.shape:
            raise ValueError(f"encoder_mask {tuple(mask.shape)} must match encoder_ids {tuple(encoder_ids.shape)}")
        return encoder_ids, mask

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                   encoder: nn.Module | None = None) -> torch.Tensor:
        """Text-encoder ids (B, L) -> l^0 (B, L, D) (mPLUG §3.1)."""
        ids, mask = self.encoder_inputs(ids, ids.shape[0], mask)
        return (encoder or self.text)(ids, mask)

    def fuse(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
             image_mask: torch.Tensor | None = None) -> FusionOutput:
        """(v^0, l^0) -> (v^L, l^L) through the fusion network (mPLUG §3.2)."""
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError(f"image and text batch sizes differ: {image_embeds.shape[0]} vs {text_embeds.shape[0]}")
        return self.fusion(image_embeds, text_embeds, text_mask, image_mask)

    def context(self, images: torch.Tensor | None = None, encoder_ids: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> Context:
        """Encode, fuse and concatenate: the decoder's context [v^L; l^L] (official ``torch.cat([image_output,
        question_output], 1)``). ``image_embeds`` (B, Nv, D) replaces ``images`` (e.g. concatenated video frames)."""
        if (images is None) == (image_embeds is None):
            raise ValueError("give images (B, 3, S, S) or image_embeds (B, Nv, D), exactly one of them")
        v = self.embed_image(images) if image_embeds is None else image_embeds     # (B, Nv, D)
        B, Nv, _ = v.shape
        ids, mask = self.encoder_inputs(encoder_ids, B, encoder_mask)
        if ids.shape[0] != B:
            raise ValueError(f"{B} images but {ids.shape[0]} texts: give one text per image")
        l = self.text(ids, mask)                                                   # (B, L, D)
        if image_mask is None:
            image_mask = torch.ones(B, Nv, dtype=torch.bool, device=v.device)
        fused = self.fusion(v, l, mask, image_mask)
        states = torch.cat([fused.image, fused.text], dim=1)                       # (B, Nv + L, D)
        return Context(states, torch.cat([image_mask, mask], dim=1), v, l, fused)

    def decode(self, decoder_input_ids: torch.Tensor, context: Context, caches: list | None = None,
               offset: int = 0) -> torch.Tensor:
        """Decoder logits (B, T, V) for decoder inputs ([BOS] y_1 ..) given a :class:`Context`."""
        if self.decoder is None:
            raise ValueError("this mPLUG has no decoder (decoder_layers=0): it classifies, it does not generate")
        c = self.config
        if decoder_input_ids.dim() != 2:
            raise ValueError(f"decoder_input_ids must be (B, T), got {tuple(decoder_input_ids.shape)}")
        if offset + decoder_input_ids.shape[1] > c.max_text_len:
            raise ValueError(f"decoder positions reach {offset + decoder_input_ids.shape[1]} but max_text_len="
                             f"{c.max_text_len}: generate fewer tokens or build the model with a larger max_text_len")
        return self.decoder(decoder_input_ids, context.states, context.mask, caches, offset)

    # -- ITC / ITM / MLM heads ------------------------------------------------------------------------------
    def itc_features(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                     momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features (B, embed_dim) of the image and text [CLS] (not normalised; the ITC losses normalise).
        ``momentum=True`` uses the momentum copies of the projections."""
        vp, tp = ((self.momentum_model["vision_proj"], self.momentum_model["text_proj"]) if momentum
                  else (self.vision_proj, self.text_proj))
        return vp(image_embeds[:, 0]), tp(text_embeds[:, 0])

    @torch.no_grad()
    def momentum_features(self, images: torch.Tensor, text_ids: torch.Tensor,
                          text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features (B, embed_dim) x 2 from the momentum encoders (ALBEF's *_m models), no gradient."""
        if self.momentum_model is None:
            raise ValueError("this mPLUG has no momentum encoders: build it with momentum_encoders=True")
        v = self.embed_image(images, encoder=self.momentum_model["vision"])
        l = self.embed_text(text_ids, text_mask, encoder=self.momentum_model["text"])
        return self.itc_features(v, l, momentum=True)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_m <- m θ_m + (1 - m) θ for the unimodal encoders and ITC projections (mPLUG §5.1: m = 0.995)."""
        if self.momentum_model is None:
            raise ValueError("this mPLUG has no momentum encoders: build it with momentum_encoders=True")
        for name in MOMENTUM_PARTS:
            momentum_update(getattr(self, name), self.momentum_model[name], self.config.momentum)

    def with_config(self, **changes) -> "MPLUG":
        """A new model of this class whose config is this one's with ``changes``, every weight whose name and shape
        match copied (the rest keeps its fresh initialisation), in this model's train / eval mode.

        ``momentum_encoders=False`` drops the momentum copies and the queue (what fine-tuned checkpoints store);
        ``momentum_encoders=True`` adds them, synced to the online encoders (ITC with queues: pretraining, retrieval).
        A new ``vision_stem`` (e.g. ``"conv"`` -> ``"cells"``) leaves the image front end fresh (FRONT_END_PREFIXES:
        patch projection / stem / cell namer and the image positions, also in the momentum copy): the ViT layers, text
        encoder, fusion network, decoder and heads are copied.
        """
        cfg = dataclasses.replace(self.config, **changes)
        out = type(self)(cfg)
        own = out.state_dict()
        new_front = cfg.vision_stem != self.config.vision_stem
        for k, v in self.state_dict().items():
            if new_front and k.removeprefix("momentum_model.").startswith(FRONT_END_PREFIXES):
                continue
            if k in own and own[k].shape == v.shape:
                own[k] = v.clone()
        out.load_state_dict(own)
        if cfg.momentum_encoders and not self.config.momentum_encoders:
            out.reset_momentum()
        return out.to(self.device).train(self.training)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online encoders into the momentum ones (after loading new weights, e.g. from BERT / CLIP)."""
        if self.momentum_model is not None:
            for name in MOMENTUM_PARTS:
                self.momentum_model[name].load_state_dict(getattr(self, name).state_dict())

    def itm_logits(self, fused_text: torch.Tensor) -> torch.Tensor:
        """(B, 2) [not matched, matched] logits from the fused [CLS] (mPLUG §3.3 ITM)."""
        return self.itm_head(fused_text[:, 0])

    def mlm_logits(self, fused_text: torch.Tensor) -> torch.Tensor:
        """(B, L, V) word logits at every fused text position (mPLUG §3.3 MLM)."""
        return self.mlm_head(fused_text)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, encoder_ids: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                encoder_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                step: Callable[["MPLUG"], Any] | None = None) -> Any:
        """The generative path: encode, fuse, decode (teacher forcing); the loss when ``labels`` (B, T) are given.

        ``step``: run ``step(self)`` inside this forward and return its result. A training step that needs several
        passes (mPLUG §3.3: ITC, then ITM on negatives chosen from ITC's similarities, MLM, PrefixLM) runs them all
        inside ONE forward call, so DistributedDataParallel (which wraps the model under several processes) sees
        one forward and one backward, while the loss code lives with the tasks (``loss_fn(model, batch) =
        model(step=...)``).
        """
        if step is not None:
            given = [n for n, v in (("images", images), ("encoder_ids", encoder_ids), ("labels", labels),
                                    ("decoder_input_ids", decoder_input_ids), ("image_embeds", image_embeds)) if v is not None]
            if given:
                raise ValueError(f"forward(step=...) runs the step on its own; pass {given} to the step instead")
            return step(self)
        ctx = self.context(images, encoder_ids, encoder_mask, image_embeds)
        if decoder_input_ids is None:
            return MPLUGOutput(None, None, ctx)
        logits = self.decode(decoder_input_ids, ctx)                                 # (B, T, V)
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match decoder_input_ids "
                                 f"{tuple(decoder_input_ids.shape)} (-100 where nothing is predicted)")
            loss = token_cross_entropy(logits, labels)[0]
        return MPLUGOutput(loss, logits, ctx)

    # -- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: torch.Tensor | None = None, encoder_ids: torch.Tensor | None = None,
                 max_new_tokens: int = 20, *, encoder_mask: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True,
                 logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Generation:
        """Decode after [BOS] from the fused context (open vocabulary: nothing restricts the tokens).

        The context [v^L; l^L] is computed once; with ``use_cache`` every decoder layer keeps a
        :class:`mmkit.nn.KVCache` (its self-attention keys / values grow, the context's keys / values are projected
        once), so each step runs only the newest token; ``use_cache=False`` recomputes every step (same result).
        Greedy by default; ``do_sample`` draws from softmax(logits / temperature) within ``top_k`` / ``top_p``
        using ``generator``. ``logits_processor(ids (B, t), logits (B, V)) -> logits`` may edit the logits first
        (e.g. grounding allows only coordinate tokens). A row stops after [EOS] (then [PAD]).
        """
        c = self.config
        if self.decoder is None:
            raise ValueError("this mPLUG has no decoder (decoder_layers=0): it classifies, it does not generate")
        if max_new_tokens < 1 or max_new_tokens > c.max_text_len:
            raise ValueError(f"max_new_tokens must be in 1..max_text_len={c.max_text_len}, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.training
        self.eval()
        try:
            ctx = self.context(images, encoder_ids, encoder_mask, image_embeds)
            B = ctx.states.shape[0]
            dec = torch.full((B, 1), c.bos_token_id, dtype=torch.long, device=ctx.states.device)
            caches = [KVCache() for _ in self.decoder.blocks] if use_cache else None
            done = torch.zeros(B, dtype=torch.bool, device=dec.device)
            out_ids, out_logits = [], []
            for t in range(max_new_tokens):
                if use_cache:
                    logits = self.decode(dec[:, -1:], ctx, caches, offset=t)[:, -1].float()   # (B, V)
                else:
                    logits = self.decode(dec, ctx)[:, -1].float()                          # (B, V)
                out_logits.append(logits)
                so_far = dec[:, 1:]
                nxt = sample_next(logits if logits_processor is None else logits_processor(so_far, logits),
                                  do_sample, temperature, top_k, top_p, generator)          # (B,)
                nxt = torch.where(done, c.pad_token_id, nxt)
                out_ids.append(nxt)
                done = done | (nxt == c.eos_token_id)
                if bool(done.all()):
                    break
                dec = torch.cat([dec, nxt[:, None]], dim=1)
        finally:
            self.train(was_training)
        return Generation(torch.stack(out_ids, 1), torch.stack(out_logits, 1))

    def cached_step(self, images, encoder_ids, input_ids, caches, past_length: int) -> torch.Tensor:
        """The incremental step :class:`mmkit.generation.HFGenerationAdapter` calls (built by :meth:`hf_generator`).

        ``caches`` holds 2 x decoder_layers cache layers (see :class:`ContextCache`). First call (``past_length``
        0): encode + fuse the prefix and run the decoder prompt, filling self-attention and context slots. Later
        calls: only the new decoder tokens; the context is read from the cache, its padding mask rebuilt from
        ``encoder_ids``.
        """
        c = self.config
        n = len(self.decoder.blocks)
        if len(caches) != 2 * n:
            raise ValueError(f"mPLUG's cached step needs {2 * n} cache layers (self-attention + context per decoder "
                             f"layer), got {len(caches)}: build the adapter with model.hf_generator()")
        B = input_ids.shape[0]
        H, hd = c.n_heads, c.d_model // c.n_heads
        dtype = self.text_proj.weight.dtype
        empty = torch.zeros(B, H, 0, hd, dtype=dtype, device=input_ids.device)
        slots = [ContextCache(caches[i], caches[n + i], empty) for i in range(n)]
        if past_length == 0:
            ctx = self.context(images, encoder_ids)
            states, mask = ctx.states, ctx.mask
        else:
            ids, text_mask = self.encoder_inputs(encoder_ids, B)
            image_mask = torch.ones(B, self.num_image_tokens, dtype=torch.bool, device=input_ids.device)
            states = torch.zeros(B, 0, c.d_model, dtype=dtype, device=input_ids.device)   # in the cache already
            mask = torch.cat([image_mask, text_mask], 1)
        return self.decoder(input_ids, states, mask, slots, past_length)                  # (B, t, V)

    def hf_generator(self) -> HFGenerationAdapter:
        """transformers' ``generate()`` (beam search, sampling, logits processors) on this model, KV-cached: the
        adapter's cache gets 2 x decoder_layers layers (self-attention and context keys per decoder layer)."""
        c = self.config
        if self.decoder is None:
            raise ValueError("this mPLUG has no decoder (decoder_layers=0)")
        cfg = MMKitGenerationConfig(vocab_size=c.vocab_size, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
                                    eos_token_id=c.eos_token_id, num_hidden_layers=2 * c.decoder_layers,
                                    max_position_embeddings=c.max_text_len)
        return HFGenerationAdapter(self, cfg)

    @property
    def wte(self) -> nn.Embedding:
        """The decoder's word embedding (what transformers calls the input embeddings)."""
        return self.decoder.embeddings.word

    # -- counting --------------------------------------------------------------------------------------------
    def parameter_counts(self) -> "OrderedDict[str, int]":
        """Parameters per part, shared (tied) tensors once: vision (ViT + bridge), text_encoder, fusion, decoder (with
        its embeddings and LM head), heads (ITC projections, temperature, ITM, the MLM transform + bias), any task
        head; ``online`` = their sum, the model that runs; ``momentum`` = the frozen ALBEF-style copies (vision, text,
        projections) that pretraining keeps beside it; ``total`` = online + momentum."""
        momentum = set() if self.momentum_model is None else {id(p) for p in self.momentum_model.parameters()}
        seen: set[int] = set(momentum)
        out: "OrderedDict[str, int]" = OrderedDict()
        groups = [("vision", self.vision), ("text_encoder", self.text), ("fusion", self.fusion),
                  ("decoder", self.decoder), ("heads", nn.ModuleList([self.vision_proj, self.text_proj, self.temperature,
                                                                       self.itm_head, self.mlm_head])), ("task_heads", self)]
        for name, module in groups:                         # "task_heads": whatever a subclass adds (classifiers)
            n = 0
            for p in ([] if module is None else module.parameters()):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            out[name] = n
        out["online"] = sum(out.values())
        out["momentum"] = sum(p.numel() for p in self.momentum_model.parameters()) if momentum else 0
        out["total"] = out["online"] + out["momentum"]
        return out




# =========================================================================================================
# Classification models: SNLI-VE and NLVR2 (mPLUG §5.2.5)
# =========================================================================================================

@dataclass
class MPLUGClassifierConfig(MPLUGConfig):
    model_type: str = "mplug_classifier"
    num_labels: int = 3            # SNLI-VE: entailment / neutral / contradiction (3); NLVR2: true / false (2)
    num_images: int = 1            # images per example (NLVR2: 2)
    decoder_layers: int = 0        # §5.2.5 "we remove the decoder ... only use the encoder modules"
    momentum_encoders: bool = False    # no ITC while classifying: no momentum copies, no queue
    read_with: str = "cls"         # what the labels are read from (see MPLUGForClassification):
                                   # "cls" = the paper's MLP on the fused text [CLS], the decoder removed;
                                   # "answer_words" = the decoder's log-likelihood of each label's word (label_ids);
                                   # "decoder_state" = the decoder's state at [BOS], one pass per image, concatenated,
                                   # an MLP. Why the last two (issue 14, measured from mplug-tiny-vqa, whose decoder
                                   # learned to read the world): the [CLS] head stayed at the text-only level on SNLI-VE
                                   # after 300 to 800 steps (0.683 = the prior; lr 5e-4 .. 2e-3)
    label_ids: tuple = ()          # read_with="answer_words": one token-id sequence per label (e.g. "yes" / "maybe" /
                                   # "no"; mmkit.tokenizer.word_ids)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_labels < 2 or self.num_images < 1:
            raise ValueError(f"need num_labels >= 2 and num_images >= 1, got {self.num_labels}, {self.num_images}")
        if self.read_with not in ("cls", "answer_words", "decoder_state"):
            raise ValueError(f"read_with must be 'cls', 'answer_words' or 'decoder_state', got {self.read_with!r}")
        self.label_ids = tuple(tuple(int(t) for t in w) for w in self.label_ids)       # JSON lists -> tuples
        if self.read_with != "cls" and self.decoder_layers < 1:
            raise ValueError(f"read_with={self.read_with!r} reads the decoder: keep decoder_layers >= 1 (build it with "
                             "MPLUGForClassification.from_pretrained_mplug(model, ..., read_with=...))")
        if self.read_with == "answer_words":
            if self.num_images != 1:
                raise ValueError("read_with='answer_words' reads one image; for several use 'decoder_state'")
            if len(self.label_ids) != self.num_labels or not all(self.label_ids):
                raise ValueError(f"label_ids needs one non-empty token-id sequence per label ({self.num_labels}), got "
                                 f"{self.label_ids}")
            if len(set(self.label_ids)) != self.num_labels:
                raise ValueError(f"label_ids must differ between labels, got {self.label_ids}")
        elif self.label_ids:
            raise ValueError(f"label_ids are read only with read_with='answer_words', not {self.read_with!r}")


class MPLUGForClassification(MPLUG):
    """mPLUG's encoders + fusion network + a classifier (mPLUG §5.2.5), reading the labels one of three ways
    (``config.read_with``; the config's comment says why the last two exist):

    - ``"cls"``, the paper's: an MLP on the fused text [CLS], decoder removed. SNLI-VE: image premise, hypothesis.
      NLVR2: the paper follows BLIP (two cross-attentions per fusion layer, merged before the FFN); here the two images'
      token sequences are concatenated into one visual sequence (as §5.4.2 concatenates video frames), each image's
      tokens plus a learned slot embedding (zero at the start, so a pretrained model's behaviour is unchanged).
    - ``"answer_words"``: the decoder stays and reads each label as a VQA answer: logit_k = log P(word_k [EOS] |
      [v^L; l^L]), so a softmax over the logits is a distribution over labels (SNLI-VE: yes / maybe / no).
    - ``"decoder_state"``: the text is fused with each image in its own pass (as one image was in VQA), the decoder's
      state at [BOS] of every pass (what it would start answering from) is concatenated, and an MLP classifies it:
      VLMo §4.3's two-pass recipe with the decoder's state in place of [T_CLS] (NLVR2).

    ``classify(images, ids, mask)``: images (B, 3, S, S) or (B, num_images, 3, S, S) -> logits (B, num_labels).
    """

    config: MPLUGClassifierConfig

    def __init__(self, config: MPLUGClassifierConfig):
        super().__init__(config)
        c = config
        self.image_slots = (nn.Parameter(torch.zeros(c.num_images, c.d_model))
                            if c.num_images > 1 and c.read_with == "cls" else None)
        self.classifier = None
        if c.read_with != "answer_words":
            d_in = c.d_model * (c.num_images if c.read_with == "decoder_state" else 1)
            self.classifier = ClassifierHead(d_in, c.d_model, c.num_labels)
            init_weights(self.classifier, std=c.init_std)

    def visual_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) or (B, K, 3, S, S) -> (B, K (1 + N), D): each image's v^0 (+ its slot), concatenated."""
        K = self.config.num_images
        if images.dim() == 4 and K == 1:
            return self.embed_image(images)
        self._check_images(images)
        B = images.shape[0]
        v = self.embed_image(images.flatten(0, 1)).view(B, K, self.num_image_tokens, -1)   # (B, K, 1 + N, D)
        if self.image_slots is not None:
            v = v + self.image_slots[None, :, None, :]
        return v.flatten(1, 2)                                                       # (B, K (1 + N), D)

    def _check_images(self, images: torch.Tensor) -> None:
        K = self.config.num_images
        if images.dim() != 5 or images.shape[1] != K:
            raise ValueError(f"this classifier reads {K} image(s) per example: images must be (B, {K}, 3, S, S)"
                             + (" or (B, 3, S, S)" if K == 1 else "") + f", got {tuple(images.shape)}")

    def label_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing of the label words: inputs [BOS] w_1 .. and labels w_1 .. [EOS] (num_labels, T)."""
        c = self.config
        T = 1 + max(len(w) for w in c.label_ids)
        ins = torch.full((c.num_labels, T), c.pad_token_id, dtype=torch.long, device=self.device)
        outs = torch.full((c.num_labels, T), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for k, w in enumerate(c.label_ids):
            ins[k, :len(w) + 1] = torch.tensor((c.bos_token_id, *w))
            outs[k, :len(w) + 1] = torch.tensor((*w, c.eos_token_id))
        return ins, outs

    def classify(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels), read as ``config.read_with`` says."""
        c = self.config
        if c.read_with == "cls":
            v = self.visual_sequence(images)
            ids, mask = self.encoder_inputs(ids, ids.shape[0], mask)
            fused = self.fuse(v, self.text(ids, mask), mask)
            return self.classifier(fused.text[:, 0])
        if c.read_with == "answer_words":
            ctx = self.context(image_embeds=self.visual_sequence(images), encoder_ids=ids,
                               encoder_mask=mask)                                     # [v^L; l^L], once per example
            B, K = ctx.states.shape[0], c.num_labels
            ctx = ctx._replace(states=ctx.states.repeat_interleave(K, 0), mask=ctx.mask.repeat_interleave(K, 0))
            dec, labels = self.label_targets()                                       # (K, T)
            logits = self.decode(dec.repeat(B, 1), ctx)                              # (B K, T, V)
            return sequence_logprob(logits, labels.repeat(B, 1)).view(B, K)          # (B, K) log P(word_k | ..)
        if images.dim() == 4 and c.num_images == 1:
            images = images[:, None]
        self._check_images(images)
        bos = torch.full((images.shape[0], 1), c.bos_token_id, dtype=torch.long, device=self.device)
        states = []
        for j in range(c.num_images):                                                # one fusion pass per image
            ctx = self.context(images[:, j], ids, mask)
            states.append(self.decoder(bos, ctx.states, ctx.mask, return_hidden=True)[:, 0])   # (B, D) at [BOS]
        return self.classifier(torch.cat(states, dim=-1))                            # (B, num_labels)

    @classmethod
    def from_pretrained_mplug(cls, model: MPLUG, num_labels: int, num_images: int = 1, read_with: str = "cls",
                              label_ids: Sequence[Sequence[int]] = ()) -> "MPLUGForClassification":
        """A classifier initialised from a (pretrained) mPLUG: every shared weight copied; momentum copies and queues
        left out; the slots start at zero and the MLP at N(0, init_std). With ``read_with="cls"`` the decoder is left
        out too (§5.2.5); otherwise it is kept and copied (``label_ids``: see the config)."""
        base = {k: v for k, v in vars(model.config).items() if k not in ("model_type",)}
        base.update(momentum_encoders=False, num_labels=num_labels, num_images=num_images, read_with=read_with,
                    label_ids=tuple(label_ids))
        if read_with == "cls":
            base.update(decoder_layers=0)
        out = cls(MPLUGClassifierConfig(**base))
        own = out.state_dict()
        for k, v in model.state_dict().items():
            if k in own and own[k].shape == v.shape:
                own[k] = v.clone()
        out.load_state_dict(own)
        return out


# ---------------------------------------------------------------------------------------------------------
# Registration and presets
# ---------------------------------------------------------------------------------------------------------

register_model("mplug", MPLUGConfig, MPLUG)
register_model("mplug_classifier", MPLUGClassifierConfig, MPLUGForClassification)
register_cached_forward(MPLUG, MPLUG.cached_step)

# The world model: 64 px images, 8 x 8 patches (64 + [CLS]) made by a 3-stage conv stem (ViT-Hybrid, see ConvPatches),
# width 128, FFN 256, ViT 2 layers, text encoder 2, fusion one block of (3 co-attention + 1 connected), decoder 2.
# Tokenizer: mmkit.tokenizer.world_tokenizer(). The settings and what they cost are in mmkit/mplug/recipes.py.
TINY = dict(vision_stem="conv")
register_preset("mplug-tiny", lambda: MPLUGConfig(**TINY))
# The world VQA model (mplug-tiny-vqa, issue 14): mplug-tiny with [CLS] + one code token per 3x3 world cell in place of
# the 64 conv-stem patches (vision_stem="cells"); built from mplug-tiny-pretrained by with_config(vision_stem="cells").
TINY_CELLS = dict(vision_stem="cells")
register_preset("mplug-tiny-cells", lambda: MPLUGConfig(**TINY_CELLS))
# SNLI-VE and NLVR2 on the world (issue 14): from mplug-tiny-vqa with its decoder kept (MPLUGClassifierConfig.read_with
# says why): SNLI-VE reads each label as an answer word, NLVR2 the decoder's [BOS] state of one pass per image.
SNLI_VE_WORDS = ("yes", "maybe", "no")      # entailment, neutral, contradiction (ENTAILMENT_LABELS' order)
register_preset("mplug-tiny-snli-ve", lambda: MPLUGClassifierConfig(
    **TINY_CELLS, num_labels=3, num_images=1, decoder_layers=MPLUGConfig.decoder_layers, read_with="answer_words",
    label_ids=word_ids(world_tokenizer(), SNLI_VE_WORDS)))
register_preset("mplug-tiny-nlvr2", lambda: MPLUGClassifierConfig(
    **TINY_CELLS, num_labels=2, num_images=2, decoder_layers=MPLUGConfig.decoder_layers, read_with="decoder_state"))

# Full size (mPLUG §4-5.1 and the released configs): BERT-base text side (6 text encoder layers, 6 fusion layers,
# 12 decoder layers, width 768, bert-base-uncased's 30522 ids, [CLS] / [SEP] as decoder BOS / EOS), ITC 256-d with
# queues of 65,536 and momentum 0.995, dropout 0.1, gradient checkpointing and bf16 on (§4). The fusion layout is the
# released one (skip_layout "official", image_skip_residual): stride 3 at base (pretrain_mplug_base.yaml), 6 at large
# (config_bert.json), which never reaches a connected layer (module notes). scaled/configs/mplug_*.yaml say the same.
FULL_SIZE = dict(vocab_size=30522, max_text_len=512, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                 mask_token_id=103, bos_token_id=101, eos_token_id=102, d_model=768, n_heads=12, d_ff=3072,
                 dropout=0.1, text_layers=6, fusion="skip", fusion_layers=6, skip_layout="official",
                 image_skip_residual=True, decoder_layers=12, vision_activation="quick_gelu",
                 vision_layer_norm_eps=1e-5, vision_pre_norm=True, vision_patch_bias=False,
                 image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
                 embed_dim=256, queue_size=65536, momentum=0.995, distill_alpha=0.4, gradient_checkpointing=True,
                 bf16=True)
# CLIP ViT-B/16 at the 256 px of pretraining (§5.1); CLIP ViT-L/14 at 224 px.
register_preset("mplug-base", lambda: MPLUGConfig(**FULL_SIZE, stride=3, image_size=256, patch_size=16, vision_width=768,
                                                  vision_layers=12, vision_heads=12, vision_d_ff=3072))
register_preset("mplug-large", lambda: MPLUGConfig(**FULL_SIZE, stride=6, image_size=224, patch_size=14,
                                                   vision_width=1024, vision_layers=24, vision_heads=16,
                                                   vision_d_ff=4096))

# X-PLUG/mPLUG README: mplug.en.base 350M, mplug.en.large 600M ("#params"). MPLUG.parameter_counts()["online"] of the
# presets is compared with them in tests/test_mplug.py; what is counted is said there and in scaled/README.md.
OFFICIAL_PARAMS: dict[str, float] = {"mplug-base": 350e6, "mplug-large": 600e6}
