"""VLMo: one Multiway Transformer that is an image encoder, a text encoder and a fusion encoder (Wang et al. 2021).

    model = mmkit.build_model("vlmo-tiny")                              # or VLMo(VLMoConfig(...))
    img = model(images, itc=True)                                       # image-only: V-FFN in every layer
    txt = model(input_ids=ids, attention_mask=am, itc=True)             # text-only: L-FFN in every layer
    img.features @ txt.features.T                                       # dual encoder (§3.5): retrieval by dot product
    pair = model(images, ids, am, itm=True, mlm=True)                   # fusion: [text; image], VL-FFN on top
    pair.itm_logits, pair.mlm_logits                                    # (B, 2), (B, T, V)
    mim = model(images, bool_masked_pos=mask)                           # BEiT masked image modelling (stage 1)
    mim.mim_logits                                                      # (B, N, n_image_codes)

The whole model, top to bottom (VLMo §3.1-3.2):

    images (B, 3, H, W) in [0, 1] --(x-0.5)/0.5--> patches P x P --linear--> [I_CLS] + N patches
        + V_pos (learned 1-D) + V_type                                           H^v_0 (B, 1 + N, D)
    input_ids (B, T) = [T_CLS] w_1 .. w_M [T_SEP] [PAD].. --word emb--> + T_pos, LayerNorm, + T_type
                                                                                 H^w_0 (B, T, D)
    image-only  x = H^v_0            route "vision":   V-FFN in all L layers
    text-only   x = H^w_0            route "language": L-FFN in all L layers
    fusion      x = [H^w_0; H^v_0]   route "fusion":   bottom L-F layers: L-FFN on the text part, V-FFN on the
                                                       image part; top F layers: VL-FFN on the whole sequence
    every layer: x = x + γ1 ⊙ MSA(LN(x))      (ONE attention shared by all modalities)      VLMo eq. (1)
                 x = x + γ2 ⊙ Expert(x)        Expert = LN + FFN of the routed modality       VLMo eq. (2)
    h = LN_final(x)                                                              (B, L, D)

Heads (asked for with flags, so a forward computes only what its loss reads):

* ``itc``: ITC projections of the final [I_CLS] / [T_CLS] of an image-only / text-only pass (``features``; the
  learned temperature is ``model.temperature``, :class:`mmkit.objectives.Temperature`) (§3.3);
* ``itm``: BERT pooler (Linear + tanh) on the fusion output's first token, then Linear -> 2 logits (§3.3). The
  fused sequence is [text; image], so its first token IS [T_CLS]: the paper's "final hidden vector of [T_CLS]"
  and the official code's ``x[:, 0]`` are the same vector. VQA and NLVR2 read the same pooled [T_CLS] (§3.5);
* ``mlm``: BERT's prediction head (dense, GELU, LN, decoder over the vocabulary) on the text positions (§3.3);
* ``bool_masked_pos``: BEiT's [MASK] replaces the chosen patches, and a linear head predicts the image
  tokenizer's code of every patch (``mim_logits``; the loss reads the masked ones) (§3.4 stage 1, BEiT §2).

Downstream models add a task head on the same backbone: :class:`VLMoForVQA` (a classifier over the world's answers
on the pooled fusion [T_CLS]), :class:`VLMoForNLVR2` (two fusion passes, concatenated pooled [T_CLS], a
classifier), :class:`VLMoForImageClassification` (the vision path alone, §4.5). Tasks that train and use them
live in ``mmkit/vlmo/tasks/``; weight import from Hugging Face BEiT / ViT / BERT folders in
:mod:`mmkit.vlmo.convert`.

Where this follows the official code (microsoft/unilm ``vlmo/``) rather than the paper's text: pre-norm blocks
with layer scale (γ = 0.1), every expert owning its LayerNorm, one layer-scale γ2 shared by a block's experts, a
final LayerNorm shared by all routes, BERT's LayerNorm inside the text embedding with the modality type added
after it. Where it follows the paper instead: learned absolute 1-D positions for images and text (§3.1; the
official Base/Large use BEiT's relative position biases) and one ITC loss on the unimodal [CLS] (the official
code adds a second ITC on [CLS] vectors routed through the VL experts).

Where the kit departs from both: ``visual_tokens="cells"`` (the shipped world VQA model) replaces the linear patch
embeddings with one code token per world cell, read by a small CNN that names each cell's object
(:class:`mmkit.nn.CellTokens`, trained first and then fixed): the image side becomes [I_CLS] + 9 tokens, everything
after it is unchanged. The tuning notes in ``mmkit/vlmo/recipes.py`` measure why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.nn import (CellTokens, FeedForward, ImageEmbeddings, TextEmbeddings, TransformerBlock, TypeEmbedding, init_weights,
                      padding_mask)
from mmkit.objectives.itc import Temperature, TemperatureConfig
from mmkit.registry import register_model, register_preset

__all__ = ["VLMoConfig", "VLMo", "VLMoOutput", "Expert", "MultiwayFFN", "ROUTES", "TEXT_TYPE", "IMAGE_TYPE",
           "SECOND_IMAGE_TYPE", "VLMoVQAConfig", "VLMoForVQA", "VLMoNLVR2Config", "VLMoForNLVR2",
           "VLMoImageClsConfig", "VLMoForImageClassification", "BASE", "LARGE", "sincos_2d"]

# Modality type ids (VLMo §3.1 T_type, V_type); NLVR2 gives its second image a type of its own (official code).
TEXT_TYPE, IMAGE_TYPE, SECOND_IMAGE_TYPE = 0, 1, 2
# Routes of the Multiway-FFN: which expert(s) a forward pass uses (VLMo §3.2).
ROUTES: tuple[str, ...] = ("vision", "language", "fusion")


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

@dataclass
class VLMoConfig:
    model_type: str = "vlmo"
    # -- text (VLMo §3.1: WordPiece as BERT) ----------------------------------------------------------------
    vocab_size: int = 512          # rows of the word embedding. The world tokenizer (mmkit.tokenizer.world_tokenizer)
                                   # has 384 ids; 512 leaves room, as m6-tiny does. VLMo-Base/Large: BERT uncased 30522
    max_text_len: int = 64         # text positions T_pos. The official code pads every text to 40 (§4.1 "maximum text
                                   # sequence length is set to 40"); the world's captions reach 46 tokens with
                                   # [T_CLS]/[T_SEP], so 64 keeps them whole (longer texts must be truncated)
    pad_token_id: int = 0          # [PAD] of the world tokenizer (BERT: 0): padding, masked out of attention
    mask_token_id: int = 4         # [MASK] of the world tokenizer (BERT: 103): what MLM puts in place of words
    # -- Multiway Transformer (VLMo §3.2) -------------------------------------------------------------------
    d_model: int = 128             # hidden width D (Base 768, Large 1024)
    n_layers: int = 4              # L blocks (Base 12, Large 24)
    n_heads: int = 4               # attention heads (Base 12, Large 16)
    d_ff: int = 512                # hidden width of every expert FFN: 4 * D as ViT / BEiT (official "FFN factor=4x")
    multiway: bool = True          # False: a standard Transformer, ONE FFN for every token of every route (Table 5
                                   # "Std TRM" ablation; stored as the vision expert, so a stage-1 checkpoint loads)
    n_vl_layers: int = 1           # F: the top F layers hold a VL-FFN expert (Base 2, Large 3, §4.1). 1 of 4 here:
                                   # the same ~1/4-1/8 share of the stack, and a fusion pass still mixes the
                                   # modalities in every layer through the shared attention
    activation: str = "gelu"       # expert non-linearity (exact GELU, as BEiT / BERT)
    layer_norm_eps: float = 1e-6   # LayerNorm epsilon of the blocks and the final norm (official: 1e-6)
    text_layer_norm_eps: float = 1e-12  # LayerNorm epsilon inside the text embedding (BERT's)
    layer_scale_init: float | None = 0.1  # γ of every sublayer starts here (BEiT / official VLMo: 0.1); None = off
    dropout: float = 0.0           # residual / embedding dropout (official pretraining: 0, with drop path 0.1 that
                                   # this re-implementation leaves out)
    attn_dropout: float | None = None  # dropout on attention probabilities; None = same as dropout
    init_std: float = 0.02         # N(0, std) init of Linear / embedding weights (BERT, BEiT); the patch projection
                                   # keeps PyTorch's conv init, as timm / the official code do
    # -- image (VLMo §3.1: ViT patches) -----------------------------------------------------------------------
    image_size: int = 64           # images are image_size x image_size (the kit's world images: 64 px)
    patch_size: int = 8            # P: 64 / 8 = an 8x8 grid = 64 patches (+ [I_CLS]); Base/Large: 224 / 16 = 14x14
    in_channels: int = 3           # RGB
    visual_tokens: str = "patches"  # what the image becomes (VLMo §3.1: "patches", [I_CLS] + N linear patch
                                   # embeddings). "cells": [I_CLS] + one code per world cell from a small CNN that names
                                   # each cell's object (mmkit.nn.CellTokens; the kit's VQA departure, issue 13: the
                                   # tiny ViT never reads shape, nor binds words to 64 patches, in CPU-minutes)
    cell_channels: tuple = (32, 64, 128)  # "cells": the CNN's stride-2 conv stages (64 px -> an 8x8 feature grid)
    cell_grid: int = 3             # "cells": cells per side (the Shapes World's 3x3 grid) -> 9 image tokens
    image_pos_init: str = "random"  # how the learned V_pos start: "random" (N(0, init_std), BERT / ViT) or "sincos2d"
                                   # (the fixed 2-D sin-cos table of MAE / BEiT v2 for the patches, 0 for [I_CLS]; still
                                   # learned afterwards): every patch knows its row and column from step 0
    image_mean: tuple = (0.5, 0.5, 0.5)  # images arrive in [0, 1]; the model feeds (x - mean) / std = [-1, 1], as BEiT
    image_std: tuple = (0.5, 0.5, 0.5)
    # -- heads -----------------------------------------------------------------------------------------------
    temperature_init: float = 0.07  # σ of the ITC softmax at the start (official: logit scale log(1/0.07))
    n_image_codes: int = 256       # MIM targets: the image tokenizer's codebook size (vqgan-world-32: 256 codes;
                                   # BEiT's DALL-E tokenizer: 8192)
    tie_word_embeddings: bool = False  # MLM decoder tied to the word embedding (BERT ties; the official VLMo's
                                   # MLMHead has its own decoder, so False)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"VLMoConfig: {msg}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        need(0 <= self.n_vl_layers <= self.n_layers,
             f"n_vl_layers={self.n_vl_layers} must be in 0..n_layers={self.n_layers} (the top F layers get a VL-FFN)")
        need(self.image_size % self.patch_size == 0,
             f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; pick a patch size that "
             "divides the image size")
        need(max(self.pad_token_id, self.mask_token_id) < self.vocab_size,
             f"special token ids {self.pad_token_id}, {self.mask_token_id} do not fit vocab_size={self.vocab_size}")
        need(len(self.image_mean) == self.in_channels and len(self.image_std) == self.in_channels,
             f"image_mean / image_std need in_channels={self.in_channels} entries")
        need(self.max_text_len >= 2, "max_text_len must hold at least [T_CLS] and [T_SEP]")
        need(self.image_pos_init in ("random", "sincos2d"),
             f"image_pos_init must be 'random' or 'sincos2d', got {self.image_pos_init!r}")
        need(self.image_pos_init == "random" or self.d_model % 4 == 0,
             f"image_pos_init='sincos2d' needs d_model divisible by 4, got {self.d_model}")
        need(self.visual_tokens in ("patches", "cells"),
             f"visual_tokens must be 'patches' or 'cells', got {self.visual_tokens!r}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.cell_channels = tuple(self.cell_channels)

    @property
    def grid_size(self) -> int:
        """Patches per image side (8 for 64 px and P = 8): the MIM code grid must have this side too. "cells": 3, the
        world's 3x3 grid."""
        return self.cell_grid if self.visual_tokens == "cells" else self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def vl_layers(self) -> range:
        """Indices of the top F layers, the ones with a VL-FFN expert (none in a standard Transformer)."""
        return range(self.n_layers - self.n_vl_layers, self.n_layers) if self.multiway else range(0)


