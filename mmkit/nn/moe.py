"""Mixture-of-Experts feed-forward layer (M6 §3.4), and expert parallelism over ``torch.distributed``.

    moe = MoEFeedForward(MoEConfig(d_model=128, d_ff=512, n_experts=8, top_k=1, capacity_factor=1.25))
    y = moe(x)                        # (B, L, D) or (N, D) -> same shape: a drop-in replacement for the FFN
    loss = task_loss + moe.aux_loss   # weighted load-balancing + router z-loss of this call
    loss = task_loss + moe_aux_loss(model)   # the same, summed over every MoE layer of a model
    moe.last_stats                    # MoEStats: tokens per expert, dropped fraction, gate entropy, losses

    block = TransformerBlock(d_model, n_heads, ffn=MoEFeedForward(cfg))   # an MoE transformer layer

What the layer computes, for every token x (M6 §3.4)
----------------------------------------------------
* the gate: logits ``g(x) = x W_g`` (a linear layer, one logit per expert) and, eq. (1),
  ``p(x)_i = exp(g(x)_i) / sum_j exp(g(x)_j)``, the softmax over the m experts;
* top-k routing: T = the indices of the k largest p(x)_i (k = 1: Switch / M6-100B; k = 2: GShard, Mixtral);
  optionally the k chosen probabilities are renormalised to sum to 1 (Mixtral);
* eq. (2): ``y = sum_{i in T} p(x)_i E_i(x)``, each expert E_i being an MLP (``act(x W1) W2``, or the gated
  ``(act(x Wg) * (x Wu)) W2``: SwiGLU with silu, as in Mixtral).

Expert capacity and dropped tokens
----------------------------------
M6 §3.4 (after Switch, Fedus et al.): an expert processes at most ``C = N * c / m`` tokens, N the tokens
in the batch (here: the tokens of one call, all B*L of them, form ONE group), c the capacity factor, m the
number of experts; we round up, ``C = ceil(N * c / m)``. ``capacity_factor=None`` means no capacity (nothing
is dropped, as in Mixtral). Assignments beyond capacity are *dropped*: that expert contributes 0 to that
token, so in a residual block ``x + MoE(LN(x))`` the token is carried on by the residual connection alone.

Which assignments win a place (GShard's priority): all first choices before any second choice, and within
a choice, in token order (token 0 first). For top-2, C counts assignments, and each token makes two, so a
capacity factor of 2 is the "no slack" value there (GShard writes C = 2N/m).

Auxiliary losses (returned in ``self.aux_loss``, already weighted)
-------------------------------------------------------------------
* load balancing (Switch §2.2 eq. (4); GShard): ``aux = m * sum_i f_i * P_i``, with f_i the fraction of
  tokens whose top-k choices include expert i (counted before capacity; for top-2 the f_i sum to 2, as in
  Hugging Face's Mixtral ``load_balancing_loss_func``) and P_i the mean gate probability of expert i.
  It is 1 (top-1) when routing is uniform; only P carries a gradient.
* router z-loss (ST-MoE, Zoph et al. 2022): ``z = mean_x (logsumexp_i g(x)_i)^2``, keeps the logits small.
* ``aux_loss = aux_loss_coef * aux + z_loss_coef * z``.

Jitter (Switch): in training only, the gate sees ``x * U(1 - eps, 1 + eps)`` (multiplicative noise); the
experts always see the clean x.

Dispatch on a CPU (no dense one-hot S x E x C tensors)
-------------------------------------------------------
1. flatten the (token, choice) assignments choice-major, ``argsort`` them by expert id (a *stable* sort,
   so inside an expert they stay in priority order), and keep those whose rank inside the expert is < C;
2. ``index_select`` the kept tokens: one (S, D) matrix in which each expert's tokens are contiguous;
3. run every expert once on its slice (``Experts``: weights stored batched, (m, D, F) and (m, F, D); one
   ``torch.nn.functional.grouped_mm`` call for all experts, or a Python loop of matmuls, or a ``bmm`` on
   padded buckets - ``mmkit bench moe`` measures which is faster);
4. multiply each row by its gate probability and ``index_add_`` it back to its token.

Expert parallelism (:class:`ExpertParallelMoE`)
-----------------------------------------------
M6 §3.4: "the parameters of experts do not share across workers, while those of other parts are identical
across workers", with all-to-all communication to dispatch tokens and combine them. Each of W processes
holds m / W experts and routes its own tokens with the replicated gate; the tokens travel to the process
holding their expert with ``all_to_all_single`` (uneven splits), the local experts run, and a second
all-to-all brings the results home. Both exchanges are differentiable (:class:`_AllToAll`: the backward
of an all-to-all is the reverse all-to-all). Capacity is that of the *global* batch (the concatenation of
all processes' tokens, rank 0 first), exactly as the single-process layer on that batch: see the class.

Local gradient clipping (M6 §3.4): ``mmkit.train.local_clip_fn(is_expert_param)`` clips expert parameters
by their own norm on each process, without the communication a global norm would need.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmkit.nn.blocks import ACTIVATIONS

__all__ = [
    "MoEConfig", "MoEFeedForward", "ExpertParallelMoE", "Experts", "MoEStats", "Routing", "DispatchPlan",
    "expert_capacity", "route", "dispatch_plan", "load_balancing_loss", "router_z_loss", "is_expert_param", "moe_aux_loss",
    "expert_parallel_param_names", "ddp_ignore_expert_params", "all_to_all",
]

BACKENDS = ("auto", "grouped_mm", "loop", "bmm")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

@dataclass
class MoEConfig:
    d_model: int = 128                     # token width D (input and output of the layer)
    d_ff: int = 512                        # hidden width F of ONE expert (a dense FFN with the same active parameters has d_ff * top_k)
    n_experts: int = 8                     # m, the number of experts (M6-100B: 1024 per layer)
    top_k: int = 1                         # experts per token: 1 (Switch, M6-100B) or 2 (GShard, Mixtral)
    capacity_factor: float | None = 1.25   # c in C = ceil(N*c/m) (Switch trains with 1.0-1.25); None: no capacity, nothing dropped
    renormalize: bool = False              # rescale the k chosen probabilities to sum to 1 (Mixtral); False: raw softmax values (M6 eq. (2), Switch)
    aux_loss_coef: float = 0.01            # weight of the load-balancing loss m * sum_i f_i P_i (Switch's alpha = 0.01)
    z_loss_coef: float = 0.0               # weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE uses 1e-3)
    jitter_noise: float = 0.0              # training only: the gate sees x * U(1-eps, 1+eps) (Switch); 0: off
    activation: str = "gelu"               # expert non-linearity: gelu, gelu_tanh, relu, silu
    gated: bool = False                    # True: GLU experts (act(x Wg) * (x Wu)) W2 - SwiGLU with "silu" (Mixtral)
    bias: bool = False                     # biases in the expert MLPs (Switch and Mixtral have none)
    router_bias: bool = False              # bias in the gate's linear layer
    dropout: float = 0.0                   # dropout on the expert hidden activation (training only)
    backend: str = "auto"                  # expert matmuls: "grouped_mm" (one fused call), "loop", "bmm" (padded buckets); auto: grouped_mm when usable

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"MoEConfig: {msg}")
        need(self.d_model > 0 and self.d_ff > 0, f"d_model and d_ff must be positive, got {self.d_model}, {self.d_ff}")
        need(self.n_experts >= 1, f"n_experts must be >= 1, got {self.n_experts}")
        need(self.top_k in (1, 2) and self.top_k <= self.n_experts,
             f"top_k must be 1 or 2 (and <= n_experts={self.n_experts}), got {self.top_k}")
        need(self.capacity_factor is None or self.capacity_factor > 0,
             f"capacity_factor must be > 0, or None for no capacity limit; got {self.capacity_factor}")
        need(self.activation in ACTIVATIONS, f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.jitter_noise >= 0, f"jitter_noise must be >= 0, got {self.jitter_noise}")


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """M6 §3.4: ``C = N * c / m`` assignments per expert, rounded up; ``None`` (no limit) when c is None."""
    if capacity_factor is None:
        return None
    return math.ceil(n_tokens * capacity_factor / n_experts)


# ---------------------------------------------------------------------------------------------------------
# Routing: gate, top-k, capacity
# ---------------------------------------------------------------------------------------------------------

class Routing(NamedTuple):
    logits: torch.Tensor     # (N, m) gate logits g(x), float32
    probs: torch.Tensor      # (N, m) p(x) = softmax(g(x)), eq. (1)
    top_idx: torch.Tensor    # (N, k) chosen experts, best first
    top_w: torch.Tensor      # (N, k) their combine weights p(x)_i (renormalised to sum 1 if asked)


def route(logits: torch.Tensor, top_k: int, renormalize: bool = False) -> Routing:
    """Softmax over experts (M6 eq. (1)) and top-k selection (the set T of eq. (2))."""
    probs = logits.softmax(dim=-1)                                     # (N, m)
    if top_k == 1:
        top_w, top_idx = probs.max(dim=-1, keepdim=True)               # (N, 1): cheaper than topk
    else:
        top_w, top_idx = probs.topk(top_k, dim=-1)                     # (N, k) each, best first
    if renormalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, top_idx, top_w)


class DispatchPlan(NamedTuple):
    """Which (token, choice) assignments each expert processes: kept ones only, grouped by expert."""
    token: torch.Tensor      # (S,) token of each kept assignment; expert 0's first, then expert 1's, ...
    choice: torch.Tensor     # (S,) 0 = the token's first choice, 1 = second
    slot: torch.Tensor       # (S,) position in the choice-major flattening: choice * N + token
    expert: torch.Tensor     # (S,) the expert (global id), non-decreasing
    counts: torch.Tensor     # (m,) kept assignments per expert (sum = S)
    routed: torch.Tensor     # (k, m) assignments per choice and expert before capacity
    capacity: int | None     # C, or None when nothing is dropped


def dispatch_plan(top_idx: torch.Tensor, n_experts: int, capacity: int | None,
                  base: torch.Tensor | None = None) -> DispatchPlan:
    """Sort the assignments by expert and drop those beyond capacity (GShard priority).

    Assignments are flattened choice-major: position ``j * N + t`` is choice j of token t. A *stable* argsort by
    expert id then lists each expert's assignments in priority order (first choices in token order, then
    second choices in token order). An assignment is kept when its priority rank among its expert's
    assignments is ``< capacity``.

    ``base`` (k, m), for expert parallelism: the number of higher-priority assignments to expert e that live
    elsewhere (on earlier processes for the same choice, and on every process for earlier choices). The rank
    of an assignment is then ``base[j, e] +`` its rank among this process's (choice j, expert e) assignments.
    Without ``base`` this is the single-process rule.
    """
    N, k = top_idx.shape
    m = n_experts
    flat = top_idx.t().reshape(-1)                                     # (k*N,) choice-major expert ids
    choice_of = torch.arange(k, device=flat.device).repeat_interleave(N)  # (k*N,) 0...0 1...1
    routed = torch.bincount(choice_of * m + flat, minlength=k * m).view(k, m)   # (k, m)
    order = torch.argsort(flat, stable=True)                           # (k*N,) grouped by expert, priority order inside
    if capacity is not None:
        e_sorted = flat[order]
        start = routed.sum(0).cumsum(0) - routed.sum(0)                # (m,) first sorted slot of each expert
        rank = torch.arange(k * N, device=flat.device) - start[e_sorted]   # priority rank inside the expert, here
        if base is not None:                                           # expert parallel: rank inside (choice, expert)
            j_sorted = choice_of[order]                                # here, plus what precedes it elsewhere
            earlier = routed.cumsum(0) - routed                        # (k, m) this process's earlier-choice assignments
            rank = rank - earlier[j_sorted, e_sorted] + base[j_sorted, e_sorted]
        order = order[rank < capacity]                                 # drop the assignments beyond capacity
    expert = flat[order]
    counts = torch.bincount(expert, minlength=m)                       # (m,)
    if k == 1:                                                         # avoid the (slow) integer division when we can
        choice = torch.zeros_like(order)
    else:
        choice = (order >= N).long() if k == 2 else order // N
    return DispatchPlan(order - choice * N, choice, order, expert, counts, routed, capacity)


# ---------------------------------------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------------------------------------

def load_balancing_loss(probs: torch.Tensor, routed_per_expert: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """Switch §2.2 eq. (4): ``m * sum_i f_i * P_i``.

    probs (N, m); routed_per_expert (m,): how many of the N tokens chose expert i among their top-k (before
    capacity). f_i = routed_i / N, P_i = mean probability of expert i. Only P_i carries a gradient.
    """
    N, m = probs.shape
    n = max(1, N if n_tokens is None else n_tokens)                   # an empty group has zero loss, not 0/0
    f = routed_per_expert.to(probs.dtype) / n                          # (m,)
    P = probs.sum(0) / n                                               # (m,)
    return m * (f * P).sum()


def router_z_loss(logits: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of ``logsumexp(logits)^2``, logits (N, m)."""
    n = max(1, logits.shape[0] if n_tokens is None else n_tokens)
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / n


