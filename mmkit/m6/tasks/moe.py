"""M6-MoE (M6 §3.4) on the world: routing statistics, capacity, and training. The config :class:`M6MoEConfig` and
its FFN factory live in :mod:`mmkit.m6.model`; the MoE layer in :mod:`mmkit.nn.moe`.

    cfg = mmkit.load_config("m6-tiny-moe")                     # M6MoEConfig: m6-tiny + 8 experts in every other block
    model = mmkit.build_model(cfg)                             # an M6Model whose odd blocks hold MoEFeedForward FFNs
    out = model.forward_batch(batch, images)                   # M6Output: loss = CE + aux_loss_weight * aux_loss
    moe_layers(model)                                          # {block index: MoEFeedForward}: .last_stats, .last_routing
    mmkit.build_model("scaled/configs/m6_100b.yaml", device="meta")   # M6-100B (Table 4), counted without memory

    # training on the world: the M6 §3.3 four-task data and loss of mmkit.m6.tasks.pretrain, plus routing metrics per step
    init_image_side(model, mmkit.load("m6-tiny-pretrained"))   # the stage-0 CNN of the pretrained M6, frozen
    run = pretrain_moe(model, data, TrainConfig(steps=300, batch_size=32, lr=3e-3))
    run.result.history[-1]["load_cv/1"]                        # how uneven block 1's expert loads were at that step

What M6 §3.4 fixes and what we assume (see also ``scaled/configs/m6_100b.yaml``)
-------------------------------------------------------------------------------
M6-100B is M6-base (24 layers, d_model 1024, 16 heads) with 1024 experts (Table 4), routed by a softmax gate over
the experts (eq. (1)) and combined over the top-k (eq. (2)), top-1 preferred ("the effectiveness of top-1 gating
enables faster computation"), with expert capacity ``C = N c / m`` and dropped tokens carried by the residual.
The paper does not say which layers are MoE nor how wide an expert is. We follow GShard and Switch
Transformers, which M6 cites for MoE: **every other FFN** is an MoE layer (blocks 1, 3, 5, ...: ``moe_every=2``,
Hugging Face's Switch ``sparse_step=2`` layout) and **each expert is the dense FFN** (``d_ff = 4 d_model``), so
a top-1 token uses as many parameters as in the dense model. With that, 12 MoE layers x 1024 experts x 8.4M
parameters give 103.3B in all, +3.3% from Table 4's 100B; MoE in all 24 layers would give 206B (+106%), so the
count itself supports "every other layer". Also assumed: capacity factor 1.25 and load-balancing weight 0.01
(Switch's training values), no biases in the experts (Switch).

Losses. Each MoE layer stores its weighted side loss ``aux_loss_coef * balance + z_loss_coef * z`` (see
:mod:`mmkit.nn.moe`); :class:`M6Model` sums them into ``M6Output.aux_loss`` and adds ``aux_loss_weight`` times that to
the loss. The MoE coefficients already weight the terms, so ``M6MoEConfig.aux_loss_weight`` defaults to 1.

Routing groups. Every forward call's B x L positions form one routing group (N in C = N c / m), padding
positions included: the MoE layer does not see the attention mask, so padding is routed and takes capacity like
any token (as in the reference Switch / GShard layers, which route whatever the batch holds). The
:class:`RoutingMonitor` below counts what the experts received, padding included; :func:`route_table` (the heat
map) counts real tokens only.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from mmkit.config import build_model, replace_config
from mmkit.m6.masking import SEG_PAD, SEG_VISUAL, collate
from mmkit.m6.model import M6MoEConfig
from mmkit.m6.tasks.pretrain import pretrain_loss, task_losses
from mmkit.nn.moe import MoEFeedForward
from mmkit.train import train, unwrap

__all__ = [
    "M6MoEConfig", "moe_layers", "capacity_factor", "RoutingMonitor", "LayerLoad", "load_cv", "MoEPretrainLoss",
    "init_image_side", "pretrain_moe", "MoERun", "route_table", "RouteTable", "evaluate_capacity", "CapacityEval",
    "comparison_configs", "run_histories", "compare_moe", "save_comparison", "load_comparison",
]


# ---------------------------------------------------------------------------------------------------------
# Reaching the MoE layers
# ---------------------------------------------------------------------------------------------------------

def moe_layers(model: nn.Module) -> dict[int, MoEFeedForward]:
    """``{block index: MoE layer}`` of an M6 (possibly DDP-wrapped). After a forward each layer holds
    ``last_stats`` (:class:`mmkit.nn.moe.MoEStats`), ``last_routing`` and ``last_plan`` of that call."""
    return {i: b.ffn for i, b in enumerate(unwrap(model).blocks) if isinstance(b.ffn, MoEFeedForward)}


@contextlib.contextmanager
def capacity_factor(model: nn.Module, c: float | None):
    """Temporarily give every MoE layer of ``model`` the capacity factor ``c`` (None: unlimited)."""
    layers = moe_layers(model)
    old = {i: m.config for i, m in layers.items()}
    try:
        for m in layers.values():
            m.config = replace(m.config, capacity_factor=c)
        yield model
    finally:
        for i, m in layers.items():
            m.config = old[i]


def load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation std / mean of per-expert counts (m,): 0 = perfectly even; sqrt(m - 1) = all
    tokens on one expert (population std)."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


class LayerLoad(NamedTuple):
    routed: torch.Tensor      # (m,) assignments the gate sent to each expert (before capacity), summed over calls
    kept: torch.Tensor        # (m,) assignments each expert processed (after capacity)
    n_tokens: int             # tokens routed (all calls)
    n_assign: int             # assignments made, N * k
    aux_loss: float           # unweighted load-balancing loss, mean over calls

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - float(self.kept.sum()) / self.n_assign if self.n_assign else 0.0


class RoutingMonitor:
    """Sums the routing statistics of every MoE layer over all forward calls made inside ``with``:

        with RoutingMonitor(model) as mon:
            loss = pretrain_loss(model, batch)            # four task forwards: four routing groups per layer
        mon.loads()[1].routed                             # (m,) block 1's routed counts, summed
        mon.metrics()                                     # flat {name: float} for a training history
    """

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self._sum: dict[int, list] = {}
        self._handles = []
        self.side_loss = 0.0                  # sum over layers and calls of the layers' weighted aux_loss

    def __enter__(self) -> "RoutingMonitor":
        for i, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(module, args, output):
            s = module.last_stats
            acc = self._sum.setdefault(i, [0, 0, 0, 0, 0.0, 0])
            acc[0] = acc[0] + s.routed_per_expert.detach().cpu()
            acc[1] = acc[1] + s.tokens_per_expert.detach().cpu()
            acc[2] += s.n_tokens
            acc[3] += s.n_tokens * module.config.top_k
            acc[4] += s.aux_loss
            acc[5] += 1
            if module.aux_loss is not None:
                self.side_loss += float(module.aux_loss.detach())
        return hook

    def loads(self) -> dict[int, LayerLoad]:
        out = {}
        for i, layer in self.layers.items():
            if i in self._sum:
                r, k, n, a, aux, calls = self._sum[i]
                out[i] = LayerLoad(r, k, n, a, aux / calls)
            else:
                zero = torch.zeros(layer.config.n_experts, dtype=torch.long)
                out[i] = LayerLoad(zero, zero, 0, 0, 0.0)
        return out

    def metrics(self, per_expert: bool = True) -> dict[str, float]:
        """``load_cv/L`` (of routed counts), ``dropped/L``, ``balance/L`` (unweighted aux) for every MoE block L,
        and with ``per_expert`` each expert's share of the routed assignments ``load/L/e``."""
        out = {}
        for i, ld in self.loads().items():
            out[f"load_cv/{i}"] = load_cv(ld.routed)
            out[f"dropped/{i}"] = ld.dropped_fraction
            out[f"balance/{i}"] = ld.aux_loss
            if per_expert:
                share = ld.routed.double() / max(1, ld.n_assign)
                out.update({f"load/{i}/{e}": float(v) for e, v in enumerate(share)})
        return out