def sincos_2d(grid: int, d_model: int, temperature: float = 10_000.0) -> torch.Tensor:
    """(grid * grid, D) 2-D sin-cos position table in raster order (MAE / BEiT v2): the first D/2 dims encode the
    row, the last D/2 the column, each as sin / cos of geometrically spaced frequencies."""
    if d_model % 4:
        raise ValueError(f"a 2-D sin-cos table needs d_model divisible by 4, got {d_model}")
    q = d_model // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float) / q)                  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float),
                                indexing="ij")

    def enc(pos):
        a = pos.flatten()[:, None] * omega[None]                                           # (N, D/4)
        return torch.cat([a.sin(), a.cos()], dim=1)                                        # (N, D/2)
    return torch.cat([enc(rows), enc(cols)], dim=1)                                        # (N, D)


# ---------------------------------------------------------------------------------------------------------
# Multiway-FFN: the pool of modality experts (VLMo §3.2)
# ---------------------------------------------------------------------------------------------------------

class Expert(nn.Module):
    """One modality expert: its own LayerNorm, then the FFN ``fc2(act(fc1(x)))``: (B, L, D) -> (B, L, D).

    VLMo eq. (2) reads ``Multiway-FFN(LN(H'))``; the official code gives every expert its own LN (``norm2_imag``,
    ``norm2_text``, ``norm2_vl``), so the normalisation statistics are modality-specific too.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = FeedForward(d_model, d_ff, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))                                          # (B, L, D)


class MultiwayFFN(nn.Module):
    """VLMo §3.2 Multiway-FFN: experts chosen by the input's modality and the layer (hard routing, no gate).

    ``forward(h, route, text_len)``, h (B, L, D):

    * ``route="vision"``   (image-only input)  -> V-FFN on every position;
    * ``route="language"`` (text-only input)   -> L-FFN on every position;
    * ``route="fusion"``   (an image-text pair [text; image]) -> in a layer with a VL expert, VL-FFN on every
      position; below it, L-FFN on the first ``text_len`` positions and V-FFN on the rest.

    The VL expert exists only in the top F layers (``with_vl``). ``shared=True`` is the standard Transformer of
    Table 5 ("Std TRM"): one FFN (``self.vision``) for every position of every route, no L-FFN, no VL-FFN.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, eps: float = 1e-6,
                 with_vl: bool = False, shared: bool = False):
        super().__init__()
        self.shared = shared
        self.vision = Expert(d_model, d_ff, activation, dropout, eps)          # V-FFN (the one FFN when shared)
        self.language = None if shared else Expert(d_model, d_ff, activation, dropout, eps)        # L-FFN
        self.vl = Expert(d_model, d_ff, activation, dropout, eps) if with_vl and not shared else None   # VL-FFN

    def forward(self, h: torch.Tensor, route: str = "vision", text_len: int = 0) -> torch.Tensor:
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; use one of {ROUTES}")
        if route == "vision" or self.shared:
            return self.vision(h)
        if route == "language":
            return self.language(h)
        if self.vl is not None:
            return self.vl(h)                                                  # top F layers: (B, T + 1 + N, D)
        if not 0 <= text_len <= h.shape[1]:
            raise ValueError(f"text_len={text_len} is outside 0..{h.shape[1]} (the fused sequence is [text; image])")
        # bottom layers of a pair: each part keeps its own expert
        return torch.cat([self.language(h[:, :text_len]), self.vision(h[:, text_len:])], dim=1)   # (B, L, D)


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

