"""M6 poem generation under format constraints (M6 §4.5): the rules as a logits processor, data, evaluation.

    poem = PoemFormatProcessor(tok)                                  # M6 §4.5 format as a LogitsProcessor
    texts = decode_texts(m6, tok, encoder_ids=enc, method="sample", logits_processor=[poem],
                         max_new_tokens=poem.max_new_tokens)          # any decoding method of mmkit.generation
    gen = m6.generate(None, enc, poem.max_new_tokens, logits_processor=poem)   # the same object, M6's own loop
    check_poem(texts[0])                                             # [] = every rule holds
    _, poems = poem_data("train", 2000, start=50_000)                # caption as title -> world poem
    evaluate_poems(m6, tok, method="sample")                         # PoemEval(rule_ok, fact_precision, ...)

M6 §4.5: "at least 4 lines; an even number of lines; each line exactly 5 or 7 words; all lines the same
number of words; [generate] until the model generates an <eos> token, or the number of lines exceeds a limit of
16", "done in a search framework that we generate short sentences ending with punctuation until the number of
words meets the constraint". :class:`PoemFormatProcessor` is that search as a constraint mask on the logits,
usable by any decoding method; :func:`check_poem` checks finished text independently.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

import torch
from transformers import LogitsProcessor

from mmkit.data.text import POEM_COLOUR, POEM_POSITION, POEM_SHAPE, POEM_SIZE, caption, poem
from mmkit.data.world import sample_scene, split_seeds
from mmkit.generation import decode_texts
from mmkit.m6.tasks.seq2seq import Seq2SeqData
from mmkit.tokenizer import pad_texts, world_tokenizer

__all__ = [
    "PoemFormatProcessor", "PoemState", "check_poem", "poem_lines", "is_cjk_char", "LINE_ENDS", "RULE_MIN_LINES",
    "RULE_EVEN_LINES", "RULE_LINE_LENGTH", "RULE_SAME_LENGTH", "RULE_MAX_LINES", "RULE_FORMAT",
    "POEM_PROMPT", "poem_data", "poem_facts", "PoemEval", "evaluate_poems",
]

LINE_ENDS = ("，", "。")   # punctuation that ends a line (M6 Figure 11: "上马出东门，摧车欲问道。")

RULE_MIN_LINES = "at least 4 lines"
RULE_EVEN_LINES = "an even number of lines"
RULE_LINE_LENGTH = "5 or 7 characters per line"
RULE_SAME_LENGTH = "every line the same length"
RULE_MAX_LINES = "at most 16 lines"
RULE_FORMAT = "lines of characters, each ended by line-end punctuation"


def is_cjk_char(token: str) -> bool:
    """True for one CJK ideograph ("字"): a 'word' of a Chinese poem line (M6 §4.5 counts these)."""
    if len(token) != 1:
        return False
    o = ord(token)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def _rule_names(line_lengths, min_lines, max_lines, even_lines) -> dict[str, str]:
    lengths = " or ".join(str(n) for n in line_lengths)
    return {"min": f"at least {min_lines} lines", "even": RULE_EVEN_LINES if even_lines else "",
            "length": f"{lengths} characters per line", "same": RULE_SAME_LENGTH,
            "max": f"at most {max_lines} lines", "format": RULE_FORMAT}


def poem_lines(text: str, line_ends: Sequence[str] = LINE_ENDS,
               is_char: Callable[[str], bool] = is_cjk_char) -> tuple[list[str], list[str]]:
    """Split a poem into lines (each ending with one of ``line_ends``); whitespace and newlines are ignored.

    Returns ``(lines, problems)``: the lines without their punctuation, and what does not fit the format (a
    non-character inside a line, a line with no characters, an unfinished last line).
    """
    lines, problems, cur = [], [], ""
    for ch in re.sub(r"\s+", "", text):
        if ch in line_ends:
            if not cur:
                problems.append(f"{ch!r} ends an empty line (after line {len(lines)})")
            lines.append(cur)
            cur = ""
        elif is_char(ch):
            cur += ch
        else:
            problems.append(f"{ch!r} inside line {len(lines) + 1} is not a character")
    if cur:
        problems.append(f"the last line {cur!r} has no line-end punctuation")
    return lines, problems


def check_poem(text: str, *, line_lengths: Sequence[int] = (5, 7), min_lines: int = 4, max_lines: int = 16,
               even_lines: bool = True, line_ends: Sequence[str] = LINE_ENDS,
               is_char: Callable[[str], bool] = is_cjk_char, details: bool = False) -> list[str]:
    """The M6 §4.5 rules ``text`` violates, [] when it is a well-formed poem. Independent of the processor.

    Rules (in this order): ``RULE_MIN_LINES``, ``RULE_EVEN_LINES``, ``RULE_LINE_LENGTH``, ``RULE_SAME_LENGTH``
    (the four of the paper), ``RULE_MAX_LINES`` (generation stops at 16) and ``RULE_FORMAT`` (every line is
    characters followed by one line-end punctuation mark). ``text`` may be decoded ids (``mmkit.tokenizer.decode``)
    or the world's poems with newlines; whitespace is ignored. ``details=True`` appends ": why" to each rule.
    """
    names = _rule_names(line_lengths, min_lines, max_lines, even_lines)
    lines, problems = poem_lines(text, line_ends, is_char)
    lens = [len(s) for s in lines]
    out: list[tuple[str, str]] = []
    if len(lines) < min_lines:
        out.append((names["min"], f"{len(lines)} lines"))
    if even_lines and len(lines) % 2:
        out.append((names["even"], f"{len(lines)} lines"))
    bad = [(i + 1, n) for i, n in enumerate(lens) if n not in line_lengths]
    if bad:
        out.append((names["length"], ", ".join(f"line {i} has {n}" for i, n in bad)))
    if len(set(lens)) > 1:
        out.append((names["same"], f"line lengths {lens}"))
    if len(lines) > max_lines:
        out.append((names["max"], f"{len(lines)} lines"))
    if problems:
        out.append((names["format"], "; ".join(problems)))
    return [f"{r}: {why}" if details else r for r, why in out]


class PoemState(NamedTuple):
    """Where a row of ids stands in the poem format (what :class:`PoemFormatProcessor` decides from)."""
    lines: tuple[int, ...]    # characters in each finished line
    current: int              # characters in the line being written
    ended: bool               # [EOS] was generated: nothing is constrained any more
    broken: bool              # the ids already violate the format (a user prompt, or a -inf beam): force [EOS]


class PoemFormatProcessor(LogitsProcessor):
    """M6 §4.5 format constraints as a logits mask, for transformers' ``generate()`` and ``M6Model.generate``.

    At every step each row may only continue its poem legally:

    * inside a line: only *characters* (``char_ids``; by default every single-CJK-ideograph token of the
      tokenizer), no punctuation, no [EOS], nothing else;
    * a line ends (line-end punctuation, by default "，" / "。") exactly when it reaches its length: the first line
      may end at any of ``line_lengths`` (5 or 7) characters and must end at the longest; every later line has the
      first line's length;
    * [EOS] is allowed only between lines, when the count is even and >= ``min_lines`` (4); after ``max_lines``
      (16) lines [EOS] is forced.

    ``alternate=True`` also fixes which mark ends which line: line k ends with ``line_ends[k % len(line_ends)]``
    ("，" then "。", as in M6 Figure 11 and the world's poems). The poem is what follows the last [BOS] (transformers
    passes [BOS] + prompt + generated ids; ``M6Model.generate`` passes only the generated ids), so a decoder prompt
    such as "[BOS] 红 圆" starts the first line. Rows that ended ([EOS]) are left alone. Rows whose ids already break
    the format (an illegal prompt, or a beam that fell to -inf) may only emit [EOS]. Every row keeps at least one
    allowed token, so sampling never sees an all -inf row; if an earlier processor already set all of them to -inf
    (e.g. ``suppress_tokens=[eos]``), a clear error says so instead of letting sampling fail on NaNs.

    Greedy, beam search and top-k / top-p sampling all run on the masked logits (transformers applies custom
    processors before its top-k / top-p warpers; ``M6Model.generate`` does the same), so every decoding method
    produces only well-formed poems, provided ``max_new_tokens >= self.max_new_tokens`` (enough room for 16 lines
    of 7 characters, their punctuation and [EOS]).

    Build it from a tokenizer (``PoemFormatProcessor(tok)``) or from ids (``char_ids=..., line_end_ids=...,
    eos_token_id=...``) for any character-level vocabulary.
    """

    def __init__(self, tokenizer=None, *, char_ids: Iterable[int] | None = None,
                 line_end_ids: Sequence[int] | None = None, eos_token_id: int | None = None,
                 bos_token_id: int | None = None, line_ends: Sequence[str] = LINE_ENDS,
                 line_lengths: Sequence[int] = (5, 7), min_lines: int = 4, max_lines: int = 16,
                 even_lines: bool = True, alternate: bool = False,
                 is_char: Callable[[str], bool] = is_cjk_char):
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            if char_ids is None:
                char_ids = [i for t, i in vocab.items() if i not in special and is_char(t)]
            if line_end_ids is None:
                missing = [s for s in line_ends if s not in vocab]
                if missing:
                    raise ValueError(f"the tokenizer has no token for the line-end punctuation {missing}; pass "
                                     "line_ends= marks it knows, or line_end_ids=")
                line_end_ids = [vocab[s] for s in line_ends]
            eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
            bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        if char_ids is None or line_end_ids is None or eos_token_id is None:
            raise ValueError("PoemFormatProcessor needs a tokenizer, or char_ids, line_end_ids and eos_token_id")
        self.char_ids = sorted({int(i) for i in char_ids})
        self.line_end_ids = [int(i) for i in line_end_ids]
        self.eos_token_id = int(eos_token_id)
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.line_lengths = tuple(sorted({int(n) for n in line_lengths}))
        self.min_lines, self.max_lines = int(min_lines), int(max_lines)
        self.even_lines, self.alternate = bool(even_lines), bool(alternate)
        self._check_args()
        self._chars = set(self.char_ids)
        self._ends = set(self.line_end_ids)
        self._masks: dict[tuple, torch.Tensor] = {}

    def _check_args(self) -> None:
        if not self.char_ids:
            raise ValueError("no character tokens: the tokenizer has no single-character tokens for which is_char() "
                             "holds (is it a character-level vocabulary, e.g. Chinese?); pass char_ids= explicitly")
        if not self.line_end_ids:
            raise ValueError("line_end_ids is empty: a poem needs at least one line-end punctuation token")
        clash = (self._set(self.char_ids) & self._set(self.line_end_ids)) | (
            self._set(self.char_ids + self.line_end_ids) & {self.eos_token_id, self.bos_token_id})
        if clash:
            raise ValueError(f"token ids {sorted(clash)} are used for two roles (character / line end / EOS / BOS)")
        if not self.line_lengths or self.line_lengths[0] < 1:
            raise ValueError(f"line_lengths must be positive numbers of characters, got {self.line_lengths}")
        if not 1 <= self.min_lines <= self.max_lines:
            raise ValueError(f"need 1 <= min_lines <= max_lines, got min_lines={self.min_lines}, "
                             f"max_lines={self.max_lines}")
        if self.even_lines and self.max_lines % 2:
            raise ValueError(f"max_lines={self.max_lines} is odd but the number of lines must be even: [EOS] is forced "
                             "after max_lines lines; use an even max_lines (M6 §4.5: 16)")

    @staticmethod
    def _set(ids) -> set:
        return {int(i) for i in ids if i is not None}

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for the longest legal poem: max_lines lines of the longest length, marks, [EOS]."""
        return self.max_lines * (self.line_lengths[-1] + 1) + 1

    # -- reading the state of a row ------------------------------------------------------------------------
    def state(self, ids: Sequence[int]) -> PoemState:
        """Parse one row of ids (everything after its last [BOS]) into a :class:`PoemState`."""
        ids = list(ids)
        if self.bos_token_id is not None and self.bos_token_id in ids:
            ids = ids[len(ids) - ids[::-1].index(self.bos_token_id):]
        lines: list[int] = []
        cur, longest = 0, self.line_lengths[-1]
        for tok in ids:
            if tok == self.eos_token_id:
                return PoemState(tuple(lines), cur, True, False)
            if tok in self._chars:
                cur += 1
                if cur > (lines[0] if lines else longest):
                    return PoemState(tuple(lines), cur, False, True)
            elif tok in self._ends:
                ok = cur in self.line_lengths and (not lines or cur == lines[0])
                if self.alternate:
                    ok = ok and tok == self.line_end_ids[len(lines) % len(self.line_end_ids)]
                if not ok or len(lines) >= self.max_lines:
                    return PoemState(tuple(lines), cur, False, True)
                lines.append(cur)
                cur = 0
            else:
                return PoemState(tuple(lines), cur, False, True)
        return PoemState(tuple(lines), cur, False, False)

    def allowed_kind(self, s: PoemState) -> tuple:
        """What may come next: ("all",), ("eos",), ("chars", eos_ok), ("end", k) or ("chars+end", k)."""
        if s.ended:
            return ("all",)
        if s.broken:
            return ("eos",)
        n = len(s.lines)
        if s.current == 0:                                   # between lines
            if n >= self.max_lines:
                return ("eos",)                              # M6 §4.5: stop after 16 lines
            eos_ok = n >= self.min_lines and (n % 2 == 0 or not self.even_lines)
            return ("chars", eos_ok)
        k = n % len(self.line_end_ids) if self.alternate else -1   # which mark(s) may end this line
        if s.lines:                                          # the first line fixed the length
            return ("end", k) if s.current == s.lines[0] else ("chars", False)
        if s.current == self.line_lengths[-1]:
            return ("end", k)
        return ("chars+end", k) if s.current in self.line_lengths else ("chars", False)

    def _mask(self, kind: tuple, V: int, device) -> torch.Tensor:
        key = (kind, V, str(device))
        if key not in self._masks:
            m = torch.zeros(V, dtype=torch.bool)
            if kind[0] == "all":
                m[:] = True
            if kind[0] == "eos" or kind == ("chars", True):
                m[self.eos_token_id] = True
            if kind[0] in ("chars", "chars+end"):
                m[self.char_ids] = True
            if kind[0] in ("end", "chars+end"):
                m[self.line_end_ids if kind[1] < 0 else [self.line_end_ids[kind[1]]]] = True
            self._masks[key] = m.to(device)
        return self._masks[key]

    def allowed(self, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, V) bool: which tokens each row of ``input_ids`` (B, t) may produce next."""
        top = max(self.char_ids[-1], max(self.line_end_ids), self.eos_token_id)
        if top >= vocab_size:
            raise ValueError(f"the poem tokens reach id {top} but the logits have only {vocab_size} columns: the "
                             "tokenizer does not belong to this model")
        rows = input_ids.tolist()
        return torch.stack([self._mask(self.allowed_kind(self.state(r)), vocab_size, input_ids.device)
                            for r in rows])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``LogitsProcessor`` interface (also ``M6Model.generate``'s ``logits_processor(ids, logits)``)."""
        if scores.dim() != 2 or input_ids.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"expected input_ids (B, t) and scores (B, V), got {tuple(input_ids.shape)} and "
                             f"{tuple(scores.shape)}")
        ok = self.allowed(input_ids, scores.shape[-1]).to(scores.device)
        out = scores.masked_fill(~ok, float("-inf"))
        dead = torch.isneginf(out).all(dim=-1)
        if bool(dead.any()):
            b = int(dead.nonzero()[0, 0])
            kind = self.allowed_kind(self.state(input_ids[b].tolist()))
            raise ValueError(f"row {b}: the poem format allows only {kind} next, but those tokens already have "
                             "score -inf: a processor that runs earlier (e.g. suppress_tokens=[EOS], "
                             "bad_words_ids) forbids them. Do not suppress [EOS] or line-end punctuation together "
                             "with PoemFormatProcessor (it forces them when the format requires)")
        return out


