"""VLMo's ablations (Tables 3, 5, 6) on the Shapes World: each arm trains stage 3 (ITC + ITM + MLM on pairs) for
the SAME steps / batch / LR / seed from its own initialisation, and is measured on the same held-out pairs.

    arms = [BASELINE, SCRATCH, STD_TRM, NO_VL, LOCAL_NEG]
    runs = run_arms(arms, StageBudget(steps=60, batch_size=32), inits={"stage2": hub.load("vlmo-tiny-stage2")})
    runs["stagewise"].eval["t2i_r10"], runs["stagewise"].cpu_seconds

What the paper found (VLMo §4.6; Base size, 4M pairs, 200k steps of 1024) and what the world version changes:

* Table 3, stagewise pretraining: image-only + text-only initialisation beats image-only (NLVR2 82.1 vs 80.3,
  Flickr30k IR 88.5 vs 87.7); random initialisation "obtains a relatively low accuracy" (no number given). Here:
  stage 3 from the cached ``vlmo-tiny-stage2`` (stage 1 MIM -> stage 2 MLM) against stage 3 from random weights.
* Table 5, the Transformer: Multiway beats a standard Transformer (one shared FFN; NLVR2 80.1 vs 78.8, Flickr30k
  TR 95.2 vs 93.4) and Multiway without the VL experts (79.6, 94.5). The paper initialises these arms from ViT-Base;
  here all three start from ``vlmo-tiny-stage2`` (the standard Transformer's one FFN is its V-FFN, the L-FFN is
  dropped; the no-VL arm drops the VL-FFN), so only the architecture differs.
* Table 6, hard negatives for ITM: global mining over the 1024 examples of 32 GPUs beats local mining over each
  GPU's 32 (NLVR2 79.5 vs 77.7). Here one process emulates 4 "GPUs" by mining within 4 equal slices of the batch
  (``PretrainConfig(negative_pool="local", local_groups=4)``).

Scale: the paper's arms differ by 0.5-2 points after days on 32-64 GPUs; these arms train for CPU-minutes, where
ITM stays at its prior (recipes.py tuning notes) and ITC leaves chance only a little. The metrics are the ones that
can move at this scale, each beside its blind baseline: zero-shot dual-encoder R@1/5/10 both ways (chance K / N),
held-out ITC / ITM / MLM losses (log B, the ITM prior, the masked words' entropy), and an ITM probe (AUC of the fusion
ITM score of each true pair against a shuffled pair; blind 0.5). The baseline arm can run with several seeds to
show the noise an arm difference has to beat.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Sequence

import torch

from mmkit.config import build_model, load_config
from mmkit.train import TrainConfig, evaluating
from mmkit.vlmo.model import VLMo
from mmkit.vlmo.tasks import pretrain as P
from mmkit.vlmo.tasks import retrieval as R

__all__ = ["Arm", "BASELINE", "SCRATCH", "STD_TRM", "NO_VL", "LOCAL_NEG", "ARMS", "TABLES", "StageBudget",
           "init_arm", "itm_auc", "evaluate_arm", "ArmRun", "run_arm", "run_arms", "blind_baselines"]


# ---------------------------------------------------------------------------------------------------------
# The arms
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    name: str
    init: str = "stage2"               # "stage2": the stagewise checkpoint (stage 1 MIM -> stage 2 MLM); "scratch":
                                       # random weights (the same torch seed for every scratch arm)
    model: dict = field(default_factory=dict)      # VLMoConfig overrides (multiway, n_vl_layers)
    pretrain: dict = field(default_factory=dict)   # PretrainConfig overrides (negative_pool, local_groups)
    label: str = ""                    # how the tables name it


# VLMo's own setting, shared by the three tables (trained once, reused as each table's reference row)
BASELINE = Arm("stagewise", label="stagewise + Multiway + global negatives (VLMo)")
# Table 3: the same stage 3 from random initialisation instead of stage 1 -> stage 2
SCRATCH = Arm("scratch", init="scratch", label="stage 3 from scratch (random init)")
# Table 5 "Std TRM": one FFN shared by every token of every route (its weights: stage 2's V-FFN)
STD_TRM = Arm("std_trm", model={"multiway": False}, label="standard Transformer (one shared FFN)")
# Table 5 "Multiway-VLExp": V-FFN / L-FFN in every layer, no VL-FFN at the top
NO_VL = Arm("no_vl", model={"n_vl_layers": 0}, label="Multiway without VL experts")
# Table 6: hard negatives mined within each of 4 slices of the batch (4 emulated GPUs), as ALBEF does per GPU
LOCAL_NEG = Arm("local_neg", pretrain={"negative_pool": "local", "local_groups": 4},
                label="local hard negatives (4 slices of the batch)")

ARMS: tuple[Arm, ...] = (BASELINE, SCRATCH, STD_TRM, NO_VL, LOCAL_NEG)
# Which arms each paper table compares (the reference row first)
TABLES: dict[str, tuple[str, ...]] = {
    "Table 3 (initialisation)": ("stagewise", "scratch"),
    "Table 5 (Transformer)": ("stagewise", "std_trm", "no_vl"),
    "Table 6 (hard negatives)": ("stagewise", "local_neg"),
}


@dataclass
class StageBudget:
    """The stage-3 run every arm gets (the recipe's stage 3 settings, fewer steps)."""
    steps: int = 60
    batch_size: int = 32               # divisible by LOCAL_NEG's 4 slices
    lr: float = 1e-3
    warmup_steps: int = 6
    seed: int = 0

    def train_config(self, seed: int | None = None) -> TrainConfig:
        return TrainConfig(**dict(P.RECIPE_TRAIN[3], steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                  warmup_steps=self.warmup_steps, log_every=10 ** 6, progress_bar=False,
                                  seed=self.seed if seed is None else seed))


# ---------------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------------

def init_arm(arm: Arm, inits: dict, seed: int = 0) -> VLMo:
    """The arm's model before stage 3: ``inits[arm.init]`` (a VLMo) with the arm's config overrides, its weights
    copied wherever the new architecture has the same parameter (a dropped expert is left behind); or random weights
    (``arm.init == "scratch"``: ``torch.manual_seed(seed)``, the checkpoints' architecture + the arm's overrides)."""
    torch.manual_seed(seed)
    if arm.init == "scratch":                     # the same architecture as the checkpoints (else vlmo-tiny)
        base = next(iter(inits.values())).config if inits else load_config("vlmo-tiny")
        return build_model(replace(base, **arm.model)).train()
    if arm.init not in inits:
        raise ValueError(f"arm {arm.name!r} starts from {arm.init!r}, which is not among the inits {sorted(inits)}")
    src = inits[arm.init]
    cfg = replace(src.config, **arm.model)
    model = VLMo(cfg)
    own, state = model.state_dict(), src.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept]
    if missing:                                   # every parameter of the arm must come from the checkpoint
        raise ValueError(f"{arm.name}: {missing[:4]} are not in the {arm.init!r} checkpoint")
    model.load_state_dict(kept)
    return model.train()


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def itm_auc(model, data: R.RetrievalData, tokenizer=None, seed: int = 0) -> float:
    """An image-text matching probe on the fusion route: the ITM log-odds of every held-out image with its own caption
    against the same image with another scene's caption; the AUC (the chance that a true pair outscores a false one;
    blind 0.5). Unlike the held-out ITM loss it does not need the head to cross its prior's threshold."""
    n = len(data.images)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    other = torch.where(perm == torch.arange(n), (perm + 1) % n, perm)         # never the image's own caption
    pos = R.itm_scores(model, data.images, data.texts[:n], tokenizer)
    neg = R.itm_scores(model, data.images, [data.texts[j] for j in other.tolist()], tokenizer)
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def evaluate_arm(model, tokenizer, rdata: R.RetrievalData, n_pairs: int = 256, batch_size: int = 32) -> dict:
    """Held-out numbers of one arm: dual-encoder R@1/5/10 both ways, the stage-3 losses (global negatives for every
    arm, so Table 6's arms are scored alike), the ITM AUC probe."""
    with evaluating(model):
        r = R.evaluate_retrieval(model, rdata, tokenizer).dual
        held = P.evaluate_pretraining(model, tokenizer, n=n_pairs, batch_size=batch_size)
        auc = itm_auc(model, rdata, tokenizer)
    return {**{f"i2t_r{k}": float(v) for k, v in r.i2t.items()}, **{f"t2i_r{k}": float(v) for k, v in r.t2i.items()},
            **{k: float(v) for k, v in held.items()}, "itm_auc": auc}


