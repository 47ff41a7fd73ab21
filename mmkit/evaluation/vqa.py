"""VQA evaluation for any system: exact-match accuracy per question type and language, against blind baselines.

    ev = score_answers([(question, gold, predicted, qtype, lang), ...])   # VQAEval(accuracy, per_type, per_lang, ..)
    prior = AnswerPrior.fit(train_questions, train_answers)               # most frequent answer per question string
    blind = score_answers([(q, a, prior(q), t, l) for q, a, t, l in test_items])   # what a model that never
                                                                                  # looks at the image gets

Every VQA model of the kit (M6's generated answers, VLMo's classifier, mPLUG's decoder) is scored the same way:
answers are compared after lower-casing and collapsing spaces. The *blind baseline* answers from the question
alone: the most frequent training answer for the exact question string (else for its question type and language,
else overall). A learning floor means something only above it (house rule: computed in the test, not a comment).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmkit.data.scenes import sample_scenes
from mmkit.data.text import QTYPES, answer_vocab, questions
from mmkit.data.vqa import eval_questions

__all__ = ["VQAAnswer", "VQAEval", "normal_answer", "score_answers", "AnswerPrior", "LabelPrior", "world_answer_prior",
           "prior_eval", "ranked_answer", "pixel_saliency", "unit_heat", "by_object_count"]


class VQAAnswer(NamedTuple):
    """One answer as the VQA app shows it (every system's ``answer()`` returns these fields)."""
    answer: str                   # the answer text (generated, or the top class)
    confidence: float             # the model's probability of that answer
    alternatives: list            # [(answer, probability)] the world's answers for the question's language, most
                                  # likely first (top_k of them)
    question: str                 # the normalised question the model read
    lang: str                     # "en" or "zh"
    in_vocabulary: bool           # the answer is one of the world's answers


class VQAEval(NamedTuple):
    accuracy: float               # exact-match accuracy over all questions (answer == gold)
    per_type: dict                # {qtype: accuracy}
    per_lang: dict                # {"en": accuracy, "zh": accuracy}
    n_questions: int
    records: list                 # [(question, gold, predicted, qtype, lang)] of every question


def normal_answer(text: str) -> str:
    """Answers compare lower-cased with single spaces: "Top  Left" == "top left"."""
    return re.sub(r"\s+", " ", text).strip().lower()


def ranked_answer(generated: str, question: str, lang: str, log_probs: Callable[[list[str]], torch.Tensor],
                  top_k: int = 5) -> VQAAnswer:
    """A generated answer with its confidence and the alternatives, as every generative system's ``answer()`` gives
    them: the world's answers of ``lang`` (plus the generated text when it is none of them) are scored by the
    model, ``log_probs(candidates) -> (K,)`` log P(candidate + [EOS] | image, question); the confidence is the
    generated answer's probability, the alternatives the top ``top_k`` world answers by probability."""
    vocab = list(answer_vocab(lang))
    norm = normal_answer(generated)
    match = next((a for a in vocab if normal_answer(a) == norm), None)
    cands = vocab if match is not None or not norm else vocab + [generated]
    probs = log_probs(cands).exp()                                                        # (K,)
    order = probs.argsort(descending=True).tolist()
    own = cands.index(match) if match is not None else (len(cands) - 1 if norm else None)
    conf = float(probs[own]) if own is not None else 0.0
    alts = [(cands[k], float(probs[k])) for k in order if k < len(vocab)][:top_k]
    return VQAAnswer(match if match is not None else generated, conf, alts, question, lang, match is not None)


def pixel_saliency(grad: torch.Tensor) -> torch.Tensor:
    """(1, 3, S, S) gradient of log P(answer) w.r.t. the pixels -> (S, S) |gradient| (max over colour), smoothed
    by a 3x3 average: the heat maps' "saliency" method."""
    return F.avg_pool2d(grad.abs().amax(1, keepdim=True), 3, stride=1, padding=1)[0, 0]


def unit_heat(heat: torch.Tensor) -> torch.Tensor:
    """A heat map scaled to [0, 1] (1 = most relevant); all zeros stays zeros."""
    heat = heat.detach()
    return heat / heat.max() if float(heat.max()) > 0 else heat


def score_answers(records: Sequence[tuple[str, str, str, str, str]]) -> VQAEval:
    """Exact-match accuracy of ``records`` [(question, gold, predicted, qtype, lang)], overall, per type, per
    language (types in the world's order)."""
    records = list(records)
    per_type, per_lang = {}, {}
    for key, table in ((3, per_type), (4, per_lang)):
        groups: dict = {}
        for r in records:
            groups.setdefault(r[key], []).append(normal_answer(r[1]) == normal_answer(r[2]))
        table.update({k: sum(v) / len(v) for k, v in groups.items()})
    order = [t for t in QTYPES if t in per_type] + sorted(t for t in per_type if t not in QTYPES)
    acc = sum(normal_answer(r[1]) == normal_answer(r[2]) for r in records) / max(len(records), 1)
    return VQAEval(acc, {t: per_type[t] for t in order}, per_lang, len(records), records)


class AnswerPrior:
    """The blind baseline: the most frequent training answer for the exact question string, backing off to the
    most frequent answer of the question's type and language, then to the overall most frequent answer."""

    def __init__(self, by_question: dict, by_type: dict, overall: str):
        self.by_question, self.by_type, self.overall = by_question, by_type, overall

    @classmethod
    def fit(cls, questions: Sequence[str], answers: Sequence[str], qtypes: Sequence[str] | None = None,
            langs: Sequence[str] | None = None) -> "AnswerPrior":
        if len(questions) != len(answers) or not questions:
            raise ValueError(f"need one answer per question (non-empty), got {len(questions)} and {len(answers)}")
        qtypes = list(qtypes) if qtypes is not None else [""] * len(questions)
        langs = list(langs) if langs is not None else [""] * len(questions)
        per_q: dict[str, Counter] = {}
        per_t: dict[tuple[str, str], Counter] = {}
        for q, a, t, lg in zip(questions, answers, qtypes, langs):
            per_q.setdefault(q, Counter())[a] += 1
            per_t.setdefault((t, lg), Counter())[a] += 1
        overall = Counter(answers).most_common(1)[0][0]
        return cls({q: c.most_common(1)[0][0] for q, c in per_q.items()},
                   {k: c.most_common(1)[0][0] for k, c in per_t.items()}, overall)

    def __call__(self, question: str, qtype: str = "", lang: str = "") -> str:
        if question in self.by_question:
            return self.by_question[question]
        return self.by_type.get((qtype, lang), self.overall)


class LabelPrior(NamedTuple):
    """The blind baseline of a labelled text + image task (NLVR2 statements, SNLI-VE hypotheses): an
    :class:`AnswerPrior` over (text, label) pairs of a training set. ``labels(texts, kinds, langs)`` -> the labels it
    predicts without looking at an image (the most frequent label of the exact text, else of its kind and language)."""
    prior: AnswerPrior

    @classmethod
    def fit(cls, items: Sequence[dict], text_key: str) -> "LabelPrior":
        """``items``: dataset items with ``text_key`` (e.g. "statement"), "label", "kind" and "lang"."""
        return cls(AnswerPrior.fit([x[text_key] for x in items], [str(int(x["label"])) for x in items],
                                   [x["kind"] for x in items], [x["lang"] for x in items]))

    @classmethod
    def of_dataset(cls, train_data) -> "LabelPrior":
        """Fitted on every item of a train PairDataset (statements) or EntailmentDataset (hypotheses); only their
        texts are read (``text_item``), never their images."""
        read = getattr(train_data, "text_item", train_data.__getitem__)       # the texts only: no image rendered
        items = [read(i) for i in range(len(train_data))]
        key = next((k for k in ("statement", "hypothesis") if k in items[0]), None) if items else None
        if key is None:
            raise ValueError("LabelPrior.of_dataset needs a non-empty PairDataset or EntailmentDataset (items with a "
                             "'statement' or 'hypothesis')")
        return cls.fit(items, key)

    def labels(self, texts: Sequence[str], kinds: Sequence[str], langs: Sequence[str]) -> list[int]:
        return [int(self.prior(t, k, lg)) for t, k, lg in zip(texts, kinds, langs)]

    def score(self, texts: Sequence[str], kinds: Sequence[str], langs: Sequence[str],
              gold: Sequence[int]) -> tuple[float, dict]:
        """The prior's accuracy on these items: (overall, {kind: accuracy})."""
        hits = [p == int(y) for p, y in zip(self.labels(texts, kinds, langs), gold)]
        per_kind: dict = {}
        for k, h in zip(kinds, hits):
            per_kind.setdefault(k, []).append(h)
        return sum(hits) / max(len(hits), 1), {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}


def world_answer_prior(n_scenes: int = 2000, draws: int = 4, seed: int = 0) -> AnswerPrior:
    """The answer prior of the world's VQA training questions: ``draws`` questions per train scene and language, each
    drawn as :func:`mmkit.data.text.sample_question` draws (a type uniformly among the scene's, then a question of
    it), fitted with :meth:`AnswerPrior.fit`. What a model that never looks at the image answers (notebooks, apps)."""
    rng = random.Random(seed)
    qs, ans, types, langs = [], [], [], []
    for scene in sample_scenes("train", n_scenes):
        for lang in ("en", "zh"):
            by_type: dict = {}
            for qa in questions(scene, lang):
                by_type.setdefault(qa.qtype, []).append(qa)
            kinds = [t for t in QTYPES if t in by_type]
            for _ in range(draws):
                qa = rng.choice(by_type[rng.choice(kinds)])
                qs.append(qa.question), ans.append(qa.answer), types.append(qa.qtype), langs.append(lang)
    return AnswerPrior.fit(qs, ans, types, langs)


def prior_eval(prior: AnswerPrior, ev: VQAEval) -> VQAEval:
    """The blind baseline of the SAME questions a model was scored on (``ev.records``): the prior's answers, scored
    exactly as the model's were."""
    return score_answers([(q, gold, prior(q, t, lg), t, lg) for q, gold, _, t, lg in ev.records])


def by_object_count(ev: VQAEval, scenes: Sequence, seed: int = 0) -> dict[str, dict[int, float]]:
    """{qtype: {objects in the scene: accuracy}} of an evaluation over ``scenes`` with the fixed questions of
    ``mmkit.data.vqa.eval_questions(scenes, seed)`` (what each system's ``evaluate_vqa`` asks): where a model fails
    once a picture holds more than one object, it cannot pick the object a question names."""
    qs = eval_questions(scenes, seed)
    if len(qs) != len(ev.records) or any(qa.question != r[0] for (_, qa), r in zip(qs, ev.records)):
        raise ValueError("ev was not scored on eval_questions(scenes, seed): pass the scenes and seed it used "
                         "(evaluate_vqa(model, split, n) asks about sample_scenes(split, n))")
    groups: dict = {}
    for (i, _), r in zip(qs, ev.records):
        groups.setdefault(r[3], {}).setdefault(len(scenes[i].objects), []).append(
            normal_answer(r[1]) == normal_answer(r[2]))
    return {t: {k: sum(v) / len(v) for k, v in sorted(g.items())} for t, g in groups.items()}
