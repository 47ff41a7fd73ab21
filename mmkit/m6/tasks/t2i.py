"""M6 text-to-image, stage two: a code language model on the pretrained M6 (M6 §4.1).

    model = mmkit.load("m6-tiny-t2i")                       # M6T2I: pretrained M6 + code embeddings / outputs
    vqgan = mmkit.load("vqgan-world")                       # stage one: 64 px image <-> 16x16 codes of 512
    tok = world_tokenizer()
    out = text_to_image(model, vqgan, tok, ["a small red circle at the top left"], SamplingConfig(n_samples=4))
    out.images                                              # (B, N, 3, S, S) in [0, 1]
    ranked = rerank(out.images, prompts, scorer=itm_scorer(mmkit.load("m6-tiny-itm"), tok))
    faithfulness_score(out.images[:, 0], prompts)           # mmkit.evaluation.faithfulness: pixels vs the prompt

M6 §4.1: "In the finetuning, we add code embedding and output layers to the pretrained M6. We concat the word
sequence and the aforementioned generated code sequence as the input, and we set the objective of
autoregressive language modeling for the training. At the stage of inference, we input the text sequence, and
the model generates codes autoregressively with top-k sampling. The last step is to transform the code sequence
to an image with the generator from the first stage."

How that maps onto the kit's M6 (:mod:`mmkit.m6.model`, where :class:`M6T2I` lives), which nothing here
re-implements:

    ids 0 .. 511                word vocabulary of the pretrained M6 (the world tokenizer uses 0 .. 383)
    ids 512 .. 1023             <code_0> .. <code_511>: the ADDED code embeddings (new rows of the embedding) and,
                                through M6's tied output layer (M6 §3.2), the ADDED code outputs
    encoder block               the prompt's word ids (bidirectional, as M6's masked-text block)
    decoder block               [BOS] code_1 .. code_255 -> code_1 .. code_256 (causal): the code LM
    loss                        cross-entropy on the 256 code positions only ("autoregressive language modeling")

So :class:`M6T2I` *is* an :class:`~mmkit.m6.model.M6Model` with a 1024-id vocabulary: its forward, unified mask,
KV-cache ``generate`` (top-k / top-p / temperature / seeded generator / logits processor) and the transformers
``generate()`` adapter (:mod:`mmkit.generation`) all work unchanged. While codes are generated the vocabulary is
restricted to the code ids by :class:`CodeOnlyProcessor` (a transformers ``LogitsProcessor``, which M6's own loop
accepts as well), so a sample is always 256 valid codes.

Reranking: M6 §4.1 samples; OFA and DALL-E draw N samples and keep those an image-text model scores highest.
:func:`rerank` takes any scorer ``(images, texts) -> (B,) scores``; :func:`itm_scorer` wraps M6's image-text
matching head (:func:`mmkit.m6.tasks.itm.itm_scores`, M6 §4.6).

Held-out generalisation (M6's "military style camouflage high heels", Figure 6, an object that does not exist):
the recipe trains on one- and two-object scenes *except* the colour + shape pairs in :data:`HELDOUT_PAIRS`; every colour
and every shape is still seen, never together. :func:`eval_prompts` builds test-split prompts of seen and of
unseen pairs, and the recipe reports faithfulness on both.
"""
from __future__ import annotations

import unicodedata

import math
import numbers
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from mmkit.data.scenes import SceneBank, on_backdrop, sample_scenes
from mmkit.data.text import caption
from mmkit.data.world import STUDIO
from mmkit.evaluation.faithfulness import faithfulness, faithfulness_score, wanted_from_scene
from mmkit.m6.model import M6Model, M6T2I
from mmkit.m6.tasks.itm import itm_scores
from mmkit.objectives.lm import token_cross_entropy
from mmkit.tokenizer import pad_ids, pad_texts
from mmkit.train import TrainConfig, evaluating, train

__all__ = [
    "CodeOnlyProcessor", "SamplingConfig", "T2IData", "T2IDataConfig", "t2i_loss",
    "encode_prompts", "generate_codes", "iter_samples", "text_to_image", "T2IOutput", "Ranked", "rerank",
    "itm_scorer", "Scorer", "eval_prompts", "EVAL_KINDS", "EvalPrompts", "evaluate_t2i", "code_loss",
    "HELDOUT_PAIRS", "RECIPE_TRAIN", "RECIPE_TRAIN_FAST", "finetune_t2i", "T2IRun", "MAX_SEED", "MAX_SAMPLES",
]

