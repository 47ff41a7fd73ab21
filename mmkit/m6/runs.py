"""M6's run tasks: what ``scaled/configs/runs/m6_*.yaml`` train (``mmkit.runs``; ``scaled/README.md``).

    m6-extractor   stage 0 (M6 §3.1): the image side learns to name each grid cell's object (a trained extractor)
    m6-pretrain    the four M6 §3.3 tasks (text denoising, language modelling, image captioning, multimodal-to-text);
                   M6-MoE (M6-100B, §3.4) as well; task weights in task_options (image captioning alone = captioning)
    m6-vqa         generative VQA fine-tuning (M6 §4.2 pattern)
    m6-text-qa     reading-comprehension QA on descriptions (text to text)
    m6-poems       poem generation (text to text, M6 §4.5)
    m6-itm         image-text matching head (M6 §4.6), one process

Chained: ``m6-extractor`` -> ``m6-pretrain`` (init_from the stage-0 run) -> each downstream task (init_from the
pretraining run). Data: the world (default) or tar shards (``data: {source: shards, path: ...}``, pretraining).

The pretraining loss here is ONE forward per micro-batch over the mixed task rows (``masking.collate`` lays every
row out as [visual | encoder | decoder]; text rows' visual slots are padding) and divides the summed token loss by
the token count of the GLOBAL batch (an all_reduce), so every process runs the same number of forwards (FSDP and
ZeRO-3 gather parameters per forward) and N processes compute what one computes on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkit.config import build_model
from mmkit.data.shards import ImageTextShards
from mmkit.data.vqa import VQASampler
from mmkit.data.world import object_labels
from mmkit.m6.masking import IGNORE_INDEX, collate
from mmkit.m6.model import IMAGE_SIDE, GridProbe, M6ITMConfig
from mmkit.m6.tasks.itm import itm_data, itm_loss
from mmkit.m6.tasks.poems import poem_data
from mmkit.m6.tasks.pretrain import PretrainConfig, PretrainData
from mmkit.m6.tasks.seq2seq import seq2seq_loss
from mmkit.m6.tasks.text_qa import qa_data
from mmkit.m6.tasks.vqa import VQAConfig, vqa_bank, vqa_loss
from mmkit.objectives.lm import token_log_probs
from mmkit.registry import RunTask, register_run_task
from mmkit.runs import RunParts, options_from
from mmkit.tokenizer import SpecialIds, world_tokenizer
from mmkit.train import scaled_param_groups, unwrap

__all__ = ["M6RunOptions", "global_pretrain_loss", "shard_pretrain_data", "stage0_loss"]


@dataclass
class M6RunOptions(PretrainConfig):
    # PretrainConfig's fields (task weights, noise, data sizes, stage 0 steps ...) plus:
    image_lr_scale: float | None = None   # LR multiplier of the image side (None: PretrainConfig.extractor_lr_scale
                                          # in pretraining, 0.1 for VQA, 0 for ITM); 0 freezes it
    n_items: int = 4000                   # downstream tasks: training items (scenes / QA pairs / poems)


def _opts(options: dict) -> M6RunOptions:
    return options_from(M6RunOptions, options, "m6 task_options")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

class _Lazy:
    """A sequence computed item by item (``seq[i]``), optionally from a list of indices (stacked tensors)."""

    def __init__(self, n: int, fn, stack: bool = False):
        self.n, self.fn, self.stack = n, fn, stack

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, (list, tuple, range)):
            return torch.stack([self.fn(int(j)) for j in i])
        return self.fn(int(i))


def shard_pretrain_data(opts: PretrainConfig, tok, n_visual: int, path, image_size: int) -> PretrainData:
    """:class:`PretrainData` over tar shards: the image-text pairs are read and tokenized on access (nothing is
    loaded up front); the text-only tasks read the shards' texts as passages."""
    ds = ImageTextShards(path, image_size=image_size)
    special = SpecialIds.from_tokenizer(tok)

    def ids(i: int) -> torch.Tensor:
        text = ds[i]["text"]
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:opts.max_text_tokens], dtype=torch.long)

    def image_u8(i: int) -> torch.Tensor:
        return ds.image(i).mul(255).round_().to(torch.uint8)

    pair_ids = _Lazy(len(ds), ids)
    images = _Lazy(len(ds), image_u8)
    return PretrainData(opts, special, n_visual, pair_ids, images, None, None, None, pair_ids, None, None)


