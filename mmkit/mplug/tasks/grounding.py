"""mPLUG visual grounding (mPLUG §5.2.4): the decoder writes the box of the referred object as coordinate tokens.

    tok, first = coordinate_tokenizer(n_bins=33)              # the world tokenizer + <loc_0> .. <loc_32>
    data = GroundingDataset("train", 4000, image_size=32)      # image, expression, box (x0, y0, x1, y1) in [0, 1]
    batch = grounding_batch([data[i] for i in range(64)], tok, first, 33)
    loss, m = grounding_loss(model, batch)                     # teacher forcing on [BOS] x0 y0 x1 y1 [EOS]
    boxes = predict_boxes(model, images, expressions, tok, first, 33)    # (B, 4) in [0, 1]
    ev = evaluate_grounding(model, tok, first, 33, "test", n=200)        # Acc@IoU 0.5 vs the centre-box baseline

§5.2.4: "Instead of regressing the bounding boxes directly, we concatenate visual features and attended textual
features and feed them into the decoder to predict the coordinates": the expression goes into the text encoder, the
decoder attends to [v^L; l^L] and writes four tokens. A coordinate x in [0, 1] becomes the token ``<loc_k>``,
k = round(x (n_bins - 1)) (the official code: ``[unused{340 + k}]``, k = floor(x image_res), image_res + 1 bins,
so one bin per pixel; here ``n_bins`` defaults to image_size + 1 as well). At inference the logits are restricted to
the coordinate tokens and exactly four are decoded greedily (the official ``prob_mask`` and 4-step loop).

The official fine-tuning also reweights each box's token losses by the L1 and GIoU errors of the argmax box
(``weight_decoder``); here the plain token cross-entropy is used (a Phase-B knob if accuracy needs it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from mmkit.data.datasets import GroundingDataset
from mmkit.evaluation.grounding import box_iou, centre_boxes, grounding_accuracy
from mmkit.mplug.tasks.inputs import decoder_inputs, encoder_inputs
from mmkit.tokenizer import add_coordinate_tokens, load_tokenizer
from mmkit.train import TrainConfig, cell_namers_fixed, evaluating, train, unwrap

__all__ = ["GroundingConfig", "coordinate_tokenizer", "check_vocabulary", "boxes_to_bins", "bins_to_boxes",
           "grounding_batch", "grounding_loss", "CoordinateOnly", "predict_boxes", "GroundingEval",
           "evaluate_grounding", "GroundingRun", "finetune_grounding"]


@dataclass
class GroundingConfig:
    n_bins: int = 33               # coordinate tokens per axis value (image_size + 1: one per pixel edge at 32 px)
    lang: str = "en"               # "en", "zh" or "both"
    max_expression_tokens: int = 32    # [CLS] expression [SEP] is cut to this many tokens


def coordinate_tokenizer(n_bins: int):
    """A private copy of the world tokenizer with ``<loc_0> .. <loc_{n_bins-1}>`` added: (tokenizer, first id).
    (The shared ``world_tokenizer()`` is never extended.)"""
    tok = load_tokenizer("world")
    return tok, add_coordinate_tokens(tok, n_bins)


def check_vocabulary(model, first_id: int, n_bins: int) -> None:
    """Raise if the model's vocabulary has no room for the coordinate tokens."""
    V = model.config.vocab_size
    if first_id + n_bins > V:
        raise ValueError(f"coordinate tokens {first_id}..{first_id + n_bins - 1} do not fit the model's vocab_size={V}; "
                         f"build the model with vocab_size >= {first_id + n_bins} or use fewer bins")


