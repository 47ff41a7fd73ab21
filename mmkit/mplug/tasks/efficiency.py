"""How fast the fusion networks are (mPLUG Figure 1 / 3 / 4) and what the §4 training switches cost (Table 6),
measured side by side; used by ``mmkit bench mplug``, the stride-sweep recipe and notebook 08.

    r = fusion_times(load_config("mplug-base"), **PAPER_LENGTHS)    # {"seconds_per_100": {variant: s}, "plans": ...}
    r = stride_times(load_config("mplug-tiny"), **WORLD_LENGTHS)    # S = 1, 2, 3, 6 with skip_layout "blocks"
    r = switch_throughput(load_config("mplug-tiny"), batch=32)      # gradient checkpointing x bf16: samples/s, MB

Every configuration is timed in alternation with the others (round-robin, medians), so that noise from other
processes on the shared cores hits all alike. Timings are measurements, never asserted.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mmkit.config import load_config, replace_config
from mmkit.mplug.model import MPLUG, FusionNetwork, MPLUGConfig, fusion_plan
from mmkit.mplug.tasks.pretrain import PretrainConfig, PretrainData, pretrain_loss

__all__ = ["PAPER_LENGTHS", "WORLD_LENGTHS", "paper_fusion_config", "world_fusion_config", "fusion_variants",
           "time_round_robin", "fusion_times", "stride_times", "switch_throughput"]

PAPER_LENGTHS = dict(n_visual=257, n_text=40)       # ViT-B/16 at 256 px: 16 x 16 patches + [CLS]; a 40-token question
WORLD_LENGTHS = dict(n_visual=65, n_text=16)        # 64 px, 8 x 8 patches + [CLS]; a world question ~16 tokens


def paper_fusion_config() -> MPLUGConfig:
    """mplug-base's fusion side: width 768, 12 heads, FFN 3072, 6 fusion layers, official layout S = 3."""
    return load_config("mplug-base")


def world_fusion_config() -> MPLUGConfig:
    """mplug-tiny's fusion side (width 128, 4 fusion layers, S = 3: co co co CONN)."""
    return load_config("mplug-tiny")


def fusion_variants(base: MPLUGConfig) -> dict[str, MPLUGConfig]:
    """Figure 1 / 4: the same number of fusion layers, four ways of fusing (dropout off: timing only)."""
    base = replace_config(base, dropout=0.0, gradient_checkpointing=False, bf16=False)
    return {"connected": replace_config(base, fusion="connected"),
            "co_attention": replace_config(base, fusion="co_attention"),
            "asymmetric": replace_config(base, fusion="asymmetric"),
            "skip": base}


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     desc: str = "timing") -> dict[str, float]:
    """Median seconds of each ``fn()``; the functions are called in turn, ``repeats`` rounds (after ``warmup``).
    A progress bar counts the calls (a full-size timing takes a minute or more on a laptop CPU)."""
    from tqdm.auto import tqdm

    rounds = max(0, warmup) + max(1, repeats)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with tqdm(total=rounds * len(fns), desc=desc, dynamic_ncols=True) as bar:
        for r in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if r >= max(0, warmup):               # warm-up rounds are not timed
                    times[k].append(time.perf_counter() - t0)
                bar.update(1)
    return {k: statistics.median(v) for k, v in times.items()}


def _fusion_forward(cfg: MPLUGConfig, n_visual: int, n_text: int, batch: int) -> Callable[[], object]:
    torch.manual_seed(0)
    net = FusionNetwork(cfg).eval()
    v = torch.randn(batch, n_visual, cfg.d_model)
    l = torch.randn(batch, n_text, cfg.d_model)
    mask = torch.ones(batch, n_text, dtype=torch.bool)

    def fn():
        with torch.no_grad():
            return net(v, l, mask)
    return fn


def fusion_times(base: MPLUGConfig, n_visual: int, n_text: int, batch: int = 8, repeats: int = 5) -> dict:
    """Forward seconds per 100 samples of each Figure 1 / 4 fusion network: {variant: seconds}, plus the plans."""
    variants = fusion_variants(base)
    fns = {k: _fusion_forward(c, n_visual, n_text, batch) for k, c in variants.items()}
    sec = time_round_robin(fns, repeats, desc=f"fusion variants ({n_visual} + {n_text} tokens)")
    return {"seconds_per_100": {k: v * 100 / batch for k, v in sec.items()},
            "plans": {k: fusion_plan(c) for k, c in variants.items()}}


def stride_times(base: MPLUGConfig, n_visual: int, n_text: int, strides=(1, 2, 3, 6), co_layers: int = 6,
                 batch: int = 8, repeats: int = 5) -> dict:
    """Figure 3: forward seconds per 100 samples of the skip-connected network with ``co_layers`` co-attention layers
    and a connected layer after every S (``skip_layout="blocks"``), for each S."""
    cfgs = {s: replace_config(base, fusion="skip", skip_layout="blocks", fusion_layers=co_layers, stride=s,
                              dropout=0.0, gradient_checkpointing=False, bf16=False) for s in strides}
    fns = {s: _fusion_forward(c, n_visual, n_text, batch) for s, c in cfgs.items()}
    sec = time_round_robin(fns, repeats, desc=f"strides {tuple(strides)}")
    return {"seconds_per_100": {s: v * 100 / batch for s, v in sec.items()},
            "plans": {s: fusion_plan(c) for s, c in cfgs.items()}}


def _saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` builds the loss (then backward frees them)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total


def switch_throughput(base: MPLUGConfig, batch: int = 32, repeats: int = 5, data: PretrainData | None = None) -> dict:
    """Samples/s of a joint pretraining step (forward + backward + AdamW) for the four combinations of gradient
    checkpointing and bf16 (mPLUG §4 / Table 6), the models sharing initial weights; and the saved activations (MB)."""
    data = data if data is not None else PretrainData.build(PretrainConfig(n_pairs=max(64, batch),
                                                                           image_size=base.image_size))
    b = data.batch_fn(torch.Generator().manual_seed(0), batch)
    combos = {"baseline": (False, False), "+bf16": (False, True), "+checkpointing": (True, False),
              "+bf16 +checkpointing": (True, True)}
    torch.manual_seed(0)
    ref = MPLUG(replace_config(base, dropout=0.0))
    steps, memory = {}, {}
    for name, (ckpt, bf16) in combos.items():
        m = MPLUG(replace_config(base, dropout=0.0, gradient_checkpointing=ckpt, bf16=bf16)).train()
        m.load_state_dict(ref.state_dict())
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            loss, _ = pretrain_loss(m, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
        memory[name] = _saved_activation_bytes(lambda m=m: pretrain_loss(m, b)[0]) / 2**20
        opt.zero_grad(set_to_none=True)
    sec = time_round_robin(steps, repeats, desc="training switches")
    return {"samples_per_s": {k: batch / v for k, v in sec.items()}, "saved_activations_mb": memory, "batch": batch}
