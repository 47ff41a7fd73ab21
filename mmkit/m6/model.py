"""M6: one Transformer that encodes and decodes, switched by the attention mask (Lin et al. 2021).

    model = mmkit.build_model("m6-tiny")                       # or M6Model(M6Config(...))
    batch = masking.collate([image_captioning(ids, special=sp, n_visual=model.num_visual_tokens), ...],
                            pad_id=sp.pad_id)
    out = model.forward_batch(batch, images)                   # M6Output(loss, logits, hidden_states, aux_loss)
    gen = model.generate(images, encoder_ids=None, max_new_tokens=20)   # Generation(sequences, logits)

The whole model, top to bottom (M6 §3.1-3.2):

    images (B, 3, H, W) --feature extractor--> (B, N, F) patch features, lined up by position (raster order)
        --patch_proj--> (B, N, D) + 2-D position + segment "visual"                   = visual block
    encoder_ids (B, We)  --word emb--> + 1-D position + segment "encoder text"        = masked-text block
    decoder_input_ids (B, Wd) --word emb--> + 1-D position + segment "decoder text"   = complete-text block
    x = LN(cat[visual | encoder | decoder])                                            (B, L, D)
    x = n_layers x TransformerBlock(x, mask=unified mask)    # bidirectional context, causal decoder
    logits = x[:, decoder] @ word_emb.T                      # output layer tied to the word embedding
    loss = cross_entropy(logits, labels, ignore_index=-100)

The same file holds M6's variants and heads: M6-MoE (M6 §3.4, MoE FFNs through the FFN hook), the image-text
matching head (M6 §4.6) and the text-to-image code LM (M6 §4.1). Tasks that train and use them live in
``mmkit/m6/tasks/``; recipes in ``mmkit/m6/recipes.py``.

Sequence layout: *segment-aligned* as :func:`mmkit.m6.masking.collate` builds it: ``Wv`` visual slots, then
``We`` encoder-text slots, then ``Wd`` decoder-text slots, each block padded at its own end. Positions are
counted inside each block, so a token's embedding never depends on how the batch was padded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.generation import register_cached_forward, sample_next
from mmkit.m6.masking import IGNORE_INDEX, SEG_DECODER, SEG_ENCODER, SEG_PAD, SEG_VISUAL, TaskBatch, unified_mask
from mmkit.nn import (CellCodeTokens, ConvFeatureExtractor, KVCache, PatchFeatures, PositionEmbedding,
                      PositionEmbedding2D, TransformerBlock, TypeEmbedding, cell_attribute_accuracy,
                      cell_attribute_loss, evaluating, init_weights)
from mmkit.nn.moe import ExpertParallelMoE, MoEConfig, MoEFeedForward
from mmkit.objectives.lm import token_cross_entropy, token_log_probs
from mmkit.registry import register_model, register_preset

__all__ = ["M6Config", "M6Model", "IMAGE_SIDE", "GridProbe", "M6Output", "Generation", "FFN_FACTORIES", "register_ffn", "FULL_SIZE",
           "M6MoEConfig", "M6ITMConfig", "M6ForImageTextMatching", "MatchOutput", "CaptionLikelihood",
           "caption_likelihood", "M6T2IConfig", "M6T2I"]


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

@dataclass
class M6Config:
    model_type: str = "m6"
    # -- text ------------------------------------------------------------------------------------------
    vocab_size: int = 512          # rows of the word embedding (= output layer). The world tokenizer has 384
                                   # ids; 512 leaves 128 free ids for image-code / coordinate tokens added
                                   # later (mmkit.tokenizer.add_image_code_tokens). The paper does not give its
                                   # vocabulary; the full-size configs assume BERT-Chinese's 21128 (M6 §3.1
                                   # "WordPiece ... following BERT"), which reproduces Table 4's counts.
    max_text_len: int = 256        # 1-D positions per text block (encoder and decoder text each count from
                                   # 0). Not in the paper; BERT's 512 in the full-size configs. 256 covers the
                                   # world's longest Chinese description (~145 tokens).
    pad_token_id: int = 0          # [PAD] of the world tokenizer: padding when no mask/segment_ids are given
    bos_token_id: int = 5          # [BOS]: first decoder input in generate()
    eos_token_id: int = 6          # [EOS]: generation of a row stops after it
    # -- transformer -----------------------------------------------------------------------------------
    d_model: int = 128             # hidden width D (Table 4: 1024 for M6-base, 4096 for M6-10B)
    n_layers: int = 4              # transformer blocks (Table 4: 24 / 50)
    n_heads: int = 4               # attention heads (Table 4: 16 / 128)
    d_ff: int = 512                # FFN hidden width. Paper silent: 4 * d_model as BERT/GPT (M6 §3.2 "identical
                                   # to that of BERT or GPT"); with it Table 4's 327M / 10B come out within 2%
    activation: str = "gelu"       # FFN non-linearity (BERT's exact GELU)
    norm_first: bool = True        # pre-norm (GPT-2 / Megatron-LM, which M6 §3.4 follows for 10B; trains deep
                                   # stacks stably); False = post-norm BERT blocks. Paper silent.
    layer_norm_eps: float = 1e-5   # LayerNorm epsilon (BERT uses 1e-12; no measurable difference here)
    dropout: float = 0.0           # residual/embedding dropout (BERT 0.1 in the full-size configs; 0 for the
                                   # tiny model, which trains for minutes and is limited by steps, not data)
    attn_dropout: float | None = None  # dropout on attention probabilities; None = same as dropout
    tie_word_embeddings: bool = True   # output layer shares the word-embedding matrix (M6 §3.2)
    init_std: float = 0.02         # N(0, std) init of Transformer + embedding weights (BERT's initializer_range);
                                   # the CNN keeps PyTorch's He init (see M6Model.__init__)
    ffn_type: str = "dense"        # which FFN each block uses: a name in FFN_FACTORIES ("dense" = FeedForward).
                                   # Hook for the MoE issue (M6 §3.4): register_ffn("moe", factory)
    aux_loss_weight: float = 0.01  # weight of FFN side losses (e.g. MoE load balancing) added to the loss
    # -- image -----------------------------------------------------------------------------------------
    image_size: int = 32           # input images are image_size x image_size (world images: 32 or 64 px)
    in_channels: int = 3           # RGB
    image_mean: tuple = (0.5, 0.5, 0.5)  # images arrive in [0, 1] (the world datasets); the model feeds the
    image_std: tuple = (0.5, 0.5, 0.5)   # extractor (x - mean) / std, i.e. [-1, 1]. Centred pixels help the tiny
                                   # model start reading images sooner. A plugged ImageNet ResNet-50 wants
                                   # mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
    feature_channels: tuple = (32, 64, 128)  # conv stages of the built-in feature extractor, a laptop-scale
                                   # stand-in for M6 §3.1's trained ResNet-50 (pass feature_extractor= to
                                   # M6Model to use another one)
    feature_strides: tuple = (2, 2, 2)   # stride of each stage: grid = image_size / 8 -> 4x4 = 16 visual
                                   # tokens at 32 px, 8x8 at 64 px (ResNet-50: stride 32, 7x7 at 224 px)
    visual_tokens: str = "patches"  # "patches": one token per CNN patch feature (M6 §3.1). "cells": one token per
                                   # world grid cell, a soft code of the object it holds read from those features
                                   # (mmkit.nn.CellCodeTokens): the tiny model learns to match question words to it
                                   # in minutes, to patch tokens not at all (issue 12, notebook 04). Not in the paper
    cell_grid: int = 3             # cells per side for visual_tokens="cells" (the Shapes World's 3x3 grid)
    cell_classes: tuple = (7, 4, 3)  # values + "empty" of each attribute the cell code names (world: 6 colours,
                                   # 3 shapes, 2 sizes), as GridProbe

    def __post_init__(self) -> None:
        if self.visual_tokens not in ("patches", "cells"):
            raise ValueError(f"visual_tokens must be 'patches' or 'cells', got {self.visual_tokens!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if len(self.feature_channels) != len(self.feature_strides):
            raise ValueError(f"feature_channels {tuple(self.feature_channels)} and feature_strides "
                             f"{tuple(self.feature_strides)} need one entry per conv stage")
        if len(self.image_mean) != self.in_channels or len(self.image_std) != self.in_channels:
            raise ValueError(f"image_mean {tuple(self.image_mean)} and image_std {tuple(self.image_std)} need "
                             f"in_channels={self.in_channels} entries")
        top = max(self.pad_token_id, self.bos_token_id, self.eos_token_id)
        if top >= self.vocab_size:
            raise ValueError(f"special token id {top} does not fit vocab_size={self.vocab_size}")


# ---------------------------------------------------------------------------------------------------------
# The FFN hook: a later issue swaps the dense FFN for a Mixture-of-Experts layer (M6 §3.4)
# ---------------------------------------------------------------------------------------------------------

# factory(config, layer_index) -> module mapping (B, L, D) -> (B, L, D), or None for the block's default
# FeedForward(d_model, d_ff, activation). An FFN with a side loss stores it as `.aux_loss` after each
# forward; M6Model sums those into M6Output.aux_loss and adds aux_loss_weight * aux_loss to the loss.
FfnFactory = Callable[[M6Config, int], "nn.Module | None"]
FFN_FACTORIES: dict[str, FfnFactory] = {"dense": lambda config, layer: None}


def register_ffn(name: str, factory: FfnFactory) -> None:
    """Make ``M6Config(ffn_type=name)`` build each block's FFN with ``factory(config, layer_index)``."""
    FFN_FACTORIES[name] = factory


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