def blind_baselines(n_retrieval: int, batch_size: int, pairs: P.PairData) -> dict:
    """What each metric scores without learning: R@K = K / N, ITC log B, the ITM prior (and its 2/3 accuracy), MLM
    the masked words' entropy, ITM AUC 0.5."""
    b = {f"{d}_r{k}": k / n_retrieval for d in ("i2t", "t2i") for k in (1, 5, 10)}
    b.update(itc=P.itc_chance(batch_size), i2t_acc=1 / batch_size, t2i_acc=1 / batch_size, itm=P.ITM_PRIOR_LOSS,
             itm_acc=2 / 3, mlm=P.token_prior(pairs), itm_auc=0.5)
    return b


# ---------------------------------------------------------------------------------------------------------
# Running the arms
# ---------------------------------------------------------------------------------------------------------

class ArmRun(NamedTuple):
    arm: Arm
    seed: int
    steps: int                    # optimizer steps trained (equal for every arm: the budget)
    batch_size: int
    cpu_seconds: float            # process CPU time of the stage-3 training alone (time.process_time)
    eval_cpu_seconds: float       # ... of its evaluation
    history: list                 # per-step training metrics (loss, itc, itm, mlm, ...)
    eval: dict                    # held-out metrics (evaluate_arm)
    n_parameters: int


