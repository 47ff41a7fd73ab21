"""Switching a module between training and evaluation without losing the caller's mode."""
from __future__ import annotations

import contextlib

import torch.nn as nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``with evaluating(model):`` runs the block in eval mode (no dropout) and restores the previous mode after,
    even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
