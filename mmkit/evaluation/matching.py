"""Image-text matching evaluation for any scorer: balanced accuracy per negative kind, and twin ranking.

    pairs = ITMPairs(bank).eval_pairs(n=256)                   # (positive, negative) twins per kind
    scores = my_model_probability(images_of(pairs), texts_of(pairs))   # (len(pairs),) in [0, 1]
    ev = matching_eval(pairs, scores, kinds=NEGATIVE_KINDS)    # ITMEval(accuracy, per_kind, ranking, ...)

Twins make each kind balanced (chance 0.5); ``ranking`` asks the easier question, whether the true caption
scores above its substituted twin, which also works for scores that are not calibrated probabilities (e.g. a
caption's likelihood, M6 §3.3 zero-shot).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["ITMEval", "matching_eval", "twin_ranking"]


class ITMEval(NamedTuple):
    accuracy: float           # mean of per_kind (balanced pairs: chance 0.5)
    per_kind: dict            # {kind: accuracy over its positives + negatives, threshold 0.5}
    ranking: dict             # {kind: fraction of twins where the positive scores above its negative}
    positive_acc: float       # accuracy on the positives alone
    n: int                    # twins per kind
    scores: list              # [(ITMPair, score)] of every pair scored


def twin_ranking(pairs: Sequence, scores: torch.Tensor, kinds: Sequence[str]) -> dict[str, float]:
    """{kind: fraction of (positive, negative) twins whose positive scores higher}; ``pairs`` stored as twins."""
    out = {}
    for kind in kinds:
        idx = [k for k, p in enumerate(pairs) if p.kind == kind]
        out[kind] = float((scores[idx[0::2]] > scores[idx[1::2]]).float().mean())
    return out


def matching_eval(pairs: Sequence, scores: torch.Tensor, kinds: Sequence[str], threshold: float = 0.5) -> ITMEval:
    """Balanced ITM accuracy (M6 §4.6, Table 7 style) of match ``scores`` (probabilities) on twin ``pairs``."""
    scores = torch.as_tensor(scores, dtype=torch.float).reshape(-1)
    if len(scores) != len(pairs):
        raise ValueError(f"need one score per pair: {len(scores)} scores for {len(pairs)} pairs")
    per_kind = {}
    for kind in kinds:
        idx = [k for k, p in enumerate(pairs) if p.kind == kind]
        if not idx:
            raise ValueError(f"no pairs of kind {kind!r}; evaluate only the kinds the pairs hold")
        per_kind[kind] = sum(int((scores[k] > threshold) == bool(pairs[k].label)) for k in idx) / len(idx)
    pos_idx = [k for k, p in enumerate(pairs) if p.label]
    pos_acc = float((scores[pos_idx] > threshold).float().mean())
    n = sum(1 for p in pairs if p.kind == kinds[0]) // 2
    return ITMEval(sum(per_kind.values()) / len(per_kind), per_kind, twin_ranking(pairs, scores, kinds), pos_acc, n,
                   list(zip(pairs, scores.tolist())))