class VLMoOutput(NamedTuple):
    hidden_states: torch.Tensor          # (B, L, D) final-normed states: [I_CLS]+patches, the text, or [text; image]
    cls: torch.Tensor                    # (B, D) the first position: [I_CLS] (image-only), [T_CLS] (text, fusion)
    text_len: int                        # text positions at the start of hidden_states (0 for image-only)
    route: str                           # "vision", "language" or "fusion"
    features: torch.Tensor | None        # (B, D) ITC projection of cls (itc=True, image-only / text-only)
    pooled: torch.Tensor | None          # (B, D) BERT pooler tanh(W cls + b) of a fusion pass (itm=True, task heads)
    itm_logits: torch.Tensor | None      # (B, 2) [not matched, matched] (itm=True, fusion)
    mlm_logits: torch.Tensor | None      # (B, T, vocab_size) at the text positions (mlm=True)
    mim_logits: torch.Tensor | None      # (B, N, n_image_codes) at every patch (bool_masked_pos given, image-only)
    logits: torch.Tensor | None = None   # a downstream head's output (VQA, NLVR2, image classification)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class VLMo(nn.Module):
    """VLMo (Wang et al. 2021): a Multiway Transformer backbone and its pretraining heads (see the module doc)."""

    config_class = VLMoConfig

    def __init__(self, config: VLMoConfig):
        super().__init__()
        self.config = c = config
        D = c.d_model

        # VLMo §3.1 image: [I_CLS] + linear patch embeddings + V_pos ([MASK] for BEiT's masked image modelling)
        cells = CellTokens(c.image_size, c.in_channels, c.cell_channels, d_model=D, cell_grid=c.cell_grid) \
            if c.visual_tokens == "cells" else None                          # the kit's departure (see the config)
        self.image_embed = ImageEmbeddings(c.image_size, c.patch_size, c.in_channels, d_model=D, mask_token=True,
                                           dropout=c.dropout, patch=cells)
        # VLMo §3.1 text: word + T_pos, BERT's LayerNorm (the type is added after it, as the official code does)
        self.text_embed = TextEmbeddings(c.vocab_size, D, max_len=c.max_text_len, n_types=0,
                                         pad_token_id=c.pad_token_id, layer_norm_eps=c.text_layer_norm_eps,
                                         dropout=c.dropout)
        # VLMo §3.1 T_type, V_type (+ the second image of an NLVR2 pair)
        self.type_embed = TypeEmbedding(3, D)

        # VLMo §3.2: L pre-norm blocks, one shared self-attention each, Multiway-FFN experts (VL in the top F)
        self.blocks = nn.ModuleList(
            TransformerBlock(D, c.n_heads, dropout=c.dropout, attn_dropout=c.attn_dropout, norm_first=True,
                             layer_norm_eps=c.layer_norm_eps, layer_scale_init=c.layer_scale_init, ffn_norm=False,
                             ffn=MultiwayFFN(D, c.d_ff, c.activation, c.dropout, c.layer_norm_eps,
                                             with_vl=i in c.vl_layers, shared=not c.multiway))
            for i in range(c.n_layers))
        self.final_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)

        # VLMo §3.3 heads
        self.itc_image_proj = nn.Linear(D, D, bias=False)                     # [I_CLS] -> ĥ^v (official ITCHead)
        self.itc_text_proj = nn.Linear(D, D, bias=False)                      # [T_CLS] -> ĥ^w
        self.temperature = Temperature(TemperatureConfig(init=c.temperature_init))   # learned σ, eq. (4)
        self.pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh())               # BERT pooler on the fusion [T_CLS]
        self.itm_head = nn.Linear(D, 2)                                       # [not matched, matched]
        self.mlm_head = nn.Sequential(nn.Linear(D, D), nn.GELU(),             # BERT's prediction-head transform
                                      nn.LayerNorm(D, eps=c.text_layer_norm_eps),
                                      nn.Linear(D, c.vocab_size))             # decoder over the vocabulary
        self.mim_head = nn.Linear(D, c.n_image_codes)                         # BEiT: a code per patch

        init_weights(self, std=c.init_std)
        for m in self.image_embed.patch.modules():                            # PyTorch conv init (timm / official;
            if isinstance(m, nn.Conv2d):                                      # the cell CNN learns faster with it)
                m.reset_parameters()
        if c.image_pos_init == "sincos2d":
            with torch.no_grad():
                self.image_embed.pos_embed.weight.zero_()
                self.image_embed.pos_embed.weight[1:] = sincos_2d(c.grid_size, D)   # [I_CLS] keeps 0
        if c.tie_word_embeddings:
            self.mlm_head[-1].weight = self.text_embed.word.weight
        self.register_buffer("image_mean", torch.tensor(c.image_mean, dtype=torch.float).view(1, -1, 1, 1),
                             persistent=False)                                   # (1, C, 1, 1)
        self.register_buffer("image_std", torch.tensor(c.image_std, dtype=torch.float).view(1, -1, 1, 1),
                             persistent=False)

    # -- parts of the model (stagewise pretraining, parameter counts) -----------------------------------------
    def parts(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes of each part: what ``mmkit.train.freeze`` takes (VLMo §3.4 stagewise training).

        "attention" is everything of a block that all modalities share: the attention, its LayerNorm and the two
        layer-scale gains (γ2 scales whichever expert ran). "mask_token" is BEiT's [MASK] patch (stage 1 only).
        """
        c, L = self.config, range(self.config.n_layers)
        ls = c.layer_scale_init is not None
        return {
            "image_embeddings": ("image_embed.patch.", "image_embed.cls_token", "image_embed.pos_embed."),
            "mask_token": ("image_embed.mask_token",),
            "text_embeddings": ("text_embed.",),
            "type_embeddings": ("type_embed.",),
            "attention": tuple(p for i in L for p in (f"blocks.{i}.self_attn.", f"blocks.{i}.self_attn_norm.")
                               + ((f"blocks.{i}.self_attn_scale", f"blocks.{i}.ffn_scale") if ls else ())),
            "vision_ffn": tuple(f"blocks.{i}.ffn.vision." for i in L),
            "language_ffn": tuple(f"blocks.{i}.ffn.language." for i in L),
            "vl_ffn": tuple(f"blocks.{i}.ffn.vl." for i in c.vl_layers),
            "final_norm": ("final_norm.",),
            "itc": ("itc_image_proj.", "itc_text_proj.", "temperature."),
            "itm": ("pooler.", "itm_head."),
            "mlm_head": ("mlm_head.",),
            "mim_head": ("mim_head.",),
        }

    BACKBONE_PARTS: tuple[str, ...] = ("image_embeddings", "mask_token", "text_embeddings", "type_embeddings",
                                       "attention", "vision_ffn", "language_ffn", "vl_ffn", "final_norm")

    def num_backbone_parameters(self) -> int:
        """Parameters of the backbone, the count the paper and the official README give (175M Base, 562M Large):
        image embeddings (patch projection, [I_CLS], [MASK], positions), text embeddings (words, positions, LN),
        type embeddings, the L blocks (attention, layer scales, every expert) and the final LayerNorm. Task heads
        (ITC projections and temperature, pooler, ITM / MLM / MIM heads, downstream classifiers) are left out."""
        parts = self.parts()
        prefixes = tuple(p for name in self.BACKBONE_PARTS for p in parts[name])
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if name.startswith(prefixes) and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (read by :func:`mmkit.train.default_param_groups`): positions, [I_CLS] and
        [MASK] (as the official code and timm), and the type embeddings, whose rows of an untrained modality must stay
        exactly as they are while a stage trains the other one (VLMo §3.4; zero gradient + no decay = no change)."""
        return {"type_embed.weight", "image_embed.cls_token", "image_embed.mask_token", "image_embed.pos_embed.weight",
                "text_embed.pos.weight"}

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def routing_table(self, route: str, text_len: int = 0, image_len: int = 0) -> list[list[str]]:
        """Which expert each position meets in each layer (VLMo §3.2 hard routing), read from the modules:
        ``table[layer][position]`` in {"V-FFN", "L-FFN", "VL-FFN", "FFN"} ("FFN": the one shared FFN of a standard
        Transformer). Positions are [text; image] as the fused sequence orders them (``text_len`` + ``image_len``)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; use one of {ROUTES}")
        n = {"vision": image_len, "language": text_len, "fusion": text_len + image_len}[route]
        table = []
        for block in self.blocks:
            ffn = block.ffn
            if ffn.shared:
                row = ["FFN"] * n
            elif route == "vision":
                row = ["V-FFN"] * n
            elif route == "language":
                row = ["L-FFN"] * n
            elif ffn.vl is not None:
                row = ["VL-FFN"] * n
            else:
                row = ["L-FFN"] * text_len + ["V-FFN"] * image_len
            table.append(row)
        return table

    # -- embeddings (VLMo §3.1) --------------------------------------------------------------------------------
    def embed_image(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                    type_id: int = IMAGE_TYPE) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> H^v_0 (B, 1 + N, D) = [I_CLS, V v_1 .. V v_N] + V_pos + V_type."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"images must be (B, {c.in_channels}, {c.image_size}, {c.image_size}) floats in [0, 1] "
                             f"for this VLMo (image_size={c.image_size}), got {tuple(images.shape)}: resize them "
                             f"(e.g. mmkit.data.preprocess.image_for_model(image, {c.image_size})) or build the model "
                             "with that image_size")
        x = (images - self.image_mean) / self.image_std                          # [0, 1] -> [-1, 1]
        return self.image_embed(x, bool_masked_pos) + self.type_embed(type_id)   # (B, 1 + N, D)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, T) = [T_CLS] .. [T_SEP] [PAD].. -> H^w_0 (B, T, D) = LN(word + T_pos) + T_type."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"the text has {input_ids.shape[1]} tokens but max_text_len={self.config.max_text_len}: "
                             f"truncate it (e.g. make_collate(tok, max_length={self.config.max_text_len})) or build "
                             "the model with a larger max_text_len")
        return self.text_embed(input_ids) + self.type_embed(TEXT_TYPE)           # (B, T, D)

    # -- the Multiway Transformer (VLMo §3.2) ----------------------------------------------------------------
    def encode(self, x: torch.Tensor, route: str, mask: torch.Tensor | None = None, text_len: int = 0) -> torch.Tensor:
        """Run embedded inputs x (B, L, D) through the L blocks on ``route``; returns the final-normed (B, L, D)."""
        for block in self.blocks:
            x = block(x, mask=mask, ffn_kwargs={"route": route, "text_len": text_len})   # eq. (1)-(2)
        return self.final_norm(x)

    def _text_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return input_ids != self.config.pad_token_id                              # (B, T) True = real token
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)} (1 / True = real token)")
        return attention_mask.bool()

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, bool_masked_pos: torch.Tensor | None = None,
                image_type_id: int = IMAGE_TYPE, itc: bool = False, itm: bool = False,
                mlm: bool = False) -> VLMoOutput:
        """One pass; the inputs choose the route (VLMo §3.2):

        * ``images`` alone -> image-only (V-FFN); with ``bool_masked_pos`` (B, N) the chosen patches become [MASK]
          and ``mim_logits`` predicts every patch's code (BEiT, §3.4 stage 1);
        * ``input_ids`` alone -> text-only (L-FFN); ``attention_mask`` (B, T) (1 / True = real token) defaults to
          ``input_ids != pad_token_id``;
        * both -> fusion of [text; image] (V-FFN / L-FFN below, VL-FFN in the top F layers).

        ``itc`` adds the ITC projection of the [CLS] (unimodal passes), ``itm`` the pooled fusion [T_CLS] and its
        match logits, ``mlm`` the vocabulary logits at the text positions. Images are floats in [0, 1].
        """
        if images is None and input_ids is None:
            raise ValueError("VLMo needs images, input_ids or both (image-only, text-only or fusion pass)")
        if bool_masked_pos is not None and (images is None or input_ids is not None):
            raise ValueError("bool_masked_pos is for image-only passes (BEiT masked image modelling): pass images "
                             "without input_ids")
        if itc and images is not None and input_ids is not None:
            raise ValueError("itc=True needs an image-only or a text-only pass (VLMo §3.3: ITC compares the separately "
                             "encoded [I_CLS] and [T_CLS]); encode the images and the texts in two calls")
        if itm and (images is None or input_ids is None):
            raise ValueError("itm=True needs a fusion pass: give images and input_ids")
        if mlm and input_ids is None:
            raise ValueError("mlm=True needs input_ids")

        parts, mask, text_len = [], None, 0
        if input_ids is not None:
            tmask = self._text_mask(input_ids, attention_mask)                        # (B, T)
            parts.append(self.embed_text(input_ids))                                   # H^w_0 (B, T, D)
            text_len = input_ids.shape[1]
        if images is not None:
            parts.append(self.embed_image(images, bool_masked_pos, image_type_id))     # H^v_0 (B, 1 + N, D)
        if len({p.shape[0] for p in parts}) > 1:
            raise ValueError(f"images and input_ids have different batch sizes {[p.shape[0] for p in parts]}")
        x = torch.cat(parts, dim=1)                                                    # H^vl_0 = [H^w_0; H^v_0]
        if input_ids is not None:
            n_img = x.shape[1] - text_len
            keys = torch.cat([tmask, tmask.new_ones(x.shape[0], n_img)], dim=1)       # (B, L): image is never padding
            mask = None if bool(keys.all()) else padding_mask(keys)                    # (B, 1, 1, L) or None
        route = "fusion" if len(parts) == 2 else ("vision" if images is not None else "language")

        h = self.encode(x, route, mask, text_len)                                      # (B, L, D)
        cls = h[:, 0]                                                                  # [I_CLS] or [T_CLS]
        features = pooled = itm_logits = mlm_logits = mim_logits = None
        if itc:                                                                        # VLMo §3.3 ITC
            features = (self.itc_image_proj if route == "vision" else self.itc_text_proj)(cls)   # (B, D)
        if itm:                                                                        # VLMo §3.3 ITM
            pooled = self.pooler(cls)                                                  # (B, D)
            itm_logits = self.itm_head(pooled)                                         # (B, 2)
        if mlm:                                                                        # VLMo §3.3 MLM
            mlm_logits = self.mlm_head(h[:, :text_len])                                # (B, T, V)
        if bool_masked_pos is not None:                                                # BEiT MIM
            mim_logits = self.mim_head(h[:, 1:])                                       # (B, N, n_codes)
        return VLMoOutput(h, cls, text_len, route, features, pooled, itm_logits, mlm_logits, mim_logits)

    # -- downstream models from a pretrained one ------------------------------------------------------------
    @classmethod
    def from_pretrained_vlmo(cls, model: "VLMo", **overrides) -> "VLMo":
        """A ``cls`` model (e.g. :class:`VLMoForVQA`) holding every weight of the pretrained ``model``; its own head
        starts fresh (``init_std``). ``overrides`` set fields of the new config (e.g. ``n_answers``)."""
        base = {f.name: getattr(model.config, f.name) for f in fields(VLMoConfig) if f.name != "model_type"}
        config = cls.config_class(**{**base, **overrides})
        new = cls(config).to(next(model.parameters()).device)
        state = model.state_dict()
        if config.visual_tokens != model.config.visual_tokens:     # patches <-> cells: the image front end starts new
            state = {k: v for k, v in state.items() if not k.startswith(("image_embed.patch.", "image_embed.pos_embed."))}
        missing, unexpected = new.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(_DOWNSTREAM_HEADS)]
        if unexpected:
            raise ValueError(f"{type(model).__name__} holds weights {unexpected[:5]} that {cls.__name__} does not have")
        new.on_loaded_pretrained()
        return new

    def on_loaded_pretrained(self) -> None:
        """Hook after :meth:`from_pretrained_vlmo` copied the pretrained weights (NLVR2 sets its image types)."""


# Heads only downstream models have: a downstream model converted back (from_pretrained_vlmo) leaves them behind.
_DOWNSTREAM_HEADS = ("vqa_head.", "nlvr2_head.", "cell_norm.", "cell_head.")


def _classifier(d_in: int, d_hidden: int, n_out: int, eps: float) -> nn.Sequential:
    """The official VLMo task classifier: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden, eps=eps), nn.GELU(),
                         nn.Linear(d_hidden, n_out))


