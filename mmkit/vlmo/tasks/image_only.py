"""VLMo as an image-only encoder (VLMo §4.5): colour / shape / size of the object in every grid cell, read from the
vision path alone (image-only route: V-FFN in every layer, no text).

    model = VLMoForImageClassification.from_pretrained_vlmo(pretrained)   # a linear classifier on the vision path
    data = CellData(SceneBank.build("train", 4000, image_size=32))
    run = finetune_cells(model, data, steps=300)                           # CellRun(model, result, eval)
    acc = evaluate_cells(model, SceneBank.build("test", 400, image_size=32))   # {"colour": .., "shape": .., "size": ..}
    probe = linear_probe_features(model, images)                           # (B, D) frozen features for a probe

§4.5 evaluates VLMo's image encoder on ImageNet classification and ADE20K segmentation ("even slightly better than
the BEiT model used for the initialization"). The world's analogue is naming each cell's object: the targets are
:func:`mmkit.data.world.object_labels` (per cell: colour, shape, size, each + 1; 0 = empty cell), the loss is the
cross-entropy of each attribute per cell. Accuracy counts occupied cells; the majority baseline names the commonest
value of each attribute among them.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkit.data.scenes import CellData, SceneBank
from mmkit.data.world import object_labels
from mmkit.train import TrainConfig, evaluating, freeze, train, unwrap

__all__ = ["ATTRIBUTES", "CellData", "cell_loss", "cell_predictions", "evaluate_cells", "majority_baseline",
           "linear_probe_features", "CELL_TRAIN", "CELL_TRAIN_FAST", "CellRun", "finetune_cells"]

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size")


def _check_head(model) -> None:
    if not hasattr(unwrap(model), "cell_head"):
        raise ValueError(f"this task needs a VLMoForImageClassification, got {type(unwrap(model)).__name__}; build it "
                         "with VLMoForImageClassification.from_pretrained_vlmo(pretrained)")


def _split(model, logits: torch.Tensor) -> list[torch.Tensor]:
    return list(logits.split(tuple(unwrap(model).config.cell_classes), dim=-1))   # per attribute (B, cells, k)


def cell_loss(model, batch: dict):
    """Sum over attributes of the mean cross-entropy per cell (empty cells included: class 0), and the accuracy of
    each attribute on the occupied cells."""
    _check_head(model)
    dev = unwrap(model).type_embed.weight.device
    logits = model(batch["images"].to(dev)).logits.float()                        # (B, cells, sum(classes))
    labels = batch["labels"].to(dev)
    loss = 0.0
    metrics = {}
    occupied = labels[..., 0] > 0
    for j, (part, name) in enumerate(zip(_split(model, logits), ATTRIBUTES)):
        loss = loss + F.cross_entropy(part.reshape(-1, part.shape[-1]), labels[..., j].reshape(-1))
        with torch.no_grad():
            metrics[f"{name}_acc"] = (part.argmax(-1) == labels[..., j])[occupied].float().mean().item()
    return loss, metrics


@torch.no_grad()
def cell_predictions(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B, cells, 3) predicted attribute indices (+ 1; 0 = empty), as :func:`object_labels` writes them."""
    _check_head(model)
    dev, out = unwrap(model).type_embed.weight.device, []
    with evaluating(model):
        for i in range(0, len(images), batch_size):
            logits = model(images[i:i + batch_size].to(dev)).logits.float()
            out.append(torch.stack([p.argmax(-1) for p in _split(model, logits)], -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_cells(model, bank: SceneBank) -> dict[str, float]:
    """Accuracy of each attribute over the occupied cells of ``bank``'s scenes, and of the cell being empty or not."""
    labels = object_labels(bank.scenes)
    pred = cell_predictions(model, bank.images(range(len(bank))))
    occupied = labels[..., 0] > 0
    out = {name: float((pred[..., j] == labels[..., j])[occupied].float().mean()) for j, name in enumerate(ATTRIBUTES)}
    out["occupancy"] = float(((pred[..., 0] > 0) == occupied).float().mean())
    return out


def majority_baseline(train_bank: SceneBank, test_bank: SceneBank) -> dict[str, float]:
    """What naming each attribute's commonest training value on every occupied test cell scores: the floor a learned
    classifier must beat."""
    tr, te = object_labels(train_bank.scenes), object_labels(test_bank.scenes)
    occ_tr, occ_te = tr[..., 0] > 0, te[..., 0] > 0
    out = {}
    for j, name in enumerate(ATTRIBUTES):
        common = int(tr[..., j][occ_tr].mode().values)
        out[name] = float((te[..., j][occ_te] == common).float().mean())
    return out


@torch.no_grad()
def linear_probe_features(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B, D) mean of the final patch states of the image-only route: frozen features for a linear probe (any VLMo)."""
    dev, out = unwrap(model).type_embed.weight.device, []
    with evaluating(model):
        for i in range(0, len(images), batch_size):
            out.append(_image_states(model, images[i:i + batch_size].to(dev)).mean(1).float().cpu())
    return torch.cat(out)


def _image_states(model, images: torch.Tensor) -> torch.Tensor:
    """Final patch states (B, N, D) of an image-only pass, whatever head the VLMo carries."""
    raw = unwrap(model)
    x = raw.embed_image(images)
    return raw.encode(x, "vision")[:, 1:]


# The recipe's settings ("vlmo-tiny-image-cls"): not tuned beyond this.
CELL_TRAIN = dict(steps=400, batch_size=64, lr=2e-3, warmup_steps=30, min_lr_ratio=0.05, weight_decay=0.01,
                  mixed_precision="no", log_every=25, seed=0)
CELL_TRAIN_FAST = dict(CELL_TRAIN, steps=60, warmup_steps=6, batch_size=32)


class CellRun(NamedTuple):
    model: torch.nn.Module
    result: object                   # mmkit.train.TrainResult
    eval: dict | None                # evaluate_cells on the test bank
    seconds: float


def finetune_cells(model, data: CellData, steps: int | None = None, train_config: TrainConfig | None = None,
                   test_bank: SceneBank | None = None, **train_kw) -> CellRun:
    """Fine-tune a :class:`VLMoForImageClassification` (VLMo §4.5: the image encoder + a linear classifier). Only the
    vision path and the classifier train; text, language / VL experts and the pretraining heads are frozen."""
    _check_head(model)
    t0 = time.perf_counter()
    raw = unwrap(model)
    tcfg = train_config if train_config is not None else TrainConfig(**dict(CELL_TRAIN, **(
        {"steps": steps, "warmup_steps": min(CELL_TRAIN["warmup_steps"], max(1, steps // 10))} if steps else {})))
    vision = ("image_embeddings", "type_embeddings", "attention", "vision_ffn", "final_norm")
    for p in raw.parameters():
        p.requires_grad_(True)
    freeze(raw, [p for name, prefixes in raw.parts().items() if name not in vision for p in prefixes])
    try:
        result = train(model, cell_loss, data.batch_fn, tcfg, **train_kw)
    finally:
        for p in raw.parameters():
            p.requires_grad_(True)
    raw.eval()
    ev = evaluate_cells(raw, test_bank) if test_bank is not None else None
    return CellRun(raw, result, ev, time.perf_counter() - t0)