# M6 §4.1 Figure 6 in miniature: colour + shape pairs the code LM never sees in training (each colour and each
# shape is seen with the other shapes / colours). Faithfulness on them measures composition, not memory.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "square"), ("blue", "circle"))


# ---------------------------------------------------------------------------------------------------------
# Restricted vocabulary while generating codes
# ---------------------------------------------------------------------------------------------------------

class CodeOnlyProcessor(LogitsProcessor):
    """Only image-code ids may be generated (M6 §4.1: the decoder writes an image as codes): every other logit
    becomes -inf. A transformers ``LogitsProcessor`` (``hf.generate(logits_processor=LogitsProcessorList([p]))``)
    and a callable for ``M6Model.generate(logits_processor=p)`` (same ``(ids, scores)`` signature)."""

    def __init__(self, code_offset: int, n_codes: int):
        self.lo, self.hi = int(code_offset), int(code_offset) + int(n_codes)

    @classmethod
    def for_model(cls, model: M6T2I) -> "CodeOnlyProcessor":
        return cls(model.config.code_offset, model.config.n_codes)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[self.lo:self.hi] = True
        return scores.masked_fill(~keep, float("-inf"))                               # (B, V)


# ---------------------------------------------------------------------------------------------------------
# Data: prompts (EN + ZH) and the VQGAN codes of their images
# ---------------------------------------------------------------------------------------------------------

@dataclass
class T2IDataConfig:
    split: str = "train"           # world split the scenes come from
    n_scenes: int = 8000           # scenes kept (after leaving out held-out pairs); their images are
                                   # encoded once by the VQGAN (~15 s per 1000 at 64 px on 2 cores)
    min_objects: int = 1           # objects per scene; every prompt names every object's size, colour, shape and
    max_objects: int = 2           # position, so faithfulness is checkable. Two objects: prompts like "a red
                                   # circle at the top left and a small blue square at the bottom"
    langs: tuple = ("en", "zh")    # every scene is paired with prompts in both languages ...
    styles: tuple = ("full", "full_alt")   # ... and both phrasings that name all four attributes
    exclude_pairs: tuple = HELDOUT_PAIRS   # (colour, shape) pairs left out of training
    only_pairs: tuple = ()         # if set: keep only scenes whose objects are all among these pairs (eval sets)
    start: int = 0                 # first seed offset inside the split
    studio_backdrop: bool = True   # draw every scene on one backdrop (world.STUDIO) instead of its sampled shade:
                                   # no prompt names the shade, so sampling it only spends codes


def scene_ok(scene, cfg: T2IDataConfig) -> bool:
    """Whether ``scene`` belongs to the data ``cfg`` describes (held-out pairs left out, or only they kept)."""
    pairs = [(o.colour, o.shape) for o in scene.objects]
    if cfg.only_pairs:
        return all(p in cfg.only_pairs for p in pairs)
    return not any(p in cfg.exclude_pairs for p in pairs)


