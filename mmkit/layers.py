"""The shared layers every mmkit model composes: written once, tested against Hugging Face modules.

Contents (top to bottom):

* mask helpers         ``causal_mask``, ``padding_mask``, ``combine_masks``, ``to_additive``, ``check_mask``
* ``KVCache``          one layer's cached keys/values for incremental decoding
* ``MultiHeadAttention`` self- or cross-attention on ``F.scaled_dot_product_attention``
* ``FeedForward``      the position-wise MLP
* ``TransformerBlock`` self-attention, optional cross-attention, pluggable FFN; pre- or post-norm
* ``PatchEmbedding``   ViT / VLMo linear patch projection
* ``ConvFeatureExtractor`` M6's CNN patch features (a laptop-scale stand-in for ResNet-50)
* ``PositionEmbedding``, ``PositionEmbedding2D``, ``TypeEmbedding``
* ``init_weights``     BERT-style initialisation

Mask convention (the ``scaled_dot_product_attention`` one, used everywhere in the kit): a boolean mask is
True where a query **may attend** to a key, and broadcasts to ``(B, heads, L_q, L_k)``. A float mask is
*additive*: 0 where allowed, ``-inf`` where not (any other finite bias is simply added to the scores).

Shapes: B batch, L sequence length, D model width, H heads, hd = D // H head width.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "causal_mask", "padding_mask", "combine_masks", "to_additive", "check_mask",
    "KVCache", "MultiHeadAttention", "FeedForward", "TransformerBlock",
    "PatchEmbedding", "ConvFeatureExtractor", "PatchFeatures",
    "PositionEmbedding", "PositionEmbedding2D", "TypeEmbedding", "init_weights",
]


# ---------------------------------------------------------------------------------------------------------
# Masks: bool, True = may attend, broadcastable to (B, heads, L_q, L_k)
# ---------------------------------------------------------------------------------------------------------

def causal_mask(L: int, device: torch.device | str | None = None, *, offset: int = 0) -> torch.Tensor:
    """Lower-triangular ``(L, offset + L)`` bool mask: query i may see keys 0 .. offset + i.

    ``offset`` is the number of positions already in a KV cache: the L new queries sit at absolute
    positions ``offset .. offset + L - 1`` and the keys cover ``0 .. offset + L - 1``. With ``offset=0``
    this is the usual ``(L, L)`` GPT mask::

        causal_mask(3) = [[1, 0, 0],
                          [1, 1, 0],
                          [1, 1, 1]]
    """
    q_pos = torch.arange(offset, offset + L, device=device)[:, None]  # (L, 1) absolute query positions
    k_pos = torch.arange(offset + L, device=device)[None, :]          # (1, offset + L)
    return k_pos <= q_pos                                              # (L, offset + L)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Turn a ``(B, L)`` key mask (1/True = real token, 0/False = padding) into a ``(B, 1, 1, L)`` bool mask.

    The singleton dims broadcast over heads and queries: every query may attend to every real key.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"padding_mask expects a (B, L) 0/1 attention_mask, got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("padding_mask expects 0/1 values (1 = real token, 0 = padding); got other values. "
                             "An additive (0 / -inf) mask needs no conversion: pass it to attention directly.")
        attention_mask = attention_mask != 0
    return attention_mask[:, None, None, :]  # (B, 1, 1, L)


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical AND of broadcastable bool masks (a position is allowed only if every mask allows it).

    ``None`` entries are ignored; returns ``None`` when all are ``None``. E.g. ``combine_masks(causal_mask(L),
    padding_mask(am))`` gives a ``(B, 1, L, L)`` decoder mask.
    """
    present = [m for m in masks if m is not None]
    for m in present:
        if m.dtype != torch.bool:
            raise TypeError(f"combine_masks takes bool masks (True = may attend), got dtype {m.dtype}; "
                            "combine additive masks by adding them instead")
    if not present:
        return None
    return functools.reduce(torch.logical_and, present)