# =========================================================================================================
# Downstream heads (VLMo §3.5, §4)
# =========================================================================================================

@dataclass
class VLMoVQAConfig(VLMoConfig):
    model_type: str = "vlmo_vqa"
    n_answers: int = 66            # classes: len(mmkit.data.text.answer_vocab("both")), the world's English then
                                   # Chinese answers (VQA v2: the 3,129 most frequent answers, §4.3)


class VLMoForVQA(VLMo):
    """VLMo §4.3 VQA as classification: the pooled fusion [T_CLS] -> Linear(D, 2D), LN, GELU, Linear(2D, n_answers)
    (the official classifier). ``forward(images, input_ids, attention_mask)`` -> ``VLMoOutput.logits`` (B, n_answers);
    trained with soft targets and binary cross-entropy (:mod:`mmkit.vlmo.tasks.vqa`)."""

    config_class = VLMoVQAConfig

    def __init__(self, config: VLMoVQAConfig):
        super().__init__(config)
        self.vqa_head = init_weights(_classifier(config.d_model, 2 * config.d_model, config.n_answers,
                                                 config.layer_norm_eps), std=config.init_std)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> VLMoOutput:
        out = super().forward(images, input_ids, attention_mask)                      # fusion pass
        pooled = self.pooler(out.cls)                                                  # (B, D) pooled [T_CLS]
        return out._replace(pooled=pooled, logits=self.vqa_head(pooled))              # (B, n_answers)