class T2IData:
    """Scenes, their prompts (tokenized, every language x style) and the VQGAN codes of their images.

    ``prompt_ids[i]`` is a list of 1-D long tensors (the prompts of scene ``i``), ``prompts[i]`` their strings,
    ``codes`` (N, g*g) long VQGAN indices, ``images`` (N, 3, S, S) uint8, ``scenes``.
    """

    def __init__(self, config, scenes, prompts, prompt_ids, codes, images):
        self.config, self.scenes, self.prompts, self.prompt_ids = config, scenes, prompts, prompt_ids
        self.codes, self.images = codes, images

    @classmethod
    @torch.no_grad()
    def build(cls, vqgan, tokenizer, config: T2IDataConfig = T2IDataConfig(),
              max_prompt_tokens: int = 48) -> "T2IData":
        c = config
        bank = SceneBank.build(c.split, c.n_scenes, image_size=vqgan.config.resolution, start=c.start,
                               min_objects=c.min_objects, max_objects=c.max_objects,
                               keep=lambda scene: scene_ok(scene, c),
                               backdrop=STUDIO if c.studio_backdrop else None)
        scenes, images = bank.scenes, bank.images_u8                                    # (N, 3, S, S) uint8
        prompts = [[caption(s, st, lang) for lang in c.langs for st in c.styles] for s in scenes]
        flat = [p for ps in prompts for p in ps]
        ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        k = len(c.langs) * len(c.styles)
        prompt_ids = [[torch.tensor(x[:max_prompt_tokens], dtype=torch.long) for x in ids[i * k:(i + 1) * k]]
                      for i in range(len(scenes))]
        codes = [vqgan.encode(images[i:i + 256].float() / 255.0).flatten(1) for i in range(0, len(images), 256)]
        codes = torch.cat(codes) if codes else torch.zeros(0, vqgan.config.grid_size ** 2, dtype=torch.long)
        return cls(c, scenes, prompts, prompt_ids, codes, images)

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, rows: Sequence[int], variants: Sequence[int], code_offset: int, bos_id: int,
              pad_id: int) -> dict:
        """Scene ``rows[j]`` with its prompt ``variants[j]``: encoder / decoder ids and code labels."""
        enc = [self.prompt_ids[r][v % len(self.prompt_ids[r])] for r, v in zip(rows, variants)]
        encoder_ids = pad_ids(enc, pad_id)                                              # (B, We)
        codes = self.codes[list(rows)] + code_offset                                    # (B, g*g) model ids
        bos = torch.full((len(rows), 1), bos_id, dtype=torch.long)
        # M6 §4.1: autoregressive LM on the codes: [BOS] c1 .. c63 in, c1 .. c64 out (teacher forcing)
        return {"encoder_ids": encoder_ids, "decoder_input_ids": torch.cat([bos, codes[:, :-1]], 1),
                "labels": codes}

    def batch_fn(self, code_offset: int, bos_id: int, pad_id: int) -> Callable[[torch.Generator, int], dict]:
        """``batch_fn(generator, B)`` for :func:`mmkit.train.train`: random scenes, a random prompt of each."""
        k = len(self.prompt_ids[0])

        def fn(g: torch.Generator, batch_size: int) -> dict:
            rows = torch.randint(len(self), (batch_size,), generator=g).tolist()
            variants = torch.randint(k, (batch_size,), generator=g).tolist()
            return self.batch(rows, variants, code_offset, bos_id, pad_id)
        return fn


def t2i_loss(model, batch: dict):
    """``loss_fn`` for :func:`mmkit.train.train`: mean cross-entropy over the code positions (M6 §4.1), and the
    teacher-forced code accuracy."""
    dev = next(model.parameters()).device
    out = model(None, batch["encoder_ids"].to(dev), batch["decoder_input_ids"].to(dev), batch["labels"].to(dev))
    with torch.no_grad():
        labels = batch["labels"].to(dev)
        acc = float((out.logits.argmax(-1) == labels).float().mean())
    return out.loss, {"code_acc": acc}


@torch.no_grad()
def code_loss(model: M6T2I, data: T2IData, n: int | None = None, batch_size: int = 128) -> dict[str, float]:
    """Teacher-forced code cross-entropy and accuracy on ``data`` (every scene with its first prompt)."""
    c = model.config
    n = len(data) if n is None else min(n, len(data))
    total = correct = tokens = 0.0
    with evaluating(model):
        for i in range(0, n, batch_size):
            rows = list(range(i, min(n, i + batch_size)))
            b = data.batch(rows, rows, c.code_offset, c.bos_token_id, c.pad_token_id)
            loss, m = token_cross_entropy(model(None, b["encoder_ids"], b["decoder_input_ids"]).logits, b["labels"])
            total += float(loss) * m["n_tokens"]
            correct += m["token_acc"] * m["n_tokens"]
            tokens += m["n_tokens"]
    return {"code_loss": total / max(tokens, 1), "code_acc": correct / max(tokens, 1)}


# ---------------------------------------------------------------------------------------------------------
# Sampling (M6 §4.1: "generates codes autoregressively with top-k sampling")
# ---------------------------------------------------------------------------------------------------------

MAX_SEED = 2**63 - 1               # largest seed torch.Generator.manual_seed takes as a non-negative int64
MAX_SAMPLES = 256                  # images per prompt in one call (each is code_grid**2 sequential code steps)


