"""M6's recipes: how each shipped M6 checkpoint is made (``mmkit train NAME`` runs one; ``mmkit.load`` runs a
missing one once and caches it).

    m6-tiny-pretrained   M6 §3.3 four-task pretraining (stage 0 trains the CNN first)      from scratch
    m6-tiny-itm          M6 §4.6 image-text matching head                                  <- m6-tiny-pretrained
    m6-tiny-vqa          M6 §4.2 generative VQA, EN + ZH, drawing augmentations            <- m6-tiny-pretrained
    m6-tiny-t2i          M6 §4.1 code LM on vqgan-world codes                              <- m6-tiny-pretrained,
                                                                                              vqgan-world

Each recipe writes ``model.safetensors`` + ``config.json`` (+ trainer state) into the folder it is given and
returns the metrics it measured, which :func:`mmkit.hub.run_recipe` stores in ``recipe.json``. A recipe that
starts from another checkpoint loads it here, visibly, with :func:`mmkit.hub.load` (its ``needs``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import mmkit.hub as hub
from mmkit.config import build_model, load_config
from mmkit.m6.model import M6Model
from mmkit.m6.tasks.itm import ITM_TRAIN, ITM_TRAIN_FAST, finetune_itm, itm_model_from_pretrained
from mmkit.m6.tasks.pretrain import pretrain, recipe_configs
from mmkit.m6.tasks.t2i import (EVAL_KINDS, HELDOUT_PAIRS, RECIPE_TRAIN as T2I_TRAIN,
                                RECIPE_TRAIN_FAST as T2I_TRAIN_FAST, SamplingConfig, T2IDataConfig, eval_prompts,
                                evaluate_t2i, finetune_t2i)
from mmkit.m6.tasks.vqa import (VQA_RELATION_FOCUS, VQA_RELATION_TRAIN, VQA_RELATION_TRAIN_FAST, VQA_TRAIN,
                                VQA_TRAIN_FAST, VQAConfig, evaluate_vqa, finetune_vqa, vqa_bank,
                                zero_shot_answers)
from mmkit.registry import recipe
from mmkit.tokenizer import world_tokenizer
from mmkit.train import TrainConfig, delta_over, rounded_to_half, save_checkpoint, thinned_history

__all__ = ["train_m6_tiny_pretrained", "train_m6_tiny_itm", "train_m6_tiny_vqa", "train_m6_tiny_t2i"]


def _r4(v) -> float:
    return round(float(v), 4)


@recipe("m6-tiny-pretrained", "M6 tiny pretrained on the four M6 §3.3 tasks (EN + ZH world text and captions)",
        config="m6-tiny")
def train_m6_tiny_pretrained(out_dir: Path, fast: bool) -> dict:
    pcfg, tcfg = recipe_configs(fast)
    torch.manual_seed(tcfg.seed)
    model = build_model(load_config("m6-tiny"))
    run = pretrain(model, pcfg, tcfg)
    final = run.result.evals[-1] if run.result.evals else run.evaluator(model)
    save_checkpoint(out_dir, model, step=run.result.step, train_config=tcfg,
                    history=thinned_history(run.result.history, 1),      # every step (notebook 03 smooths it)
                    evals=run.result.evals, weights_dtype=torch.float16, extra={
                        "pretrain_config": asdict(pcfg), "mixed_precision": run.result.mixed_precision,
                        "extractor_losses": [_r4(v) for v in run.extractor.losses] if run.extractor else []})
    metrics = {k: _r4(v) for k, v in final.items() if k != "step"}
    if run.extractor is not None:
        metrics.update({f"extractor_{k}_acc": _r4(v) for k, v in run.extractor.accuracy.items()})
    metrics.update(steps=run.result.step, train_seconds=round(run.result.seconds, 1),
                   cpu_seconds=round(run.cpu_seconds, 1), first_loss=_r4(run.result.history[0]["loss"]),
                   last_loss=_r4(run.result.history[-1]["loss"]), wall_seconds=round(run.wall_seconds, 1),
                   torch_threads=torch.get_num_threads())
    return metrics


@recipe("m6-tiny-itm", "M6 tiny fine-tuned for image-text matching (M6 §4.6): substituted-caption negatives",
        config="m6-tiny-itm", needs=("m6-tiny-pretrained",))
def train_m6_tiny_itm(out_dir: Path, fast: bool) -> dict:
    tcfg = TrainConfig(**(ITM_TRAIN_FAST if fast else ITM_TRAIN))
    torch.manual_seed(tcfg.seed)
    model = itm_model_from_pretrained(hub.load("m6-tiny-pretrained"))
    run = finetune_itm(model, tcfg, n_train=1000 if fast else 4000, n_eval=128 if fast else 512)
    hist = run.result.history
    save_checkpoint(out_dir, run.model, step=run.result.step, train_config=tcfg,
                    history=thinned_history(hist, 10), weights_dtype=torch.float16,
                    **delta_over(run.model, "m6-tiny-pretrained", torch.float16))   # the frozen extractor: from there
    ev = run.eval
    return {"itm_acc": _r4(ev.accuracy), "positive_acc": _r4(ev.positive_acc), "n_eval": ev.n,
            **{f"acc_{k}": _r4(v) for k, v in ev.per_kind.items()},
            **{f"ranking_{k}": _r4(v) for k, v in ev.ranking.items()},
            "steps": run.result.step, "first_loss": _r4(hist[0]["loss"]),
            "last_loss": _r4(sum(h["loss"] for h in hist[-20:]) / len(hist[-20:])),
            "train_seconds": round(run.result.seconds, 1), "wall_seconds": round(run.seconds, 1),
            "torch_threads": torch.get_num_threads()}


@recipe("m6-tiny-vqa", "M6 tiny fine-tuned for generative VQA (M6 §4.2 'question ... answer:'), EN + ZH, "
        "with drawing augmentations", config="m6-tiny-cells", needs=("m6-tiny-pretrained",))
def train_m6_tiny_vqa(out_dir: Path, fast: bool) -> dict:
    cpu0 = time.process_time()
    tcfg = TrainConfig(**(VQA_TRAIN_FAST if fast else VQA_TRAIN))
    # The answer side reads one code token per world cell (M6Model.with_cell_code, issue 12): its head is trained
    # first on frozen CNN features (code_steps), then the image side stays frozen while the Transformer learns.
    cfg = VQAConfig(n_scenes=2000, n_augmented=2000, code_steps=200, image_lr_scale=0.0) if fast else \
        VQAConfig(image_lr_scale=0.0)
    torch.manual_seed(tcfg.seed)
    model = M6Model.with_cell_code(hub.load("m6-tiny-pretrained")).train()
    bank = vqa_bank(cfg, "train")
    first = finetune_vqa(model, train_config=tcfg, config=cfg, bank=bank, n_eval=0)
    cpu_first = time.process_time() - cpu0
    # then relations, asked in one direction per axis, half of the questions (VQA_RELATION_TRAIN's note)
    rcfg = TrainConfig(**(VQA_RELATION_TRAIN_FAST if fast else VQA_RELATION_TRAIN))
    run = finetune_vqa(first.model.train(), train_config=rcfg, config=replace(cfg, **VQA_RELATION_FOCUS), bank=bank,
                       n_eval=0)
    cpu_finetune = time.process_time() - cpu0       # issue 12's budget: bank + cell-code head + both phases
    n_eval = 100 if fast else 400
    run = run._replace(cell_code=first.cell_code, eval=evaluate_vqa(run.model, "test", n_eval),
                       eval_augmented=evaluate_vqa(run.model, "test", n_eval, augmented=True))
    half = evaluate_vqa(rounded_to_half(run.model).eval(), "test", n_eval)      # what the float16 file answers
    _, zs_gen, zs_rank = zero_shot_answers(hub.load("m6-tiny-pretrained"), n=50 if fast else 200)
    steps = first.result.step + run.result.step
    hist = first.result.history + [dict(h, step=h["step"] + first.result.step) for h in run.result.history]
    save_checkpoint(out_dir, run.model, step=steps, train_config=tcfg, history=thinned_history(hist, 25),
                    weights_dtype=torch.float16, **delta_over(run.model, "m6-tiny-pretrained", torch.float16),
                    extra={"vqa_config": asdict(cfg), "relation_phase": {"train": dict(asdict(rcfg)),
                                                                         "focus": VQA_RELATION_FOCUS}})
    return {"test_acc": _r4(run.eval.accuracy), "test_n_questions": run.eval.n_questions,
            **{f"test_acc_{k}": _r4(v) for k, v in run.eval.per_type.items()},
            **{f"test_acc_{k}": _r4(v) for k, v in run.eval.per_lang.items()},
            **{f"cell_code_test_{k}": v for k, v in run.cell_code["test"].items()},
            "cell_code_seconds": run.cell_code["seconds"],
            "fp16_test_acc": _r4(half.accuracy), "augmented_acc": _r4(run.eval_augmented.accuracy),
            **{f"augmented_acc_{k}": _r4(v) for k, v in run.eval_augmented.per_type.items()},
            "zero_shot_generated_acc": _r4(zs_gen.accuracy), "zero_shot_ranked_acc": _r4(zs_rank.accuracy),
            **{f"zero_shot_ranked_acc_{k}": _r4(v) for k, v in zs_rank.per_type.items()},
            "steps": steps, "relation_phase_steps": run.result.step, "first_loss": _r4(hist[0]["loss"]),
            "last_loss": _r4(sum(h["loss"] for h in hist[-25:]) / len(hist[-25:])),
            "train_seconds": round(first.result.seconds + run.result.seconds, 1),
            "wall_seconds": round(first.seconds + run.seconds, 1), "cpu_seconds_finetune": round(cpu_finetune, 1),
            "relation_phase_cpu_seconds": round(cpu_finetune - cpu_first, 1),
            "torch_threads": torch.get_num_threads()}


@recipe("m6-tiny-t2i", "M6 tiny text-to-image code LM (M6 §4.1) on vqgan-world codes, EN + ZH prompts",
        config="m6-tiny-t2i", needs=("m6-tiny-pretrained", "vqgan-world"))
def train_m6_tiny_t2i(out_dir: Path, fast: bool) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    tok = world_tokenizer()
    vqgan = hub.load("vqgan-world")
    pretrained = hub.load("m6-tiny-pretrained")
    tcfg = TrainConfig(**(T2I_TRAIN_FAST if fast else T2I_TRAIN), progress_bar=not fast)
    dcfg = T2IDataConfig(n_scenes=800 if fast else T2IDataConfig.n_scenes)
    run = finetune_t2i(pretrained, vqgan, tok, tcfg, dcfg, val_scenes=128 if fast else 256)
    if not run.after["code_loss"] < run.before["code_loss"] - 1.0:
        raise RuntimeError(f"m6-tiny-t2i did not learn: val code loss {run.before['code_loss']:.3f} -> "
                           f"{run.after['code_loss']:.3f}")
    n_eval = 32 if fast else 128
    metrics = {"val_code_loss_before": _r4(run.before["code_loss"]), "val_code_acc_before":
               _r4(run.before["code_acc"]), "val_code_loss": _r4(run.after["code_loss"]),
               "val_code_acc": _r4(run.after["code_acc"])}
    cpu_train = time.process_time() - cpu0
    sampling = SamplingConfig(n_samples=1)
    for kind in EVAL_KINDS:
        ev = evaluate_t2i(run.model, vqgan, tok, eval_prompts(n_eval, kind), sampling)
        metrics.update({f"{kind}_{k}": _r4(v) for k, v in ev.items() if k.startswith("first_")})
        metrics[f"{kind}_seconds_per_image"] = _r4(ev["seconds_per_image"])
    save_checkpoint(out_dir, run.model, step=run.result.step, train_config=tcfg,
                    history=thinned_history(run.result.history, 10),
                    extra={"data_config": dict(asdict(dcfg))}, weights_dtype=torch.float16,
                    **delta_over(run.model, "m6-tiny-pretrained", torch.float16))
    metrics.update(steps=run.result.step, first_loss=_r4(run.result.history[0]["loss"]),
                   last_loss=_r4(run.result.history[-1]["loss"]), train_seconds=round(run.result.seconds, 1),
                   wall_seconds=round(time.perf_counter() - t0, 1),
                   cpu_seconds=round(cpu_train, 1), torch_threads=torch.get_num_threads(),
                   train_scenes=len(run.data), heldout_pairs=[list(p) for p in HELDOUT_PAIRS])
    return metrics
