"""M6 image captioning (M6 §4.3): image in, no prompt; greedy / beam / top-k top-p decoding, scored by BLEU-4,
CIDEr and attribute accuracy (:mod:`mmkit.evaluation.captioning`).

    m6 = mmkit.load("m6-tiny-pretrained")
    caps = decode_captions(m6, images, tok, "beam", langs=["en"] * B)
    ev = evaluate_captioning(m6, tok, "test", n=128)             # every method side by side
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from mmkit.data.scenes import SceneBank
from mmkit.evaluation.captioning import caption_scores
from mmkit.generation import DECODING, decode_texts
from mmkit.tokenizer import world_tokenizer

__all__ = ["decode_captions", "CaptionEval", "evaluate_captioning"]


@torch.no_grad()
def decode_captions(model, images: torch.Tensor, tok, method: str = "greedy", langs: Sequence[str] | None = None,
                    batch_size: int = 64, **kw) -> list[str]:
    """M6 §4.3 captioning: "we only use the image feature as input and provide no prompt". ``langs`` fixes each
    caption's language through its first token (None = the model's choice)."""
    out = []
    for i in range(0, len(images), batch_size):
        out += decode_texts(model, tok, images=images[i:i + batch_size], method=method,
                            langs=None if langs is None else langs[i:i + batch_size], **kw)
    return out


class CaptionEval(NamedTuple):
    scores: dict              # {method: CaptionScores}
    captions: dict            # {method: [str]}
    scenes: list
    langs: list


def evaluate_captioning(model, tok=None, split: str = "test", n: int = 128, methods: Sequence[str] = DECODING,
                        **kw) -> CaptionEval:
    """Caption ``n`` held-out images (languages alternate EN / ZH) with each decoding method and score them."""
    tok = tok if tok is not None else world_tokenizer()
    bank = SceneBank.build(split, n, image_size=model.config.image_size)
    images = bank.images(range(len(bank)))
    langs = [("en", "zh")[i % 2] for i in range(len(bank))]
    caps = {m: decode_captions(model, images, tok, m, langs, **kw) for m in methods}
    return CaptionEval({m: caption_scores(c, bank.scenes, langs) for m, c in caps.items()}, caps, bank.scenes, langs)