@dataclass
class SamplingConfig:
    n_samples: int = 4             # images drawn per prompt (then reranked)
    top_k: int | None = 8          # keep the k most likely codes at each step (M6 §4.1's top-k); None = all
    top_p: float | None = None     # nucleus: smallest set of codes with probability >= top_p; None = off
    temperature: float = 0.5       # softmax(logits / T): < 1 sharper and safer, > 1 more varied. Measured on the
                                   # shipped m6-tiny-t2i, first sample all right (128 prompts each: held-out / unseen
                                   # pairs / two objects): k=8 T=0.5 0.953 / 0.750 / 0.656; k=8 T=1 0.938 / 0.570 /
                                   # 0.602; k=8 T=0.7 0.914 / 0.703 / 0.656; greedy 0.953 / 0.719 / 0.648 (no variety)
    seed: int = 0                  # seeds the sampling generator: same seed, same images
    use_cache: bool = True         # KV cache (M6Model.generate): same samples, far fewer FLOPs per code

    def __post_init__(self) -> None:
        def whole(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        if not whole(self.n_samples) or not 1 <= self.n_samples <= MAX_SAMPLES:
            raise ValueError(f"n_samples must be a whole number from 1 to {MAX_SAMPLES}, got {self.n_samples!r}")
        if not number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and (not whole(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a whole number >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        # torch.Generator.manual_seed takes 64-bit seeds; checked here so a bad seed fails when the settings are
        # made, not later inside a lazy sample generator (where an app's error handling no longer reaches)
        if not whole(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1), got {self.seed!r}")


def encode_prompts(tokenizer, prompts: Sequence[str], max_tokens: int = 48, pad_id: int = 0) -> torch.Tensor:
    """Prompts -> (B, We) word ids, padded with ``pad_id`` (M6 masks encoder padding). A prompt longer than
    ``max_tokens`` is an error (never silently cut: the image would not show what the cut-off words ask for)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings, e.g. ['a small red circle at the top left']")
    if len(prompts) == 0:
        raise ValueError("no prompts given; pass a list with at least one, e.g. ['a small red circle at the top left']")
    for p in prompts:
        if not any(unicodedata.category(c)[0] in "LN" for c in p):     # empty, control characters or symbols only
            raise ValueError(f"the prompt {p[:40]!r} has no words; describe an object, e.g. 'a small red circle at "
                             "the top left' or '左上角的一个红色小圆形'")
        n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            raise ValueError(f"the prompt is too long: {n} tokens, the model reads at most {max_tokens} (a world "
                             f"caption needs ~12). Describe one object (it began: {p[:60]!r}).")
    out = pad_texts(tokenizer, prompts, max_tokens, pad_id)
    return out


@torch.no_grad()
def generate_codes(model: M6T2I, encoder_ids: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one image's codes per row of ``encoder_ids`` (B, We) -> (B, g, g) VQGAN code indices.

    M6's own KV-cache loop (``M6Model.generate``) with top-k / top-p / temperature and the vocabulary
    restricted to codes (:class:`CodeOnlyProcessor`); exactly ``code_grid**2`` steps.
    """
    s = sampling
    g = generator if generator is not None else torch.Generator().manual_seed(s.seed)
    gen = model.generate(None, encoder_ids, model.config.n_image_codes, do_sample=True, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, generator=g, use_cache=s.use_cache,
                         logits_processor=CodeOnlyProcessor.for_model(model))
    return model.ids_to_codes(gen.sequences)                                          # (B, g, g)


def iter_samples(model: M6T2I, vqgan, tokenizer, prompts: Sequence[str],
                 sampling: SamplingConfig = SamplingConfig()) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(k, codes (B, g, g), images (B, 3, S, S))`` for sample k = 0 .. N-1 of every prompt, as each
    round finishes (an app shows images while the rest are still being drawn). One generator seeded by
    ``sampling.seed`` draws all rounds, so the whole run is reproducible."""
    enc = encode_prompts(tokenizer, prompts, model.config.max_prompt_tokens, model.config.pad_token_id)
    g = torch.Generator().manual_seed(sampling.seed)
    for k in range(sampling.n_samples):
        codes = generate_codes(model, enc, sampling, g)
        yield k, codes, vqgan.decode(codes)                   # stage one's generator: codes -> pixels


class T2IOutput(NamedTuple):
    images: torch.Tensor          # (B, N, 3, S, S) in [0, 1]: N samples per prompt
    codes: torch.Tensor           # (B, N, g, g) VQGAN code indices
    seconds: float                # wall-clock time of sampling + decoding


def text_to_image(model: M6T2I, vqgan, tokenizer, prompts: Sequence[str],
                  sampling: SamplingConfig = SamplingConfig()) -> T2IOutput:
    """N samples for every prompt: the whole of M6 §4.1's inference (text -> codes -> VQGAN decoder)."""
    t0 = time.perf_counter()
    enc = encode_prompts(tokenizer, prompts, model.config.max_prompt_tokens, model.config.pad_token_id)
    B, N = enc.shape[0], sampling.n_samples
    g = torch.Generator().manual_seed(sampling.seed)
    codes = generate_codes(model, enc.repeat_interleave(N, 0), sampling, g)             # (B*N, g, g)
    images = vqgan.decode(codes)                                                          # (B*N, 3, S, S)
    return T2IOutput(images.view(B, N, *images.shape[1:]), codes.view(B, N, *codes.shape[1:]),
                     time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------
# Reranking (as DALL-E / OFA rerank samples with CLIP; here M6's own image-text matching)
# ---------------------------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]   # (images (B, 3, H, W) in [0, 1], texts) -> (B,)


class Ranked(NamedTuple):
    order: torch.Tensor           # (B, N) sample indices, best first
    scores: torch.Tensor          # (B, N) the scorer's score of every sample (original order)
    best: torch.Tensor            # (B, 3, H, W) the top sample of each prompt


@torch.no_grad()
def rerank(images: torch.Tensor, prompts: Sequence[str], scorer: Scorer) -> Ranked:
    """Order the N samples of each prompt by ``scorer`` (higher = matches the prompt better).

    ``images`` (B, N, 3, H, W); the scorer sees all B*N (image, prompt) pairs in one call.
    """
    if images.dim() != 5 or images.shape[0] != len(prompts):
        raise ValueError(f"rerank expects images (B, N, 3, H, W) with B = len(prompts) = {len(prompts)}, got "
                         f"{tuple(images.shape)}")
    B, N = images.shape[:2]
    texts = [p for p in prompts for _ in range(N)]
    scores = torch.as_tensor(scorer(images.flatten(0, 1), texts), dtype=torch.float).view(B, N).cpu()
    order = scores.argsort(dim=1, descending=True, stable=True)
    return Ranked(order, scores, images[torch.arange(B), order[:, 0]])


def itm_scorer(itm_model, tokenizer) -> Scorer:
    """M6's image-text matching probability (M6 §4.6; :func:`mmkit.m6.tasks.itm.itm_scores`) as a rerank scorer.
    Images are area-resized to the side the matching model reads (the generator may draw larger ones)."""
    side = itm_model.config.image_size

    def score(images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        if images.shape[-1] != side:
            images = F.interpolate(images, size=(side, side), mode="area")
        return itm_scores(itm_model, images, list(texts), tokenizer)
    return score


# ---------------------------------------------------------------------------------------------------------
# Evaluation prompts and faithfulness
# ---------------------------------------------------------------------------------------------------------

class EvalPrompts(NamedTuple):
    prompts: list                 # prompt strings (alternating English / Chinese, alternating styles)
    scenes: list                  # the test-split scenes they describe
    kind: str                     # "heldout" (test split, seen pairs) or "unseen_pairs" (HELDOUT_PAIRS only)


EVAL_KINDS: tuple[str, ...] = ("heldout", "unseen_pairs", "two_objects")


def eval_prompts(n: int = 64, kind: str = "heldout", split: str = "test", start: int = 0) -> EvalPrompts:
    """``n`` prompts from the ``split`` (never trained on): ``kind="heldout"`` takes one-object scenes of seen colour
    + shape pairs, ``"unseen_pairs"`` one-object scenes of :data:`HELDOUT_PAIRS` only, ``"two_objects"`` scenes of
    two objects of seen pairs ("a red circle at the top left and a small blue square at the bottom")."""
    if kind not in EVAL_KINDS:
        raise ValueError(f"kind must be one of {EVAL_KINDS}, got {kind!r}")
    two = kind == "two_objects"
    cfg = T2IDataConfig(exclude_pairs=HELDOUT_PAIRS if kind != "unseen_pairs" else (),
                        only_pairs=HELDOUT_PAIRS if kind == "unseen_pairs" else (),
                        min_objects=2 if two else 1, max_objects=2 if two else 1)
    scenes = on_backdrop(sample_scenes(split, n, start=start, min_objects=cfg.min_objects,
                                       max_objects=cfg.max_objects, keep=lambda scene: scene_ok(scene, cfg)),
                         STUDIO if cfg.studio_backdrop else None)                # the backdrop the model draws on
    prompts = [caption(s, ("full", "full_alt")[(i // 2) % 2], ("en", "zh")[i % 2]) for i, s in enumerate(scenes)]
    return EvalPrompts(prompts, scenes, kind)


@torch.no_grad()
def evaluate_t2i(model: M6T2I, vqgan, tokenizer, prompts: EvalPrompts, sampling: SamplingConfig = SamplingConfig(),
                 scorer: Scorer | None = None) -> dict[str, float]:
    """Faithfulness (:mod:`mmkit.evaluation.faithfulness`, checked against the prompt's own scene) of generated images.

    ``first_*``: the first sample of each prompt (no reranking); ``any_all_right``: some sample is right (the
    best a reranker could do); with a ``scorer``, ``rerank_*``: the sample the scorer ranks first.
    """
    out = text_to_image(model, vqgan, tokenizer, prompts.prompts, sampling)
    wanted = [wanted_from_scene(s) for s in prompts.scenes]
    res = {f"first_{k}": v for k, v in faithfulness_score(out.images[:, 0], wanted).items() if k != "n"}
    ok = torch.tensor([[faithfulness(img, w).ok for img in imgs] for imgs, w in zip(out.images, wanted)])
    res.update(mean_all_right=float(ok.float().mean()), any_all_right=float(ok.any(1).float().mean()),
               n_prompts=len(wanted), n_samples=sampling.n_samples,
               seconds_per_image=out.seconds / max(1, out.images.shape[0] * out.images.shape[1]))
    if scorer is not None:
        ranked = rerank(out.images, prompts.prompts, scorer)
        res.update({f"rerank_{k}": v for k, v in faithfulness_score(ranked.best, wanted).items() if k != "n"})
    return res


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------------

# 3000 steps of 32 on 8000 one- and two-object scenes: 34 min on 2 threads (4072 CPU-s); val code accuracy 0.82,
# first sample right on held-out prompts 0.95 (mmkit/checkpoints/m6-tiny-t2i/recipe.json). Measured at 800 steps
# on a 32 px tokenizer and not kept: DALL-E-style row / column code embeddings, a 10% prompt dropout for
# classifier-free guidance (guided at 1.5-3), code rows started from the VQGAN codebook: none beat the plain LM.
RECIPE_TRAIN = dict(steps=3000, batch_size=32, lr=2e-3, warmup_steps=50, min_lr_ratio=0.05, weight_decay=0.01,
                    mixed_precision="no", eval_every=0, log_every=50, seed=0)
RECIPE_TRAIN_FAST = dict(RECIPE_TRAIN, steps=100, batch_size=16, warmup_steps=15)


class T2IRun(NamedTuple):
    model: M6T2I
    result: object                # mmkit.train.TrainResult
    before: dict                  # val code loss / accuracy before fine-tuning
    after: dict                   # ... and after
    data: T2IData


def finetune_t2i(pretrained: M6Model, vqgan, tokenizer, train_config=None, data_config: T2IDataConfig | None = None,
                 val_scenes: int = 256, progress_bar: bool = False) -> T2IRun:
    """M6 §4.1 fine-tuning: add code embeddings / outputs to ``pretrained`` and train the code LM."""
    tcfg = train_config or TrainConfig(**RECIPE_TRAIN, progress_bar=progress_bar)
    model = M6T2I.from_pretrained_m6(pretrained, n_codes=vqgan.config.n_embed, code_grid=vqgan.config.grid_size)
    dcfg = data_config or T2IDataConfig()
    data = T2IData.build(vqgan, tokenizer, dcfg, model.config.max_prompt_tokens)
    # validation: the same kind of scenes (objects, backdrop, held-out pairs) from the val split
    val = T2IData.build(vqgan, tokenizer, replace(dcfg, split="val", n_scenes=val_scenes, start=0),
                        model.config.max_prompt_tokens)
    before = code_loss(model, val)
    c = model.config
    result = train(model, t2i_loss, data.batch_fn(c.code_offset, c.bos_token_id, c.pad_token_id), tcfg)
    model.eval()
    return T2IRun(model, result, before, code_loss(model, val), data)
