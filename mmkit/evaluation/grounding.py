"""Visual grounding metrics for any box predictor: IoU and Acc@IoU 0.5 (mPLUG §5.2.4), with a blind baseline.

    acc = grounding_accuracy(pred_boxes, gold_boxes)        # fraction with IoU >= 0.5
    base = grounding_accuracy(centre_boxes(gold_boxes), gold_boxes)   # a box in the middle of the image, no model

Boxes are (x0, y0, x1, y1), in any one unit (pixels or [0, 1]) for both arguments.
"""
from __future__ import annotations

import torch

__all__ = ["box_iou", "grounding_accuracy", "centre_boxes"]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (N, 4) box tensors: (N,). Empty or inverted boxes have area 0."""
    a, b = torch.as_tensor(a, dtype=torch.float).reshape(-1, 4), torch.as_tensor(b, dtype=torch.float).reshape(-1, 4)
    if a.shape != b.shape:
        raise ValueError(f"need one predicted box per gold box, got {tuple(a.shape)} and {tuple(b.shape)}")
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)   # noqa: E731
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def grounding_accuracy(pred: torch.Tensor, gold: torch.Tensor, threshold: float = 0.5) -> float:
    """Acc@IoU``threshold``: the fraction of predicted boxes whose IoU with the gold box is at least it."""
    iou = box_iou(pred, gold)
    return float((iou >= threshold).float().mean()) if len(iou) else 0.0


def centre_boxes(gold: torch.Tensor, extent: float = 1.0) -> torch.Tensor:
    """The blind baseline: for every gold box, a box of the mean gold size centred in the image whose side is
    ``extent`` (1.0 for [0, 1] boxes, S for pixel boxes)."""
    gold = torch.as_tensor(gold, dtype=torch.float).reshape(-1, 4)
    w, h = (gold[:, 2] - gold[:, 0]).mean(), (gold[:, 3] - gold[:, 1]).mean()
    c = extent / 2
    box = torch.stack([c - w / 2, c - h / 2, c + w / 2, c + h / 2])
    return box.expand(len(gold), 4).clone()
