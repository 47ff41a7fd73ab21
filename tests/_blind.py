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
from typing import Sequence

from mmkit.evaluation.vqa import AnswerPrior, VQAEval, score_answers, world_answer_prior

N_TRAIN_SCENES = 6000          # train scenes the prior is fitted on (the measurement the issue quotes)
DRAWS_PER_SCENE = 4            # questions drawn per scene and language (VQASampler draws many per scene too)


@functools.lru_cache(maxsize=1)
def blind_prior(n_scenes: int = N_TRAIN_SCENES, draws: int = DRAWS_PER_SCENE) -> AnswerPrior:
    return world_answer_prior(n_scenes, draws, seed=0)


def blind_eval(prior: AnswerPrior, items: Sequence[tuple[str, str, str, str]]) -> VQAEval:
    """Score the prior's answers to ``items`` [(question, gold, qtype, lang)] exactly as a model's are scored."""
    return score_answers([(q, a, prior(q, t, lg), t, lg) for q, a, t, lg in items])
