"""Fine-tuning M6 on text-to-text pairs (M6 §3.3 "... to text"): what text QA (§4.4) and poems (§4.5) share.

    data = Seq2SeqData(prompts, targets, tok)          # tokenized once: encoder = prompt, decoder = target
    finetune_text(m6, data, TrainConfig(steps=150, batch_size=32, lr=2e-3))
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmkit.m6.masking import collate, task_example
from mmkit.tokenizer import SpecialIds, world_tokenizer
from mmkit.train import train, unwrap

__all__ = ["Seq2SeqData", "seq2seq_loss", "finetune_text"]


class Seq2SeqData:
    """(prompt, target) text pairs tokenized once, and a ``batch_fn`` of :class:`TaskExample` s (text only)."""

    def __init__(self, prompts: Sequence[str], targets: Sequence[str], tok=None, max_len: int = 200):
        tok = tok if tok is not None else world_tokenizer()
        self.special = SpecialIds.from_tokenizer(tok)
        self.prompts, self.targets = list(prompts), list(targets)
        enc = tok(self.prompts, add_special_tokens=False)["input_ids"]
        tgt = tok(self.targets, add_special_tokens=False)["input_ids"]
        self.examples = [task_example("text_to_text", torch.tensor(t[:max_len], dtype=torch.long),
                                      torch.tensor(e[-max_len:], dtype=torch.long), 0, self.special)
                         for e, t in zip(enc, tgt)]

    def __len__(self) -> int:
        return len(self.examples)

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> list:
        idx = torch.randint(len(self.examples), (batch_size,), generator=generator).tolist()
        return [self.examples[i] for i in idx]


def seq2seq_loss(model, examples: list):
    """``loss_fn`` for :func:`mmkit.train.train`: mean token cross-entropy of the targets (M6 §3.3 "... to text")."""
    raw = unwrap(model)
    tb = collate(examples, pad_id=raw.config.pad_token_id)
    dev = raw.wte.weight.device
    out = model(None, tb.encoder_ids.to(dev), tb.decoder_input_ids.to(dev), tb.labels.to(dev), mask=tb.mask.to(dev))
    return out.loss


def finetune_text(model, data: Seq2SeqData, train_config, **train_kw):
    """Fine-tune M6 on text-to-text pairs (the four-task model's decoder keeps its weights; nothing new)."""
    result = train(model, seq2seq_loss, data.batch_fn, train_config, **train_kw)
    model.eval()
    return result
