"""M6 (Lin et al. 2021): one Transformer that encodes and decodes, switched by the attention mask.

    model.py     configs, the model, its variants and heads (M6-MoE §3.4, ITM §4.6, text-to-image code LM §4.1)
    masking.py   the unified mask and the four pretraining tasks (§3.2-3.3)
    tasks/       pretrain, vqa, itm, captioning, text_qa, poems, t2i, moe: data building, losses, inference
    recipes.py   how each shipped M6 checkpoint is trained
    apps.py      what the VQA and text-to-image apps offer

Importing the package registers M6's model types, presets, recipes and app entries (mmkit.registry).
"""
from mmkit.m6 import apps, model, recipes  # noqa: F401  (registration)
from mmkit.m6 import runs  # noqa: F401  (M6's run tasks for scaled/: mmkit train RUN.yaml)
