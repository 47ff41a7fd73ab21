"""M6 question answering with long answers on text (M6 §4.4): the "? answer:" prompt, data, evaluation.

    qas, data = qa_data("train", 2000, start=50_000)      # "{description} {question}? answer:" -> long answer
    finetune_text(m6, data, TrainConfig(steps=150, batch_size=32, lr=2e-3))      # mmkit.m6.tasks.seq2seq
    evaluate_text_qa(m6, tok)                              # QAEval(exact, facts, bleu4, answers)

M6 §4.4: "At the stage of inference, we append a question mark and a token 'Answer:' in the prompt, which better
triggers the model to generate an answer." Here the question is about a product description given as context
(:func:`mmkit.data.text.description_question`). English only: the world tokenizer has no 回 / 答 (its vocabulary
comes from the world's text).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from mmkit.data.text import DESCRIPTION_QA_KINDS, answer_facts, description_question
from mmkit.data.world import sample_scene, split_seeds
from mmkit.evaluation.captioning import bleu4
from mmkit.generation import decode_texts
from mmkit.m6.tasks.seq2seq import Seq2SeqData
from mmkit.tokenizer import pad_texts, world_tokenizer

__all__ = ["QA_PROMPT", "QA_KINDS", "TextQA", "text_qa", "qa_data", "QAEval", "evaluate_text_qa"]

QA_PROMPT = "{context} {question}? answer:"          # M6 §4.4's pattern
QA_KINDS: tuple[str, ...] = DESCRIPTION_QA_KINDS


class TextQA(NamedTuple):
    prompt: str               # QA_PROMPT filled: description, question, "? answer:"
    answer: str               # the long reference answer
    kind: str                 # "contents" (every object, ~20-40 tokens) or "where" (one object)
    scene: object


def text_qa(scene, kind: str = "contents", index: int = 0) -> TextQA:
    """A text QA example about ``scene``'s English product description, in M6 §4.4's prompt pattern."""
    q = description_question(scene, kind, index)
    return TextQA(QA_PROMPT.format(context=q.context, question=q.question), q.answer, q.kind, scene)


def qa_data(split: str, n: int, start: int = 0, kinds: Sequence[str] = QA_KINDS, tok=None) -> tuple[list, Seq2SeqData]:
    """``n`` scenes of ``split`` -> one QA example each (kinds alternate): (list of TextQA, Seq2SeqData)."""
    qas = [text_qa(sample_scene(s), kinds[k % len(kinds)], index=s)
           for k, s in enumerate(split_seeds(split, n, start=start))]
    return qas, Seq2SeqData([q.prompt for q in qas], [q.answer for q in qas], tok)


class QAEval(NamedTuple):
    exact: dict               # {kind: fraction of answers equal to the reference}
    facts: float              # mean answer_facts of the "contents" answers (object facts stated, 0-1)
    bleu4: float              # corpus BLEU-4 of every answer against its reference
    answers: list             # [(TextQA, generated answer)]


@torch.no_grad()
def evaluate_text_qa(model, tok=None, split: str = "test", n: int = 64, method: str = "greedy",
                     max_new_tokens: int = 64, **kw) -> QAEval:
    """Answer ``n`` held-out questions (M6 §4.4 prompt) and score them: exact match per kind, facts, BLEU-4."""
    tok = tok if tok is not None else world_tokenizer()
    qas, _ = qa_data(split, n, tok=tok)
    outs = []
    for i in range(0, n, 32):
        enc = pad_texts(tok, [q.prompt for q in qas[i:i + 32]], model.config.max_text_len, model.config.pad_token_id)
        outs += decode_texts(model, tok, encoder_ids=enc, method=method, max_new_tokens=max_new_tokens, **kw)
    exact = {k: sum(o.strip() == q.answer for q, o in zip(qas, outs) if q.kind == k) /
             max(1, sum(q.kind == k for q in qas)) for k in QA_KINDS}
    facts = [answer_facts(o, q.scene) for q, o in zip(qas, outs) if q.kind == "contents"]
    return QAEval(exact, sum(facts) / max(1, len(facts)), bleu4(outs, [[q.answer] for q in qas]), list(zip(qas, outs)))
