"""BERT masked language modelling with whole-word masking and the 80/10/10 rule (VLMo §3.3, mPLUG §3.3).

    out = mlm_mask(input_ids, mask_id=tok.mask_token_id, vocab_size=len(tok), special_ids=tok.all_special_ids,
                   generator=g, tokens=tok.convert_ids_to_tokens(ids))      # MLMOutput(input_ids, labels)
    loss, metrics = mlm_loss(logits, out.labels)                           # token CE on the chosen positions
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mmkit.objectives.lm import IGNORE_INDEX, token_cross_entropy

__all__ = ["MLMOutput", "word_ids_from_tokens", "mlm_mask", "mlm_loss"]


class MLMOutput(NamedTuple):
    input_ids: Tensor  # same shape as the input: [MASK] / random / kept tokens at the chosen positions
    labels: Tensor     # original id at the chosen positions, IGNORE_INDEX elsewhere


def word_ids_from_tokens(tokens: Sequence[str] | Sequence[Sequence[str]]) -> Tensor:
    """Word index of every WordPiece token: a ``##`` piece continues the previous token's word.

    ``["a", "sm", "##all", "red"]`` -> ``[0, 1, 1, 2]``. A list of equal-length lists gives (B, L).
    """
    if tokens and not isinstance(tokens[0], str):
        rows = [word_ids_from_tokens(t) for t in tokens]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("every row of tokens must have the same length (tokens of the padded input_ids)")
        return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)
    out, w = [], -1
    for t in tokens:
        if not (t.startswith("##") and w >= 0):
            w += 1
        out.append(w)
    return torch.tensor(out, dtype=torch.long)


def mlm_mask(input_ids, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
             generator: torch.Generator | None = None, word_ids=None, tokens=None, rate: float = 0.15,
             probs: Sequence[float] = (0.8, 0.1, 0.1), at_least_one: bool = True) -> MLMOutput:
    """BERT masked language modelling inputs and labels (VLMo §3.3, mPLUG §3.3: 15% as in BERT).

    ``input_ids`` (L,) or (B, L). Each *word* is chosen with probability ``rate`` (so each token is chosen
    with probability ``rate``); all its pieces are then predicted (whole-word masking). Words are given by
    ``word_ids`` (same shape, -1 / None = not a word, e.g. ``encoding.word_ids()`` of a fast tokenizer) or
    ``tokens`` (WordPiece strings, see :func:`word_ids_from_tokens`); with neither, every token is its own
    word. Tokens in ``special_ids`` (pass ``tok.all_special_ids``: [CLS], [SEP], [PAD], ...) are never
    chosen. Each chosen token independently becomes [MASK] / a random non-special token / itself with
    ``probs`` = (0.8, 0.1, 0.1), as BERT. ``at_least_one``: a row with no chosen token gets one random word
    chosen, so no row has an all-ignored loss (biases the rate up only for short rows).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    single = ids.dim() == 1
    ids = ids.unsqueeze(0) if single else ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (L,) or (B, L), got shape {tuple(ids.shape)}")
    if len(probs) != 3 or abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
        raise ValueError(f"probs = (mask, random, keep) must be 3 non-negative numbers summing to 1, got {probs}")
    B, L = ids.shape
    if tokens is not None:
        if word_ids is not None:
            raise ValueError("give word_ids or tokens, not both")
        word_ids = word_ids_from_tokens(tokens)
    if word_ids is None:
        words = torch.arange(L).expand(B, L)
    else:
        if not isinstance(word_ids, Tensor):
            rows = [word_ids] if single else word_ids
            word_ids = [[-1 if w is None else w for w in r] for r in rows]
        words = torch.as_tensor(word_ids, dtype=torch.long)
        words = words.unsqueeze(0) if words.dim() == 1 else words
        if words.shape != ids.shape:
            raise ValueError(f"word_ids / tokens shape {tuple(words.shape)} must match input_ids {tuple(ids.shape)}")
    special = torch.isin(ids, torch.as_tensor(list(special_ids), dtype=torch.long))
    cand = ~special & (words >= 0)                                    # (B, L) tokens that may be chosen
    safe_words = words.clamp(min=0)
    n_words = int(words.max()) + 1 if words.numel() else 1
    chosen_word = torch.rand((B, max(n_words, 1)), generator=generator) < rate         # (B, W)
    chosen = torch.gather(chosen_word, 1, safe_words) & cand          # (B, L) whole words
    if at_least_one:
        empty = ~chosen.any(1) & cand.any(1)                          # (B,)
        score = torch.where(cand, torch.rand((B, L), generator=generator), -1.0)
        pick = score.argmax(1)                                        # a random candidate token per row
        same_word = safe_words == torch.gather(safe_words, 1, pick[:, None])
        chosen = chosen | (same_word & cand & empty[:, None])
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    u = torch.rand((B, L), generator=generator)
    to_mask = chosen & (u < probs[0])
    to_random = chosen & (u >= probs[0]) & (u < probs[0] + probs[1])
    allowed = torch.arange(vocab_size)
    allowed = allowed[~torch.isin(allowed, torch.as_tensor(list(special_ids), dtype=torch.long))]
    if len(allowed) == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to draw random replacements from")
    random_ids = allowed[torch.randint(len(allowed), (B, L), generator=generator)]
    out = torch.where(to_mask, mask_id, torch.where(to_random, random_ids, ids))
    return MLMOutput(out[0], labels[0]) if single else MLMOutput(out, labels)


def mlm_loss(logits: Tensor, labels: Tensor):
    """Masked-LM loss: token cross-entropy on the positions :func:`mlm_mask` chose (labels != IGNORE_INDEX).

    logits (B, L, V), labels (B, L) -> ``(loss, {"mlm_acc": ..., "mlm_tokens": ...})``.
    """
    loss, m = token_cross_entropy(logits, labels)
    return loss, {"mlm_acc": m["token_acc"], "mlm_tokens": float(m["n_tokens"])}