class MoEStats(NamedTuple):
    tokens_per_expert: torch.Tensor   # (m,) assignments each expert processed (after capacity)
    routed_per_expert: torch.Tensor   # (m,) assignments the gate sent to each expert (before capacity)
    dropped_fraction: float           # dropped assignments / all N*k assignments
    tokens_dropped: float             # fraction of tokens none of whose k choices was kept (= dropped_fraction for top-1)
    gate_entropy: float               # mean over tokens of -sum_i p_i log p_i (log m: uniform; 0: one-hot)
    aux_loss: float                   # load-balancing loss m * sum_i f_i P_i, unweighted
    z_loss: float                     # router z-loss, unweighted
    capacity: int | None              # C used for this call (None: unlimited)
    n_tokens: int                     # N, the tokens in the group


# ---------------------------------------------------------------------------------------------------------
# Experts: m MLPs with batched weights, run on contiguous token slices
# ---------------------------------------------------------------------------------------------------------

class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (expert parallelism: see ExpertParallelMoE)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _ExpertMM(torch.autograd.Function):
    """``out[rows of e] = a[rows of e] @ w[e]`` for consecutive row blocks of ``sizes``: a loop of ``torch.mm`` with
    ``out=`` (no per-expert autograd nodes, no concatenation). Backward: the same loop for ``a`` (``g @ w[e]^T``)
    and ``w`` (``a^T @ g``; zero for experts without rows). About as fast as ``grouped_mm`` (``mmkit bench moe``),
    and works for any dtype and shape (float64 for gradcheck, widths that are not multiples of 4)."""

    @staticmethod
    def forward(ctx, a, w, sizes):
        ctx.save_for_backward(a, w)
        ctx.sizes = sizes
        out = a.new_empty(a.shape[0], w.shape[2])                          # (S, out)
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.mm(a[start:start + n], w[e], out=out[start:start + n])
            start += n
        return out

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        ga = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            rows = slice(start, start + n)
            if n and ga is not None:
                torch.mm(g[rows], w[e].t(), out=ga[rows])
            if gw is not None:
                if n:
                    torch.mm(a[rows].t(), g[rows], out=gw[e])
                else:
                    gw[e].zero_()
            start += n
        return ga, gw, None


