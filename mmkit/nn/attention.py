"""Attention, written once for every mmkit model: boolean masks, a KV cache and multi-head attention.

* mask helpers         ``causal_mask``, ``padding_mask``, ``combine_masks``, ``to_additive``, ``check_mask``
* ``KVCache``          one layer's cached keys/values for incremental decoding
* ``MultiHeadAttention`` self- or cross-attention on ``F.scaled_dot_product_attention``

Mask convention (the ``scaled_dot_product_attention`` one, used everywhere in the kit): a boolean mask is
True where a query **may attend** to a key, and broadcasts to ``(B, heads, L_q, L_k)``. A float mask is
*additive*: 0 where allowed, ``-inf`` where not (any other finite bias is simply added to the scores).

Shapes: B batch, L sequence length, D model width, H heads, hd = D // H head width.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["causal_mask", "padding_mask", "combine_masks", "to_additive", "check_mask", "KVCache",
           "MultiHeadAttention"]


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

    def attention_probs(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                        is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``forward`` computes inside SDPA, spelled out for looking at (notebooks' forward walks, heat maps):
        ``probs = softmax(Q K^T / sqrt(d_h) + mask)`` (B, H, L_q, L_k), 0 in rows with no key to attend to, and the
        output ``out_proj(probs V)`` (B, L_q, D), equal to ``forward(x, context, mask, is_causal)`` without dropout
        (no KV cache). Same arguments and mask convention as ``forward``."""
        if context is not None and is_causal:
            raise ValueError("is_causal applies to self-attention only; cross-attention sees the whole context")
        B, L_q, _ = x.shape
        ctx = x if context is None else context
        q = self._heads(self.q_proj(x))                                     # (B, H, L_q, hd)
        k, v = self._heads(self.k_proj(ctx)), self._heads(self.v_proj(ctx))  # (B, H, L_k, hd)
        attn_mask, dead, sdpa_causal = self._attention_mask(mask, is_causal, B, L_q, k.shape[2], q)
        if sdpa_causal and attn_mask is None:                               # forward's fast path: SDPA's causal mask
            attn_mask = causal_mask(L_q, q.device)[None, None]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)       # (B, H, L_q, L_k)
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        probs = scores.softmax(-1)
        if dead is not None:
            probs = probs.masked_fill(dead, 0.0)                            # empty rows attend to nothing
        y = self.out_proj((probs @ v).transpose(1, 2).reshape(B, L_q, self.d_model))   # (B, L_q, D)
        if dead is not None:
            y = y.masked_fill(dead.all(dim=1), 0.0)
        return probs, y

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
