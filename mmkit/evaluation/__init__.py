"""Evaluation written once for every system: captioning, VQA, matching, retrieval, grounding, faithfulness.

    captioning.py    BLEU-4 / CIDEr (pycocoevalcap) against the world's references, attribute accuracy
    vqa.py           exact match per question type and language, the answer-prior blind baseline, VQAAnswer
    matching.py      balanced ITM accuracy per negative kind, twin ranking
    retrieval.py     Recall@1/5/10 in both directions
    grounding.py     IoU, Acc@IoU 0.5, the centre-box baseline
    faithfulness.py  a model-free pixel check of generated images against their prompt (M6 §4.1)
"""