class M6Output(NamedTuple):
    loss: torch.Tensor | None           # scalar: mean CE over decoder labels != -100 (+ weighted aux_loss)
    logits: torch.Tensor | None         # (B, Wd, V) word logits at the decoder positions (None: no decoder)
    hidden_states: torch.Tensor         # (B, L, D) final states of the whole [visual | encoder | decoder] sequence
    aux_loss: torch.Tensor | None       # sum of the FFNs' side losses (MoE), None for dense FFNs


class Generation(NamedTuple):
    sequences: torch.Tensor             # (B, T) generated ids (no [BOS]); [PAD] after a row's [EOS]; T <=
                                        # max_new_tokens (shorter when every row has ended)
    logits: torch.Tensor                # (B, T, V) raw next-token logits of each step (before sampling filters)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class M6Model(nn.Module):
    """M6 (Lin et al. 2021): patch features + words -> one BERT/GPT Transformer under the unified mask.

    Args:
        config: an :class:`M6Config`.
        feature_extractor: optional module replacing the built-in :class:`ConvFeatureExtractor`, e.g. a local
            ResNet-50 trunk ``nn.Sequential(*list(resnet.children())[:-2])``. It maps images (B, C, H, W) to a
            feature map (B, F, h, w), a sequence (B, N, F) (N must be a square) or a :class:`PatchFeatures`.
            Its output width F and grid are found by running it once on a zero image; a ``patch_proj`` Linear
            F -> d_model is added. Its weights are left as given (not re-initialised); freeze it with
            ``model.feature_extractor.requires_grad_(False)`` to follow FashionBERT / M6 ("a trained feature
            extractor").
        ffn_factory: optional ``factory(config, layer_index) -> nn.Module`` overriding ``config.ffn_type``.
    """

    def __init__(self, config: M6Config, feature_extractor: nn.Module | None = None,
                 ffn_factory: FfnFactory | None = None):
        super().__init__()
        self.config = c = config
        D = c.d_model

        # M6 §3.1: image -> patch features from a (trained) CNN, lined up into a sequence by position.
        if feature_extractor is None:
            self.feature_extractor = ConvFeatureExtractor(c.in_channels, tuple(c.feature_channels),
                                                          tuple(c.feature_strides), d_model=D)
            feat_dim, self.feature_grid = D, self.feature_extractor.grid_size(c.image_size)   # F, (h, w)
        else:
            self.feature_extractor = feature_extractor
            feat_dim, self.feature_grid = _probe_extractor(feature_extractor, c)
        if c.visual_tokens == "cells":            # one token per world cell instead of one per patch (issue 12)
            self.patch_proj = CellCodeTokens(self.feature_grid, feat_dim, D, cell_grid=c.cell_grid,
                                             classes=tuple(c.cell_classes))
            self.grid_size = (c.cell_grid, c.cell_grid)
        else:                                     # F -> D (the built-in extractor ends at width D already)
            self.patch_proj = nn.Identity() if feature_extractor is None else nn.Linear(feat_dim, D)
            self.grid_size = self.feature_grid                                # (h, w) of the visual tokens
        self.num_visual_tokens = self.grid_size[0] * self.grid_size[1]       # N visual positions
        self.pos_emb_2d = PositionEmbedding2D(self.grid_size, D)             # where each patch sits

        # M6 §3.1: WordPiece tokens embedded as in BERT: word + 1-D position.
        self.wte = nn.Embedding(c.vocab_size, D)
        self.pos_emb = PositionEmbedding(c.max_text_len, D)
        # M6 §3.2: "we add corresponding segment embeddings for different modalities": one vector each for
        # visual, masked (encoder) text and complete (decoder) text (masking.SEG_VISUAL/ENCODER/DECODER).
        self.segment_emb = TypeEmbedding(3, D)
        self.embed_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)              # BERT's embedding LayerNorm
        self.drop = nn.Dropout(c.dropout)

        # M6 §3.2: a single stack of BERT/GPT blocks (self-attention + point-wise FFN) for the whole sequence.
        if ffn_factory is None:
            if c.ffn_type not in FFN_FACTORIES:
                raise ValueError(f"unknown ffn_type {c.ffn_type!r}; registered: {sorted(FFN_FACTORIES)}. Import "
                                 "the module that calls mmkit.m6.model.register_ffn for it first.")
            ffn_factory = FFN_FACTORIES[c.ffn_type]
        self.blocks = nn.ModuleList(
            TransformerBlock(D, c.n_heads, c.d_ff, dropout=c.dropout, attn_dropout=c.attn_dropout,
                             activation=c.activation, norm_first=c.norm_first, layer_norm_eps=c.layer_norm_eps,
                             ffn=ffn_factory(c, i))
            for i in range(c.n_layers))
        self.final_norm = nn.LayerNorm(D, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()

        # M6 §3.2: "an output layer for word prediction ... we tie its weights to those of the embedding layer".
        self.lm_head = nn.Linear(D, c.vocab_size, bias=False)

        # BERT init (N(0, 0.02)) for the Transformer and embeddings. The feature extractor keeps its own: a
        # user's trained CNN must not be overwritten, and the built-in CNN keeps PyTorch's He init. With
        # N(0, 0.02) convs (and raw [0, 1] pixels) the tiny model took > 150 steps to start using the image
        # when memorising 6 captions; with He init and centred pixels, 60-90 (tests/test_m6.py overfits 4).
        for name, child in self.named_children():
            if name != "feature_extractor":
                init_weights(child, std=c.init_std)
        self.register_buffer("image_mean", torch.tensor(c.image_mean, dtype=torch.float).view(1, -1, 1, 1),
                             persistent=False)                                 # (1, C, 1, 1)
        self.register_buffer("image_std", torch.tensor(c.image_std, dtype=torch.float).view(1, -1, 1, 1),
                             persistent=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @classmethod
    def with_cell_code(cls, m6: "M6Model") -> "M6Model":
        """A copy of ``m6`` (built-in CNN) whose visual tokens are the per-cell code (``visual_tokens="cells"``): the
        feature extractor, Transformer and text embeddings copied, the code head and tables new. Train the head
        with :func:`mmkit.m6.tasks.vqa.train_cell_code` before using it."""
        new_side = ("patch_proj.", "pos_emb_2d.")                  # the parts whose shapes follow the token grid
        new = cls(replace(m6.config, visual_tokens="cells"))
        missing, unexpected = new.load_state_dict(
            {k: v for k, v in m6.state_dict().items() if not k.startswith(new_side)}, strict=False)
        if unexpected or any(not k.startswith(new_side) for k in missing):
            raise ValueError(f"with_cell_code needs an M6 with the built-in CNN; unmatched weights: "
                             f"{sorted(unexpected) + [k for k in missing if not k.startswith(new_side)]}")
        return new.train(m6.training)

    # -- embeddings ------------------------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> visual block (B, N, D): patch features + 2-D positions + visual segment."""
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"images must be (B, {c.in_channels}, H, W), got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (c.image_size, c.image_size):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but this M6 was built for "
                             f"image_size={c.image_size}: resize them (e.g. ImageTextDataset(image_size="
                             f"{c.image_size})) or build the model with image_size={images.shape[-1]}")
        v = self.patch_proj(self.patch_features(images))             # (B, N, D); "cells": (B, cell_grid^2, D)
        # M6 §3.1 "line up the representations to a sequence by their positions" (+ where each one sits)
        return v + self.pos_emb_2d(self.grid_size) + self.segment_emb(SEG_VISUAL)  # (B, N, D)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> (B, N, F) patch features of the feature extractor (M6 §3.1), before the
        projection (or the cell code) makes them visual tokens."""
        images = (images - self.image_mean) / self.image_std                      # [0, 1] -> about [-1, 1]
        feats, grid = _as_features(self.feature_extractor(images))                # (B, N, F), (h, w)
        if tuple(grid) != tuple(self.feature_grid):
            raise ValueError(f"the feature extractor gave a {grid[0]}x{grid[1]} grid, expected "
                             f"{self.feature_grid[0]}x{self.feature_grid[1]}")
        return feats

    def embed_text(self, ids: torch.Tensor, segment: int, offset: int = 0) -> torch.Tensor:
        """Token ids (B, L) -> (B, L, D): word + 1-D position (from ``offset``) + segment embedding."""
        name = "encoder" if segment == SEG_ENCODER else "decoder"
        if ids.dim() != 2:
            raise ValueError(f"{name} ids must be (B, L), got shape {tuple(ids.shape)}")
        if offset + ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"{name} text reaches position {offset + ids.shape[1]} but max_text_len="
                             f"{self.config.max_text_len}: truncate it (e.g. Collator(max_length=...)) or build "
                             f"the model with a larger max_text_len")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{name} ids must lie in 0..{self.config.vocab_size - 1} (vocab_size), got "
                             f"{int(ids.min())}..{int(ids.max())}; labels use -100, inputs never do")
        return self.wte(ids) + self.pos_emb(ids.shape[1], offset=offset) + self.segment_emb(segment)

    def _embed(self, images, encoder_ids, decoder_input_ids) -> torch.Tensor:
        # M6 §3.2: "we integrate the image embeddings e^i and the word embeddings e^t into e = {e^i, e^t}"
        parts = []
        if images is not None:
            parts.append(self.embed_images(images))                           # (B, Wv, D)
        if encoder_ids is not None:
            parts.append(self.embed_text(encoder_ids, SEG_ENCODER))           # (B, We, D)
        if decoder_input_ids is not None:
            parts.append(self.embed_text(decoder_input_ids, SEG_DECODER))     # (B, Wd, D)
        if not parts:
            raise ValueError("M6 needs at least one of images, encoder_ids, decoder_input_ids")
        if len({p.shape[0] for p in parts}) > 1:
            raise ValueError(f"images / encoder_ids / decoder_input_ids have different batch sizes "
                             f"{[p.shape[0] for p in parts]}")
        return self.drop(self.embed_norm(torch.cat(parts, dim=1)))           # (B, L, D)

    def _transform(self, x: torch.Tensor, mask: torch.Tensor, caches: list[KVCache] | None = None):
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=None if caches is None else caches[i])  # (B, L, D)
        return self.final_norm(x)

    def _segments(self, B, n_visual, encoder_ids, decoder_input_ids, device) -> torch.Tensor:
        """(B, L) segment ids when none are given: padding = pad_token_id in the text blocks."""
        pad = self.config.pad_token_id
        seg = [torch.full((B, n_visual), SEG_VISUAL, dtype=torch.long, device=device)]
        for ids, s in ((encoder_ids, SEG_ENCODER), (decoder_input_ids, SEG_DECODER)):
            if ids is not None:
                seg.append(torch.where(ids != pad, s, SEG_PAD))
        return torch.cat(seg, dim=1)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None = None, encoder_ids: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> M6Output:
        """Run [visual | encoder text | decoder text] through the stack under M6's unified mask.

        images (B, C, H, W) or None; encoder_ids (B, We) or None; decoder_input_ids (B, Wd) or None;
        labels (B, Wd) with -100 = ignore; mask (B, L, L) or (L, L) bool (True = may attend), L = N + We + Wd,
        e.g. ``TaskBatch.mask``. Without a mask it is built with :func:`masking.unified_mask` from
        ``segment_ids`` (B, L), or else from the inputs, treating ``pad_token_id`` in the text as padding.
        """
        x = self._embed(images, encoder_ids, decoder_input_ids)               # (B, L, D)
        B, L, _ = x.shape
        n_vis = 0 if images is None else self.num_visual_tokens
        if mask is None:
            if segment_ids is None:
                segment_ids = self._segments(B, n_vis, encoder_ids, decoder_input_ids, x.device)
            if tuple(segment_ids.shape) != (B, L):
                raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected (B, L) = {(B, L)}")
            mask = unified_mask(segment_ids=segment_ids).mask                  # (B, L, L)
        mask = self._check_mask(mask, B, L, n_vis)                             # (B or 1, 1, L, L)

        # M6 §3.2: one model; the mask makes visual + masked text an encoder and complete text a decoder.
        h = self._transform(x, mask)                                           # (B, L, D)
        aux = self._aux_loss()
        if decoder_input_ids is None:
            return M6Output(None, None, h, aux)
        logits = self.lm_head(h[:, L - decoder_input_ids.shape[1]:])          # (B, Wd, V)
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match decoder_input_ids "
                                 f"{tuple(decoder_input_ids.shape)} (use -100 where nothing is predicted)")
            # M6 §3.3: every task is "... to text": cross-entropy on the decoder's next-word predictions.
            loss = token_cross_entropy(logits, labels)[0]
            if aux is not None:
                loss = loss + self.config.aux_loss_weight * aux
        return M6Output(loss, logits, h, aux)

    def forward_batch(self, batch: TaskBatch, images: torch.Tensor | None = None) -> M6Output:
        """``forward`` on a :class:`mmkit.m6.masking.TaskBatch` (from ``masking.collate``) and its images.

        ``images`` (B, C, H, W) is needed when the batch has visual slots (any image task); rows of text-only
        tasks may hold any image (e.g. zeros): their visual slots are padding, masked out.
        """
        Wv = batch.mask.shape[-1] - batch.encoder_ids.shape[1] - batch.decoder_input_ids.shape[1]
        if Wv and images is None:
            raise ValueError(f"the batch has {Wv} visual slots (an image task) but images is None; pass the "
                             "images (B, C, H, W), zeros for text-only rows")
        if not Wv and images is not None:
            raise ValueError("images were given but the batch has no visual slots: build the examples with "
                             f"n_visual={self.num_visual_tokens} (image_captioning / multimodal_to_text)")
        dev = self.wte.weight.device
        return self.forward(images, batch.encoder_ids.to(dev), batch.decoder_input_ids.to(dev),
                            batch.labels.to(dev), mask=batch.mask.to(dev))

    def _check_mask(self, mask: torch.Tensor, B: int, L: int, n_vis: int) -> torch.Tensor:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = may attend), e.g. TaskBatch.mask; got {mask.dtype}")
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() != 3 or mask.shape[-2:] != (L, L) or mask.shape[0] not in (1, B):
            if mask.dim() == 3 and mask.shape[-1] != L:
                hint = (f"the inputs give L = {L} positions ({n_vis} visual + text) but the mask covers "
                        f"{mask.shape[-1]}: build image examples with n_visual={self.num_visual_tokens} "
                        "(model.num_visual_tokens), and pass images only when the batch has visual slots")
            else:
                hint = "pass TaskBatch.mask or masking.unified_mask(...).mask"
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, L, L) = {(B, L, L)}; {hint}")
        return mask[:, None]                                                   # (B, 1, L, L): broadcast heads

    def _aux_loss(self) -> torch.Tensor | None:
        side = [b.ffn.aux_loss for b in self.blocks if getattr(b.ffn, "aux_loss", None) is not None]
        return torch.stack([a.reshape(()) for a in side]).sum() if side else None

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: torch.Tensor | None = None, encoder_ids: torch.Tensor | None = None,
                 max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True,
                 logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> Generation:
        """Decode text after [BOS] given images and/or (masked) encoder text (M6 §3.3 "... to text").

        The prefix [visual | encoder | BOS] is encoded once; each new token then runs only itself through the
        stack, reading every earlier key/value from a per-layer :class:`KVCache` (``use_cache=False``
        recomputes the whole sequence at every step: same result, slower). Greedy by default; ``do_sample``
        draws from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens and/or the
        smallest set with probability >= ``top_p`` (nucleus), using ``generator``. ``logits_processor(ids,
        logits)`` may edit the (B, V) logits first, given the (B, t) ids generated so far (e.g. M6 §4.5 poem
        format constraints). Encoder padding (``pad_token_id``) is masked out. A row stops after [EOS].
        """
        c = self.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens > c.max_text_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds max_text_len={c.max_text_len} decoder "
                             "positions; ask for fewer tokens or build the model with a larger max_text_len")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        ref = images if images is not None else encoder_ids
        if ref is None:
            raise ValueError("generate needs images and/or encoder_ids (for plain language modelling pass "
                             "encoder_ids of shape (B, 0))")
        B, dev = ref.shape[0], self.wte.weight.device
        n_vis = 0 if images is None else self.num_visual_tokens
        prefix_seg = self._segments(B, n_vis, encoder_ids, None, dev)                      # (B, Lp)
        bos = torch.full((B, 1), c.bos_token_id, dtype=torch.long, device=dev)
        with evaluating(self):
            out_ids, out_logits = [], []
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            if use_cache:
                # Step 0: encode [visual | encoder | BOS] once, filling every layer's cache.
                caches = [KVCache() for _ in self.blocks]
                seg = torch.cat([prefix_seg, torch.full_like(bos, SEG_DECODER)], dim=1)     # (B, Lp + 1)
                x = self._embed(images, encoder_ids, bos)
                h = self._transform(x, unified_mask(segment_ids=seg).mask[:, None], caches)
                key_ok = seg != SEG_PAD                                                     # (B, Lp + 1) keys
            dec = bos
            for t in range(max_new_tokens):
                if not use_cache:   # reference path: recompute the whole sequence every step
                    seg = torch.cat([prefix_seg, torch.full_like(dec, SEG_DECODER)], dim=1)
                    h = self.forward(images, encoder_ids, dec, segment_ids=seg).hidden_states
                logits = self.lm_head(h[:, -1]).float()                                     # (B, V)
                out_logits.append(logits)
                if logits_processor is not None:
                    so_far = torch.stack(out_ids, 1) if out_ids else logits.new_zeros(B, 0, dtype=torch.long)
                    logits = logits_processor(so_far, logits)
                nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)   # (B,)
                nxt = torch.where(done, c.pad_token_id, nxt)
                out_ids.append(nxt)
                done = done | (nxt == c.eos_token_id)
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                dec = torch.cat([dec, nxt[:, None]], dim=1)                                 # (B, t + 2)
                if use_cache:
                    # One new decoder token: it sees every real prefix key and all earlier decoder tokens.
                    x = self.drop(self.embed_norm(self.embed_text(nxt[:, None], SEG_DECODER, offset=t + 1)))
                    key_ok = torch.cat([key_ok, key_ok.new_ones(B, 1)], dim=1)              # (B, Lk)
                    h = self._transform(x, key_ok[:, None, None, :], caches)                # (B, 1, D)
        return Generation(torch.stack(out_ids, dim=1), torch.stack(out_logits, dim=1))

    def cached_step(self, images, encoder_ids, input_ids, caches, past_length: int) -> torch.Tensor:
        """M6's incremental step, the same computation as ``M6Model.generate(use_cache=True)``.

        First call (``past_length == 0``): [visual | encoder | decoder prompt] under the unified mask (M6 §3.2),
        filling every layer's cache. Later calls: only the new decoder tokens, at decoder positions ``past_length -
        prefix_length ...``; they attend to every real prefix key (encoder padding stays masked), every cached decoder
        key and, causally, to each other.
        """
        B, t = input_ids.shape
        dev = input_ids.device
        n_vis = 0 if images is None else self.num_visual_tokens
        prefix_seg = self._segments(B, n_vis, encoder_ids, None, dev)                   # (B, Lp)
        Lp = prefix_seg.shape[1]
        if past_length == 0:
            seg = torch.cat([prefix_seg, torch.full_like(input_ids, SEG_DECODER)], dim=1)  # (B, Lp + t)
            x = self._embed(images, encoder_ids, input_ids)                              # (B, Lp + t, D)
            h = self._transform(x, unified_mask(segment_ids=seg).mask[:, None], caches)
        else:
            done = past_length - Lp                                                       # decoder tokens cached
            if done < 1:
                raise ValueError(f"the cache holds {past_length} positions but the prefix alone has {Lp}: it was "
                                 "filled for other inputs; let generate() build a fresh cache")
            x = self.drop(self.embed_norm(self.embed_text(input_ids, SEG_DECODER, offset=done)))  # (B, t, D)
            prefix_ok = (prefix_seg != SEG_PAD)[:, None, :].expand(B, t, Lp)            # (B, t, Lp)
            causal = torch.ones(t, done + t, dtype=torch.bool, device=dev).tril(done)    # (t, done + t)
            mask = torch.cat([prefix_ok, causal.expand(B, t, done + t)], dim=2)          # (B, t, Lk)
            h = self._transform(x, mask[:, None], caches)                                # (B, t, D)
        return self.lm_head(h[:, -t:])                                                   # (B, t, V)



# ---------------------------------------------------------------------------------------------------------
# Helpers for plugged-in feature extractors
# ---------------------------------------------------------------------------------------------------------

def _as_features(out) -> tuple[torch.Tensor, tuple[int, int]]:
    """Extractor output -> ((B, N, F) features, (h, w) grid)."""
    if isinstance(out, PatchFeatures) or (isinstance(out, tuple) and len(out) == 2):
        return out[0], tuple(out[1])
    if isinstance(out, torch.Tensor) and out.dim() == 4:                              # (B, F, h, w) map
        return out.flatten(2).transpose(1, 2), (out.shape[2], out.shape[3])
    if isinstance(out, torch.Tensor) and out.dim() == 3:                              # (B, N, F) sequence
        side = math.isqrt(out.shape[1])
        if side * side != out.shape[1]:
            raise ValueError(f"the feature extractor returned {out.shape[1]} positions, not a square grid; "
                             "return a (B, F, h, w) map or PatchFeatures(features, (h, w))")
        return out, (side, side)
    raise TypeError("a feature extractor must return a (B, F, h, w) map, a (B, N, F) sequence or PatchFeatures; "
                    f"got {type(out).__name__}")


@torch.no_grad()
def _probe_extractor(extractor: nn.Module, c: M6Config) -> tuple[int, tuple[int, int]]:
    """Run ``extractor`` once on a zero image (in eval mode: BatchNorm statistics stay untouched)."""
    p = next(extractor.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    with evaluating(extractor):
        feats, grid = _as_features(extractor(torch.zeros(1, c.in_channels, c.image_size, c.image_size,
                                                         device=device)))   # only shapes are read
    return feats.shape[-1], (int(grid[0]), int(grid[1]))


# ---------------------------------------------------------------------------------------------------------
# The image side, and a probe that trains it (stage 0: a stand-in for M6 §3.1's trained ResNet-50)
# ---------------------------------------------------------------------------------------------------------

# Parameter-name prefixes of M6's image side (M6 §3.1 feature extractor, its projection, the 2-D positions):
# what stage 0 trains and later stages freeze or train slowly (mmkit.train.scaled_param_groups).
IMAGE_SIDE: tuple[str, ...] = ("feature_extractor.", "patch_proj.", "pos_emb_2d.")


class GridProbe(nn.Module):
    """A linear head on M6's visual tokens that names the object of every grid cell: colour, shape, size or empty.

    M6 §3.1 reads patch features from a ResNet-50 *trained* on ImageNet; the world has no such network, so the kit
    trains its small CNN on this supervised task first (``mmkit.m6.tasks.pretrain.pretrain_feature_extractor``)
    and throws the head away. ``classes`` counts each attribute's values plus "empty" (world: 6 colours, 3 shapes,
    2 sizes).
    """

    def __init__(self, m6: M6Model, n_cells: int = 9, classes: tuple[int, ...] = (7, 4, 3)):
        super().__init__()
        self.m6, self.n_cells, self.classes = m6, n_cells, tuple(classes)
        self.head = nn.Linear(m6.num_visual_tokens * m6.config.d_model, n_cells * sum(classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.m6.embed_images(images)                                        # (B, N, D) visual tokens
        return self.head(v.flatten(1)).view(len(images), self.n_cells, sum(self.classes))   # (B, cells, sum)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over attributes of the mean cross-entropy per cell; labels (B, cells, attributes) long."""
        return cell_attribute_loss(self(images), labels, self.classes)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor,
                 names: tuple[str, ...] = ("colour", "shape", "size")) -> dict[str, float]:
        """Accuracy of each attribute over the occupied cells (label 0 = empty)."""
        return cell_attribute_accuracy(self(images), labels, self.classes, names)


