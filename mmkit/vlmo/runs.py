"""VLMo's run tasks: what ``scaled/configs/runs/vlmo_*.yaml`` train (``mmkit.runs``; ``scaled/README.md``).

    vlmo-stage1   VLMo §3.4 stage 1: BEiT masked image modelling on VQGAN codes; trains attention + V-FFN
    vlmo-stage2   stage 2: text-only masked language modelling; attention and V-FFN frozen, trains L-FFN (+ text
                  embeddings)
    vlmo-stage3   stage 3: image-text pairs (ITC + global hard-negative ITM + MLM); trains everything
    vlmo-vqa      VQA fine-tuning as classification (§4.3) from a pretrained VLMo

Chained through ``init_from``: stage 1 -> stage 2 -> stage 3 -> VQA. The freezing and the expert copies between
stages are those of :func:`mmkit.vlmo.tasks.pretrain.run_stage` (its ``prepare_stage`` / ``copy_expert``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from mmkit.config import build_model
from mmkit.data.vqa import VQASampler
from mmkit.data.scenes import SceneBank
from mmkit.registry import RunTask, register_run_task
from mmkit.runs import RunParts, options_from
from mmkit.tokenizer import world_tokenizer
from mmkit.vlmo.model import VLMoVQAConfig
from mmkit.vlmo.tasks.pretrain import (ImageData, PairData, PretrainConfig, TextData, copy_expert, mim_loss,
                                       prepare_stage, text_mlm_loss, vl_loss)
from mmkit.vlmo.tasks.vqa import vqa_loss

__all__ = ["VLMoRunOptions"]


@dataclass
class VLMoRunOptions(PretrainConfig):
    # PretrainConfig's fields (data sizes, masking, loss weights, expert initialisation between stages) plus:
    image_tokenizer: str = "vqgan-world-32"  # stage 1: the checkpoint (hub name) whose codes MIM predicts
    n_scenes: int = 4000                   # vlmo-vqa: training scenes


def _opts(options: dict, mcfg) -> VLMoRunOptions:
    options = dict(options)
    options.setdefault("image_size", mcfg.image_size)          # the data follows the model
    return options_from(VLMoRunOptions, options, "vlmo task_options")


def _stage(stage: int):
    def build(mcfg, options: dict, ctx) -> RunParts:
        opts = _opts(options, mcfg)
        model = build_model(mcfg)
        tok = world_tokenizer()
        if stage == 1:
            if ctx.load is None:
                raise ValueError("vlmo-stage1 needs the image tokenizer: run it through `mmkit train RUN.yaml` or "
                                 "scaled/train.py (they pass the hub loader)")
            data = ImageData.build(opts, ctx.load(opts.image_tokenizer), mcfg.grid_size)
            loss = mim_loss
        elif stage == 2:
            data, loss = TextData.build(opts, tok, mcfg.max_text_len), text_mlm_loss
        else:
            data = PairData.build(opts, tok, mcfg.max_text_len)

            def loss(m, b):
                return vl_loss(m, b, opts)

        def prepare(m) -> None:                 # after init_from: the expert copies, then VLMo §3.4's freezing
            if stage == 2 and opts.language_init:
                copy_expert(m, opts.language_init, "language")
            if stage == 3 and opts.vl_init:
                copy_expert(m, opts.vl_init, "vl")
            prepare_stage(m, stage)
        return RunParts(model, loss, data.batch_fn, prepare=prepare)
    return build


def _build_vqa(mcfg, options: dict, ctx) -> RunParts:
    opts = _opts(options, mcfg)
    base = {f.name: getattr(mcfg, f.name) for f in fields(mcfg) if f.name != "model_type"}
    model = build_model(VLMoVQAConfig(**base))
    bank = SceneBank.build("train", opts.n_scenes, image_size=mcfg.image_size, min_objects=opts.min_objects,
                           max_objects=opts.max_objects)
    sampler = VQASampler(bank, opts.lang, 0.0)
    tok = world_tokenizer()
    return RunParts(model, lambda m, b: vqa_loss(m, b, tok), sampler.batch_fn)


for _s, _what in ((1, "masked image modelling on VQGAN codes (attention + V-FFN)"),
                  (2, "text-only masked language modelling (L-FFN; attention frozen)"),
                  (3, "image-text pairs: ITC + global hard-negative ITM + MLM (everything)")):
    register_run_task(RunTask(f"vlmo-stage{_s}", f"VLMo §3.4 stage {_s}: {_what}", _stage(_s), model="vlmo-base",
                              options=VLMoRunOptions))
register_run_task(RunTask("vlmo-vqa", "VLMo §4.3 VQA fine-tuning (classification over the answers)", _build_vqa,
                          model="vlmo-base", options=VLMoRunOptions))