def _grouped_mm_usable(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """``torch.nn.functional.grouped_mm`` on the CPU wants float32/bf16/fp16 and 16-byte aligned rows."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = x.element_size()
    return all(w.dtype == x.dtype and all((s * size) % 16 == 0 for s in w.stride()[:-1] + x.stride()[:-1])
               and w.shape[-1] * size % 16 == 0 for w in ws)


class Experts(nn.Module):
    """m expert MLPs stored as batched weights: ``w_in`` (m, D, F or 2F), ``w_out`` (m, F, D), x @ W layout.

    ``forward(x, counts)``: x (S, D) holds expert 0's ``counts[0]`` rows, then expert 1's, ...; returns (S, D),
    each row through its own expert. Gated experts keep the gate half first in ``w_in``:
    ``h = act(x @ w_in[:, :, :F]) * (x @ w_in[:, :, F:])`` (Hugging Face's Mixtral ``gate_up_proj`` transposed).
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: str = "gelu", gated: bool = False,
                 bias: bool = False, dropout: float = 0.0, backend: str = "auto", init_std: float = 0.02):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff, self.gated, self.backend = n_experts, d_model, d_ff, gated, backend
        d_in = 2 * d_ff if gated else d_ff
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_in))    # (m, D, F) or (m, D, 2F)
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))   # (m, F, D)
        self.b_in = nn.Parameter(torch.zeros(n_experts, d_in)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT-style N(0, init_std) weights (what ``mmkit.nn.init_weights`` gives a FeedForward), zero biases."""
        nn.init.normal_(self.w_in, std=self.init_std)
        nn.init.normal_(self.w_out, std=self.init_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            h = self.act(g) * u
        else:
            h = self.act(h)
        return self.dropout(h)

    def resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "grouped_mm" if _grouped_mm_usable(x, self.w_in, self.w_out) else "loop"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        w_in, w_out, b_in, b_out = self.w_in, self.w_out, self.b_in, self.b_out
        if grad_scale != 1.0:
            w_in, w_out = _ScaleGrad.apply(w_in, grad_scale), _ScaleGrad.apply(w_out, grad_scale)
            b_in = None if b_in is None else _ScaleGrad.apply(b_in, grad_scale)
            b_out = None if b_out is None else _ScaleGrad.apply(b_out, grad_scale)
        x = x.to(w_in.dtype).contiguous()                                   # (S, D)
        backend = self.resolve_backend(x)
        if backend == "grouped_mm" and not _grouped_mm_usable(x, w_in, w_out):
            raise ValueError("backend='grouped_mm' needs float32/bf16/fp16 tensors whose row sizes are multiples of "
                             "16 bytes (d_model and d_ff multiples of 4 in float32); use backend='loop' or 'auto'")
        if b_in is not None:                                                # per-row expert id for the biases
            eid = torch.repeat_interleave(torch.arange(self.n_experts, device=x.device), counts)  # (S,)

        if backend in ("grouped_mm", "loop"):
            if backend == "grouped_mm":                                     # one fused kernel for all experts
                offs = counts.cumsum(0).to(torch.int32)                     # (m,) end row of each expert
                mm = functools.partial(F.grouped_mm, offs=offs)
            else:                                                           # torch.mm per non-empty expert, written in place
                mm = functools.partial(_ExpertMM.apply, sizes=counts.tolist())
            h = mm(x, w_in)                                                 # (S, F or 2F): row block e times w_in[e]
            if b_in is not None:
                h = h + b_in[eid]
            y = mm(self._hidden(h), w_out)                                  # (S, D)
            return y if b_out is None else y + b_out[eid]

        if backend == "bmm":                                                # pad each expert's slice to the largest one
            S = x.shape[0]
            if S == 0:
                return x.new_zeros(0, self.d_model)
            if b_in is None:
                eid = torch.repeat_interleave(torch.arange(self.n_experts, device=x.device), counts)
            width = int(counts.max())
            slot = torch.arange(S, device=x.device) - (counts.cumsum(0) - counts)[eid]   # (S,) row inside the bucket
            xp = x.new_zeros(self.n_experts, width, self.d_model).index_put((eid, slot), x)  # (m, width, D)
            h = torch.bmm(xp, w_in) if b_in is None else torch.baddbmm(b_in[:, None, :], xp, w_in)
            h = self._hidden(h)                                             # (m, width, F)
            y = torch.bmm(h, w_out) if b_out is None else torch.baddbmm(b_out[:, None, :], h, w_out)
            return y[eid, slot]                                             # (S, D)
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------------
# The MoE layer
# ---------------------------------------------------------------------------------------------------------

class MoEFeedForward(nn.Module):
    """Mixture-of-Experts FFN (M6 §3.4): ``moe(x)`` maps (B, L, D) or (N, D) to the same shape.

    All B*L tokens of a call form one routing group (the N of ``C = ceil(N*c/m)``). After each call:

    * ``self.aux_loss``   - scalar tensor to ADD to the training loss (``aux_loss_coef * aux + z_loss_coef * z``);
    * ``self.last_stats`` - :class:`MoEStats` (detached numbers for logging and plots);
    * ``self.last_routing`` - the (detached) :class:`Routing` and ``self.last_plan`` the :class:`DispatchPlan`,
      for visualising which token went where.

    ``MoEFeedForward(cfg)`` or ``MoEFeedForward(d_model=64, d_ff=256, n_experts=8, ...)`` (keywords override cfg).
    """

    def __init__(self, cfg: MoEConfig | None = None, *, local_experts: range | None = None, **overrides):
        super().__init__()
        cfg = replace(cfg, **overrides) if cfg is not None else MoEConfig(**overrides)
        self.config = cfg
        m = cfg.n_experts
        self.local_experts = range(m) if local_experts is None else local_experts   # the experts held here
        self.gate = nn.Linear(cfg.d_model, m, bias=cfg.router_bias)                  # g(x): one logit per expert
        nn.init.normal_(self.gate.weight, std=0.02)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)
        self.experts = Experts(len(self.local_experts), cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated,
                               cfg.bias, cfg.dropout, cfg.backend)
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: MoEStats | None = None
        self.last_routing: Routing | None = None
        self.last_plan: DispatchPlan | None = None

    def extra_repr(self) -> str:
        c = self.config
        return (f"n_experts={c.n_experts}, top_k={c.top_k}, capacity_factor={c.capacity_factor}, "
                f"d_ff={c.d_ff}, activation={c.activation}{' (gated)' if c.gated else ''}")

    # --- the gate -------------------------------------------------------------------------------------
    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """g(x), (N, D) -> (N, m), in float32 (Switch's "selective precision": the softmax stays exact under bf16)."""
        if self.training and self.config.jitter_noise > 0:                 # Switch: multiplicative jitter, training only
            eps = self.config.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.gate.bias is None else self.gate.bias.float()
            return F.linear(x.float(), self.gate.weight.float(), bias)     # (N, m)

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE input must be (..., d_model={cfg.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, cfg.d_model)                                     # (N, D)
        r = route(self.gate_logits(x), cfg.top_k, cfg.renormalize)         # M6 eq. (1) + top-k
        plan, n_total, f_counts, share = self._plan(r)
        y_rows = self._run_experts(x, plan)                                # (S, D): E_i(x) for each kept assignment
        w = r.top_w.t().reshape(-1).index_select(0, plan.slot)            # (S,) p(x)_i: the gate's gradient path
        y = x.new_zeros(x.shape)                                           # dropped assignments add nothing
        y.index_add_(0, plan.token, (y_rows * w[:, None]).to(x.dtype))     # M6 eq. (2): y = sum_{i in T} p(x)_i E_i(x)
        self._losses_and_stats(r, plan, n_total, f_counts, share)
        return y.view(shape)

    def _plan(self, r: Routing):
        """Single process: capacity from this call's N. Returns plan, N, routed counts (m,), loss share."""
        N = r.top_idx.shape[0]
        plan = dispatch_plan(r.top_idx, self.config.n_experts,
                             expert_capacity(N, self.config.n_experts, self.config.capacity_factor))
        return plan, N, plan.routed.sum(0), 1.0

    def _run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return self.experts(x.index_select(0, plan.token), plan.counts)   # gather, run each expert once

    def _losses_and_stats(self, r: Routing, plan: DispatchPlan, n_total: int, routed: torch.Tensor,
                          share: float) -> None:
        """aux / z losses over the group of n_total tokens. ``share`` scales this process's part (see EP)."""
        cfg = self.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.aux_loss_coef != 0):   # no graph when unused
            aux = load_balancing_loss(r.probs, routed, n_total) * share   # Switch eq. (4)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.z_loss_coef != 0):
            lse = torch.logsumexp(r.logits, dim=-1)                        # (N,) log of the softmax normaliser
            z = lse.pow(2).sum() / max(1, n_total) * share                 # ST-MoE z-loss = router_z_loss(logits)
        self.aux_loss = cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        with torch.no_grad():
            N, k = r.top_idx.shape
            entropy = (lse - (r.probs * r.logits).sum(-1)).mean()          # H(p) = logsumexp(g) - sum_i p_i g_i
            counts, routed_all, n_assign = self._global_counts(plan, n_total)
            kept_per_token = torch.bincount(plan.token, minlength=N)
            self.last_stats = MoEStats(
                tokens_per_expert=counts, routed_per_expert=routed_all,
                dropped_fraction=1.0 - float(counts.sum()) / n_assign if n_assign else 0.0,
                tokens_dropped=float((kept_per_token == 0).float().mean()) if N else 0.0,
                gate_entropy=float(entropy) if N else 0.0, aux_loss=float(aux.detach()), z_loss=float(z.detach()),
                capacity=plan.capacity, n_tokens=n_total)
            self.last_routing = Routing(*(t.detach() for t in r))
            self.last_plan = plan

    def _global_counts(self, plan: DispatchPlan, n_total: int):
        return plan.counts, plan.routed.sum(0), n_total * self.config.top_k

    @torch.no_grad()
    def load_from(self, other: "MoEFeedForward") -> "MoEFeedForward":
        """Copy the gate and (this module's share of) the experts from a layer holding all m experts."""
        if other.experts.n_experts != self.config.n_experts or other.config.d_model != self.config.d_model:
            raise ValueError("load_from needs a layer with the same d_model and all n_experts experts")
        self.gate.load_state_dict(other.gate.state_dict())
        sl = slice(self.local_experts.start, self.local_experts.stop)
        for name, p in self.experts.named_parameters():
            p.copy_(getattr(other.experts, name)[sl])
        return self


def moe_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """Sum of ``aux_loss`` over every MoE layer of ``model`` after a forward: add it to the task loss."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoEFeedForward) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else 0.0


def is_expert_param(name: str, param: nn.Parameter | None = None) -> bool:
    """For ``mmkit.train.local_clip_fn(is_expert_param)``: True for parameters of MoE experts (``...experts.w_in``)."""
    return ".experts." in f".{name}"


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism
# ---------------------------------------------------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` on dim 0: row blocks of sizes ``in_splits`` go to ranks 0..W-1 and
    blocks of sizes ``out_splits`` arrive. Its backward is the reverse all-to-all (gradients travel back the
    way the rows came). Every rank must run the backward too, or the others wait forever."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Autograd-aware ``all_to_all_single`` (uneven splits): send ``x``'s row blocks, receive (sum(out_splits), ...)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# torch >= 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ExpertParallelMoE(MoEFeedForward):
    """:class:`MoEFeedForward` with its m experts sharded over the W processes of a ``torch.distributed`` group.

    Rank r holds experts ``r*m/W .. (r+1)*m/W - 1`` (``self.local_experts``); the gate is replicated. Forward
    on each rank's own tokens (any number per rank, (B, L, D) or (N, D)):

    1. route locally with the replicated gate (eq. (1), top-k);
    2. ``all_gather`` the (k, m) routing counts of every rank: the only "counts first" exchange needed -
       from it every rank knows the global N, the capacity C, where each of its assignments ranks in the
       global priority order, and how many rows it will send to / receive from each rank;
    3. ``all_to_all_single`` the kept token rows to the ranks holding their experts (uneven splits);
    4. run the local experts once each on their rows (from all ranks);
    5. ``all_to_all_single`` the results back; weight by p(x)_i and ``index_add_`` into the tokens.

    Capacity semantics (exact, not approximate): identical to ``MoEFeedForward`` applied to the concatenated
    global batch ``torch.cat([x_rank0, x_rank1, ...])``: N is the global token count, ``C = ceil(N*c/m)``, and
    priority is "all first choices before second choices; within a choice, rank 0's tokens in order, then rank
    1's, ...". The outputs are those of the single-process layer on that batch (up to float summation order).

    Gradients, with data parallelism for everything else (each rank's loss a mean over its own tokens, DDP
    averaging the replicated gradients over the W ranks), so that training equals single-process training on
    the global batch:

    * ``self.aux_loss`` is this rank's share: f_i comes from the global counts and P_i from this rank's tokens,
      scaled so that the mean of the W ranks' ``aux_loss`` equals the global-batch value (and likewise z);
    * the gate is replicated: its gradient must be averaged over ranks - DDP does it, or call
      :meth:`allreduce_replicated_grads` without DDP;
    * an expert's gradient collects the contributions of every rank's tokens through the all-to-all, i.e. of
      the SUM of the W rank losses; multiplying it by ``expert_grad_scale`` (default 1/W) turns that into the
      gradient of their mean. Expert parameters must NOT be averaged by DDP (they differ per rank):
      :func:`ddp_ignore_expert_params` before wrapping the model in DDP.

    ``last_stats``: tokens per expert, routed counts, dropped fraction and capacity are global (from the
    all_gather); ``tokens_dropped``, ``gate_entropy``, ``aux_loss`` and ``z_loss`` are this rank's (the losses
    as its share, whose mean over ranks is the global value).

    Collectives per forward: one small all_gather and two all-to-alls; per backward: two all-to-alls. Every
    rank must call forward (and backward) the same number of times, even with no tokens.
    """

    def __init__(self, cfg: MoEConfig | None = None, group=None, expert_grad_scale: float | None = None, **overrides):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialised (dist.init_process_group('gloo') "
                               "under torchrun or accelerate launch); for one process use MoEFeedForward")
        cfg = replace(cfg, **overrides) if cfg is not None else MoEConfig(**overrides)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if cfg.n_experts % world:
            raise ValueError(f"n_experts={cfg.n_experts} must be divisible by the number of processes ({world}) "
                             "to shard the experts evenly")
        per = cfg.n_experts // world
        super().__init__(cfg, local_experts=range(rank * per, (rank + 1) * per))
        self.group, self.world_size, self.rank = group, world, rank
        self.expert_grad_scale = 1.0 / world if expert_grad_scale is None else expert_grad_scale

    def _plan(self, r: Routing):
        cfg, W, me = self.config, self.world_size, self.rank
        m, k = cfg.n_experts, cfg.top_k
        N_local = r.top_idx.shape[0]
        flat = r.top_idx.t().reshape(-1)
        choice_of = torch.arange(k, device=flat.device).repeat_interleave(N_local)
        local = torch.bincount(choice_of * m + flat, minlength=k * m).view(k, m)   # (k, m) this rank's routing counts
        gathered = local.new_empty((W * k, m))                            # gloo wants (W * k, m), not (W, k, m)
        _all_gather_single(gathered, local.contiguous(), group=self.group)             # counts first
        gathered = gathered.view(W, k, m)                                  # [rank, choice, expert]
        n_per_rank = gathered[:, 0, :].sum(-1)                             # (W,) every token has one first choice
        N = int(n_per_rank.sum())
        C = expert_capacity(N, m, cfg.capacity_factor)
        total = gathered.sum(0)                                            # (k, m)
        # base[r, j, e]: global-priority assignments to e ahead of rank r's choice-j ones
        base = (total.cumsum(0) - total)[None] + (gathered.cumsum(0) - gathered)         # (W, k, m)
        if C is None:
            kept = gathered
        else:
            kept = torch.minimum((C - base).clamp_min(0), gathered)        # (W, k, m) kept per rank, choice, expert
        kept_re = kept.sum(1)                                              # (W, m)
        plan = dispatch_plan(r.top_idx, m, C, base=base[me])
        if not torch.equal(plan.counts, kept_re[me]):                     # cannot happen: both follow the same rule
            raise RuntimeError("expert parallel: the local dispatch plan disagrees with the global counts")
        self._kept_re, self._routed_global = kept_re, total.sum(0)
        # this rank's loss share: f from the global counts, P and z summed over the local tokens / global N, times W,
        # so that the MEAN over the W ranks of aux_loss is the global-batch value (see the class docstring)
        return plan, N, total.sum(0), float(W)

    def _run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        W, me, per = self.world_size, self.rank, len(self.local_experts)
        kept_re = self._kept_re.view(W, W, per)                            # [source rank, dest rank, local expert]
        send = kept_re[me].sum(-1).tolist()                                # rows to each rank (plan is sorted by expert = by rank)
        recv_blocks = kept_re[:, me, :]                                    # (W, per): rows from each source, per my expert
        recv = recv_blocks.sum(-1).tolist()
        x_in = all_to_all(x.index_select(0, plan.token), recv, send, self.group)          # (R, D) dispatch
        # rows arrive grouped by source rank, each block sorted by expert: regroup by expert for the experts
        local_eid = torch.arange(per).repeat(W).repeat_interleave(recv_blocks.reshape(-1))  # (R,)
        perm = torch.argsort(local_eid, stable=True)
        y = self.experts(x_in[perm], recv_blocks.sum(0), grad_scale=self.expert_grad_scale)  # (R, D)
        y = y[torch.argsort(perm)]                                         # back to arrival order
        return all_to_all(y, send, recv, self.group)                       # (S, D) combine: results come home

    def _global_counts(self, plan: DispatchPlan, n_total: int):
        return self._kept_re.sum(0), self._routed_global, n_total * self.config.top_k   # global, from the all_gather

    @torch.no_grad()
    def allreduce_replicated_grads(self) -> None:
        """Average the gate's gradient over the ranks (what DDP does); for use WITHOUT DDP only."""
        for p in self.gate.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.world_size


def expert_parallel_param_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the expert parameters of every :class:`ExpertParallelMoE` inside ``model``."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoE):
            prefix = f"{mod_name}.experts." if mod_name else "experts."
            names += [prefix + n for n, _ in mod.experts.named_parameters()]
    return names


def ddp_ignore_expert_params(model: nn.Module) -> list[str]:
    """Tell DistributedDataParallel (call BEFORE wrapping) not to broadcast or average sharded expert parameters."""
    names = expert_parallel_param_names(model)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names
