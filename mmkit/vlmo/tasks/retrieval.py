"""VLMo image-text retrieval (VLMo §3.5, §4.4): the dual encoder, optional ITM reranking, and the fusion-encoder
scoring of every pair it avoids.

    data = retrieval_data("test", 200, image_size=32)                 # RetrievalData(images, texts, text_to_image)
    r = evaluate_retrieval(model, data)                               # RetrievalResult(dual=Retrieval(i2t, t2i, mean), ..)
    r = evaluate_retrieval(model, data, rerank_k=8)                   # + ITM rerank of each query's top 8
    img = encode_images(model, data.images)                           # (N_img, D) normalised ĥ^v, computed ONCE
    txt = encode_texts(model, data.texts)                             # (N_txt, D) normalised ĥ^w
    sim = img @ txt.T                                                 # every score by one matrix product
    slow = fusion_scores(model, data.images, data.texts)              # the same shape, one fusion pass per pair

Dual encoder (§3.5 "we compute representations of all images and text, and then use dot product to obtain
image-to-text and text-to-image similarity scores of all possible image-text pairs"): N_img image passes and
N_txt text passes, then one (N_img, D) x (D, N_txt) product. A fusion encoder instead runs N_img x N_txt joint passes
(quadratic, §4.4): :func:`fusion_scores` is that slow path, scoring every pair with the ITM head (log-odds of
"matched"). ALBEF-style reranking (Table 2's other models) re-scores only each query's top k dual candidates with
the fusion ITM head: :func:`itm_rerank`.

Recall@K in both directions comes from :func:`mmkit.evaluation.retrieval.recall_at_k`.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.datasets import ImageTextDataset
from mmkit.evaluation.retrieval import Retrieval, recall_at_k
from mmkit.objectives import itc_loss
from mmkit.tokenizer import world_tokenizer
from mmkit.train import evaluating, unwrap

__all__ = ["RetrievalData", "retrieval_data", "tokenize", "encode_images", "encode_texts", "dual_scores",
           "fusion_scores", "itm_scores", "itm_rerank", "RetrievalResult", "evaluate_retrieval", "retrieval_loss",
           "RETRIEVAL_TRAIN", "RETRIEVAL_TRAIN_FAST", "RETRIEVAL_PAIRS"]


class RetrievalData(NamedTuple):
    images: torch.Tensor              # (N_img, 3, S, S) in [0, 1]
    texts: list                       # N_txt captions
    text_to_image: torch.Tensor       # (N_txt,) the image of every text


def retrieval_data(split: str = "test", n: int = 200, *, image_size: int = 32, lang: str = "both",
                   captions_per_image: int = 1, styles: Sequence[str] | None = ("full",), start: int = 0,
                   **kw) -> RetrievalData:
    """``n`` held-out scenes of ``split`` and ``captions_per_image`` captions each (drawn with different text seeds,
    like COCO's five). ``styles`` default "full": a caption that names every object, so each text has one image."""
    texts, owner, images = [], [], None
    for k in range(captions_per_image):
        ds = ImageTextDataset(split, n, start=start, image_size=image_size, lang=lang, styles=styles, text_seed=k, **kw)
        items = [ds[i] for i in range(n)]
        if images is None:
            images = torch.stack([it["image"] for it in items])
        texts += [it["text"] for it in items]
        owner += list(range(n))
    return RetrievalData(images, texts, torch.tensor(owner, dtype=torch.long))


def tokenize(model, texts: Sequence[str], tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_CLS] text [T_SEP], cut at the model's ``max_text_len``, right-padded: ids (B, T), mask (B, T) bool."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    if isinstance(texts, str):
        raise TypeError("texts must be a list of str, e.g. ['a red circle at the top']")
    enc = tok(list(texts), padding="longest", truncation=True, max_length=unwrap(model).config.max_text_len,
              return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].bool()


def _device(model) -> torch.device:
    return unwrap(model).type_embed.weight.device


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, S, S) -> (N, D) L2-normalised ITC image vectors ĥ^v (image-only route, V-FFN)."""
    dev, out = _device(model), []
    with evaluating(model):
        for i in range(0, len(images), batch_size):
            out.append(F.normalize(model(images[i:i + batch_size].to(dev), itc=True).features.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """N texts -> (N, D) L2-normalised ITC text vectors ĥ^w (text-only route, L-FFN)."""
    dev, out = _device(model), []
    with evaluating(model):
        for i in range(0, len(texts), batch_size):
            ids, am = tokenize(model, texts[i:i + batch_size], tokenizer)
            out.append(F.normalize(model(input_ids=ids.to(dev), attention_mask=am.to(dev), itc=True).features.float(),
                                   dim=-1))
    return torch.cat(out)


@torch.no_grad()
def dual_scores(model, images: torch.Tensor, texts: Sequence[str], tokenizer=None) -> torch.Tensor:
    """(N_img, N_txt) cosine similarities s = ĥ^v · ĥ^w (VLMo eq. (3)): each side encoded once."""
    return encode_images(model, images) @ encode_texts(model, texts, tokenizer).T


@torch.no_grad()
def itm_scores(model, images: torch.Tensor, texts: Sequence[str], tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """(M,) ITM log-odds logit[matched] - logit[not matched] of the pairs (images[m], texts[m]): fusion passes."""
    if len(images) != len(texts):
        raise ValueError(f"itm_scores scores pairs: {len(images)} images and {len(texts)} texts")
    dev, out = _device(model), []
    with evaluating(model):
        for i in range(0, len(texts), batch_size):
            ids, am = tokenize(model, texts[i:i + batch_size], tokenizer)
            logits = model(images[i:i + batch_size].to(dev), ids.to(dev), am.to(dev), itm=True).itm_logits.float()
            out.append(logits[:, 1] - logits[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def fusion_scores(model, images: torch.Tensor, texts: Sequence[str], tokenizer=None,
                  batch_size: int = 256) -> torch.Tensor:
    """(N_img, N_txt) ITM log-odds of EVERY pair: N_img x N_txt fusion passes, the fusion encoder's quadratic cost
    that the dual encoder avoids (§4.4)."""
    n_img, n_txt = len(images), len(texts)
    img_idx = torch.arange(n_img).repeat_interleave(n_txt)                       # pair m = (m // N_txt, m % N_txt)
    txt_idx = torch.arange(n_txt).repeat(n_img)
    scores = []
    for i in range(0, len(img_idx), batch_size):
        sl = slice(i, i + batch_size)
        scores.append(itm_scores(model, images[img_idx[sl]], [texts[j] for j in txt_idx[sl].tolist()], tokenizer,
                                 batch_size))
    return torch.cat(scores).view(n_img, n_txt)


@torch.no_grad()
def itm_rerank(model, sim: torch.Tensor, images: torch.Tensor, texts: Sequence[str], k: int = 8,
               tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score each query's top ``k`` dual-encoder candidates with the fusion ITM head (ALBEF's inference).

    Returns (i2t, t2i) score matrices of ``sim``'s shape: in row i of i2t (column j of t2i) the top k candidates move
    above every other candidate, ordered by their ITM log-odds; the rest keep their dual order. k x (N_img + N_txt)
    fusion passes instead of N_img x N_txt.
    """
    n_img, n_txt = sim.shape
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    top_t = sim.topk(k_i2t, dim=1).indices                                       # (N_img, k) texts per image
    top_i = sim.topk(k_t2i, dim=0).indices                                       # (k, N_txt) images per text
    img_a = torch.arange(n_img).repeat_interleave(k_i2t)
    s_i2t = itm_scores(model, images[img_a], [texts[j] for j in top_t.flatten().tolist()], tokenizer)
    txt_b = torch.arange(n_txt).repeat(k_t2i)
    s_t2i = itm_scores(model, images[top_i.flatten()], [texts[j] for j in txt_b.tolist()], tokenizer)
    lift = float(sim.abs().max()) + float(torch.cat([s_i2t, s_t2i]).abs().max()) + 1.0   # above every dual score
    i2t, t2i = sim.clone().float(), sim.clone().float()
    i2t[img_a, top_t.flatten()] = lift + s_i2t
    t2i[top_i.flatten(), txt_b] = lift + s_t2i
    return i2t, t2i


