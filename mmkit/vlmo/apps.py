"""What VLMo offers the apps: its VQA classifier for ``apps/vqa.py``, registered in :mod:`mmkit.registry`.

The app lists an entry only when its checkpoint is shipped or cached (``mmkit.zoo.vqa_models``), so this entry is
harmless until the ``vlmo-tiny-vqa`` checkpoint exists.
"""
from __future__ import annotations

import mmkit.hub as hub
from mmkit.registry import VQAModelEntry, register_vqa_model
from mmkit.vlmo.model import VLMoVQAConfig
from mmkit.vlmo.tasks.vqa import answer, answer_heatmap

__all__: list[str] = []

register_vqa_model(VQAModelEntry(
    name="VLMo-tiny VQA", checkpoint="vlmo-tiny-vqa", load=lambda: hub.load("vlmo-tiny-vqa"),
    description="VLMo tiny: Multiway Transformer fusion encoder, a classifier over the world's EN + ZH answers on "
                "the pooled [T_CLS] (VLMo §4.3); it reads one code token per world cell (notebook 07, section 6)",
    answer=answer, heatmap=answer_heatmap, image_size=VLMoVQAConfig().image_size))