@dataclass
class VLMoNLVR2Config(VLMoConfig):
    model_type: str = "vlmo_nlvr2"


class VLMoForNLVR2(VLMo):
    """VLMo §4.3 NLVR2: the statement is fused with each image in turn (image types 1 and 2), the two pooled [T_CLS]
    vectors are concatenated and classified true / false by Linear(2D, 2D), LN, GELU, Linear(2D, 2).

    ``forward(images (B, 2, C, S, S), input_ids, attention_mask)`` -> ``VLMoOutput``: hidden states / cls of the
    left pass, ``pooled`` (B, 2D) the concatenation, ``logits`` (B, 2) [false, true].
    """

    config_class = VLMoNLVR2Config

    def __init__(self, config: VLMoNLVR2Config):
        super().__init__(config)
        D = config.d_model
        self.nlvr2_head = init_weights(_classifier(2 * D, 2 * D, 2, config.layer_norm_eps), std=config.init_std)

    def on_loaded_pretrained(self) -> None:
        with torch.no_grad():                       # official: the second image's type starts as the image type
            self.type_embed.weight[SECOND_IMAGE_TYPE] = self.type_embed.weight[IMAGE_TYPE]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> VLMoOutput:
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(f"NLVR2 takes image pairs (B, 2, C, S, S) (left, right), got {tuple(images.shape)}")
        left = super().forward(images[:, 0], input_ids, attention_mask, image_type_id=IMAGE_TYPE)
        right = super().forward(images[:, 1], input_ids, attention_mask, image_type_id=SECOND_IMAGE_TYPE)
        pooled = torch.cat([self.pooler(left.cls), self.pooler(right.cls)], dim=-1)   # (B, 2D)
        return left._replace(pooled=pooled, logits=self.nlvr2_head(pooled))          # (B, 2)