def run_arm(arm: Arm, budget: StageBudget, inits: dict, pairs: P.PairData, tokenizer, rdata: R.RetrievalData,
            seed: int | None = None, n_eval_pairs: int = 256) -> ArmRun:
    """Initialise ``arm``, train its stage 3 on ``pairs`` for ``budget``, evaluate it (VLMo §3.3-3.4)."""
    s = budget.seed if seed is None else seed
    model = init_arm(arm, inits, seed=s)
    pcfg = replace(pairs.config, **arm.pretrain)
    cpu0 = time.process_time()
    run = P.run_stage(model, 3, pairs, budget.train_config(s), pcfg)
    cpu1 = time.process_time()
    ev = evaluate_arm(model, tokenizer, rdata, n_pairs=n_eval_pairs, batch_size=budget.batch_size)
    return ArmRun(arm, s, run.result.step, budget.batch_size, cpu1 - cpu0, time.process_time() - cpu1,
                  run.result.history, ev, sum(p.numel() for p in model.parameters()))


def run_arms(arms: Sequence[Arm], budget: StageBudget, inits: dict, pairs: P.PairData, tokenizer,
             rdata: R.RetrievalData, seeds: dict | None = None, n_eval_pairs: int = 256,
             progress=None) -> dict[str, list[ArmRun]]:
    """Every arm under the same ``budget``; ``seeds[name]`` lists the seeds of an arm (default: ``budget.seed``).
    Returns {arm name: [ArmRun per seed]}. ``progress(name, seed)`` is called before each run (e.g. a tqdm update)."""
    out: dict[str, list[ArmRun]] = {}
    for arm in arms:
        for s in (seeds or {}).get(arm.name, [budget.seed]):
            if progress is not None:
                progress(arm.name, s)
            out.setdefault(arm.name, []).append(run_arm(arm, budget, inits, pairs, tokenizer, rdata, s, n_eval_pairs))
    return out