def to_additive(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Bool mask -> additive float mask (0 where True, ``-inf`` where False); float masks pass through (cast)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.is_floating_point():
        return mask.to(dtype)
    raise TypeError(f"to_additive takes a bool or float mask, got dtype {mask.dtype}")


def check_mask(mask: torch.Tensor, batch_size: int, n_heads: int, L_q: int, L_k: int,
               name: str = "mask") -> torch.Tensor:
    """Check that ``mask`` is bool or additive float and broadcasts to ``(B, heads, L_q, L_k)``; return it 4-D.

    Raises a ``ValueError`` / ``TypeError`` that names the expected shape and how to build it.
    """
    expected = (batch_size, n_heads, L_q, L_k)
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"{name} has dtype {mask.dtype}; pass a bool mask (True = may attend) or an additive float "
                        "mask (0 / -inf). padding_mask() converts a (B, L) 0/1 attention_mask.")
    ok = mask.dim() <= 4 and all(m in (1, e) for m, e in zip(reversed(mask.shape), reversed(expected)))
    if not ok:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, which does not broadcast to (B, heads, L_q, L_k) = {expected}. "
            "Build (B, 1, 1, L_k) key-padding masks with padding_mask(attention_mask), (L, L) causal masks with "
            "causal_mask(L), and AND them with combine_masks().")
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b, h, l_q, l_k) with b,h,l_q in {1, full}


# ---------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------

