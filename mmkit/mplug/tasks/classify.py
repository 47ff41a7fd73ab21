"""mPLUG visual reasoning heads (mPLUG §5.2.5): SNLI-VE (image premise, text hypothesis -> entailment / neutral /
contradiction) and NLVR2 (two images, a statement -> true / false), an MLP on the fused text [CLS].

    model = MPLUGForClassification.from_pretrained_mplug(pretrained, num_labels=3)       # SNLI-VE, no decoder
    ds = EntailmentDataset("train", 4000, image_size=32)                                 # mmkit.data.datasets
    train(model, classification_loss, ds, TrainConfig(...), collate_fn=classification_collate())
    ev = evaluate_classifier(model, EntailmentDataset("test", 300, image_size=32))      # ClassifierEval

    nlvr = MPLUGForClassification.from_pretrained_mplug(pretrained, num_labels=2, num_images=2)
    ev = evaluate_classifier(nlvr, PairDataset("test", 300, image_size=32))

From a model that already reads the world through its decoder (mplug-tiny-vqa), the labels can be read by the
decoder instead (``read_with``, see :class:`mmkit.mplug.model.MPLUGForClassification`): as answer words (SNLI-VE:
entailment "yes", neutral "maybe", contradiction "no") or from its [BOS] state, one pass per image (NLVR2):

    ids = word_ids(world_tokenizer(), SNLI_VE_WORDS)                     # mmkit.tokenizer, mmkit.mplug.model
    model = MPLUGForClassification.from_pretrained_mplug(vqa_model, 3, read_with="answer_words", label_ids=ids)
    nlvr = MPLUGForClassification.from_pretrained_mplug(vqa_model, 2, 2, read_with="decoder_state")

§5.2.5: SNLI-VE feeds "the image premise, text premise and text hypothesis" to the encoder, removes the decoder and
classifies the fused [CLS] (the world has no text premise: the hypothesis alone). NLVR2 follows BLIP with two
cross-attentions; here the two images' tokens are concatenated into one visual sequence with a slot embedding each
(:class:`mmkit.mplug.model.MPLUGForClassification`). Both read a batch of collated dataset items: ``image`` (B, 3, S, S)
or ``images`` (B, 2, 3, S, S), ``input_ids`` / ``attention_mask`` of the hypothesis / statement, ``label``.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkit.data.datasets import make_collate
from mmkit.evaluation.vqa import LabelPrior
from mmkit.tokenizer import world_tokenizer
from mmkit.train import TrainConfig, cell_namers_fixed, evaluating, freeze, grad_flags_restored, train, unwrap

__all__ = ["classification_collate", "classification_loss", "predict_labels", "ClassifierEval",
           "evaluate_classifier", "ClassifierRun", "finetune_classifier"]


def classification_collate(tokenizer=None, max_length: int = 48):
    """The collate function for EntailmentDataset / PairDataset items (tokenizes the hypothesis / statement)."""
    return make_collate(tokenizer if tokenizer is not None else world_tokenizer(), max_length=max_length)


def _images(batch: dict) -> torch.Tensor:
    if "images" in batch:
        return batch["images"]                                   # (B, 2, 3, S, S) NLVR2 pairs
    if "image" in batch:
        return batch["image"]                                    # (B, 3, S, S)
    raise KeyError(f"the batch has no 'image' or 'images' (keys: {sorted(batch)}); collate dataset items with "
                   "classification_collate()")


def classification_loss(model, batch: dict):
    """Cross-entropy of the classifier -> (loss, {"acc"}). Runs inside ``model(step=...)`` (one DDP forward)."""
    labels = batch["label"]

    def step(m):
        return m.classify(_images(batch), batch["input_ids"], batch["attention_mask"])   # (B, num_labels)

    logits = model(step=step)
    loss = F.cross_entropy(logits.float(), labels.to(logits.device))
    return loss, {"acc": float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())}


@torch.no_grad()
def predict_labels(model, batch: dict) -> torch.Tensor:
    """(B,) predicted label indices of a collated batch."""
    with evaluating(model):
        return model.classify(_images(batch).to(model.device), batch["input_ids"].to(model.device),
                              batch["attention_mask"].to(model.device)).argmax(-1).cpu()


class ClassifierEval(NamedTuple):
    accuracy: float           # over all items
    per_kind: dict            # {kind: accuracy} (the datasets' statement / hypothesis kinds)
    majority: float           # the blind baseline: always the most frequent label of these items
    n: int
    blind: float | None = None        # the text-only prior (LabelPrior) on the same items: never sees an image
    blind_per_kind: dict | None = None


@torch.no_grad()
def evaluate_classifier(model, dataset, tokenizer=None, batch_size: int = 64,
                        prior: LabelPrior | None = None) -> ClassifierEval:
    """Accuracy on a (held-out) EntailmentDataset / PairDataset, per kind, beside the majority-label baseline and,
    with ``prior`` (``LabelPrior.of_dataset(train_data)``), the text-only baseline on the same items."""
    collate = classification_collate(tokenizer)
    preds, labels, kinds, langs, texts = [], [], [], [], []
    for i in range(0, len(dataset), batch_size):
        batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        preds.append(predict_labels(model, batch))
        labels.append(batch["label"])
        kinds += list(batch["kind"])
        langs += list(batch["lang"])
        texts += list(batch["hypothesis"] if "hypothesis" in batch else batch["statement"])
    p, y = torch.cat(preds), torch.cat(labels)
    hit = (p == y).float()
    per_kind = {k: float(hit[[i for i, kk in enumerate(kinds) if kk == k]].mean()) for k in sorted(set(kinds))}
    majority = Counter(y.tolist()).most_common(1)[0][1] / len(y)
    blind, blind_per_kind = prior.score(texts, kinds, langs, y.tolist()) if prior is not None else (None, None)
    return ClassifierEval(float(hit.mean()), per_kind, majority, len(y), blind, blind_per_kind)


class ClassifierRun(NamedTuple):
    model: torch.nn.Module
    result: object                 # TrainResult
    cpu_seconds: float


def finetune_classifier(model, dataset, train_config: TrainConfig, tokenizer=None,
                        frozen: tuple[str, ...] = ()) -> ClassifierRun:
    """Fine-tune an :class:`~mmkit.mplug.model.MPLUGForClassification` (in place) on a train EntailmentDataset /
    PairDataset with :func:`classification_loss` (mPLUG §5.2.5). ``frozen``: parameter-name prefixes kept fixed
    meanwhile (e.g. ``("vision.", "text.")``: the encoders; the recipe's notes say when that helps)."""
    c0 = time.process_time()
    with grad_flags_restored(model) as raw, cell_namers_fixed(raw):   # the namer of stage 0 stays fixed as well
        if frozen:
            freeze(raw, frozen)
        result = train(model, classification_loss, dataset, train_config, collate_fn=classification_collate(tokenizer))
    return ClassifierRun(raw, result, time.process_time() - c0)
