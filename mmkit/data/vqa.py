"""Visual questions over a :class:`SceneBank`, for any VQA model: training batches, fixed evaluation questions,
and questions as people type them, normalised to the world's wording.

    bank = SceneBank.build("train", 10_000, image_size=32, n_augmented=6000)
    sampler = VQASampler(bank, lang="both", aug_fraction=0.5)
    batch = sampler.batch_fn(torch.Generator().manual_seed(0), 64)   # images, questions, answers, qtypes, langs
    qs = eval_questions(test_bank.scenes)            # [(scene index, QA)]: one question of every type per scene
    normalise_question("What COLOR is the circle")   # "what colour is the circle?"
    read_question("is the red circle right of the blue square?")   # "is the blue square left of the red circle?"
"""
from __future__ import annotations

import random
import re
import unicodedata
from typing import Sequence

import torch

from mmkit.data.scenes import SceneBank
from mmkit.data.text import QTYPES, canonical_question, questions, sample_question

__all__ = ["question_language", "normalise_question", "read_question", "check_question", "VQASampler", "eval_questions"]

_CJK = re.compile(r"[\u3400-\u9fff\uff01-\uff1f]")


def question_language(question: str) -> str:
    """"zh" if the question holds a Chinese character or full-width punctuation, else "en"."""
    return "zh" if _CJK.search(question) else "en"


def normalise_question(question: str) -> str:
    """The question as the world writes them: stripped, lower case, British "colour" / American "center" (the
    world's words), one trailing "?" ("？" in Chinese). "What COLOR is the circle" -> "what colour is the circle?"."""
    q = re.sub(r"\s+", " ", question).strip()
    if question_language(q) == "en":
        q = q.lower()
        q = re.sub(r"\bcolou?rs?\b", lambda m: "colours" if m.group(0).endswith("s") else "colour", q)
        q = re.sub(r"\bcentre\b", "center", q)
        q = re.sub(r"\s*[?.!]*$", "", q) + "?"
    else:
        q = re.sub(r"[?？。!！\s]*$", "", q) + "？"
    return q


def read_question(question: str) -> str:
    """The question as a VQA model reads it: normalised, and a relation asked in its one direction per axis ("is A
    right of B?" -> "is B left of A?", :func:`mmkit.data.text.canonical_question`). The world asks each pair's true
    relation and its opposite, so without the rewrite yes / no is an XOR of the asked direction and the relation
    that holds; with it the answer follows from the two cells (M6's relation phase: 0.51 -> 0.94)."""
    return canonical_question(normalise_question(question))


def check_question(question) -> str:
    """``question`` with control / invisible characters turned into spaces, or a ValueError when it is not a string,
    is empty, or holds no word (letters or digits) at all: a question of control characters or symbols is refused,
    not answered."""
    if not isinstance(question, str):
        raise ValueError(f"the question must be a string, got {type(question).__name__}; ask e.g. "
                         "'what colour is the circle?'")
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") else c for c in question)
    if not question.strip():
        raise ValueError("the question is empty; ask e.g. 'what colour is the circle?' or '圆形是什么颜色的？'")
    if not any(unicodedata.category(c)[0] in "LN" for c in text):
        raise ValueError("the question has no words (only control characters, symbols or punctuation); ask e.g. "
                         "'what colour is the circle?'")
    return text


class VQASampler:
    """Random training questions over a bank: a scene at random, its language, a question type uniformly among
    those the scene has, a question of it (:func:`mmkit.data.text.sample_question`), the clean or augmented view.
    With ``focus_qtype``, a question of that type (uniformly among the scene's) is asked with probability
    ``focus_share`` instead (scenes without one are skipped for those draws).
    """

    def __init__(self, bank: SceneBank, lang: str = "both", aug_fraction: float = 0.0, focus_qtype: str | None = None,
                 focus_share: float = 0.0):
        if lang not in ("en", "zh", "both"):
            raise ValueError(f"lang must be 'en', 'zh' or 'both', got {lang!r}")
        if not 0.0 <= aug_fraction <= 1.0:
            raise ValueError(f"aug_fraction must be in [0, 1], got {aug_fraction}")
        if aug_fraction > 0 and bank.n_augmented == 0:
            raise ValueError("aug_fraction > 0 needs a SceneBank built with n_augmented > 0 augmented views")
        if focus_qtype is not None and focus_qtype not in QTYPES:
            raise ValueError(f"focus_qtype must be one of {QTYPES} or None, got {focus_qtype!r}")
        if not 0.0 <= focus_share <= 1.0:
            raise ValueError(f"focus_share must be in [0, 1], got {focus_share}")
        self.bank, self.lang, self.aug_fraction = bank, lang, aug_fraction
        self.focus_qtype, self.focus_share = focus_qtype, focus_share     # that type asked with this probability

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        """``batch_fn`` for :func:`mmkit.train.train`: {"images": (B, 3, S, S), "questions", "answers", "qtypes",
        "langs": [str] * B, "augmented": (B,) bool}."""
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        n_aug = self.bank.n_augmented
        images, qs, ans, types, langs, augs = [], [], [], [], [], []
        while len(qs) < batch_size:
            i = rng.randrange(len(self.bank))
            lang = rng.choice(("en", "zh")) if self.lang == "both" else self.lang
            if self.focus_qtype is not None and self.focus_share > 0 and rng.random() < self.focus_share:
                focus = [qa for qa in questions(self.bank.scenes[i], lang) if qa.qtype == self.focus_qtype]
                if not focus:                        # this scene has none (relations need two objects): another
                    continue
                qa = rng.choice(focus)
            else:
                qa = sample_question(self.bank.scenes[i], lang, seed=rng.randrange(2**31))
            aug = i < n_aug and rng.random() < self.aug_fraction
            images.append(self.bank.image(i, aug))
            qs.append(qa.question), ans.append(qa.answer), types.append(qa.qtype), langs.append(lang), augs.append(aug)
        return {"images": torch.stack(images), "questions": qs, "answers": ans, "qtypes": types, "langs": langs,
                "augmented": torch.tensor(augs)}


def eval_questions(scenes: Sequence, seed: int = 0, qtypes: Sequence[str] = QTYPES) -> list[tuple[int, object]]:
    """Fixed evaluation questions: for each scene one question of every type it has (languages alternate between
    scenes, the question within a type drawn from ``seed``). Returns [(scene index, QA)]."""
    rng = random.Random(seed)
    out = []
    for i, scene in enumerate(scenes):
        lang = ("en", "zh")[i % 2]
        by_type: dict = {}
        for qa in questions(scene, lang):
            by_type.setdefault(qa.qtype, []).append(qa)
        for t in qtypes:
            if t in by_type:
                out.append((i, rng.choice(by_type[t])))
    return out