class RetrievalResult(NamedTuple):
    dual: Retrieval                   # R@1/5/10 both ways from the dual encoder's dot products
    reranked: Retrieval | None        # ... after ITM reranking of each query's top k (rerank_k > 0)
    sim: torch.Tensor                 # (N_img, N_txt) dual scores
    seconds_dual: float               # wall-clock of the dual scoring (encoding both sides + the product)
    seconds_rerank: float             # wall-clock of the reranking (0 without)


def evaluate_retrieval(model, data: RetrievalData, tokenizer=None, rerank_k: int = 0,
                       ks: Sequence[int] = (1, 5, 10)) -> RetrievalResult:
    """Recall@K both ways (§4.4) of the dual encoder on ``data``, and with ``rerank_k`` > 0 after ITM reranking."""
    t0 = time.perf_counter()
    sim = dual_scores(model, data.images, data.texts, tokenizer)
    t1 = time.perf_counter()
    dual = recall_at_k(sim, data.text_to_image, ks)
    reranked, t2 = None, t1
    if rerank_k:
        i2t, t2i = itm_rerank(model, sim, data.images, data.texts, rerank_k, tokenizer)
        t2 = time.perf_counter()
        a, b = recall_at_k(i2t, data.text_to_image, ks), recall_at_k(t2i, data.text_to_image, ks)
        reranked = Retrieval(a.i2t, b.t2i, (sum(a.i2t.values()) + sum(b.t2i.values())) / (2 * len(ks)))
    return RetrievalResult(dual, reranked, sim, t1 - t0, t2 - t1)


def retrieval_loss(model, batch: dict):
    """``loss_fn`` for retrieval fine-tuning (§3.5 "optimized for the image-text contrastive loss"): ITC over the
    global batch on {"images", "input_ids", "attention_mask"[, "pair_ids"]} (e.g. a pretraining PairData batch)."""
    raw = unwrap(model)
    dev = raw.type_embed.weight.device
    img = model(batch["images"].to(dev), itc=True)
    txt = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), itc=True)
    ids = batch.get("pair_ids")
    out = itc_loss(img.features, txt.features, raw.temperature(), ids=None if ids is None else ids.to(dev).long())
    return out.loss, {k: v for k, v in out.metrics.items() if k != "queue_size"}


# The "vlmo-tiny-retrieval" recipe (§3.5: retrieval fine-tuned with ITC alone): batches of 64 pairs (63 in-batch
# negatives per query, against stage 3's 15), "full" captions (each names every object: one image per caption, as the
# evaluation's). Not tuned beyond this.
RETRIEVAL_TRAIN = dict(steps=300, batch_size=64, lr=1e-3, warmup_steps=30, min_lr_ratio=0.05, weight_decay=0.01,
                       mixed_precision="no", log_every=25, seed=0)
RETRIEVAL_TRAIN_FAST = dict(RETRIEVAL_TRAIN, steps=30, warmup_steps=5, batch_size=32)
RETRIEVAL_PAIRS = dict(n_pairs=6000, caption_styles=("full",))    # PretrainConfig fields of the training pairs