@dataclass
class VLMoImageClsConfig(VLMoConfig):
    model_type: str = "vlmo_image_cls"
    n_cells: int = 9               # the world's 3x3 grid: one prediction per cell (mmkit.data.world.object_labels)
    cell_classes: tuple = (7, 4, 3)  # per cell: colour (6 + empty), shape (3 + empty), size (2 + empty)
    pool: str = "cells"            # what the classifier reads: "cells" = the final patch states averaged over each
                                   # cell's region, one shared classifier per cell (dense prediction from patch tokens,
                                   # as §4.5's ADE20K segmentation reads them); "cls" = the final [I_CLS] and one Linear
                                   # to every cell's logits (measured: from scratch, both predict "empty" everywhere
                                   # for 150 steps; "cells" then learns, "cls" stays there)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cell_classes = tuple(self.cell_classes)
        if self.pool not in ("cells", "cls"):
            raise ValueError(f"pool must be 'cells' or 'cls', got {self.pool!r}")
        side = math.isqrt(self.n_cells)
        if self.pool == "cells" and (side * side != self.n_cells or side > self.grid_size):
            raise ValueError(f"pool='cells' needs a square number of cells no finer than the {self.grid_size}x"
                             f"{self.grid_size} patch grid, got n_cells={self.n_cells}")


