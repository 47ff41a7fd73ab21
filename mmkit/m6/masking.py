"""M6's unified attention mask and its four pretraining tasks (M6 §3.2-3.3), and prefix LM in M6's form.

Pure tensor functions (no model code), deterministic given a ``torch.Generator``.

    sp = SpecialIds.from_tokenizer(tok)
    g = torch.Generator().manual_seed(0)
    ex = text_denoising(tok("a red circle left of a blue square", add_special_tokens=False)["input_ids"],
                        special=sp, generator=g)
    ex.encoder_ids          # a red [MASK] of a blue square      (one [MASK] per masked span)
    ex.decoder_input_ids    # [BOS] a red circle left of a blue square
    ex.labels               # a red circle left of a blue square [EOS]
    batch = collate([ex, image_captioning(ids, special=sp, n_visual=16)], pad_id=sp.pad_id)
    # model input: cat([visual (B, Nv, D), embed(batch.encoder_ids), embed(batch.decoder_input_ids)], dim=1)
    # attention: batch.mask (B, L, L); loss on the last Ld positions against batch.labels

Conventions (DEVELOPING.md): boolean masks, **True = may attend**, (L, L) or (B, L, L), broadcastable to
(B, heads, L_q, L_k) for ``F.scaled_dot_product_attention`` (use ``mask[:, None]`` for a batch). Token ids
given to the task builders are plain text ids, without [CLS]/[SEP] (``add_special_tokens=False``).
BERT's masked language modelling lives in :mod:`mmkit.objectives.mlm` (VLMo and mPLUG use it too).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mmkit.objectives.lm import IGNORE_INDEX, split_prefix
from mmkit.tokenizer import SpecialIds, pad_ids

# Segment ids of the unified sequence (M6 §3.2); a notebook draws boundaries where they change.
SEG_PAD, SEG_VISUAL, SEG_ENCODER, SEG_DECODER = -1, 0, 1, 2

__all__ = [
    "IGNORE_INDEX", "SEG_PAD", "SEG_VISUAL", "SEG_ENCODER", "SEG_DECODER", "SpecialIds",
    "UnifiedMask", "unified_mask", "TaskExample", "TaskBatch", "span_noise_mask", "replace_spans", "task_example",
    "text_denoising", "language_modeling", "image_captioning", "multimodal_to_text", "collate",
    "PrefixLMSplit", "prefix_lm_split",
]


# --------------------------------------------------------------------------------------------------------------
# M6 §3.2: the unified encoder-decoder mask
# --------------------------------------------------------------------------------------------------------------
class UnifiedMask(NamedTuple):
    mask: Tensor         # (L, L) or (B, L, L) bool, True = query row may attend to key column
    segment_ids: Tensor  # (L,) or (B, L) long: 0 visual, 1 encoder (masked) text, 2 decoder text, -1 padding


def _lengths(x, name: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long).reshape(-1) if not isinstance(x, Tensor) else x.long().reshape(-1)
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
    return t


def unified_mask(n_visual=0, n_encoder=0, n_decoder=0, *, widths: Sequence[int] | None = None,
                 segment_ids: Tensor | None = None, device=None) -> UnifiedMask:
    """M6's unified attention mask over [visual | masked text | complete text] (M6 §3.2).

    Rules (True = may attend):
      * visual and encoder-text queries attend bidirectionally to every visual and encoder-text key, never
        to decoder text;
      * decoder-text queries attend to every visual and encoder-text key and causally (key <= query) to
        decoder text;
      * padding keys are never attended by a real query. A padding *query* row attends to itself only:
        every row keeps one True entry so SDPA's softmax gives no NaN; its output is garbage that the loss
        ignores (its label is ``IGNORE_INDEX``).

    Give either segment lengths, or ``segment_ids`` for any other layout (the rules above only read the
    segment of each position and, among decoder positions, their order).

    Lengths: ints (one example -> ``mask`` (L, L), ``segment_ids`` (L,)) or sequences / 1-D tensors of
    length B (ints broadcast) -> (B, L, L), (B, L). The batch layout is *segment-aligned*: each segment
    has a fixed width (``widths=(Wv, We, Wd)``, default the max over the batch) and is padded at its own end,
    so a model concatenates ``(B, Wv, D)``, ``(B, We, D)`` and ``(B, Wd, D)`` tensors and the decoder block
    always starts at ``Wv + We`` (batched generation appends at the end)::

        lengths (2, 1, 2) and (2, 0, 1), widths (2, 1, 2):   segment_ids  [0 0 1 2 2]
                                                                          [0 0 -1 2 -1]
    """
    if segment_ids is None:
        batched = any(not isinstance(n, int) and torch.as_tensor(n).dim() > 0
                      for n in (n_visual, n_encoder, n_decoder))
        nv, ne, nd = (_lengths(n, name).to(device) for n, name in
                      ((n_visual, "n_visual"), (n_encoder, "n_encoder"), (n_decoder, "n_decoder")))
        B = max(len(nv), len(ne), len(nd))
        for n, name in ((nv, "n_visual"), (ne, "n_encoder"), (nd, "n_decoder")):
            if len(n) not in (1, B):
                raise ValueError(f"{name} has {len(n)} entries but the batch has {B}: give one per example or an int")
        nv, ne, nd = (n.expand(B) for n in (nv, ne, nd))
        if widths is None:
            widths = [int(n.max()) if B else 0 for n in (nv, ne, nd)]
        parts = []
        for n, w, seg, name in ((nv, widths[0], SEG_VISUAL, "visual"), (ne, widths[1], SEG_ENCODER, "encoder"),
                                (nd, widths[2], SEG_DECODER, "decoder")):
            if B and int(n.max()) > w:
                raise ValueError(f"a {name} segment has {int(n.max())} positions but its width is {w}: "
                                 "widen `widths` or shorten the example")
            pos = torch.arange(int(w), device=nv.device)
            parts.append(torch.where(pos[None, :] < n[:, None], seg, SEG_PAD))
        seg_ids = torch.cat(parts, dim=1)  # (B, L)
        if not batched:
            seg_ids = seg_ids[0]
    else:
        if any(int(torch.as_tensor(n).sum()) for n in (n_visual, n_encoder, n_decoder)):
            raise ValueError("give either segment lengths or segment_ids, not both")
        seg_ids = torch.as_tensor(segment_ids, dtype=torch.long, device=device)
        bad = ~torch.isin(seg_ids, torch.tensor([SEG_PAD, SEG_VISUAL, SEG_ENCODER, SEG_DECODER],
                                                device=seg_ids.device))
        if bad.any():
            raise ValueError(f"segment ids must be -1, 0, 1 or 2; got {sorted(set(seg_ids[bad].tolist()))}")
    return UnifiedMask(_mask_from_segments(seg_ids), seg_ids)


def _mask_from_segments(seg: Tensor) -> Tensor:
    L = seg.shape[-1]
    q, k = seg.unsqueeze(-1), seg.unsqueeze(-2)                      # (..., L, 1), (..., 1, L)
    idx = torch.arange(L, device=seg.device)
    causal = idx[None, :] <= idx[:, None]                            # (L, L): key position <= query position
    ctx_k = (k == SEG_VISUAL) | (k == SEG_ENCODER)                   # keys everyone real may see
    ctx_q = (q == SEG_VISUAL) | (q == SEG_ENCODER)
    mask = ctx_q & ctx_k                                             # bidirectional encoder block
    mask = mask | ((q == SEG_DECODER) & (ctx_k | ((k == SEG_DECODER) & causal)))  # decoder: context + causal
    mask = mask | ((q == SEG_PAD) & torch.eye(L, dtype=torch.bool, device=seg.device))  # pad rows: self only
    return mask


# --------------------------------------------------------------------------------------------------------------
# M6 §3.3: the pretraining tasks
# --------------------------------------------------------------------------------------------------------------
class TaskExample(NamedTuple):
    task: str                  # "text_denoising" | "language_modeling" | "image_captioning" | ...
    encoder_ids: Tensor        # (n_encoder,) long: masked/noised text (segment 1), may be empty
    decoder_input_ids: Tensor  # (n_decoder,) long: [BOS] + text (segment 2)
    labels: Tensor             # (n_decoder,) long: text + [EOS]; IGNORE_INDEX where not predicted
    n_visual: int              # visual positions (segment 0): image patch features supplied by the model
    n_encoder: int             # == len(encoder_ids)
    n_decoder: int             # == len(decoder_input_ids) == len(labels)
    noise_mask: Tensor         # (len(text),) bool: text tokens replaced by span [MASK]s (all False if no noise)


def _ids(x, name: str = "ids") -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"{name} must be one 1-D sequence of token ids, got shape {tuple(t.shape)}")
    return t


def _rand(generator, *shape) -> Tensor:
    return torch.rand(shape, generator=generator)


def span_noise_mask(n: int, *, generator: torch.Generator | None = None, rate: float = 0.15,
                    mean_span: float = 3.0) -> Tensor:
    """Choose ~``rate`` of ``n`` positions as contiguous spans (M6 §3.3 text denoising). Returns (n,) bool.

    * Count: ``k = max(1, floor(rate * n + u))``, u ~ U[0, 1) (stochastic rounding), capped at n. Its mean is
      exactly ``rate * n`` whenever ``rate * n >= 1`` (n >= 7 at 15%), so the masked fraction is unbiased;
      shorter texts still get one span (a denoising example with nothing to denoise teaches nothing).
    * Span lengths: geometric with mean ``mean_span`` (P(l) = p (1-p)^(l-1), p = 1/mean_span, as SpanBERT),
      drawn until they add up to k (the last is cut to fit). Geometric because it is always >= 1 (no empty
      spans, unlike BART's Poisson) and favours short spans, which suits captions of ~10 tokens where 15%
      is 1-3 tokens; mean 3 follows T5 / BART.
    * Placement: spans go into distinct, uniformly chosen gaps between the n - k kept tokens, so two spans
      are always separated by a kept token and each becomes exactly ONE [MASK] (if there are more spans
      than gaps, the last ones are merged).
    """
    if n < 0 or not 0.0 < rate <= 1.0 or mean_span < 1.0:
        raise ValueError(f"need n >= 0, 0 < rate <= 1 and mean_span >= 1; got n={n}, rate={rate}, "
                         f"mean_span={mean_span}")
    mask = torch.zeros(n, dtype=torch.bool)
    if n == 0:
        return mask
    k = min(n, max(1, math.floor(rate * n + float(_rand(generator)))))
    log_q = math.log1p(-1.0 / mean_span) if mean_span > 1.0 else -math.inf
    lengths, left = [], k
    while left > 0:
        u = 1.0 - float(_rand(generator))                             # (0, 1]
        length = 1 if log_q == -math.inf else int(math.log(u) / log_q) + 1
        lengths.append(min(length, left))
        left -= lengths[-1]
    n_keep = n - k
    while len(lengths) > n_keep + 1:                                   # not enough gaps: merge the last two
        last = lengths.pop()
        lengths[-1] += last
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=generator).tolist()]
    gaps = torch.randperm(n_keep + 1, generator=generator)[: len(lengths)].sort().values.tolist()
    before = 0                                                        # masked tokens placed so far
    for gap, length in zip(gaps, lengths):
        start = gap + before                                           # `gap` kept tokens precede this span
        mask[start:start + length] = True
        before += length
    return mask


def replace_spans(ids, noise_mask: Tensor, mask_id: int) -> Tensor:
    """Replace every contiguous run of ``noise_mask`` in ``ids`` by ONE ``mask_id`` (M6 §3.3)."""
    ids, noise_mask = _ids(ids), torch.as_tensor(noise_mask, dtype=torch.bool)
    if noise_mask.shape != ids.shape:
        raise ValueError(f"noise_mask {tuple(noise_mask.shape)} must match ids {tuple(ids.shape)}")
    prev = torch.cat([noise_mask.new_zeros(1), noise_mask[:-1]])
    start = noise_mask & ~prev                                         # first token of each span
    keep = ~noise_mask | start
    return torch.where(start, torch.full_like(ids, mask_id), ids)[keep]


def task_example(task: str, text: Tensor, encoder_ids: Tensor, n_visual: int, special: SpecialIds,
                 noise_mask: Tensor | None = None) -> TaskExample:
    # Decoder side of every task: teacher forcing over the *complete* text, [BOS] in, [EOS] out (M6 §3.3),
    # so the model learns the length too. Every position is predicted: no IGNORE_INDEX in a single example.
    dec_in = torch.cat([text.new_tensor([special.bos_id]), text])
    labels = torch.cat([text, text.new_tensor([special.eos_id])])
    if noise_mask is None:
        noise_mask = torch.zeros(len(text), dtype=torch.bool)
    return TaskExample(task, encoder_ids, dec_in, labels, int(n_visual), len(encoder_ids), len(dec_in), noise_mask)


def _check_visual(n_visual: int, task: str) -> None:
    if int(n_visual) < 1:
        raise ValueError(f"{task} needs an image: n_visual must be >= 1 (patch positions), got {n_visual}")


def text_denoising(ids, *, special: SpecialIds, generator: torch.Generator | None = None, rate: float = 0.15,
                   mean_span: float = 3.0) -> TaskExample:
    """Text-to-text: encoder sees the text with ~15% of it masked as spans (one [MASK] per span), the
    decoder regenerates the whole original text (M6 §3.3). See :func:`span_noise_mask`."""
    text = _ids(ids)
    noise = span_noise_mask(len(text), generator=generator, rate=rate, mean_span=mean_span)
    return task_example("text_denoising", text, replace_spans(text, noise, special.mask_id), 0, special, noise)


def language_modeling(ids, *, special: SpecialIds) -> TaskExample:
    """Text-to-text: the encoder receives nothing; the decoder learns the whole text left to right (M6 §3.3)."""
    text = _ids(ids)
    return task_example("language_modeling", text, text.new_zeros(0), 0, special)


def image_captioning(ids, *, special: SpecialIds, n_visual: int) -> TaskExample:
    """Image-to-text: ``n_visual`` patch features in, masked-text input left blank, caption out (M6 §3.3)."""
    _check_visual(n_visual, "image_captioning")
    text = _ids(ids)
    return task_example("image_captioning", text, text.new_zeros(0), n_visual, special)


def multimodal_to_text(ids, *, special: SpecialIds, n_visual: int, generator: torch.Generator | None = None,
                       rate: float = 0.15, mean_span: float = 3.0) -> TaskExample:
    """Multimodality-to-text (image-based text denoising): image + span-noised text in, whole text out
    (M6 §3.3)."""
    _check_visual(n_visual, "multimodal_to_text")
    text = _ids(ids)
    noise = span_noise_mask(len(text), generator=generator, rate=rate, mean_span=mean_span)
    return task_example("multimodal_to_text", text, replace_spans(text, noise, special.mask_id), n_visual, special,
                    noise)


class TaskBatch(NamedTuple):
    encoder_ids: Tensor        # (B, We) long, pad_id after each example's encoder text
    decoder_input_ids: Tensor  # (B, Wd) long, pad_id after each example's decoder input
    labels: Tensor             # (B, Wd) long, IGNORE_INDEX at padding
    mask: Tensor               # (B, L, L) bool, L = Wv + We + Wd; use mask[:, None] for SDPA's heads axis
    segment_ids: Tensor        # (B, L) long: 0 visual, 1 encoder, 2 decoder, -1 pad
    n_visual: Tensor           # (B,) long: valid patch positions of each example (0 for text-only tasks)
    n_encoder: Tensor          # (B,) long
    n_decoder: Tensor          # (B,) long
    tasks: tuple               # (B,) task names


def collate(examples: Sequence[TaskExample], *, pad_id: int, n_visual: int | None = None) -> TaskBatch:
    """Pad a list of task examples (any mix of tasks) into batch tensors plus their unified mask.

    The sequence is segment-aligned (see :func:`unified_mask`): ``n_visual`` patch slots (default: the most
    any example uses), then the encoder text block, then the decoder block. Examples with fewer visual
    positions (0 for text-only tasks) have the rest of the slots marked padding, so the model may feed any
    (e.g. zero) features there.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    nv = torch.tensor([e.n_visual for e in examples], dtype=torch.long)
    wv = int(nv.max()) if n_visual is None else int(n_visual)
    if int(nv.max()) > wv:
        raise ValueError(f"an example has {int(nv.max())} visual positions but n_visual={wv}: raise n_visual")
    enc = pad_ids([e.encoder_ids for e in examples], pad_id)
    dec = pad_ids([e.decoder_input_ids for e in examples], pad_id)
    labels = pad_ids([e.labels for e in examples], IGNORE_INDEX)
    ne = torch.tensor([len(e.encoder_ids) for e in examples], dtype=torch.long)
    nd = torch.tensor([len(e.decoder_input_ids) for e in examples], dtype=torch.long)
    um = unified_mask(nv, ne, nd, widths=(wv, enc.shape[1], dec.shape[1]))
    return TaskBatch(enc, dec, labels, um.mask, um.segment_ids, nv, ne, nd, tuple(e.task for e in examples))


# --------------------------------------------------------------------------------------------------------------
# mPLUG §3.3: prefix language modelling
# --------------------------------------------------------------------------------------------------------------
class PrefixLMSplit(NamedTuple):
    prefix_ids: Tensor     # (split,) bidirectional context
    suffix_ids: Tensor     # (n - split,) text to generate
    split: int             # prefix length: text == cat([prefix_ids, suffix_ids])
    example: TaskExample   # task "prefix_lm": encoder = prefix, decoder [BOS]+suffix -> suffix+[EOS]; collate-able
    mask: UnifiedMask      # (L, L), L = n_visual + split + n - split + 1: prefix bidirectional, suffix causal


def prefix_lm_split(ids, *, special: SpecialIds, generator: torch.Generator | None = None, n_visual: int = 0,
                    min_prefix: int = 1, min_suffix: int = 1, split: int | None = None) -> PrefixLMSplit:
    """Split a text at a uniform random point into a prefix (context, attended bidirectionally together with
    the image) and a suffix the decoder generates left to right (mPLUG §3.3 PrefixLM).

    The split is uniform over ``[min_prefix, n - min_suffix]`` (or the given ``split``). The mask is M6's
    unified mask with the prefix as encoder text and [BOS] + suffix as decoder text (``n_visual`` image
    positions in front).
    """
    text = _ids(ids)
    prefix, suffix, split = split_prefix(text, generator=generator, min_prefix=min_prefix,
                                         min_suffix=min_suffix, split=split)
    ex = task_example("prefix_lm", suffix, prefix, n_visual, special)
    ex = ex._replace(noise_mask=torch.zeros(len(text), dtype=torch.bool))
    return PrefixLMSplit(prefix, suffix, int(split), ex, unified_mask(ex.n_visual, ex.n_encoder, ex.n_decoder))
