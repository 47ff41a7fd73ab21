"""What M6 offers the apps: VQA models for ``apps/vqa.py`` and the text-to-image generator for
``apps/text_to_image.py``, registered in :mod:`mmkit.registry` (the apps list whatever is shipped or cached)."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

import mmkit.hub as hub
import mmkit.vqgan  # noqa: F401  (registers the vqgan-world-tiny preset read below)
from mmkit.config import load_config
from mmkit.m6.tasks.t2i import SamplingConfig, iter_samples, itm_scorer
from mmkit.m6.tasks.vqa import answer, answer_heatmap
from mmkit.registry import T2IModelEntry, VQAModelEntry, register_t2i_model, register_vqa_model
from mmkit.tokenizer import world_tokenizer

__all__ = ["T2IBundle", "load_t2i", "t2i_samples", "t2i_score"]


def zero_shot_answer(model, image, question, **kw):
    """The pretrained model continues "question ... answer:" with a longer budget: it has never learnt to stop."""
    return answer(model, image, question, max_new_tokens=16, **kw)


register_vqa_model(VQAModelEntry(
    name="M6-tiny VQA", checkpoint="m6-tiny-vqa", load=lambda: hub.load("m6-tiny-vqa"),
    description="M6 tiny fine-tuned on 'question ... answer:' (M6 §4.2), EN + ZH, drawing augmentations; it reads "
                "one code token per world cell (notebook 04, section 6)",
    answer=answer, heatmap=answer_heatmap))
register_vqa_model(VQAModelEntry(
    name="M6-tiny pretrained (zero-shot)", checkpoint="m6-tiny-pretrained", load=lambda: hub.load("m6-tiny-pretrained"),
    description="M6 tiny after pretraining only: continues 'question ... answer:' without fine-tuning "
                "(M6 §4.2, Figure 8)",
    answer=zero_shot_answer, heatmap=answer_heatmap))


class T2IBundle(NamedTuple):
    model: torch.nn.Module            # the M6 code LM (mmkit.m6.model.M6T2I)
    vqgan: torch.nn.Module            # stage one: codes <-> pixels
    tok: object                       # the world tokenizer
    itm: torch.nn.Module | None       # M6's image-text matching head for reranking, if installed


def load_t2i() -> T2IBundle:
    """The shipped text-to-image checkpoints; the ITM reranker only if it is shipped or cached (never trained while
    a user waits)."""
    itm = hub.load("m6-tiny-itm") if hub.find_checkpoint("m6-tiny-itm") is not None else None
    return T2IBundle(hub.load("m6-tiny-t2i"), hub.load("vqgan-world"), world_tokenizer(), itm)


def t2i_samples(b: T2IBundle, prompt: str, *, n_samples: int = 4, top_k: int | None = 8,
                temperature: float = SamplingConfig.temperature, seed: int = 0) -> Iterator[torch.Tensor]:
    """M6 §4.1 samples of one prompt, one (3, S, S) image at a time."""
    sampling = SamplingConfig(n_samples=n_samples, top_k=top_k, temperature=temperature, seed=seed)
    for _, _, images in iter_samples(b.model, b.vqgan, b.tok, [prompt], sampling):
        yield images[0]


def t2i_score(b: T2IBundle, images: torch.Tensor, prompt: str) -> torch.Tensor:
    """M6 §4.6 image-text matching probabilities of the samples (needs the ITM checkpoint: ``b.itm``)."""
    if b.itm is None:
        raise ValueError("reranking needs the m6-tiny-itm checkpoint: `mmkit train m6-tiny-itm`")
    return itm_scorer(b.itm, b.tok)(images, [prompt] * len(images))


_TOKENIZER = load_config("vqgan-world-tiny")        # the shipped vqgan-world's config (a preset, no weights loaded)
register_t2i_model(T2IModelEntry(
    name="M6-tiny text-to-image", description="M6 tiny code LM on VQGAN codes (M6 §4.1), reranked by M6's ITM",
    load=load_t2i, samples=t2i_samples, score=t2i_score, can_score=lambda b: b.itm is not None,
    checkpoints=("m6-tiny-t2i", "vqgan-world"), image_size=_TOKENIZER.resolution, n_codes=_TOKENIZER.n_embed,
    code_grid=_TOKENIZER.grid_size))