# =========================================================================================================
# M6-MoE (M6 §3.4): Mixture-of-Experts FFNs through the FFN hook
# =========================================================================================================

@dataclass
class M6MoEConfig(M6Config):
    model_type: str = "m6_moe"
    ffn_type: str = "moe"                  # the MoE FFN factory registered below (register_ffn("moe", ...))
    aux_loss_weight: float = 1.0           # M6Output.aux_loss is already weighted by aux_loss_coef / z_loss_coef below
    # -- M6 §3.4: which blocks are MoE, and the experts --------------------------------------------------
    moe_every: int = 2                     # every moe_every-th block is MoE: blocks moe_every-1, 2*moe_every-1, ...
                                           # (2: every other block, GShard / Switch; 1: all). Paper silent
    n_experts: int = 8                     # m, experts per MoE layer (Table 4, M6-100B: 1024)
    expert_d_ff: int | None = None         # hidden width of ONE expert; None = d_ff (each expert = the dense FFN,
                                           # so top-1 has the dense model's active parameters). Paper silent
    top_k: int = 1                         # experts per token: 1 (Switch; M6 §3.4 prefers it for speed) or 2 (GShard)
    capacity_factor: float | None = 1.25   # c in C = ceil(N c / m) (M6 §3.4); None = no capacity, nothing dropped
    aux_loss_coef: float = 0.01            # load-balancing loss weight (Switch's alpha); 0 = no balancing
    z_loss_coef: float = 0.0               # router z-loss weight (ST-MoE: 1e-3); 0 = off
    jitter_noise: float = 0.0              # Switch's multiplicative gate jitter in training; 0 = off
    renormalize: bool = False              # top-k weights renormalised to sum 1 (Mixtral); False = raw p(x)_i, eq. (2)
    expert_bias: bool = False              # biases in the expert MLPs (Switch has none)
    expert_parallel: bool = False          # True: ExpertParallelMoE, the experts sharded over the torch.distributed
                                           # processes (M6 §3.4 expert parallelism); needs the process group first
    moe_backend: str = "auto"              # expert matmuls (mmkit.nn.moe.MoEConfig.backend; `mmkit bench moe`)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ffn_type != "moe":
            raise ValueError(f"M6MoEConfig has ffn_type='moe'; got {self.ffn_type!r} (use M6Config for a dense M6)")
        if not 1 <= self.moe_every <= self.n_layers:
            raise ValueError(f"moe_every must be in 1..n_layers={self.n_layers}, got {self.moe_every}")
        self.moe_config()                                                   # validates the MoE fields

    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE blocks: ``moe_every - 1, 2 * moe_every - 1, ...``."""
        return [i for i in range(self.n_layers) if i % self.moe_every == self.moe_every - 1]

    def moe_config(self) -> MoEConfig:
        """The :class:`mmkit.nn.moe.MoEConfig` of each MoE layer."""
        return MoEConfig(d_model=self.d_model, d_ff=self.expert_d_ff or self.d_ff, n_experts=self.n_experts,
                         top_k=self.top_k, capacity_factor=self.capacity_factor, renormalize=self.renormalize,
                         aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
                         jitter_noise=self.jitter_noise, activation=self.activation, bias=self.expert_bias,
                         dropout=self.dropout, backend=self.moe_backend)


# M6 §3.4: "the MoE layer is a parallel combination of multiple FFN layers, each of which acts as an expert"
def _moe_ffn(config: M6Config, layer: int) -> nn.Module | None:
    if not isinstance(config, M6MoEConfig):
        raise ValueError("ffn_type='moe' needs an M6MoEConfig (mmkit.m6.model), which holds n_experts, top_k, "
                         "capacity_factor, ...; e.g. mmkit.load_config('m6-tiny-moe')")
    if layer not in config.moe_layer_ids():
        return None                                                         # a dense FeedForward block
    cls = ExpertParallelMoE if config.expert_parallel else MoEFeedForward
    return cls(config.moe_config())


# =========================================================================================================
# Image-text matching head (M6 §4.6)
# =========================================================================================================

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
    valid = target != c.pad_token_id                                               # (B, W + 1): tokens + [EOS]
    out = model.forward(images, None, dec)                                         # logits (B, W + 2, V)
    logp = token_log_probs(out.logits[:, :W + 1], target.masked_fill(~valid, IGNORE_INDEX))   # 0 at pads
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


# =========================================================================================================
# Text-to-image code LM (M6 §4.1): M6 with image codes as extra vocabulary
# =========================================================================================================

@dataclass
class M6T2IConfig(M6Config):
    model_type: str = "m6-t2i"
    vocab_size: int = 768          # joint vocabulary: the pretrained M6's 512 word ids + n_codes image codes
    code_offset: int = 512         # id of <code_0>: codes come right after the pretrained word vocabulary
    n_codes: int = 256             # VQGAN codebook size (vqgan-world: 512, vqgan-world-32: 256)
    code_grid: int = 8             # codes per image side: an image is code_grid**2 codes in raster order
    max_prompt_tokens: int = 48    # prompts are cut to this many word tokens (the longest world prompt: ~30)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size != self.code_offset + self.n_codes:
            raise ValueError(f"vocab_size={self.vocab_size} must equal code_offset + n_codes = "
                             f"{self.code_offset} + {self.n_codes} (word ids, then one id per image code)")
        if max(self.pad_token_id, self.bos_token_id, self.eos_token_id) >= self.code_offset:
            raise ValueError("special token ids must be word ids (< code_offset)")
        if self.code_grid ** 2 > self.max_text_len:     # decoder inputs: [BOS] + all codes but the last
            raise ValueError(f"{self.code_grid ** 2} code positions do not fit max_text_len={self.max_text_len}")

    @property
    def n_image_codes(self) -> int:
        """Codes per image (256 for a 16x16 grid)."""
        return self.code_grid ** 2


class M6T2I(M6Model):
    """M6 with image codes as extra vocabulary (M6 §4.1): encoder = prompt, decoder = [BOS] + codes.

    ``forward(None, prompt_ids, code_input_ids, labels)`` is M6's forward; use :meth:`codes_to_ids` /
    :meth:`ids_to_codes` between VQGAN code indices (0 .. n_codes-1) and the model's ids.
    """

    config: M6T2IConfig

    def __init__(self, config: M6T2IConfig, **kwargs):
        super().__init__(config, **kwargs)

    @classmethod
    def from_pretrained_m6(cls, m6: M6Model, n_codes: int = 256, code_grid: int = 8, seed: int = 0) -> "M6T2I":
        """M6 §4.1 "we add code embedding and output layers to the pretrained M6": every pretrained weight is
        copied; the ``n_codes`` new embedding rows (= tied output rows) start at BERT's N(0, 0.02)."""
        c = m6.config
        base = {f.name: getattr(c, f.name) for f in fields(M6Config) if f.name not in ("model_type", "vocab_size")}
        cfg = M6T2IConfig(**base, vocab_size=c.vocab_size + n_codes, code_offset=c.vocab_size, n_codes=n_codes,
                          code_grid=code_grid)
        torch.manual_seed(seed)
        model = cls(cfg)
        sd = m6.state_dict()
        own = model.state_dict()
        for k, v in sd.items():
            if k in ("wte.weight", "lm_head.weight"):
                own[k][: c.vocab_size] = v                      # word rows; code rows keep their fresh init
            elif k in own:
                own[k].copy_(v)
        model.load_state_dict(own)
        return model

    @property
    def code_ids(self) -> range:
        c = self.config
        return range(c.code_offset, c.code_offset + c.n_codes)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQGAN codes (B, h, w) or (B, h*w) -> model ids (B, h*w)."""
        return codes.reshape(codes.shape[0], -1).long() + self.config.code_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Model ids (B, g*g) -> VQGAN codes (B, g, g); raises if an id is not a code."""
        c = self.config
        codes = ids.long() - c.code_offset
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c.n_codes):
            raise ValueError("ids_to_codes got word ids; generate with CodeOnlyProcessor so every id is a code")
        return codes.view(ids.shape[0], c.code_grid, c.code_grid)