def boxes_to_bins(boxes: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(B, 4) boxes in [0, 1] -> (B, 4) bin indices k = round(x (n_bins - 1)), clamped to 0 .. n_bins - 1."""
    return (boxes.float().clamp(0, 1) * (n_bins - 1)).round().long()


def bins_to_boxes(bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(B, 4) bin indices -> (B, 4) boxes in [0, 1]."""
    return bins.float() / (n_bins - 1)


def grounding_batch(items: Sequence[dict], tok, first_id: int, n_bins: int, max_len: int = 32) -> dict:
    """GroundingDataset items -> {"images" (B, 3, S, S), "ids" / "mask" (B, L) [CLS] expression [SEP],
    "decoder_input_ids" / "labels" (B, 5) [BOS] c0..c3 / c0..c3 [EOS], "boxes" (B, 4) in [0, 1]}."""
    if not items:
        raise ValueError("grounding_batch needs at least one item")
    ids, mask = encoder_inputs(tok, [it["expression"] for it in items], max_len)
    boxes = torch.stack([torch.as_tensor(it["box"], dtype=torch.float) for it in items])     # (B, 4)
    coords = boxes_to_bins(boxes, n_bins) + first_id                                          # (B, 4) token ids
    dec, labels = decoder_inputs(coords.tolist(), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                                 pad_id=tok.pad_token_id)
    return {"images": torch.stack([it["image"] for it in items]), "ids": ids, "mask": mask,
            "decoder_input_ids": dec, "labels": labels, "boxes": boxes}


def grounding_loss(model, batch: dict):
    """Teacher-forced coordinate tokens -> (loss, {"coord_acc": share of the 4 coordinates right (argmax)})."""
    dev = batch["images"].device
    out = model(batch["images"], batch["ids"].to(dev), batch["decoder_input_ids"].to(dev), batch["labels"].to(dev),
                encoder_mask=batch["mask"].to(dev))
    with torch.no_grad():
        hit = out.logits[:, :4].argmax(-1).cpu() == batch["labels"][:, :4].cpu()
    return out.loss, {"coord_acc": float(hit.float().mean())}


class CoordinateOnly:
    """A ``logits_processor(ids, logits)`` for ``MPLUG.generate``: only coordinate tokens may be written."""

    def __init__(self, first_id: int, n_bins: int):
        self.first_id, self.n_bins = first_id, n_bins

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[self.first_id:self.first_id + self.n_bins] = True
        return logits.masked_fill(~keep, float("-inf"))


@torch.no_grad()
def predict_boxes(model, images: torch.Tensor, expressions: Sequence[str], tok, first_id: int, n_bins: int,
                  max_len: int = 32) -> torch.Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) in [0, 1]: four coordinate tokens decoded greedily from [v^L; l^L]."""
    m = unwrap(model)
    check_vocabulary(m, first_id, n_bins)
    ids, mask = encoder_inputs(tok, list(expressions), max_len)
    with evaluating(m):
        seqs = m.generate(images.to(m.device), ids.to(m.device), 4, encoder_mask=mask.to(m.device),
                          logits_processor=CoordinateOnly(first_id, n_bins)).sequences          # (B, 4)
    return bins_to_boxes(seqs.cpu() - first_id, n_bins)


class GroundingEval(NamedTuple):
    accuracy: float               # Acc@IoU 0.5 of the model's boxes (mPLUG Table 4's metric)
    baseline: float               # Acc@IoU 0.5 of the centre box of mean size (mmkit.evaluation.grounding.centre_boxes)
    mean_iou: float
    boxes: torch.Tensor           # (n, 4) predicted
    gold: torch.Tensor            # (n, 4)
    expressions: list


@torch.no_grad()
def evaluate_grounding(model, tok, first_id: int, n_bins: int, split: str = "test", n: int = 200, lang: str = "en",
                       start: int = 0, batch_size: int = 128) -> GroundingEval:
    """Acc@IoU 0.5 on ``n`` held-out GroundingDataset items, beside the blind centre-box baseline."""
    ds = GroundingDataset(split, n, lang=lang, image_size=model.config.image_size, start=start)
    items = [ds[i] for i in range(n)]
    preds = torch.cat([predict_boxes(model, torch.stack([it["image"] for it in items[i:i + batch_size]]),
                                     [it["expression"] for it in items[i:i + batch_size]], tok, first_id, n_bins)
                       for i in range(0, n, batch_size)])
    gold = torch.stack([it["box"] for it in items])
    return GroundingEval(grounding_accuracy(preds, gold), grounding_accuracy(centre_boxes(gold), gold),
                         float(box_iou(preds, gold).mean()), preds, gold, [it["expression"] for it in items])


class GroundingRun(NamedTuple):
    model: torch.nn.Module
    result: object                 # TrainResult
    cpu_seconds: float


def finetune_grounding(model, tok, first_id: int, n_bins: int, train_config: TrainConfig, n_train: int = 8000,
                       lang: str = "en", max_len: int = 32) -> GroundingRun:
    """Fine-tune ``model`` (trained in place) to write the four coordinate tokens of the referred object's box
    (mPLUG §5.2.4) on ``n_train`` GroundingDataset items of the train split (images rendered once)."""
    c0 = time.process_time()
    m = unwrap(model)
    check_vocabulary(m, first_id, n_bins)
    ds = GroundingDataset("train", n_train, lang=lang, image_size=m.config.image_size, cache_images=True)
    items = [ds[i] for i in range(len(ds))]

    def batch_fn(g: torch.Generator, b: int) -> dict:
        idx = torch.randint(len(items), (b,), generator=g).tolist()
        return grounding_batch([items[i] for i in idx], tok, first_id, n_bins, max_len)

    with cell_namers_fixed(m):                   # the namer of stage 0 stays fixed: its codes name objects
        result = train(model, grounding_loss, batch_fn, train_config)
    return GroundingRun(m, result, time.process_time() - c0)
