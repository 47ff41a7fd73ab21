"""mPLUG image-text retrieval (mPLUG §5.2.3): ITC top-k candidates reranked by ITM, Recall@1/5/10 both directions.

    loss_fn = retrieval_loss                                  # fine-tuning: ITC + ITM jointly (§5.2.3, ALBEF)
    s = retrieval_scores(model, images, text_ids, k=16)       # RetrievalScores(itc, i2t, t2i)
    ev = evaluate_retrieval(model, "test", n=100, k=16)       # RetrievalEval(itc=Retrieval(..), reranked=Retrieval(..))

§5.2.3: "we first select top-k candidates by computing the dot-product similarity between the image and text encoder
features, and then rerank the selected candidates based on their ITM scores" (k = 256 on COCO, 128 on Flickr30K).
As the official ``retrieval_img_mplug.py``: for every image the k most similar texts are fused with it and scored by
the ITM head; the same for every text and its k most similar images. The official code gives every other text -100
(a tie, so with k < K Recall@K would count a text outside the candidates as found); here the others keep their ITC
order below every candidate (ITC similarity - ``RANK_GAP``), so Recall@K stays right for any k.
The ITM score here is the log-odds ``logit_match - logit_no_match`` (monotone in P(match); the official code ranks
by the raw match logit).
"""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.scenes import SceneBank
from mmkit.data.text import caption
from mmkit.evaluation.retrieval import Retrieval, recall_at_k
from mmkit.mplug.tasks.inputs import encoder_inputs
from mmkit.mplug.tasks.pretrain import PretrainConfig, PretrainData, make_pretrain_loss
from mmkit.tokenizer import world_tokenizer
from mmkit.train import TrainConfig, cell_namers_fixed, evaluating, train, unwrap

__all__ = ["retrieval_loss", "RetrievalScores", "retrieval_scores", "scores_from_embeddings", "RetrievalEval",
           "reranked_recall", "evaluate_retrieval", "RetrievalRun", "finetune_retrieval"]

# §5.2.3 "we jointly optimize the ITC loss and the ITM loss during fine-tuning": the pretraining step without MLM and
# PrefixLM (batches from mmkit.mplug.tasks.pretrain.PretrainData)
RANK_GAP = 1e4          # puts a non-candidate below every ITM-scored candidate

retrieval_loss = make_pretrain_loss(PretrainConfig(mlm=0.0, prefix_lm=0.0))


class RetrievalScores(NamedTuple):
    itc: torch.Tensor             # (N_img, N_txt) cosine similarities of the ITC features
    i2t: torch.Tensor             # (N_img, N_txt) ITM log-odds of each image's top-k texts; the others ITC - RANK_GAP
    t2i: torch.Tensor             # (N_img, N_txt) ITM log-odds of each text's top-k images; the others ITC - RANK_GAP


def _batched(fn, n: int, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, i + batch_size)) for i in range(0, n, batch_size)])


@torch.no_grad()
def retrieval_scores(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None,
                     k: int = 16, batch_size: int = 64) -> RetrievalScores:
    """ITC similarities of all images (N_img, 3, S, S) and texts (N_txt, L), then ITM on each one's top-k."""
    with evaluating(model):
        v = _batched(lambda s: model.embed_image(images[s].to(model.device)), len(images), batch_size)   # (Ni, Nv, D)
        image_feat = model.vision_proj(v[:, 0])                                                       # (Ni, E)
        return scores_from_embeddings(model, v, image_feat, text_ids, text_mask, k, batch_size)


