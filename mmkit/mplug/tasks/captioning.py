"""mPLUG image captioning (mPLUG §5.2.2, §7.1): cross-entropy fine-tuning, beam search, BLEU-4 / CIDEr, and
self-critical sequence training (CIDEr optimisation) with a greedy baseline.

    sampler = CaptionSampler(SceneBank.build("train", 4000, image_size=32), lang="both")
    loss, m = caption_loss(model, sampler.batch_fn(g, 32))                  # teacher forcing (stage 1)
    loss, m = scst_loss(model, sampler.batch_fn(g, 32), SCSTConfig())       # CIDEr reward, greedy baseline (stage 2)
    caps = decode_captions(model, images, method="beam", num_beams=3)       # §7.1: beam 10, max length 20
    ev = evaluate_captioning(model, "test", n=128)                          # CaptionEval(scores, captions, ...)

§7.1: "we first fine-tune mPLUG with cross-entropy loss ... Based on the fine-tuned model, we fine-tune it with CIDEr
optimization [Rennie et al. 2017] ... During inference, we use beam search with a beam size of 10". The caption is
decoded from the fused context of the image and a prompt ([CLS] prompt [SEP] in the text encoder): no prompt by
default (an empty text), or §5.4.1's "a picture of" for zero-shot captioning (``prompt=``). (The official fine-tuned
captioner decodes from the image embeddings alone; see the notes of mmkit.mplug.model.)

Self-critical sequence training (:func:`scst_loss`): per image, ``n_samples`` captions are sampled from the model and
one is decoded greedily; the reward r of a caption is its CIDEr-D against the scene's five reference captions
(:func:`mmkit.evaluation.captioning.caption_references`), the baseline b the greedy caption's CIDEr-D, and

    L = - 1/(B K) sum_{i,k} (r_ik - b_i) log p(c_ik | image_i)          (Rennie et al. 2017, eq. (9))

CIDEr-D's document frequencies come from the references of the batch (every image's five references; the greedy and
sampled captions are scored in one call, so both see the same frequencies).
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from pycocoevalcap.cider.cider import Cider

from mmkit.data.scenes import SceneBank
from mmkit.data.text import CAPTION_STYLES, caption
from mmkit.evaluation.captioning import CaptionScores, caption_references, caption_scores, metric_tokens
from mmkit.generation import FirstTokenLanguage, first_token_language, one_language
from mmkit.mplug.tasks.inputs import decoder_inputs, encoder_inputs, teacher_forced
from mmkit.objectives.lm import sequence_logprob
from mmkit.tokenizer import decode_rows, world_tokenizer
from mmkit.train import TrainConfig, cell_namers_fixed, evaluating, train, unwrap

__all__ = ["ZERO_SHOT_PROMPTS", "CaptionSampler", "caption_loss", "decode_captions", "CaptionEval",
           "evaluate_captioning", "SCSTConfig", "cider_rewards", "scst_loss", "CaptionRun", "finetune_captioning"]

# mPLUG §5.4.1: "we feed a prefix prompt 'A picture of' into the text encoder"
ZERO_SHOT_PROMPTS: dict[str, str] = {"en": "a picture of", "zh": "一张图片："}


class CaptionSampler:
    """Random training captions over a :class:`SceneBank`: a scene, its language, a caption style
    (``batch_fn`` for :func:`mmkit.train.train`). Batches: images (B, 3, S, S), captions, langs, scenes."""

    def __init__(self, bank: SceneBank, lang: str = "both", styles: Sequence[str] = CAPTION_STYLES):
        if lang not in ("en", "zh", "both"):
            raise ValueError(f"lang must be 'en', 'zh' or 'both', got {lang!r}")
        self.bank, self.lang, self.styles = bank, lang, tuple(styles)

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        idx = [rng.randrange(len(self.bank)) for _ in range(batch_size)]
        langs = [rng.choice(("en", "zh")) if self.lang == "both" else self.lang for _ in idx]
        scenes = [self.bank.scenes[i] for i in idx]
        caps = [caption(s, rng.choice(self.styles), lg) for s, lg in zip(scenes, langs)]
        return {"images": self.bank.images(idx), "captions": caps, "langs": langs, "scenes": scenes}


def _prompts(tok, n: int, prompt: str | Sequence[str] | None, max_len: int = 32):
    texts = [""] * n if prompt is None else [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(texts) != n:
        raise ValueError(f"{len(texts)} prompts for {n} images")
    return encoder_inputs(tok, texts, max_len)


def caption_loss(model, batch: dict, tokenizer=None, prompt: str | None = None):
    """Cross-entropy captioning (teacher forcing): batch {"images", "captions"} -> (loss, {"token_acc"})."""
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    c = unwrap(model).config
    ids, mask = _prompts(tok, len(batch["captions"]), prompt)
    dec, labels = teacher_forced(tok, batch["captions"], c)
    dev = batch["images"].device
    out = model(batch["images"], ids.to(dev), dec.to(dev), labels.to(dev), encoder_mask=mask.to(dev))
    with torch.no_grad():
        valid = labels != -100
        acc = float((out.logits.argmax(-1).cpu() == labels)[valid].float().mean())
    return out.loss, {"token_acc": acc}


@torch.no_grad()
def decode_captions(model, images: torch.Tensor, tokenizer=None, method: str = "beam", num_beams: int = 3,
                    max_new_tokens: int = 48, prompt: str | Sequence[str] | None = None,
                    langs: Sequence[str | None] | None = None, batch_size: int = 64) -> list[str]:
    """Captions of ``images`` (B, 3, S, S): ``method`` "beam" (transformers' beam search through the KV-cached
    adapter, mPLUG §7.1) or "greedy" (the model's own KV-cached loop). ``langs`` fixes each caption's language by its
    first token (:class:`mmkit.generation.FirstTokenLanguage`); ``prompt`` goes into the text encoder."""
    if method not in ("beam", "greedy"):
        raise ValueError(f"method must be 'beam' or 'greedy', got {method!r}")
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    c = model.config
    out: list[str] = []
    with evaluating(model):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(model.device)
            ids, mask = _prompts(tok, len(x), prompt if prompt is None or isinstance(prompt, str)
                                 else prompt[i:i + batch_size])
            lg = None if langs is None else list(langs[i:i + batch_size])
            if method == "greedy":
                proc = None if lg is None else first_token_language(tok, lg, c.vocab_size)
                seqs = model.generate(x, ids.to(x.device), max_new_tokens, encoder_mask=mask.to(x.device),
                                      logits_processor=proc).sequences
            else:
                procs = [] if lg is None else [FirstTokenLanguage(tok, lg, c.vocab_size, num_beams)]
                seqs = model.hf_generator().generate(images=x, encoder_ids=ids.to(x.device), num_beams=num_beams,
                                                     max_new_tokens=max_new_tokens, early_stopping=True,
                                                     logits_processor=procs)[:, 1:]
            out += decode_rows(tok, seqs.cpu(), c.eos_token_id)
    return out


class CaptionEval(NamedTuple):
    scores: CaptionScores             # BLEU-4, CIDEr, attribute accuracy (mmkit.evaluation.captioning)
    captions: list                    # the generated captions
    scenes: list
    langs: list


@torch.no_grad()
def evaluate_captioning(model, split: str = "test", n: int = 128, tokenizer=None, method: str = "beam",
                        num_beams: int = 3, max_new_tokens: int = 48, start: int = 0) -> CaptionEval:
    """Caption ``n`` held-out scenes (languages alternate EN / ZH) and score them against the world's references."""
    bank = SceneBank.build(split, n, image_size=model.config.image_size, start=start)
    langs = [("en", "zh")[i % 2] for i in range(len(bank))]
    caps = decode_captions(model, bank.images(range(len(bank))), tokenizer, method, num_beams, max_new_tokens,
                           langs=langs)
    return CaptionEval(caption_scores(caps, bank.scenes, langs), caps, bank.scenes, langs)


# ---------------------------------------------------------------------------------------------------------
# Self-critical sequence training (CIDEr optimisation, mPLUG §5.2.2 / §7.1)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class SCSTConfig:
    n_samples: int = 1             # captions sampled per image (Rennie et al.: 1; later work: 5)
    baseline: str = "greedy"       # b_i: "greedy" = the reward of the greedy caption (Rennie et al. 2017); "mean" =
                                   # the mean reward of image i's other samples (Luo 2020; needs n_samples >= 2).
                                   # Measured on the world: with "greedy", samples at temperature 1 score below the
                                   # greedy caption, nearly every advantage is negative, and 120 steps pushed the
                                   # captioner into "right right right ..." (CIDEr 1.93 -> 0.005); "mean" centres them
    temperature: float = 1.0       # sampling temperature
    top_k: int | None = None       # restrict sampling to the k most likely tokens (None: the full distribution)
    max_new_tokens: int = 48       # caption budget (the longest world caption: 44 tokens + [EOS])

    def __post_init__(self) -> None:
        if self.baseline not in ("greedy", "mean"):
            raise ValueError(f"baseline must be 'greedy' or 'mean', got {self.baseline!r}")
        if self.baseline == "mean" and self.n_samples < 2:
            raise ValueError("baseline='mean' averages the other samples of an image: set n_samples >= 2")


def cider_rewards(candidates: Sequence[str], scenes: Sequence, langs: Sequence[str]) -> torch.Tensor:
    """CIDEr-D (pycocoevalcap) of each candidate against its scene's references in its language: (len,) float."""
    gts = {i: [metric_tokens(r, lg) for r in caption_references(s, lg)]
           for i, (s, lg) in enumerate(zip(scenes, langs))}
    res = {i: [metric_tokens(cand, lg) or "<empty>"] for i, (cand, lg) in enumerate(zip(candidates, langs))}
    _, scores = Cider().compute_score(gts, res)
    return torch.as_tensor(scores, dtype=torch.float)


def scst_loss(model, batch: dict, config: SCSTConfig | None = None, tokenizer=None,
              generator: torch.Generator | None = None):
    """Self-critical loss of a batch {"images", "scenes", "langs"} -> (loss, {"reward", "baseline", "advantage"}).

    Sampling and the greedy baseline run without gradient (the model's KV-cached ``generate``); the sampled captions
    are then scored with gradient by teacher forcing through ``model(...)`` (DDP-safe)."""
    cfg = config or SCSTConfig()
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    raw = unwrap(model)
    c = raw.config
    images, scenes, langs = batch["images"], list(batch["scenes"]), list(batch["langs"])
    B, K = len(images), cfg.n_samples
    ids, mask = _prompts(tok, B, None)
    ids, mask = ids.to(images.device), mask.to(images.device)
    # greedy and sampled captions stay in the row's language: the reward compares them with references of that
    # language only, and a sample drifting into the other language would teach mixing (measured: "purple square正方形")
    with torch.no_grad():
        rep = images.repeat_interleave(K, 0)
        sampled = raw.generate(rep, ids.repeat_interleave(K, 0), cfg.max_new_tokens,
                               encoder_mask=mask.repeat_interleave(K, 0), do_sample=True,
                               temperature=cfg.temperature, top_k=cfg.top_k, generator=generator,
                               logits_processor=one_language(tok, [lg for lg in langs for _ in range(K)],
                                                             c.vocab_size)).sequences
        if cfg.baseline == "greedy":
            greedy = raw.generate(images, ids, cfg.max_new_tokens, encoder_mask=mask,
                                  logits_processor=one_language(tok, langs, c.vocab_size)).sequences   # (B, T)
    s_text = decode_rows(tok, sampled.cpu(), c.eos_token_id)
    rs = [s for s in scenes for _ in range(K)]
    rl = [lg for lg in langs for _ in range(K)]
    if cfg.baseline == "greedy":
        g_text = decode_rows(tok, greedy.cpu(), c.eos_token_id)
        scores = cider_rewards(s_text + g_text, rs + scenes, rl + langs)               # one call: same frequencies
        reward, baseline = scores[:B * K], scores[B * K:].repeat_interleave(K)
    else:
        reward = cider_rewards(s_text, rs, rl)
        per_image = reward.view(B, K)
        baseline = ((per_image.sum(1, keepdim=True) - per_image) / (K - 1)).flatten()   # the other samples' mean
    advantage = reward - baseline                                                       # (B K,)
    # the sampled token ids themselves (cut at [EOS]) are the targets: exact, no re-tokenization
    rows, ended = [], []
    for row in sampled.tolist():
        ended.append(c.eos_token_id in row)
        rows.append(row[:row.index(c.eos_token_id)] if ended[-1] else row)
    dec, labels = decoder_inputs(rows, bos_id=c.bos_token_id, eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                                 max_len=c.max_text_len)
    for i, (row, done) in enumerate(zip(rows, ended)):
        if not done and len(row) < labels.shape[1]:
            labels[i, len(row)] = -100                          # [EOS] was never sampled: not part of c
    dev = images.device
    out = model(rep, ids.repeat_interleave(K, 0), dec.to(dev), encoder_mask=mask.repeat_interleave(K, 0))
    logp = sequence_logprob(out.logits, labels.to(dev))                                 # (B K,) log p(c | image)
    loss = -(advantage.to(dev) * logp).mean()
    return loss, {"reward": float(reward.mean()), "baseline": float(baseline.mean()),
                  "advantage": float(advantage.mean())}



# ---------------------------------------------------------------------------------------------------------
# Training runs: cross-entropy, then CIDEr optimisation (mPLUG §7.1's two stages)
# ---------------------------------------------------------------------------------------------------------

class CaptionRun(NamedTuple):
    model: torch.nn.Module
    ce: object | None              # TrainResult of the cross-entropy stage (None when skipped)
    scst: object | None            # TrainResult of the SCST stage (history: loss, reward, baseline, advantage)
    cpu_seconds: float


def finetune_captioning(model, bank: SceneBank, ce_config: TrainConfig | None = None,
                        scst_config: TrainConfig | None = None, scst: SCSTConfig | None = None, lang: str = "both",
                        tokenizer=None, seed: int = 0) -> CaptionRun:
    """mPLUG §7.1 on the world: ``ce_config.steps`` of cross-entropy on the captions of ``bank`` (all five styles),
    then ``scst_config.steps`` of self-critical sequence training (:func:`scst_loss`, CIDEr-D reward, greedy
    baseline). Either stage is skipped when its config is None. ``model`` is trained in place."""
    c0 = time.process_time()
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    sampler = CaptionSampler(bank, lang=lang)
    ce = sc = None
    with cell_namers_fixed(model):               # the namer of stage 0 stays fixed: its codes name objects
        if ce_config is not None:
            ce = train(model, functools.partial(caption_loss, tokenizer=tok), sampler.batch_fn, ce_config)
        if scst_config is not None:
            g = torch.Generator().manual_seed(seed)
            sc = train(model, functools.partial(scst_loss, config=scst or SCSTConfig(), tokenizer=tok, generator=g),
                       sampler.batch_fn, scst_config)
    return CaptionRun(unwrap(model), ce, sc, time.process_time() - c0)
