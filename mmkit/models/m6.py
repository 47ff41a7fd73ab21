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

Sequence layout: *segment-aligned* as :func:`mmkit.masking.collate` builds it: ``Wv`` visual slots, then
``We`` encoder-text slots, then ``Wd`` decoder-text slots, each block padded at its own end. Positions are
counted inside each block, so a token's embedding never depends on how the batch was padded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.config import register_model, register_preset
from mmkit.layers import (ConvFeatureExtractor, KVCache, PatchFeatures, PositionEmbedding, PositionEmbedding2D,
                          TransformerBlock, TypeEmbedding, init_weights)
from mmkit.masking import IGNORE_INDEX, SEG_DECODER, SEG_ENCODER, SEG_PAD, SEG_VISUAL, TaskBatch, unified_mask

__all__ = ["M6Config", "M6Model", "M6Output", "Generation", "FFN_FACTORIES", "register_ffn"]


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

    def __post_init__(self) -> None:
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
            self.grid_size = self.feature_extractor.grid_size(c.image_size)   # (h, w)
            self.patch_proj = nn.Identity()                                   # the extractor ends at width D
        else:
            self.feature_extractor = feature_extractor
            feat_dim, self.grid_size = _probe_extractor(feature_extractor, c)
            self.patch_proj = nn.Linear(feat_dim, D)                          # F -> D
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
                                 "the module that calls mmkit.models.m6.register_ffn for it first.")
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
        images = (images - self.image_mean) / self.image_std                      # [0, 1] -> about [-1, 1]
        feats, grid = _as_features(self.feature_extractor(images))                # (B, N, F), (h, w)
        if tuple(grid) != tuple(self.grid_size):
            raise ValueError(f"the feature extractor gave a {grid[0]}x{grid[1]} grid, expected "
                             f"{self.grid_size[0]}x{self.grid_size[1]}")
        v = self.patch_proj(feats)                                                 # (B, N, D)
        # M6 §3.1 "line up the representations to a sequence by their positions" (+ where each one sits)
        return v + self.pos_emb_2d(self.grid_size) + self.segment_emb(SEG_VISUAL)  # (B, N, D)

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
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / (labels != IGNORE_INDEX).sum().clamp(min=1)
            if aux is not None:
                loss = loss + self.config.aux_loss_weight * aux
        return M6Output(loss, logits, h, aux)

    def forward_batch(self, batch: TaskBatch, images: torch.Tensor | None = None) -> M6Output:
        """``forward`` on a :class:`mmkit.masking.TaskBatch` (from ``masking.collate``) and its images.

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
        was_training = self.training
        self.eval()
        try:
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
                nxt = self._pick(logits, out_ids, do_sample, temperature, top_k, top_p, generator,
                                 logits_processor)                                          # (B,)
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
        finally:
            self.train(was_training)
        return Generation(torch.stack(out_ids, dim=1), torch.stack(out_logits, dim=1))

    @staticmethod
    def _pick(logits, out_ids, do_sample, temperature, top_k, top_p, generator, logits_processor):
        if logits_processor is not None:
            so_far = torch.stack(out_ids, 1) if out_ids else logits.new_zeros(logits.shape[0], 0, dtype=torch.long)
            logits = logits_processor(so_far, logits)
        if not do_sample:
            return logits.argmax(dim=-1)                                              # greedy
        logits = logits / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]   # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, idx = logits.sort(dim=-1, descending=True)
            p = srt.softmax(dim=-1)
            drop = p.cumsum(dim=-1) - p >= top_p        # tokens after the nucleus already reached top_p
            logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)          # (B,)


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
    was_training = extractor.training
    extractor.eval()
    try:
        feats, grid = _as_features(extractor(torch.zeros(1, c.in_channels, c.image_size, c.image_size,
                                                         device=device)))   # only shapes are read
    finally:
        extractor.train(was_training)
    return feats.shape[-1], (int(grid[0]), int(grid[1]))


# ---------------------------------------------------------------------------------------------------------
# Registration and presets (Table 4)
# ---------------------------------------------------------------------------------------------------------

register_model("m6", M6Config, M6Model)

# Trains on 2 CPU cores in minutes on 32 px world images: 16 visual tokens + ~15 caption tokens, ~1M params.
register_preset("m6-tiny", lambda: M6Config())

# Full size (Table 4). What the paper does not give is assumed as explained in scaled/configs/m6_base.yaml
# (same values): BERT-Chinese's 21128 WordPiece ids + the [BOS]/[EOS] that mmkit.tokenizer.load_tokenizer
# appends to it (ids 21128, 21129); d_ff = 4 d_model; 512 text positions; 224 px images -> 7x7 features.
_FULL_SIZE = dict(vocab_size=21130, pad_token_id=0, bos_token_id=21128, eos_token_id=21129, max_text_len=512,
                  dropout=0.1, image_size=224, feature_channels=(32, 64, 128, 256, 512),
                  feature_strides=(2, 2, 2, 2, 2))
# Table 4: M6-base, 24 layers, d_model 1024, 16 heads, 327M parameters.
register_preset("m6-base", lambda: M6Config(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, **_FULL_SIZE))
# Table 4: M6-10B, 50 layers, d_model 4096, 128 heads, 10B parameters.
register_preset("m6-10b", lambda: M6Config(d_model=4096, n_layers=50, n_heads=128, d_ff=16384, **_FULL_SIZE))
