"""VLMo (Wang et al. 2021): one Multiway Transformer as image encoder, text encoder and fusion encoder.

    model.py     configs, the Multiway Transformer, its heads (ITC, ITM, MLM, MIM) and downstream models (VQA, NLVR2,
                 image classification); presets vlmo-tiny / vlmo-base / vlmo-large
    masking.py   BEiT's block-wise masking of image patches (stage 1 masked image modelling)
    convert.py   weights from local Hugging Face BEiT / ViT (attention + V-FFN) and BERT (text embeddings) folders
    tasks/       pretrain (the three stages, VLMo §3.3-3.4), retrieval, vqa, nlvr2, image_only
    recipes.py   how each VLMo checkpoint is made (stage 1 -> 2 -> 3 -> VQA / NLVR2 / image-only)
    apps.py      what the VQA app offers

Importing the package registers VLMo's model types, presets, recipes and app entries (mmkit.registry).
"""
from mmkit.vlmo import apps, model, recipes  # noqa: F401  (registration)
