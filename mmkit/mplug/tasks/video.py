"""mPLUG zero-shot "video" (mPLUG §5.4.2) on world clips: frame features concatenated into one visual sequence.

    ds = ClipDataset("test", 64, n_frames=4, image_size=32)          # mmkit.data.clips: frames + ground truth
    v = clip_embeds(model, frames)                                   # (B, T (1 + N), D): the frames side by side
    caps = caption_clips(model, frames)                              # §5.4.2 prompt "a video of"
    answers = answer_clips(model, frames, questions)                 # generative VQA on the whole clip
    s = clip_retrieval_scores(model, frames, text_ids, k=8)          # ITC (mean frame feature) + ITM rerank
    ev = evaluate_zero_shot_video(model, "test", n=32)               # VideoEval(qa, captions, retrieval)

§5.4.2: "we uniformly sample n frames for each video ... and concatenate the frame features into a single sequence":
each frame goes through the visual encoder alone (v^0 of a frame: [CLS] + patches); the T sequences are concatenated
and the text encoder, fusion network and decoder read them as if they were one long image (no temporal position
is added: zero-shot, nothing new is learned). For ITC the frames' [CLS] features are averaged (the clip's feature);
ITM reranks with the concatenated sequence. "Video Caption: We use a prefix prompt 'A video of'". The model is an
image model: colour and shape questions transfer, the temporal ones (direction, start, end) need what it never saw.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.clips import ClipDataset
from mmkit.evaluation.captioning import bleu4, caption_mentions
from mmkit.evaluation.retrieval import Retrieval, recall_at_k
from mmkit.evaluation.vqa import VQAEval, score_answers
from mmkit.mplug.tasks.inputs import encoder_inputs
from mmkit.mplug.tasks.retrieval import RetrievalScores, reranked_recall, scores_from_embeddings
from mmkit.tokenizer import decode_rows, world_tokenizer
from mmkit.train import evaluating

__all__ = ["VIDEO_PROMPTS", "clip_embeds", "clip_features", "caption_clips", "answer_clips", "clip_retrieval_scores",
           "VideoEval", "evaluate_zero_shot_video"]

VIDEO_PROMPTS: dict[str, str] = {"en": "a video of", "zh": "一段视频："}    # §5.4.2 "A video of"


def clip_embeds(model, frames: torch.Tensor) -> torch.Tensor:
    """frames (B, T, 3, S, S) -> (B, T (1 + N), D): every frame's v^0, concatenated along the sequence."""
    if frames.dim() != 5:
        raise ValueError(f"frames must be (B, T, 3, S, S), got {tuple(frames.shape)}")
    B, T = frames.shape[:2]
    v = model.embed_image(frames.flatten(0, 1).to(model.device))                      # (B T, 1 + N, D)
    return v.view(B, T * v.shape[1], v.shape[2])


def clip_features(model, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(concatenated sequence (B, T (1 + N), D), ITC feature (B, E): the mean of the frames' normalised features)."""
    B, T = frames.shape[:2]
    v = clip_embeds(model, frames)
    per_frame = v.view(B, T, -1, v.shape[-1])[:, :, 0]                                 # (B, T, D) frame [CLS]
    feat = F.normalize(model.vision_proj(per_frame), dim=-1).mean(1)                    # (B, E)
    return v, feat


@torch.no_grad()
def caption_clips(model, frames: torch.Tensor, tokenizer=None, prompt: str | None = VIDEO_PROMPTS["en"],
                  max_new_tokens: int = 32) -> list[str]:
    """Greedy captions of clips from their concatenated frames; ``prompt`` goes into the text encoder."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    with evaluating(model):
        v = clip_embeds(model, frames)
        ids, mask = encoder_inputs(tok, [prompt or ""] * len(v), model.config.max_text_len)
        seqs = model.generate(None, ids.to(model.device), max_new_tokens, encoder_mask=mask.to(model.device),
                              image_embeds=v).sequences
    return decode_rows(tok, seqs.cpu(), model.config.eos_token_id)


@torch.no_grad()
def answer_clips(model, frames: torch.Tensor, questions: Sequence[str], tokenizer=None,
                 max_new_tokens: int = 6) -> list[str]:
    """Generated answers to ``questions[b]`` about clip ``b`` (open vocabulary, as image VQA)."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    if len(frames) != len(questions):
        raise ValueError(f"{len(frames)} clips but {len(questions)} questions")
    with evaluating(model):
        v = clip_embeds(model, frames)
        ids, mask = encoder_inputs(tok, list(questions), model.config.max_text_len)
        seqs = model.generate(None, ids.to(model.device), max_new_tokens, encoder_mask=mask.to(model.device),
                              image_embeds=v).sequences
    return decode_rows(tok, seqs.cpu(), model.config.eos_token_id)


@torch.no_grad()
def clip_retrieval_scores(model, frames: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None,
                          k: int = 8) -> RetrievalScores:
    """Text-to-clip retrieval: ITC with the clips' mean frame features, the top-k reranked by ITM on the
    concatenated frames."""
    with evaluating(model):
        v, feat = clip_features(model, frames)
        return scores_from_embeddings(model, v, feat, text_ids, text_mask, k)


class VideoEval(NamedTuple):
    qa: VQAEval               # exact-match accuracy per question type (colour / shape vs the temporal ones)
    caption_bleu4: float      # BLEU-4 of the captions against the clip's caption
    mover_named: float        # share of captions naming the mover's colour + shape
    retrieval_itc: Retrieval  # R@K of ITC alone
    retrieval: Retrieval      # R@K after ITM reranking
    captions: list


@torch.no_grad()
def evaluate_zero_shot_video(model, split: str = "test", n: int = 32, n_frames: int = 4, lang: str = "en",
                             tokenizer=None, k: int = 8, prompt: str | None = VIDEO_PROMPTS["en"]) -> VideoEval:
    """Zero-shot clip QA, captioning and text-to-clip retrieval on ``n`` clips of ``split``."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    ds = ClipDataset(split, n, n_frames=n_frames, image_size=model.config.image_size, lang=lang, return_clip=True)
    items = [ds[i] for i in range(n)]
    frames = torch.stack([it["frames"] for it in items])                             # (n, T, 3, S, S)
    preds = answer_clips(model, frames, [it["question"] for it in items], tok)
    qa = score_answers([(it["question"], it["answer"], p, it["qtype"], it["lang"]) for it, p in zip(items, preds)])
    caps = caption_clips(model, frames, tok, prompt)
    named = [(it["clip"].mover.colour, it["clip"].mover.shape) in caption_mentions(cp) for it, cp in zip(items, caps)]
    ids, mask = encoder_inputs(tok, [it["caption"] for it in items], model.config.max_text_len)
    s = clip_retrieval_scores(model, frames, ids, mask, k)
    return VideoEval(qa, bleu4(caps, [[it["caption"]] for it in items]), sum(named) / max(len(named), 1),
                     recall_at_k(s.itc), reranked_recall(s), caps)