@torch.no_grad()
def scores_from_embeddings(model, image_embeds: torch.Tensor, image_feat: torch.Tensor, text_ids: torch.Tensor,
                           text_mask: torch.Tensor | None = None, k: int = 16, batch_size: int = 64) -> RetrievalScores:
    """:func:`retrieval_scores` from visual sequences already encoded: ``image_embeds`` (N_img, Nv, D) what the fusion
    network reads, ``image_feat`` (N_img, E) the ITC features (e.g. of concatenated video frames and their mean)."""
    c = model.config
    dev = model.device
    mask = (text_ids != c.pad_token_id if text_mask is None else text_mask.bool()).to(dev)
    with evaluating(model):
        v = image_embeds.to(dev)
        l = _batched(lambda s: model.embed_text(text_ids[s].to(dev), mask[s]), len(text_ids), batch_size)
        ft = model.text_proj(l[:, 0])
        sim = F.normalize(image_feat.to(dev), dim=-1) @ F.normalize(ft, dim=-1).T                     # (Ni, Nt)
        kk_t, kk_i = min(k, sim.shape[1]), min(k, sim.shape[0])

        def itm(vv, ll, mm):
            logits = model.itm_logits(model.fuse(vv, ll, mm).text)                                    # (k, 2)
            return logits[:, 1] - logits[:, 0]

        i2t = sim - RANK_GAP                          # outside the top-k: after every candidate, in ITC order
        for i in range(sim.shape[0]):                 # every image: its k most similar texts, reranked
            top = sim[i].topk(kk_t).indices
            i2t[i, top] = itm(v[i:i + 1].expand(kk_t, -1, -1), l[top], mask[top])
        t2i = sim - RANK_GAP
        for j in range(sim.shape[1]):                 # every text: its k most similar images, reranked
            top = sim[:, j].topk(kk_i).indices
            t2i[top, j] = itm(v[top], l[j:j + 1].expand(kk_i, -1, -1), mask[j:j + 1].expand(kk_i, -1))
    return RetrievalScores(sim.cpu(), i2t.cpu(), t2i.cpu())


class RetrievalEval(NamedTuple):
    itc: Retrieval                # Recall@K of the ITC similarities alone (the dual-encoder ranking)
    reranked: Retrieval           # Recall@K after ITM reranking of the top-k (mPLUG's reported numbers)
    scores: RetrievalScores
    texts: list


def reranked_recall(scores: RetrievalScores, text_to_image: Sequence[int] | None = None,
                    ks: Sequence[int] = (1, 5, 10)) -> Retrieval:
    """Recall@K with image->text ranks from ``scores.i2t`` and text->image ranks from ``scores.t2i``."""
    a, b = recall_at_k(scores.i2t, text_to_image, ks), recall_at_k(scores.t2i, text_to_image, ks)
    return Retrieval(a.i2t, b.t2i, (sum(a.i2t.values()) + sum(b.t2i.values())) / (2 * len(ks)))


@torch.no_grad()
def evaluate_retrieval(model, split: str = "test", n: int = 100, k: int = 16, lang: str = "en", style: str = "full",
                       tokenizer=None, start: int = 0) -> RetrievalEval:
    """Retrieval among ``n`` held-out scenes and one caption each (``style``, ``lang``): R@1/5/10 both ways, before
    and after ITM reranking of the top ``k``."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    bank = SceneBank.build(split, n, image_size=model.config.image_size, start=start)
    texts = [caption(s, style, lang) for s in bank.scenes]
    ids, mask = encoder_inputs(tok, texts, model.config.max_text_len)
    s = retrieval_scores(model, bank.images(range(n)), ids, mask, k)
    return RetrievalEval(recall_at_k(s.itc), reranked_recall(s), s, texts)




class RetrievalRun(NamedTuple):
    model: torch.nn.Module
    result: object                 # TrainResult (history: loss, itc, itm, their accuracies)
    cpu_seconds: float


def finetune_retrieval(model, data: PretrainData, train_config: TrainConfig) -> RetrievalRun:
    """§5.2.3 "we jointly optimize the ITC loss and the ITM loss during fine-tuning": :data:`retrieval_loss` on the
    image-caption pairs of ``data`` (``model`` needs its momentum encoders and queue; trained in place)."""
    c0 = time.process_time()
    if unwrap(model).momentum_model is None:
        raise ValueError("retrieval fine-tuning trains ITC with momentum queues: give an mPLUG with momentum encoders "
                         "(model.with_config(momentum_encoders=True))")
    with cell_namers_fixed(model):               # the namer of stage 0 stays fixed: its codes name objects
        result = train(model, retrieval_loss, data.batch_fn, train_config)
    return RetrievalRun(unwrap(model), result, time.process_time() - c0)