# ---------------------------------------------------------------------------------------------------------
# Registration and presets (Table 4)
# ---------------------------------------------------------------------------------------------------------

register_model("m6", M6Config, M6Model)

# Trains on 2 CPU cores in minutes on 32 px world images: 16 visual tokens + ~15 caption tokens, ~1M params.
register_preset("m6-tiny", lambda: M6Config())
# m6-tiny reading one code token per world cell (M6Model.with_cell_code): the shipped m6-tiny-vqa (issue 12)
register_preset("m6-tiny-cells", lambda: M6Config(visual_tokens="cells"))

# Full size (Table 4). What the paper does not give is assumed as explained in scaled/configs/m6_base.yaml
# (same values): BERT-Chinese's 21128 WordPiece ids + the [BOS]/[EOS] that mmkit.tokenizer.load_tokenizer
# appends to it (ids 21128, 21129); d_ff = 4 d_model; 512 text positions; 224 px images -> 7x7 features.
FULL_SIZE = dict(vocab_size=21130, pad_token_id=0, bos_token_id=21128, eos_token_id=21129, max_text_len=512,
                  dropout=0.1, image_size=224, feature_channels=(32, 64, 128, 256, 512),
                  feature_strides=(2, 2, 2, 2, 2))
# Table 4: M6-base, 24 layers, d_model 1024, 16 heads, 327M parameters.
register_preset("m6-base", lambda: M6Config(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, **FULL_SIZE))
# Table 4: M6-10B, 50 layers, d_model 4096, 128 heads, 10B parameters.
register_preset("m6-10b", lambda: M6Config(d_model=4096, n_layers=50, n_heads=128, d_ff=16384, **FULL_SIZE))