# ---------------------------------------------------------------------------------------------------------
# Training on the world: the pretraining data and loss, plus routing metrics and a clock
# ---------------------------------------------------------------------------------------------------------

class MoEPretrainLoss:
    """``loss_fn`` for :func:`mmkit.train.train`: :func:`mmkit.m6.tasks.pretrain.pretrain_loss` (the four M6 §3.3 tasks, the
    MoE side loss included through ``M6Output.aux_loss``) with extra metrics logged every step:

    * ``ce``: the task loss alone (the logged ``loss`` includes the weighted side loss);
    * ``aux``: the weighted side loss added to it (0 for a dense M6);
    * the :meth:`RoutingMonitor.metrics` of the MoE layers (``load_cv/L``, ``dropped/L``, ``balance/L``, ``load/L/e``);
    * ``cpu_s``: this thread's CPU seconds since the first step began (``time.thread_time``). Differences between
      steps time a whole step (forward, backward, optimizer), and with one torch thread they are far less
      disturbed by other processes on the same cores than wall-clock time is.
    """

    def __init__(self, base: Callable | None = None, per_expert: bool = True):
        self.base = base or pretrain_loss
        self.per_expert = per_expert
        self._t0: float | None = None

    def __call__(self, model, batch):
        now = time.thread_time()
        if self._t0 is None:
            self._t0 = now
        with RoutingMonitor(model) as mon:
            loss, metrics = self.base(model, batch)
            aux_w = mon.side_loss * unwrap(model).config.aux_loss_weight     # what task_losses added to the loss
        metrics = dict(metrics, ce=float(loss.detach()) - aux_w, aux=aux_w, cpu_s=now - self._t0,
                       **mon.metrics(self.per_expert))
        return loss, metrics


