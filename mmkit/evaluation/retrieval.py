"""Image-text retrieval metrics for any dual or fusion scorer: Recall@K in both directions (VLMo §4.2, mPLUG §5.2.3).

    sim = image_emb @ text_emb.T                     # (N_images, N_texts) scores, higher = better match
    r = recall_at_k(sim, text_to_image=[0, 0, 1, ...])   # Retrieval(i2t={1: .., 5: .., 10: ..}, t2i={...}, mean)

An image may own several texts (COCO has 5 captions per image): ``text_to_image[j]`` names the image of text j.
Image-to-text retrieval is right at K when any of the image's texts is among its top K; text-to-image when the
text's image is among its top K.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["Retrieval", "recall_at_k"]


class Retrieval(NamedTuple):
    i2t: dict                 # {K: fraction of images with one of their texts in their top K texts}
    t2i: dict                 # {K: fraction of texts whose image is in their top K images}
    mean: float               # mean of every i2t and t2i recall (the "RSUM / 6" of the papers)


def recall_at_k(sim: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor | None = None,
                ks: Sequence[int] = (1, 5, 10)) -> Retrieval:
    """Recall@K of an (N_images, N_texts) score matrix. ``text_to_image`` defaults to text j <-> image j."""
    sim = torch.as_tensor(sim, dtype=torch.float)
    if sim.dim() != 2:
        raise ValueError(f"sim must be an (N_images, N_texts) matrix, got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    t2img = torch.arange(n_txt) if text_to_image is None else torch.as_tensor(text_to_image, dtype=torch.long)
    if text_to_image is None and n_img != n_txt:
        raise ValueError(f"{n_img} images and {n_txt} texts: give text_to_image (the image index of every text)")
    if len(t2img) != n_txt or (n_txt and (int(t2img.min()) < 0 or int(t2img.max()) >= n_img)):
        raise ValueError("text_to_image must hold one image index in 0..N_images-1 per text")
    owns = t2img[None, :] == torch.arange(n_img)[:, None]                    # (N_img, N_txt): image i owns text j
    # rank of the best true text of each image: how many texts score strictly higher
    best_true = sim.masked_fill(~owns, float("-inf")).max(1).values          # (N_img,)
    i2t_rank = (sim > best_true[:, None]).sum(1)                             # (N_img,)
    true_score = sim[t2img, torch.arange(n_txt)]                             # (N_txt,)
    t2i_rank = (sim > true_score[None, :]).sum(0)                            # (N_txt,)
    i2t = {k: float((i2t_rank < k).float().mean()) for k in ks}
    t2i = {k: float((t2i_rank < k).float().mean()) for k in ks}
    return Retrieval(i2t, t2i, (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks)))
