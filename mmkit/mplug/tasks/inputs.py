"""Model inputs from strings, shared by mPLUG's tasks.

    ids, mask = encoder_inputs(tok, ["what colour is the circle?"], max_len=48)   # [CLS] ... [SEP], padded
    dec, labels = decoder_inputs([[281, 290]], bos_id=5, eos_id=6, pad_id=0)    # [BOS] y / y [EOS], -100 at pads
    dec, labels = teacher_forced(tok, ["red"], model.config)                        # the same from strings
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmkit.objectives.lm import IGNORE_INDEX

__all__ = ["encoder_inputs", "decoder_inputs", "teacher_forced", "pad_rows"]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids with ``pad_id`` into a (B, W) long tensor (W = ``length`` or the longest row, >= 1)."""
    W = max([len(r) for r in rows] + [1]) if length is None else length
    out = torch.full((len(rows), W), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > W:
            raise ValueError(f"row {i} has {len(r)} ids but the padded length is {W}")
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def encoder_inputs(tok, texts: Sequence[str], max_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder inputs ``[CLS] text [SEP]`` (BERT, mPLUG §3.1), cut at ``max_len`` tokens (the [SEP] kept):
    ids (B, L) right-padded with [PAD], mask (B, L) bool (True = real token)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str, e.g. ['what colour is the circle?']")
    if max_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for [CLS] text [SEP]")
    rows = tok(list(texts), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
    ids = pad_rows(rows, tok.pad_token_id)
    return ids, ids != tok.pad_token_id


def decoder_inputs(targets: Sequence[Sequence[int]], *, bos_id: int, eos_id: int, pad_id: int,
                   max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing for the decoder: inputs ``[BOS] y_1 .. y_T`` and labels ``y_1 .. y_T [EOS]`` (B, T + 1),
    right-padded ([PAD] in the inputs, -100 in the labels). Targets longer than ``max_len`` - 1 tokens are cut."""
    limit = None if max_len is None else max_len - 1
    ins = [[bos_id] + list(t)[:limit] for t in targets]
    outs = [list(t)[:limit] + [eos_id] for t in targets]
    return pad_rows(ins, pad_id), pad_rows(outs, IGNORE_INDEX)


def teacher_forced(tok, texts: Sequence[str], config, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decoder_inputs` of strings (tokenized without special tokens)."""
    c = config
    rows = tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return decoder_inputs(rows, bos_id=c.bos_token_id, eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                          max_len=max_len or c.max_text_len)