def _pretrain_data(opts: M6RunOptions, model, ctx) -> PretrainData:
    tok = world_tokenizer()
    nv = unwrap(model).num_visual_tokens
    src = ctx.data.get("source", "world")
    if src == "shards":
        if not ctx.data.get("path"):
            raise ValueError("data: {source: shards} needs a path (a folder or glob of tar shards)")
        return shard_pretrain_data(opts, tok, nv, ctx.data["path"], unwrap(model).config.image_size)
    if src != "world":
        raise ValueError(f"data source {src!r}: use 'world' or 'shards'")
    return PretrainData.build(opts, tok, "train", n_visual=nv)


# ---------------------------------------------------------------------------------------------------------
# Losses that give the same gradient on any number of processes
# ---------------------------------------------------------------------------------------------------------

def _global_count(n: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(total over processes, world size) of a local count (float64)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = n.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        return total, dist.get_world_size()
    return n.detach().to(torch.float64), 1


def global_pretrain_loss(model, batch: dict):
    """``loss_fn``: the M6 §3.3 batch (every task's rows) in ONE forward; token cross-entropy summed over the slice,
    divided by the global batch's token count and multiplied by the world size (DDP / FSDP / ZeRO average over
    processes), plus the weighted MoE side loss (each process's share; their mean is the global value)."""
    raw = unwrap(model)
    dev = raw.wte.weight.device
    tb = collate(batch["examples"], pad_id=raw.config.pad_token_id)
    n_vis = tb.mask.shape[-1] - tb.encoder_ids.shape[1] - tb.decoder_input_ids.shape[1]
    images = batch["images"].to(dev) if n_vis else None
    out = model(images, tb.encoder_ids.to(dev), tb.decoder_input_ids.to(dev), None, mask=tb.mask.to(dev))
    labels = tb.labels.to(dev)
    valid = labels != IGNORE_INDEX
    tok_sum = -token_log_probs(out.logits, labels).sum()
    n = valid.sum()
    total, world = _global_count(n)
    loss = tok_sum * (world / total.clamp(min=1)).to(tok_sum.dtype)
    metrics = {}
    if out.aux_loss is not None:
        metrics["aux"] = float(out.aux_loss.detach())
        loss = loss + raw.config.aux_loss_weight * out.aux_loss
    with torch.no_grad():
        metrics["token_acc"] = float(((out.logits.argmax(-1) == labels) & valid).sum()) / max(1, int(n))
    return loss, metrics


def stage0_loss(model, batch: dict):
    """``loss_fn`` of stage 0: :meth:`GridProbe.loss` through the (possibly wrapped) probe's forward."""
    probe = unwrap(model)
    parts = model(batch["images"]).split(probe.classes, dim=-1)
    labels = batch["labels"]
    return sum(F.cross_entropy(p.reshape(-1, k), labels[..., j].reshape(-1))
               for j, (p, k) in enumerate(zip(parts, probe.classes)))


# ---------------------------------------------------------------------------------------------------------
# Builders: (model config, task_options, RunContext) -> RunParts
# ---------------------------------------------------------------------------------------------------------

def _build_extractor(mcfg, options: dict, ctx) -> RunParts:
    opts = _opts(options)
    m6 = build_model(mcfg)
    data = PretrainData.build(opts, world_tokenizer(), "train", n_texts=0, n_visual=m6.num_visual_tokens)
    labels = object_labels(data.pair_scenes)                                   # (N, 9, 3)
    probe = GridProbe(m6, n_cells=labels.shape[1])

    def batch_fn(g: torch.Generator, b: int) -> dict:
        idx = torch.randint(len(data.pair_ids), (b,), generator=g)
        return {"images": data.images(idx.tolist()), "labels": labels[idx]}
    return RunParts(probe, stage0_loss, batch_fn)


def _build_pretrain(mcfg, options: dict, ctx) -> RunParts:
    opts = _opts(options)
    model = build_model(mcfg)
    data = _pretrain_data(opts, model, ctx)
    scale = opts.extractor_lr_scale if opts.image_lr_scale is None else opts.image_lr_scale
    groups = None if scale == 1.0 else (lambda m: scaled_param_groups(
        m, ctx.train.weight_decay, ctx.train.lr, {p: scale for p in IMAGE_SIDE}))
    return RunParts(model, global_pretrain_loss, data.batch_fn, param_groups_fn=groups)


def _build_vqa(mcfg, options: dict, ctx) -> RunParts:
    opts = _opts(options)
    model = build_model(mcfg)
    vcfg = VQAConfig(image_size=mcfg.image_size, n_scenes=opts.n_items, n_augmented=0, aug_fraction=0.0,
                     lang=opts.lang)
    sampler = VQASampler(vqa_bank(vcfg, "train"), vcfg.lang, 0.0)
    tok = world_tokenizer()
    scale = 0.1 if opts.image_lr_scale is None else opts.image_lr_scale
    return RunParts(model, lambda m, b: vqa_loss(m, b, tok), sampler.batch_fn,
                    param_groups_fn=lambda m: scaled_param_groups(m, ctx.train.weight_decay, ctx.train.lr,
                                                                  {p: scale for p in IMAGE_SIDE}))


def _build_text(kind: str):
    def build(mcfg, options: dict, ctx) -> RunParts:
        opts = _opts(options)
        model = build_model(mcfg)
        tok = world_tokenizer()
        _, data = (qa_data if kind == "qa" else poem_data)("train", opts.n_items, tok=tok)
        return RunParts(model, seq2seq_loss, data.batch_fn)
    return build


def _build_itm(mcfg, options: dict, ctx) -> RunParts:
    if ctx.world_size > 1:
        raise ValueError("m6-itm's loss calls the model's match_logits directly (not through DDP); run it on one "
                         "process")
    opts = _opts(options)
    cfg = M6ITMConfig(**{f.name: getattr(mcfg, f.name) for f in fields(mcfg) if f.name != "model_type"
                         and f.name in {g.name for g in fields(M6ITMConfig)}})
    model = build_model(cfg)
    data = itm_data("train", opts.n_items, cfg.image_size)
    tok = world_tokenizer()
    return RunParts(model, lambda m, b: itm_loss(m, b, tok), data.batch_fn)


register_run_task(RunTask("m6-extractor", "M6 stage 0 (§3.1): train the image side to name every grid cell's object",
                          _build_extractor, model="m6-base", options=M6RunOptions))
register_run_task(RunTask("m6-pretrain", "M6 pretraining (§3.3): text denoising, LM, captioning, multimodal-to-text "
                          "(M6-MoE too)", _build_pretrain, model="m6-base", options=M6RunOptions))
register_run_task(RunTask("m6-vqa", "M6 generative VQA fine-tuning (§4.2 pattern)", _build_vqa, model="m6-base",
                          options=M6RunOptions))
register_run_task(RunTask("m6-text-qa", "M6 reading-comprehension QA on descriptions (text to text)",
                          _build_text("qa"), model="m6-base", options=M6RunOptions))
register_run_task(RunTask("m6-poems", "M6 poem generation (§4.5, text to text)", _build_text("poems"),
                          model="m6-base", options=M6RunOptions))
register_run_task(RunTask("m6-itm", "M6 image-text matching head (§4.6), one process", _build_itm, model="m6-base",
                          options=M6RunOptions))