class VLMoForImageClassification(VLMo):
    """VLMo §4.5: the model as an image-only encoder (V-FFN in every layer, no text) and a linear classifier. Here the
    classes are the world's object attributes per grid cell: ``logits`` (B, n_cells, sum(cell_classes))."""

    config_class = VLMoImageClsConfig

    def __init__(self, config: VLMoImageClsConfig):
        super().__init__(config)
        D, c = config.d_model, config
        self.cell_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        n_out = sum(c.cell_classes) if c.pool == "cells" else c.n_cells * sum(c.cell_classes)
        self.cell_head = init_weights(nn.Linear(D, n_out), std=c.init_std)

    def forward(self, images: torch.Tensor) -> VLMoOutput:
        out = super().forward(images)                                                  # image-only pass
        c, B, g = self.config, len(images), self.config.grid_size
        if c.pool == "cells":
            patches = out.hidden_states[:, 1:].transpose(1, 2).reshape(B, -1, g, g)   # (B, D, g, g) raster order
            side = math.isqrt(c.n_cells)
            cells = F.adaptive_avg_pool2d(patches, side).flatten(2).transpose(1, 2)   # (B, n_cells, D) row-major
            logits = self.cell_head(self.cell_norm(cells))                             # (B, n_cells, sum(classes))
        else:
            logits = self.cell_head(self.cell_norm(out.cls)).view(B, c.n_cells, sum(c.cell_classes))
        return out._replace(logits=logits)                                             # (B, cells, sum(classes))