def init_image_side(model: nn.Module, source: nn.Module, freeze: bool = True) -> nn.Module:
    """Copy the trained image side (feature extractor + 2-D positions: stage 0 of M6 pretraining, M6 §3.1) of
    ``source`` (a pretrained M6, e.g. ``mmkit.load("m6-tiny-pretrained")``) into ``model``, frozen by default, so
    that dense and MoE models compared on the world all read the same trained patch features and skip the ~25
    CPU-s of stage 0."""
    src = source
    for name in ("feature_extractor", "pos_emb_2d"):
        getattr(model, name).load_state_dict(getattr(src, name).state_dict())
        if freeze:
            getattr(model, name).requires_grad_(False)
    return model


class MoERun(NamedTuple):
    model: nn.Module          # the trained model (trained in place)
    result: object            # mmkit.train.TrainResult; history rows carry the MoEPretrainLoss metrics
    cpu_seconds: float        # this thread's CPU time of the training call
    wall_seconds: float


def pretrain_moe(model: nn.Module, data, train_config, evaluator=None, loss_fn: MoEPretrainLoss | None = None,
                 **train_kw) -> MoERun:
    """Train a dense or MoE M6 on ``data`` (a :class:`mmkit.m6.tasks.pretrain.PretrainData`) with :class:`MoEPretrainLoss`
    and the kit's one loop; the image side, if frozen (:func:`init_image_side`), stays frozen."""
    t0, c0 = time.perf_counter(), time.thread_time()   # (default_param_groups skips frozen parameters)
    result = train(model, loss_fn or MoEPretrainLoss(), data.batch_fn, train_config, eval_fn=evaluator, **train_kw)
    return MoERun(model, result, time.thread_time() - c0, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------
# Which expert gets which word / image patch
# ---------------------------------------------------------------------------------------------------------

class RouteTable(NamedTuple):
    keys: list                # row labels: ("patch", k) for visual position k, ("word", token id) for a decoder input
    counts: dict              # {block index: (len(keys), m) float tensor}: first-choice routes of real tokens
    totals: torch.Tensor      # (len(keys),) occurrences of each key


@torch.no_grad()
def route_table(model: nn.Module, batch: dict) -> RouteTable:
    """Route a one-task batch (``PretrainData.fixed_batch``, e.g. image captioning) through ``model`` and count,
    for each MoE block, which expert each real token chose first: image patches by grid position, words by
    token id (the decoder's inputs; in the encoder of the other tasks words would be counted the same way)."""
    raw = unwrap(model)
    was = raw.training
    raw.eval()
    try:
        tb = collate(batch["examples"], pad_id=raw.config.pad_token_id)
        images = batch["images"] if batch["examples"][0].n_visual else None
        raw.forward_batch(tb, images)
    finally:
        raw.train(was)
    seg = tb.segment_ids                                                      # (B, L)
    B, L = seg.shape
    Wv = L - tb.encoder_ids.shape[1] - tb.decoder_input_ids.shape[1]
    ids = torch.cat([torch.zeros(B, Wv, dtype=torch.long), tb.encoder_ids, tb.decoder_input_ids], dim=1)  # (B, L)
    pos = torch.arange(L).expand(B, L)
    keys, key_of = [], {}
    row = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        for t in range(L):
            s = int(seg[b, t])
            if s == SEG_PAD:
                continue
            k = ("patch", int(pos[b, t])) if s == SEG_VISUAL else ("word", int(ids[b, t]))
            if k not in key_of:
                key_of[k] = len(keys)
                keys.append(k)
            row[b, t] = key_of[k]
    real = row.view(-1) >= 0
    totals = torch.bincount(row.view(-1)[real], minlength=len(keys)).float()
    counts = {}
    for i, layer in moe_layers(raw).items():
        first = layer.last_routing.top_idx[:, 0]                              # (B*L,) first-choice expert
        m = layer.config.n_experts
        flat = row.view(-1)[real] * m + first[real]
        counts[i] = torch.bincount(flat, minlength=len(keys) * m).view(len(keys), m).float()
    return RouteTable(keys, counts, totals)


# ---------------------------------------------------------------------------------------------------------
# Capacity at evaluation time
# ---------------------------------------------------------------------------------------------------------

class CapacityEval(NamedTuple):
    capacity_factor: float | None   # c used (None: unlimited)
    dropped: float                  # dropped assignments / all, over the MoE layers and the batch's task forwards
    loss: float                     # the batch's multitask loss without the side loss (ce)
    loads: dict                     # {block: LayerLoad}: routed and kept assignments per expert, summed over calls


@torch.no_grad()
def evaluate_capacity(model: nn.Module, batch: dict, c: float | None) -> CapacityEval:
    """Run a ``PretrainData`` batch through ``model`` (eval mode) with capacity factor ``c`` in every MoE layer:
    how many assignments are dropped (M6 §3.4: "tokens out of the capacity of an expert are dropped from the
    computation and they are sent to next layers through residual connections") and what that costs in loss."""
    raw = unwrap(model)
    was = raw.training
    raw.eval()
    try:
        with capacity_factor(raw, c), RoutingMonitor(raw) as mon:
            r = task_losses(raw, batch)
    finally:
        raw.train(was)
    loads = mon.loads()
    kept = sum(float(ld.kept.sum()) for ld in loads.values())
    assigned = sum(ld.n_assign for ld in loads.values())
    ce = float(r.loss) - mon.side_loss * raw.config.aux_loss_weight
    return CapacityEval(c, 1.0 - kept / assigned if assigned else 0.0, ce, loads)


# ---------------------------------------------------------------------------------------------------------
# The notebook's long comparison, shipped as histories (notebook 05 trains one model live and reads the rest)
# ---------------------------------------------------------------------------------------------------------

HISTORY_KEYS = ("ce", "cpu_s")                                    # kept for every run
ROUTING_PREFIXES = ("load/", "load_cv/", "dropped/")              # kept for MoE runs


def comparison_configs(dense_cfg, moe_cfg) -> dict:
    """The four runs notebook 05 compares (M6 §3.4): dense, top-1, top-1 without the balancing loss, top-2 with
    capacity factor 2.5 (= 1.25 per choice)."""
    return {"dense": dense_cfg, "top1": moe_cfg, "top1_nobal": replace_config(moe_cfg, aux_loss_coef=0.0),
            "top2": replace_config(moe_cfg, top_k=2, capacity_factor=2.5)}


def run_histories(run: MoERun, final: dict | None = None) -> dict:
    """A run as a small JSON-able record: per-step columns (task loss ``ce``, CPU seconds, routing loads), the CPU /
    wall seconds of training and the held-out losses ``final`` (an evaluator's output)."""
    h = run.result.history
    keys = [k for k in h[0] if k in HISTORY_KEYS or k.startswith(ROUTING_PREFIXES)]
    return {"columns": {k: [round(float(row[k]), 5) for row in h] for k in keys},
            "cpu_seconds": round(run.cpu_seconds, 2), "wall_seconds": round(run.wall_seconds, 2),
            "final": {k: round(float(v), 5) for k, v in (final or {}).items() if isinstance(v, (int, float))}}


def compare_moe(configs: dict, pretrained: nn.Module, data, train_config, evaluator=None, seed: int = 0,
                build: Callable | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Train each config of ``configs`` (name -> M6 / M6-MoE config) from ``seed`` on ``data`` with the frozen image
    side of ``pretrained`` (:func:`init_image_side`) and return ``{name: run_histories(...)}``: what notebook 05
    ships in ``notebooks/05_moe_histories.json`` (regenerate it with this function; see the notebook)."""
    build = build or build_model
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = init_image_side(build(cfg), pretrained)
        run = pretrain_moe(model, data, train_config)
        out[name] = run_histories(run, evaluator(model) if evaluator is not None else None)
        if progress is not None:
            progress(f"{name}: {run.cpu_seconds:.0f} CPU-s")
    return out


def save_comparison(path, runs: dict, settings: dict, note: str = "") -> None:
    """Write :func:`compare_moe`'s ``runs`` with the ``settings`` that produced them (steps, batch, data sizes, ...)
    as one small JSON file (what notebook 05 reads)."""
    Path(path).write_text(json.dumps({"settings": settings, "note": note, "runs": runs}, separators=(",", ":")) + "\n")


def load_comparison(path) -> dict:
    """Read a :func:`save_comparison` file: ``{"settings": ..., "note": ..., "runs": {name: run_histories(...)}}``."""
    data = json.loads(Path(path).read_text())
    if set(data) < {"settings", "runs"}:
        raise ValueError(f"{path} is not a compare_moe history file (keys {sorted(data)}); regenerate it with "
                         "mmkit.m6.tasks.moe.compare_moe + save_comparison (notebook 05 shows how)")
    return data
