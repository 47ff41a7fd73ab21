"""mPLUG (Li et al. 2022): unimodal encoders, the cross-modal skip-connected network, a text decoder.

    model.py     configs, the model (§3.1-3.2), its heads (ITC + momentum queues, ITM, MLM, LM, classifiers), presets
    convert.py   weights from local Hugging Face CLIP-ViT / ViT / BERT folders (§5.1 initialisation)
    tasks/       pretrain (§3.3), vqa, captioning (+ SCST), retrieval, grounding, classify (SNLI-VE, NLVR2), video
    recipes.py   how each mPLUG checkpoint is trained (mmkit train NAME)
    apps.py      what the VQA app offers

Importing the package registers mPLUG's model types, presets and app entries (mmkit.registry).
"""
from mmkit.mplug import apps, model, recipes  # noqa: F401  (registration)
