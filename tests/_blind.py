"""The blind baseline of the VQA tests: what a model that never looks at the image scores on the same questions.

    prior = blind_prior()                               # fitted once per process (6000 train scenes, ~4 s)
    blind = blind_eval(prior, items)                    # items: [(question, gold, qtype, lang)] -> VQAEval

:class:`mmkit.evaluation.vqa.AnswerPrior` answers from the question alone: the most frequent training answer for the
exact question string (else for its type and language). It is fitted on the questions the VQA recipe trains on:
``mmkit.data.text.sample_question``'s draw (what ``mmkit.data.vqa.VQASampler`` draws: a type uniformly among those the scene
has, then a question of it) over the train split's scenes, both languages. A learning floor means something only
above it, so every VQA accuracy floor in the tests is "blind + margin", computed here, in the test.
"""
from __future__ import annotations

import functools
import random
from typing import Sequence

from mmkit.data.scenes import sample_scenes
from mmkit.data.text import QTYPES, questions
from mmkit.evaluation.vqa import AnswerPrior, VQAEval, score_answers

N_TRAIN_SCENES = 6000          # train scenes the prior is fitted on (the measurement the issue quotes)
DRAWS_PER_SCENE = 4            # questions drawn per scene and language (VQASampler draws many per scene too)


@functools.lru_cache(maxsize=1)
def blind_prior(n_scenes: int = N_TRAIN_SCENES, draws: int = DRAWS_PER_SCENE) -> AnswerPrior:
    rng = random.Random(0)
    qs, ans, types, langs = [], [], [], []
    for scene in sample_scenes("train", n_scenes):
        for lang in ("en", "zh"):
            by_type: dict = {}
            for qa in questions(scene, lang):                  # once per scene: sample_question's own draw
                by_type.setdefault(qa.qtype, []).append(qa)    # (a type uniformly, then a question of it),
            kinds = [t for t in QTYPES if t in by_type]       # repeated without recomputing the questions
            for _ in range(draws):
                qa = rng.choice(by_type[rng.choice(kinds)])
                qs.append(qa.question), ans.append(qa.answer), types.append(qa.qtype), langs.append(lang)
    return AnswerPrior.fit(qs, ans, types, langs)


def blind_eval(prior: AnswerPrior, items: Sequence[tuple[str, str, str, str]]) -> VQAEval:
    """Score the prior's answers to ``items`` [(question, gold, qtype, lang)] exactly as a model's are scored."""
    return score_answers([(q, a, prior(q, t, lg), t, lg) for q, a, t, lg in items])