register_ffn("moe", _moe_ffn)
register_model("m6_moe", M6MoEConfig, M6Model)

# m6-tiny (4 blocks, d_model 128, d_ff 512) with 8 experts of d_ff 512 in blocks 1 and 3, top-1: the same active
# parameters per token as m6-tiny (1.00M), 2.84M in all.
register_preset("m6-tiny-moe", lambda: M6MoEConfig())
# Table 4: M6-100B = M6-base's 24 layers / 1024 / 16 heads with 1024 experts; scaled/configs/m6_100b.yaml says
# what is assumed. 103.3B parameters (+3.3%).
register_preset("m6-100b", lambda: M6MoEConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, n_experts=1024,
                                               **FULL_SIZE))

register_model("m6_itm", M6ITMConfig, M6ForImageTextMatching)
register_preset("m6-tiny-itm", lambda: M6ITMConfig())

register_model("m6-t2i", M6T2IConfig, M6T2I)
# m6-tiny's architecture with the 512 codes of vqgan-world added, 16x16 codes per image (what from_pretrained_m6
# builds from m6-tiny-pretrained and the shipped tokenizer)
register_preset("m6-tiny-t2i", lambda: M6T2IConfig(vocab_size=1024, n_codes=512, code_grid=16))

register_cached_forward(M6Model, M6Model.cached_step)
