"""The Transformer block every mmkit model stacks: pre- or post-norm, optional cross-attention, pluggable FFN.

* ``FeedForward``      the position-wise MLP (``ACTIVATIONS`` names its non-linearities)
* ``TransformerBlock`` self-attention, optional cross-attention, pluggable FFN; pre- or post-norm
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from mmkit.nn.attention import KVCache, MultiHeadAttention

__all__ = ["ACTIVATIONS", "FeedForward", "TransformerBlock"]


# ---------------------------------------------------------------------------------------------------------
# Feed-forward
# ---------------------------------------------------------------------------------------------------------

ACTIVATIONS = {
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
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = ACTIVATIONS[activation]()
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

    ``layer_scale_init`` (CaiT; BEiT, VLMo's official blocks): a learned per-channel gain γ on every sublayer's
    output, initialised to this value (BEiT / VLMo-Base: 0.1), so each residual branch starts small::

        x = x + γ_1 ⊙ SA(LN(x));  x = x + γ_2 ⊙ FFN(LN(x))          (pre-norm; post-norm scales alike)

    ``None`` (default) = no layer scale: the block is exactly the one above. ``ffn_norm=False`` leaves the
    normalisation before the FFN to the FFN itself: VLMo's modality experts each own a LayerNorm (the official
    ``norm2_imag`` / ``norm2_text`` / ``norm2_vl``), so the block must not add a shared one.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, dropout: float = 0.0,
                 attn_dropout: float | None = None, activation: str = "gelu", norm_first: bool = True,
                 layer_norm_eps: float = 1e-5, cross_attention: bool = False, kv_dim: int | None = None,
                 bias: bool = True, ffn: nn.Module | None = None, layer_scale_init: float | None = None,
                 ffn_norm: bool = True):
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
        self.ffn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if ffn_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)  # on each sublayer's output, before the residual add
        # layer scale γ (CaiT, BEiT): one learned gain per channel and sublayer; None = off (a plain block)
        self.self_attn_scale = self.cross_attn_scale = self.ffn_scale = None
        if layer_scale_init is not None:
            def gain() -> nn.Parameter:
                return nn.Parameter(torch.full((d_model,), float(layer_scale_init)))   # (D,)
            self.self_attn_scale = gain()
            self.cross_attn_scale = gain() if cross_attention else None
            self.ffn_scale = gain()

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer, scale: nn.Parameter | None = None) -> torch.Tensor:
        def branch(h: torch.Tensor) -> torch.Tensor:
            y = self.dropout(sublayer(h))
            return y if scale is None else scale * y                   # γ ⊙ sublayer (layer scale)
        if self.norm_first:
            return x + branch(norm(x))
        return norm(x + branch(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, is_causal: bool = False, cache: KVCache | None = None,
                ffn_kwargs: dict | None = None) -> torch.Tensor:
        """x (B, L, D); mask for self-attention; context (B, L_k, kv_dim) and context_mask for cross-attention."""
        x = self._residual(x, self.self_attn_norm,
                           lambda h: self.self_attn(h, mask=mask, is_causal=is_causal, cache=cache),
                           self.self_attn_scale)
        if context is not None:
            if self.cross_attn is None:
                raise ValueError("context was given but this TransformerBlock has no cross-attention; "
                                 "build it with cross_attention=True")
            x = self._residual(x, self.cross_attn_norm,
                               lambda h: self.cross_attn(h, context, mask=context_mask, cache=cache),
                               self.cross_attn_scale)
        return self._residual(x, self.ffn_norm, lambda h: self.ffn(h, **(ffn_kwargs or {})),
                              self.ffn_scale)                                                  # (B, L, D)