# M6 Figure 11 prompts with "title author text:"; a world poem's "title" is the scene's Chinese caption.
POEM_PROMPT = "{title}："


def poem_data(split: str, n: int, start: int = 0, tok=None) -> tuple[list, Seq2SeqData]:
    """``n`` scenes -> (scenes, Seq2SeqData of POEM_PROMPT(caption) -> the world's poem, 5 and 7 characters alternating)."""
    scenes = [sample_scene(s) for s in split_seeds(split, n, start=start)]
    prompts = [POEM_PROMPT.format(title=caption(s, "full", "zh")) for s in scenes]
    return scenes, Seq2SeqData(prompts, [poem(s, (5, 7)[k % 2]) for k, s in enumerate(scenes)], tok)


def poem_facts(text: str, scene) -> tuple[int, int, int]:
    """(object lines, true object lines, scene objects named). An object line is a world-poem line naming colour +
    shape + position ("红圆居左上", 7 characters with the size: "小小红圆居左上"); it is true when the scene has that
    object (and size, when named) there."""
    inv_c, inv_s = {v: k for k, v in POEM_COLOUR.items()}, {v: k for k, v in POEM_SHAPE.items()}
    inv_p, inv_z = {v: k for k, v in POEM_POSITION.items()}, {v: k for k, v in POEM_SIZE.items()}
    claims = named = 0
    true_objects = set()
    for line in poem_lines(text)[0]:
        size = inv_z.get(line[:2]) if len(line) == 7 else None
        core = line[2:] if len(line) == 7 else line
        if len(core) != 5 or core[0] not in inv_c or core[1] not in inv_s or core[3:] not in inv_p:
            continue
        claims += 1
        o = scene.object_at(inv_p[core[3:]])
        if o is not None and (o.colour, o.shape) == (inv_c[core[0]], inv_s[core[1]]) and size in (None, o.size):
            named += 1
            true_objects.add(o.position)
    return claims, named, len(true_objects)


