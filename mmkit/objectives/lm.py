"""Token-level language-modelling helpers: the loss of MLM / PrefixLM / captioning, and sequence scoring.

Every text objective of the three systems ends in the same two lines of arithmetic:

* **token cross-entropy** (M6 §3.3 "... to text" tasks, VLMo §3.3 MLM, mPLUG §3.3 MLM and PrefixLM): the mean over
  the labelled positions of -log p(label), positions labelled ``IGNORE_INDEX`` skipped::

      L = -1/|T| Σ_{t ∈ T} log softmax(z_t)[y_t],   T = {t : y_t != IGNORE_INDEX}

* **sequence log-probability**, used to rank candidate answers or captions (M6 §4.6, VQA answer scoring)::

      log p(y | x) = Σ_{t ∈ T} log softmax(z_t)[y_t]        one number per row

* **prefix splits** (mPLUG §3.3 PrefixLM): where to cut a text into bidirectional context and a continuation.

Both are computed in fp32 whatever the dtype of the logits: a bf16 log-softmax keeps about 3 significant digits,
too few for a loss of ~10 over a 30k vocabulary. The callers align logits and labels (shift by one for a causal
decoder) before calling; these helpers never shift.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "token_cross_entropy", "sequence_logprob", "token_log_probs", "split_prefix"]

IGNORE_INDEX = -100  # the label of positions no loss looks at (torch.nn.functional.cross_entropy's default)


def _check_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: logits must be "
                         "labels.shape + (vocab,); shift them yourself for next-token prediction")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    real = labels[labels != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= logits.shape[-1]):
        raise ValueError(f"labels hold ids {int(real.min())}..{int(real.max())} outside the vocabulary "
                         f"0..{logits.shape[-1] - 1}; positions to skip must be {ignore_index} (IGNORE_INDEX)")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean token cross-entropy over the labelled positions.

    logits (..., V) any float dtype, labels (...) integer ids or ``ignore_index``.
    Returns (loss, metrics): loss is a scalar fp32 tensor; metrics = {"token_acc": share of labelled positions whose
    argmax is the label, "n_tokens": number of labelled positions}. With no labelled position at all the loss is
    0 (still attached to the graph, so backward and DDP work) and token_acc is 0.
    """
    _check_labels(logits, labels, ignore_index)
    V = logits.shape[-1]
    z = logits.float().reshape(-1, V)                                    # (T, V) fp32 upcast
    y = labels.reshape(-1).long()                                        # (T,)
    real = y != ignore_index                                             # (T,)
    n = int(real.sum())
    total = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum")   # Σ_t -log p(y_t), 0 if n == 0
    loss = total / max(n, 1)                                             # mean over real tokens
    with torch.no_grad():
        correct = int(((z.argmax(-1) == y) & real).sum())
    return loss, {"token_acc": correct / max(n, 1), "n_tokens": n}


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                     per_token: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels | inputs) of each row: the sum of log p(label) over the row's labelled positions.

    logits (B, L, V), labels (B, L). Returns (B,) fp32 log-probabilities (0 for a row with no labelled position:
    the empty sequence has probability 1), or with ``per_token=True`` the pair ((B,), (B, L)) where the second
    holds log p(label) at each position and 0 at ignored ones. Differentiable (e.g. for a ranking loss).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, L, V), got {tuple(logits.shape)}")
    _check_labels(logits, labels, ignore_index)
    logp = logits.float().log_softmax(-1)                                # (B, L, V) fp32 upcast
    real = labels != ignore_index                                        # (B, L)
    safe = labels.long().masked_fill(~real, 0)                           # any valid index; masked out below
    tok = logp.gather(-1, safe[..., None]).squeeze(-1)                   # (B, L) log p(y_t)
    tok = tok.masked_fill(~real, 0.0)                                    # ignored positions add nothing
    seq = tok.sum(-1)                                                    # (B,) Σ_t log p(y_t)
    return (seq, tok) if per_token else seq


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``log p(label)`` at every position of (B, L) labels, 0 where ignored: :func:`sequence_logprob` before the sum."""
    return sequence_logprob(logits, labels, ignore_index, per_token=True)[1]


def split_prefix(ids: torch.Tensor, *, generator: torch.Generator | None = None, min_prefix: int = 1,
                 min_suffix: int = 1, split: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut a text at a uniformly random point (mPLUG §3.3 PrefixLM): ``(prefix, suffix, split)``.

    The prefix is context read bidirectionally, the suffix is what the decoder learns to continue. ``split``
    is uniform over ``[min_prefix, n - min_suffix]``, or the given one (checked).
    """
    n = len(ids)
    if min_prefix < 0 or min_suffix < 0 or n < min_prefix + min_suffix:
        raise ValueError(f"cannot split a text of {n} tokens into a prefix of >= {min_prefix} and a suffix of "
                         f">= {min_suffix} tokens: lower min_prefix / min_suffix or use a longer text")
    if split is None:
        split = min_prefix + int(torch.randint(n - min_prefix - min_suffix + 1, (), generator=generator))
    elif not min_prefix <= split <= n - min_suffix:
        raise ValueError(f"split={split} is outside [{min_prefix}, {n - min_suffix}] for a text of {n} tokens")
    return ids[:split], ids[split:], int(split)
