"""BERT-style initialisation of every mmkit layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmkit.nn.embeddings import ImageEmbeddings, PositionEmbedding, PositionEmbedding2D, TypeEmbedding

__all__ = ["init_weights"]


# ---------------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT-style init of ``module`` and all its submodules; returns ``module``. Call it once on the root.

    Linear / conv / embedding weights ~ N(0, std) (BERT's ``initializer_range``), biases 0, norms to
    weight 1 / bias 0, embedding padding rows 0. Small, uniform std keeps deep stacks stable at start.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (PositionEmbedding, TypeEmbedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, ImageEmbeddings):
            for t in (m.cls_token, m.mask_token):
                if t is not None:
                    nn.init.normal_(t, mean=0.0, std=std)
        elif isinstance(m, PositionEmbedding2D):
            nn.init.normal_(m.row, mean=0.0, std=std)
            nn.init.normal_(m.col, mean=0.0, std=std)
    return module