# ---------------------------------------------------------------------------------------------------------
# Registration and presets
# ---------------------------------------------------------------------------------------------------------

register_model("vlmo", VLMoConfig, VLMo)
register_model("vlmo_vqa", VLMoVQAConfig, VLMoForVQA)
register_model("vlmo_nlvr2", VLMoNLVR2Config, VLMoForNLVR2)
register_model("vlmo_image_cls", VLMoImageClsConfig, VLMoForImageClassification)

# The world at laptop scale: 32 px images in 8x8 patches, the world WordPiece tokenizer (384 ids in 512 rows),
# 4 blocks of width 128 with the VL expert in the top one.
register_preset("vlmo-tiny", lambda: VLMoConfig())
# The world VQA model reads the cells front end (visual_tokens="cells", see VLMoConfig; tuning notes in recipes.py)
register_preset("vlmo-tiny-vqa", lambda: VLMoVQAConfig(visual_tokens="cells"))
register_preset("vlmo-tiny-nlvr2", lambda: VLMoNLVR2Config(visual_tokens="cells"))   # from vlmo-tiny-vqa
register_preset("vlmo-tiny-image-cls", lambda: VLMoImageClsConfig())

# Full size (VLMo §4.1; the official README's VLMo-base / VLMo-large). BERT uncased vocabulary ([PAD] 0, [MASK]
# 103), texts of 40 tokens, 224 px images in 16 px patches, BEiT's 8192 DALL-E codes as MIM targets, layer scale 0.1.
# scaled/configs/vlmo_base.yaml / vlmo_large.yaml hold the same values and say what is assumed.
FULL_SIZE = dict(vocab_size=30522, max_text_len=40, pad_token_id=0, mask_token_id=103, image_size=224, patch_size=16,
                 n_image_codes=8192, layer_scale_init=0.1)
BASE = dict(FULL_SIZE, d_model=768, n_layers=12, n_heads=12, d_ff=3072, n_vl_layers=2)     # 175M (§4.1)
LARGE = dict(FULL_SIZE, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, n_vl_layers=3)  # 562M (§4.1)
register_preset("vlmo-base", lambda: VLMoConfig(**BASE))
register_preset("vlmo-large", lambda: VLMoConfig(**LARGE))

