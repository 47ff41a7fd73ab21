"""mPLUG's run tasks: what ``scaled/configs/runs/mplug_*.yaml`` train (``mmkit.runs``; ``scaled/README.md``).

    mplug-pretrain   mPLUG §3.3: ITC (momentum queues) + ITM (hard negatives) + MLM + prefix LM, jointly
    mplug-vqa        mPLUG §4.2 VQA as answer generation, from the pretrained model (init_from)
"""
from __future__ import annotations

from dataclasses import dataclass

from mmkit.config import build_model
from mmkit.data.vqa import VQASampler
from mmkit.mplug.tasks.pretrain import PretrainConfig, PretrainData, make_pretrain_loss
from mmkit.mplug.tasks.vqa import VQAConfig, vqa_bank, vqa_loss
from mmkit.registry import RunTask, register_run_task
from mmkit.runs import RunParts, options_from
from mmkit.tokenizer import world_tokenizer

__all__ = ["MPLUGRunOptions"]


@dataclass
class MPLUGRunOptions(PretrainConfig):
    # PretrainConfig's fields (task weights, masking, data sizes) plus:
    n_scenes: int = 4000               # mplug-vqa: training scenes


def _opts(options: dict, mcfg) -> MPLUGRunOptions:
    options = dict(options)
    options.setdefault("image_size", mcfg.image_size)          # the data follows the model
    return options_from(MPLUGRunOptions, options, "mplug task_options")


def _build_pretrain(mcfg, options: dict, ctx) -> RunParts:
    opts = _opts(options, mcfg)
    model = build_model(mcfg)
    data = PretrainData.build(opts, world_tokenizer())
    return RunParts(model, make_pretrain_loss(opts), data.batch_fn)


def _build_vqa(mcfg, options: dict, ctx) -> RunParts:
    opts = _opts(options, mcfg)
    model = build_model(mcfg)
    vcfg = VQAConfig(lang=opts.lang, n_scenes=opts.n_scenes, image_size=mcfg.image_size,
                     min_objects=opts.min_objects, max_objects=opts.max_objects)
    sampler = VQASampler(vqa_bank(vcfg, "train"), vcfg.lang, 0.0)
    tok = world_tokenizer()
    return RunParts(model, lambda m, b: vqa_loss(m, b, tok), sampler.batch_fn)


register_run_task(RunTask("mplug-pretrain", "mPLUG §3.3 pretraining: ITC + ITM + MLM + prefix LM", _build_pretrain,
                          model="mplug-base", options=MPLUGRunOptions))
register_run_task(RunTask("mplug-vqa", "mPLUG §4.2 VQA fine-tuning (answer generation)", _build_vqa,
                          model="mplug-base", options=MPLUGRunOptions))