class KVCache:
    """One layer's cached keys and values for incremental (token-by-token) decoding.

    A decoder keeps one ``KVCache`` per layer (``caches = [KVCache() for _ in blocks]``) and passes
    ``cache=caches[i]`` to block i. It holds two things:

    * ``key`` / ``value``: self-attention keys/values, ``(B, heads, L, head_dim)``, that grow by the new
      positions each step (``append``): a new token attends to every earlier one without recomputing them;
    * ``cross_key`` / ``cross_value``: cross-attention keys/values of the context (image, encoder output),
      computed on the first step and reused afterwards: the context does not change while decoding.
    """

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None          # (B, H, L, hd)
        self.value: torch.Tensor | None = None        # (B, H, L, hd)
        self.cross_key: torch.Tensor | None = None    # (B, H, L_ctx, hd)
        self.cross_value: torch.Tensor | None = None  # (B, H, L_ctx, hd)

    @property
    def length(self) -> int:
        """Number of cached self-attention positions (the position offset of the next token)."""
        return 0 if self.key is None else self.key.shape[2]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new ``(B, H, L_new, hd)`` keys/values; return all keys/values so far ``(B, H, L + L_new, hd)``."""
        if self.key is None:
            self.key, self.value = key, value
        else:
            if key.shape[:2] != self.key.shape[:2] or key.shape[3] != self.key.shape[3]:
                raise ValueError(f"KVCache holds keys of shape {tuple(self.key.shape)} (B, heads, L, head_dim); "
                                 f"cannot append keys of shape {tuple(key.shape)}")
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value

    def reset(self) -> None:
        """Forget everything (start a new sequence)."""
        self.key = self.value = self.cross_key = self.cross_value = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows: ``index`` (B',) selects rows (beam search: the surviving beams' parents)."""
        for name in ("key", "value", "cross_key", "cross_value"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))

    def __repr__(self) -> str:
        cross = None if self.cross_key is None else tuple(self.cross_key.shape)
        return f"KVCache(length={self.length}, cross={cross})"


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017) on ``F.scaled_dot_product_attention``.

    * self-attention: ``attn(x)``, queries, keys and values all come from ``x`` (B, L, D);
    * cross-attention: ``attn(x, context)``, keys/values come from ``context`` (B, L_k, kv_dim), e.g. image
      patches attended to by text (mPLUG §3.2 eq. (2), decoders).

    ``mask`` is a bool (True = may attend) or additive float mask broadcastable to (B, H, L_q, L_k).
    ``is_causal`` (self-attention only) adds the causal mask, offset correctly when a cache holds earlier
    positions. ``cache`` is a :class:`KVCache` for this layer: self-attention appends the new keys/values;
    cross-attention computes the context keys/values once and reuses them.

    Fully-masked rows: a query whose mask allows no key has nothing to average. Softmax over an empty set is
    0/0 (NaN with ``-inf`` masks), so such rows are defined as attending to nothing: their per-head
    attention result is 0 and, when no head may attend, the module's output for that row is exactly 0 (in
    a residual block the token then passes through unchanged).

    Separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` Linear layers (not a fused qkv) so weights copy
    one-to-one from Hugging Face BERT/ViT modules.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 kv_dim: int | None = None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads dividing d_model")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.kv_dim = d_model if kv_dim is None else kv_dim  # width of the context in cross-attention
        self.dropout = dropout                                 # on the attention probabilities (training only)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(self.kv_dim, d_model, bias=bias)
        self.v_proj = nn.Linear(self.kv_dim, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, L, D) -> (B, H, L, hd)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"attention input must be (B, L, d_model={self.d_model}), got {tuple(x.shape)}")
        B, L_q, D = x.shape
        q = self._heads(self.q_proj(x))                                     # (B, H, L_q, hd)

        if context is None:                                                 # self-attention
            if self.kv_dim != self.d_model:
                raise ValueError(f"this attention was built for cross-attention (kv_dim={self.kv_dim}); pass context")
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))  # (B, H, L_q, hd)
            if cache is not None:
                k, v = cache.append(k, v)                                   # (B, H, past + L_q, hd)
        else:                                                               # cross-attention
            if is_causal:
                raise ValueError("is_causal applies to self-attention only; cross-attention sees the whole context")
            if cache is not None and cache.cross_key is not None:
                k, v = cache.cross_key, cache.cross_value                   # context projected on step 1
            else:
                if context.dim() != 3 or context.shape[-1] != self.kv_dim or context.shape[0] != B:
                    raise ValueError(f"context must be (B={B}, L_k, kv_dim={self.kv_dim}), got {tuple(context.shape)}"
                                     "; set kv_dim to the context width when building the attention")
                k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))  # (B, H, L_k, hd)
                if cache is not None:
                    cache.cross_key, cache.cross_value = k, v
        L_k = k.shape[2]

        attn_mask, dead, sdpa_causal = self._attention_mask(mask, is_causal, B, L_q, L_k, q)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=sdpa_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, L_q, hd)
        if dead is not None:
            y = y.masked_fill(dead, 0.0)                                    # empty rows attend to nothing
        y = self.out_proj(y.transpose(1, 2).reshape(B, L_q, D))             # (B, L_q, D)
        if dead is not None:
            y = y.masked_fill(dead.all(dim=1), 0.0)                         # (b, L_q, 1): no head may attend
        return y

    def _attention_mask(self, mask, is_causal, B, L_q, L_k, q):
        """Merge ``mask`` and ``is_causal`` into one SDPA mask; find fully-masked rows (``dead``, (b, h, L_q, 1))."""
        if mask is None and (not is_causal or L_q == L_k):
            return None, None, is_causal  # fast path: SDPA's own (top-left aligned) causal mask is right here
        if mask is not None:
            mask = check_mask(mask, B, self.n_heads, L_q, L_k)
            if mask.is_floating_point():
                mask = mask.to(q.dtype)
        if is_causal:  # explicit mask: the L_q new queries are the last L_q of the L_k positions
            causal = causal_mask(L_q, q.device, offset=L_k - L_q)          # (L_q, L_k)
            if mask is None:
                mask = causal[None, None]
            elif mask.dtype == torch.bool:
                mask = mask & causal
            else:
                mask = torch.where(causal, mask, float("-inf"))
        if mask.dtype == torch.bool:
            dead = ~mask.any(dim=-1, keepdim=True)                          # (b, h, l_q, 1)
            fixed = mask | dead  # let dead rows attend anywhere (finite), then zero their output
        else:
            dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
            fixed = mask.masked_fill(dead, 0.0)
        if not dead.any():
            return mask, None, False
        return fixed, dead, False


# ---------------------------------------------------------------------------------------------------------
# Feed-forward
# ---------------------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "gelu": nn.GELU,                                     # exact (erf) GELU: BERT, ViT, VLMo
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),  # GPT-2's tanh approximation
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


class FeedForward(nn.Module):
    """Position-wise MLP: ``fc2(dropout(act(fc1(x))))``, (B, L, D) -> (B, L, D).

    ``dropout`` is on the hidden activation; the residual dropout lives in :class:`TransformerBlock`.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))  # (B, L, d_ff) inside, (B, L, D) out


# ---------------------------------------------------------------------------------------------------------
# Transformer block
# ---------------------------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, then a feed-forward network, each with a residual.

    ``norm_first=True`` (pre-norm: GPT, ViT, VLMo §3.2 eq. (1)-(2))::

        x = x + SA(LN(x));  x = x + CA(LN(x), context);  x = x + FFN(LN(x))

    ``norm_first=False`` (post-norm: BERT, mPLUG §3.2 eq. (1)-(3))::

        x = LN(x + SA(x));  x = LN(x + CA(x, context));  x = LN(x + FFN(x))

    The FFN is pluggable: pass ``ffn=`` any module mapping (B, L, D) -> (B, L, D), e.g. a Mixture-of-Experts
    layer (M6 §3.4) or VLMo's modality experts (VLMo §3.2). Extra inputs it needs (modality ids, a routing
    hint) go through ``forward(..., ffn_kwargs={...})`` and arrive as ``ffn(h, **ffn_kwargs)``. An FFN with
    side outputs (e.g. a load-balancing loss) should store them on itself and return only the tensor, so
    every block keeps the same ``x -> x`` signature.

    With ``cross_attention=True`` the block skips cross-attention when called without ``context``
    (a text-only pass through a fusion layer, as in BLIP/mPLUG text encoders).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, dropout: float = 0.0,
                 attn_dropout: float | None = None, activation: str = "gelu", norm_first: bool = True,
                 layer_norm_eps: float = 1e-5, cross_attention: bool = False, kv_dim: int | None = None,
                 bias: bool = True, ffn: nn.Module | None = None):
        super().__init__()
        self.norm_first = norm_first
        attn_dropout = dropout if attn_dropout is None else attn_dropout
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, bias)
        self.self_attn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, bias, kv_dim=kv_dim)
            self.cross_attn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        else:
            self.cross_attn = self.cross_attn_norm = None
        self.ffn = ffn if ffn is not None else FeedForward(d_model, d_ff or 4 * d_model, activation)
        self.ffn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)  # on each sublayer's output, before the residual add

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, is_causal: bool = False, cache: KVCache | None = None,
                ffn_kwargs: dict | None = None) -> torch.Tensor:
        """x (B, L, D); mask for self-attention; context (B, L_k, kv_dim) and context_mask for cross-attention."""
        x = self._residual(x, self.self_attn_norm,
                           lambda h: self.self_attn(h, mask=mask, is_causal=is_causal, cache=cache))
        if context is not None:
            if self.cross_attn is None:
                raise ValueError("context was given but this TransformerBlock has no cross-attention; "
                                 "build it with cross_attention=True")
            x = self._residual(x, self.cross_attn_norm,
                               lambda h: self.cross_attn(h, context, mask=context_mask, cache=cache))
        return self._residual(x, self.ffn_norm, lambda h: self.ffn(h, **(ffn_kwargs or {})))  # (B, L, D)


# ---------------------------------------------------------------------------------------------------------
# Image inputs
# ---------------------------------------------------------------------------------------------------------

def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbedding(nn.Module):
    """Split an image into P x P patches and project each linearly to D (ViT; VLMo §3.1; mPLUG §3.1).

    VLMo §3.1: the image (C, H, W) becomes N = HW / P^2 patches of P^2 C values, each multiplied by a
    (P^2 C) x D matrix. A Conv2d with kernel = stride = P computes exactly that linear map on every
    non-overlapping patch (same weights, just stored as (D, C, P, P)), so we use one. Output (B, N, D), the
    patches in row-major (raster) order; ``grid_size`` = (H/P, W/P).
    """

    def __init__(self, image_size: int | tuple[int, int], patch_size: int | tuple[int, int],
                 in_channels: int = 3, *, d_model: int):
        super().__init__()
        self.image_size, self.patch_size = _pair(image_size), _pair(patch_size)
        (H, W), (P, Q) = self.image_size, self.patch_size
        if H % P or W % Q:
            raise ValueError(f"image_size {H}x{W} is not divisible by patch_size {P}x{Q}; choose a patch size "
                             "that divides the image size, or resize the images")
        self.in_channels = in_channels
        self.grid_size = (H // P, W // Q)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, *self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"PatchEmbedding expects images of shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(images.shape)}; resize the images or build it with that image_size")
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


class PatchFeatures(NamedTuple):
    features: torch.Tensor          # (B, N, D), N = h * w grid cells in row-major order
    grid_size: tuple[int, int]      # (h, w)


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels at each pixel of a (B, C, H, W) map: batch-independent and local."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # normalise C, keep (B, C, H, W)


class ConvFeatureExtractor(nn.Module):
    """A small CNN that turns an image into a grid of patch features, lined up as a sequence (M6 §3.1).

    M6 §3.1 splits an image into patches, extracts each patch's features with a trained feature extractor
    (ResNet-50) and lines them up by position. At laptop scale a few strided conv stages stand in for the
    ResNet: each stage is conv3x3(stride s) -> LayerNorm over channels -> ReLU, so the output grid is the
    image downsampled by prod(strides) and cell (i, j) describes the patch under its receptive field. The norm
    is per pixel (not BatchNorm/GroupNorm), so a cell's features depend only on nearby pixels, never on batch
    or whole-image statistics. Neighbouring cells share some context (their receptive fields overlap), unlike
    running the CNN on each cropped patch; the result is the same kind of sequence. A 1x1 conv projects each
    cell to ``d_model``.

    ``forward(images)`` -> :class:`PatchFeatures` ``(features (B, N, D), grid_size (h, w))``.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64),
                 strides: tuple[int, ...] | None = None, *, d_model: int):
        super().__init__()
        strides = tuple(strides) if strides is not None else (2,) * len(channels)  # halve per stage by default
        if len(strides) != len(channels):
            raise ValueError(f"strides {strides} and channels {tuple(channels)} must have the same length "
                             "(one per stage)")
        self.strides, self.in_channels = strides, in_channels
        layers, c_in = [], in_channels
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1), _ChannelLayerNorm(c), nn.ReLU()]
            c_in = c
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, d_model, kernel_size=1)  # per-cell linear map to the model width

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The (h, w) feature grid for an image of ``image_size``: N = h * w positions to embed."""
        h, w = _pair(image_size)
        for s in self.strides:
            h, w = (h - 1) // s + 1, (w - 1) // s + 1  # conv3x3, padding 1: ceil(size / s)
        return h, w

    def forward(self, images: torch.Tensor) -> PatchFeatures:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"ConvFeatureExtractor expects images (B, C={self.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        f = self.proj(self.stages(images))                       # (B, D, h, w)
        return PatchFeatures(f.flatten(2).transpose(1, 2), (f.shape[2], f.shape[3]))  # (B, h*w, D)


# ---------------------------------------------------------------------------------------------------------
# Position and type embeddings
# ---------------------------------------------------------------------------------------------------------

class PositionEmbedding(nn.Module):
    """Learned absolute 1-D position embeddings (BERT; VLMo §3.1 V_pos and T_pos).

    ``pe(L)`` returns (1, L, D) for positions 0..L-1; ``pe(L, offset=cache.length)`` for the L new tokens of an
    incremental decoding step; ``pe(position_ids=ids)`` (B, L) for arbitrary positions. Add the result to the
    token embeddings.
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, d_model) * 0.02)  # (max_len, D)

    def forward(self, length: int | None = None, offset: int = 0,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is not None:
            hi = int(position_ids.max()) if position_ids.numel() else -1
            if hi >= self.max_len or (position_ids.numel() and int(position_ids.min()) < 0):
                raise ValueError(f"position id {hi} is outside 0..{self.max_len - 1} (max_len={self.max_len}); "
                                 "raise max_len in the config or truncate the inputs")
            return self.weight[position_ids]                     # (B, L, D)
        if length is None:
            raise ValueError("PositionEmbedding needs a length (and optional offset) or position_ids")
        if offset + length > self.max_len:
            raise ValueError(f"positions {offset}..{offset + length - 1} exceed max_len={self.max_len} of this "
                             "PositionEmbedding; raise max_len in the config or truncate the inputs")
        return self.weight[offset:offset + length].unsqueeze(0)  # (1, L, D)


class PositionEmbedding2D(nn.Module):
    """Learned 2-D position embeddings for a patch grid: ``row[i] + col[j]`` for the cell (i, j).

    Factorised rows/columns (h + w vectors instead of h * w) tell the model where a patch (or an M6 §3.1 CNN
    feature) sits in the image. ``pe2d()`` returns (1, h*w, D) in the same row-major order as
    :class:`PatchEmbedding` / :class:`ConvFeatureExtractor` output; ``pe2d((h, w))`` a smaller grid's top-left.
    """

    def __init__(self, grid_size: int | tuple[int, int], d_model: int):
        super().__init__()
        self.grid_size = _pair(grid_size)
        self.row = nn.Parameter(torch.randn(self.grid_size[0], d_model) * 0.02)  # (h, D)
        self.col = nn.Parameter(torch.randn(self.grid_size[1], d_model) * 0.02)  # (w, D)

    def forward(self, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        h, w = self.grid_size if grid_size is None else _pair(grid_size)
        if h > self.grid_size[0] or w > self.grid_size[1]:
            raise ValueError(f"grid {h}x{w} is larger than this PositionEmbedding2D's "
                             f"{self.grid_size[0]}x{self.grid_size[1]}; build it with a larger grid_size")
        pos = self.row[:h, None, :] + self.col[None, :w, :]   # (h, w, D)
        return pos.reshape(1, h * w, -1)                       # (1, h*w, D)


class TypeEmbedding(nn.Module):
    """Learned segment / modality type embeddings (BERT token types; M6 §3.1; VLMo §3.1 V_type, T_type).

    ``te(ids)`` with a (B, L) long tensor -> (B, L, D); ``te(1)`` with an int -> (1, 1, D) broadcasting over
    a whole sequence of one type (e.g. all image patches).
    """

    def __init__(self, n_types: int, d_model: int):
        super().__init__()
        self.n_types = n_types
        self.weight = nn.Parameter(torch.randn(n_types, d_model) * 0.02)  # (n_types, D)

    def forward(self, type_ids: torch.Tensor | int) -> torch.Tensor:
        if isinstance(type_ids, int):
            if not 0 <= type_ids < self.n_types:
                raise ValueError(f"type id {type_ids} is outside 0..{self.n_types - 1} (n_types={self.n_types})")
            return self.weight[type_ids].view(1, 1, -1)        # (1, 1, D)
        if type_ids.numel() and (int(type_ids.min()) < 0 or int(type_ids.max()) >= self.n_types):
            raise ValueError(f"type ids must lie in 0..{self.n_types - 1} (n_types={self.n_types}), got values "
                             f"{int(type_ids.min())}..{int(type_ids.max())}")
        return self.weight[type_ids]                           # (B, L, D)


# ---------------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT-style init of ``module`` and all its submodules; returns ``module``. Call it once on the root.

    Linear / conv / embedding weights ~ N(0, std) (BERT's ``initializer_range``), biases 0, norms to
    weight 1 / bias 0, embedding padding rows 0. Small, uniform std keeps deep stacks stable at start.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (PositionEmbedding, TypeEmbedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, PositionEmbedding2D):
            nn.init.normal_(m.row, mean=0.0, std=std)
            nn.init.normal_(m.col, mean=0.0, std=std)
    return module