class PoemEval(NamedTuple):
    rule_ok: float            # fraction of poems obeying every M6 §4.5 rule (check_poem(...) == [])
    fact_precision: float     # true object lines / object lines (poem_facts)
    fact_recall: float        # scene objects a true line names / scene objects
    poems: list               # [(prompt, poem)]


@torch.no_grad()
def evaluate_poems(model, tok=None, split: str = "test", n: int = 16, method: str = "greedy", **kw) -> PoemEval:
    """Generate ``n`` poems for held-out scenes under :class:`PoemFormatProcessor` and score them."""
    tok = tok if tok is not None else world_tokenizer()
    scenes, data = poem_data(split, n, tok=tok)
    proc = PoemFormatProcessor(tok, alternate=True)
    enc = pad_texts(tok, data.prompts, model.config.max_text_len, model.config.pad_token_id)
    poems = decode_texts(model, tok, encoder_ids=enc, method=method, max_new_tokens=proc.max_new_tokens,
                        logits_processor=[proc], **kw)
    facts = [poem_facts(p, s) for p, s in zip(poems, scenes)]
    claims, true = sum(f[0] for f in facts), sum(f[1] for f in facts)
    return PoemEval(sum(not check_poem(p) for p in poems) / len(poems), true / max(claims, 1),
                    sum(f[2] for f in facts) / sum(len(s.objects) for s in scenes), list(zip(data.prompts, poems)))
