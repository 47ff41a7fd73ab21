"""A WordPiece tokenizer for English + Chinese, wrapped as a Hugging Face fast tokenizer.

English is split into words and WordPiece sub-words (BERT); Chinese is split into single characters, as
BERT-Chinese does (``BertNormalizer(handle_chinese_chars=True)`` puts spaces around every CJK character),
which is also what M6's character-level poem constraints need (M6 §4.5).

    tok = load_tokenizer("world")                # the kit's tokenizer, shipped in mmkit/checkpoints/
    tok = load_tokenizer("/path/bert-base-chinese")  # or any local Hugging Face tokenizer folder
    ids = tok("a small red circle")["input_ids"]    # [CLS] ... [SEP]
    tok = world_tokenizer()                      # the one cached world tokenizer every task and app shares
    ids = pad_texts(tok, ["a red circle", "红色"], max_len=32, pad_id=0)   # (B, W) plain ids, right-padded
    texts = decode_rows(tok, generated, eos_id)  # generated ids -> strings, cut at [EOS]

Special tokens every model of the kit uses: [PAD] [UNK] [CLS] [SEP] [MASK] [BOS] [EOS]. Image codes
(text-to-image, M6 §4.1) and coordinate bins (grounding) are added on demand with
:func:`add_image_code_tokens` / :func:`add_coordinate_tokens`, so they get ids after the word vocabulary.
"""
from __future__ import annotations

import json
import numbers
import re
import threading
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from tokenizers import Regex, normalizers
from transformers import PreTrainedTokenizerFast

import mmkit.registry as registry
from mmkit.data import text_corpus
from mmkit.hub import checkpoint_dir, read_json, verify_checkpoint

__all__ = ["SPECIAL_TOKENS", "WORLD_TOKENIZER_NAME", "word_ids", "SpecialIds", "KitTokenizer", "train_tokenizer", "train_world_tokenizer",
           "load_tokenizer", "world_tokenizer", "pad_ids", "pad_texts", "decode", "decode_rows", "join_text",
           "add_image_code_tokens", "add_coordinate_tokens", "tokenizer_or_world"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]
# The kit's tokenizer is trained on the world's text, but people type other words: seed the alphabet so any
# English word still splits into known pieces instead of becoming [UNK].
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"()-/&%+=*#@$[]")
_ALPHABET += list("，。！？；：、（）“”《》")

WORLD_TOKENIZER_NAME = "tokenizer-world"

# Characters that separate words although BERT's normaliser (clean_text) deletes them: control characters (\x00),
# invisible format characters (zero-width space U+200B, joiners, BOM) and line / paragraph separators. Deleted,
# "red\x00circle" read as one word "redcircle"; they become spaces first. The soft hyphen (U+00AD) stays: it sits
# inside a word and BERT deletes it, which is right.
SEPARATOR_PATTERN = r"[[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]&&[^\x{00AD}]]"
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _separator_normalizer():
    return normalizers.Replace(Regex(SEPARATOR_PATTERN), " ")


def _clean(text: Any) -> Any:
    """Lone surrogates (from a bad decode, e.g. '\\ud800' in JSON) cannot reach the Rust tokenizer, which takes only
    valid Unicode (it raised TypeError): they become spaces. Lists / tuples (batches, pairs) are cleaned inside."""
    if isinstance(text, str):
        return _SURROGATE.sub(" ", text) if _SURROGATE.search(text) else text
    if isinstance(text, list):
        return [_clean(t) for t in text]
    if isinstance(text, tuple):
        return tuple(_clean(t) for t in text)
    return text


class KitTokenizer(PreTrainedTokenizerFast):
    """The kit's tokenizer class: a transformers fast tokenizer whose input is made safe first.

    * control / zero-width / separator characters split words (a normaliser step before BERT's, see
      :data:`SEPARATOR_PATTERN`), instead of being deleted and merging the words around them;
    * lone surrogates become spaces instead of a ``TypeError`` from the Rust side.

    Saved folders reload with ``AutoTokenizer`` too (as a plain fast tokenizer, keeping the normaliser step).
    """

    # (No __init__ override: transformers rebuilds the backend from scratch for subclasses that define one.)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        tok = super().from_pretrained(*args, **kwargs)
        tok._ensure_separators()
        return tok

    def _ensure_separators(self) -> None:
        if getattr(self, "_separators_ok", False):
            return
        backend = self.backend_tokenizer
        if SEPARATOR_PATTERN not in json.dumps(json.loads(backend.to_str()).get("normalizer")):
            current = backend.normalizer
            backend.normalizer = normalizers.Sequence([_separator_normalizer()] + ([current] if current else []))
        self._separators_ok = True

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        self._ensure_separators()
        return super()._encode_plus(_clean(text), _clean(text_pair), *args, **kwargs)

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        self._ensure_separators()
        return super()._encode_without_added_tokens(_clean(text))


class SpecialIds(NamedTuple):
    """The special token ids task builders and decoders need."""
    pad_id: int   # [PAD]: fills encoder/decoder inputs in a batch
    mask_id: int  # [MASK]: replaces each noised span (M6) / masked token (BERT MLM)
    bos_id: int   # [BOS]: first decoder input
    eos_id: int   # [EOS]: last decoder target, so the model learns where text ends

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        """Read the ids off a Hugging Face tokenizer (e.g. :func:`world_tokenizer`)."""
        vals = {f: getattr(tok, f"{f[:-3]}_token_id", None) for f in cls._fields}
        missing = [f for f, v in vals.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer has no {', '.join(m[:-3] + '_token' for m in missing)}; load it with "
                             "mmkit.tokenizer.load_tokenizer (which adds [BOS]/[EOS]) or add them with "
                             "tok.add_special_tokens(...)")
        return cls(**vals)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 1, method: str = "words"):
    """Train a BERT-style WordPiece tokenizer (lower-cased, Chinese by character) on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` whose ``__call__`` adds [CLS] ... [SEP] (and
    [CLS] a [SEP] b [SEP] for pairs, with token_type_ids), like BERT's.

    ``method="words"`` (default): the vocabulary is the special tokens, every character seen plus the seeded
    alphabet, ``##c`` for each letter and digit, then whole words by descending frequency (ties in alphabetical
    order) up to ``vocab_size``. Normalisation and pre-tokenisation are the ``tokenizers`` BERT ones, and the
    model is a ``tokenizers`` WordPiece, so unseen words still split into pieces. It is exactly reproducible:
    ``tokenizers``' own WordPiece trainer breaks ties between equally frequent merges in hash order, and two
    runs on the world's text gave different vocabularies (55 of 562 ids moved), which would silently
    invalidate every cached checkpoint. The world's vocabulary is closed (a few hundred words), so whole
    words lose nothing. ``method="merges"`` runs ``tokenizers.trainers.WordPieceTrainer`` (sub-word merges,
    better for large open corpora such as a user's own captions; not bit-reproducible).
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if method == "words":
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        chars = sorted(set(_ALPHABET) | {c for w in counts for c in w})
        base = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars if c.isascii() and c.isalnum()]
        if vocab_size < len(base):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(base)} special tokens and characters "
                             f"of this corpus; use vocab_size >= {len(base)}")
        known = set(base)
        words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in known),
                       key=lambda w: (-counts[w], w))
        vocab = {t: i for i, t in enumerate(base + words[: vocab_size - len(base)])}
        tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                        max_input_chars_per_word=100))
    elif method == "merges":
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tk.normalizer, tk.pre_tokenizer = normalizer, pre_tokenizer
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL_TOKENS, initial_alphabet=_ALPHABET,
                                            continuing_subword_prefix="##")
        tk.train_from_iterator(texts, trainer=trainer)
        tk = _with_continuation_alphabet(tk)
    else:
        raise ValueError(f"unknown method {method!r}; use 'words' (reproducible) or 'merges' (sub-word merges)")
    tk.normalizer, tk.pre_tokenizer = normalizer, pre_tokenizer
    tk.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return _wrap(tk)


def _with_continuation_alphabet(tk):
    """Add ``##c`` for every letter and digit the trainer never saw inside a word.

    The trainer seeds word-initial pieces from ``initial_alphabet`` but only learns ``##c`` continuations
    it has seen, so "next" (no ``##x`` in the world's text) became [UNK]. With every ``##c`` present any
    lower-case English word splits into known pieces; ids of existing tokens do not change.
    """
    from tokenizers import models

    vocab = tk.get_vocab()
    missing = [f"##{c}" for c in _ALPHABET if c.isalnum() and f"##{c}" not in vocab]
    if missing:
        vocab = dict(vocab)
        for t in missing:
            vocab[t] = len(vocab)
        tk.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                    max_input_chars_per_word=100)
    return tk


def _wrap(tk):
    tok = KitTokenizer(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[BOS]", eos_token="[EOS]", model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tok._ensure_separators()
    return tok


def train_world_tokenizer(n_scenes: int = 4000, vocab_size: int = 2000, split: str = "train"):
    """The kit's tokenizer: WordPiece trained on every kind of text the Shapes World produces, EN + ZH."""
    return train_tokenizer(text_corpus(n_scenes, split=split, langs=("en", "zh")), vocab_size=vocab_size)


def load_tokenizer(name_or_path: str | Path = "world"):
    """Load the kit's tokenizer (``"world"``) or any local Hugging Face tokenizer folder, offline.

    A folder must hold what ``save_pretrained`` writes (``tokenizer.json`` or ``vocab.txt`` + config).
    Nothing is downloaded: a hub id such as ``bert-base-uncased`` must be a local folder here.
    """
    from transformers import AutoTokenizer

    if str(name_or_path) in ("world", WORLD_TOKENIZER_NAME):
        d = checkpoint_dir(WORLD_TOKENIZER_NAME)
        verify_checkpoint(d)                                     # sha256s recorded in its recipe.json
        return KitTokenizer.from_pretrained(d, local_files_only=True)
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer {str(name_or_path)!r}: no such folder. mmkit works offline: pass 'world' for the kit's "
            "tokenizer, or the path of a folder written by tokenizer.save_pretrained(...) "
            "(e.g. a downloaded bert-base-chinese).")
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} holds no tokenizer files (tokenizer.json / vocab.txt / tokenizer_config.json)")
    verify_checkpoint(path)                                      # a hub folder: its recorded sha256s
    cfg_file = path / "tokenizer_config.json"
    try:
        kit = json.loads(cfg_file.read_text(encoding="utf-8")).get("tokenizer_class") == "KitTokenizer"
    except (OSError, ValueError, AttributeError):
        kit = False
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / f).exists():
            read_json(path / f, "tokenizer file", f"write the folder again with tokenizer.save_pretrained({str(path)!r})")
    tok = (KitTokenizer if kit else AutoTokenizer).from_pretrained(path, local_files_only=True)
    for name, tok_str in (("bos_token", "[BOS]"), ("eos_token", "[EOS]")):
        # BERT tokenizers have no BOS/EOS; decoders of the kit need them: add them as new special tokens.
        if getattr(tok, name) is None:
            tok.add_special_tokens({name: tok_str})
    return tok


def add_image_code_tokens(tok, n_codes: int) -> int:
    """Add ``<code_0> ... <code_{n-1}>`` (VQGAN codes, M6 §4.1) as special tokens; return the first id."""
    return _add_range(tok, "code", n_codes)


def add_coordinate_tokens(tok, n_bins: int) -> int:
    """Add ``<loc_0> ... <loc_{n-1}>`` (quantised box coordinates for grounding); return the first id."""
    return _add_range(tok, "loc", n_bins)


def _add_range(tok, prefix: str, n: int) -> int:
    if n <= 0:
        raise ValueError(f"need a positive number of <{prefix}_i> tokens, got {n}")
    names = [f"<{prefix}_{i}>" for i in range(n)]
    present = [t for t in names if t in tok.get_vocab()]
    if present and len(present) != n:
        raise ValueError(f"tokenizer already has {len(present)} of the {n} <{prefix}_i> tokens; load a fresh tokenizer")
    if not present:
        tok.add_special_tokens({"additional_special_tokens": names}, replace_extra_special_tokens=False)
    return tok.convert_tokens_to_ids(names[0])


_CJK = r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"


def join_text(text: str) -> str:
    """Undo the spaces WordPiece decoding puts around Chinese characters: '左 上 方 的 圆' -> '左上方的圆'."""
    return re.sub(rf"(?<={_CJK}) | (?={_CJK})", "", text)


def decode(tok, ids, skip_special_tokens: bool = True) -> str:
    """``tok.decode`` plus :func:`join_text`: readable English and Chinese. Ids outside the vocabulary raise a
    ValueError that names them (``tok.decode`` would drop them silently or overflow)."""
    flat = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
    n = len(tok)
    bad = [i for i in flat if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n]
    if bad:
        raise ValueError(f"decode: ids must be whole numbers from 0 to {n - 1} (this tokenizer's vocabulary), got "
                         f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
    # WordPiece's decoder re-attaches , . ! ? ' but leaves "background : a ..."; re-attach : and ; too.
    return re.sub(r" (?=[:;])", "", join_text(tok.decode(ids, skip_special_tokens=skip_special_tokens)))


_WORLD: dict = {}
_WORLD_LOCK = threading.Lock()


def world_tokenizer():
    """The kit's world tokenizer, loaded once per process and shared (the one way tasks and apps get it).

    Shared means: do not add tokens to it; call :func:`load_tokenizer` ("world") for a private copy to extend.
    """
    with _WORLD_LOCK:
        if "tok" not in _WORLD:
            _WORLD["tok"] = load_tokenizer("world")
        return _WORLD["tok"]


def word_ids(tok, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token ids of each word (e.g. label words a decoder reads, ``MPLUGClassifierConfig.label_ids``); a word the
    tokenizer can only spell with [UNK] raises."""
    out = tuple(tuple(tok.convert_tokens_to_ids(tok.tokenize(w))) for w in words)
    bad = [w for w, ids in zip(words, out) if not ids or tok.unk_token_id in ids]
    if bad:
        raise ValueError(f"the tokenizer cannot spell {bad}: choose words in its vocabulary")
    return out


def tokenizer_or_world(tokenizer=None):
    """``tokenizer`` if it is one (callable, with ``decode``), the shared world tokenizer for None, else a ValueError
    that says what to pass (e.g. ``tokenizer='world'`` would fail deep inside as "'str' object is not callable")."""
    if tokenizer is None:
        return world_tokenizer()
    if isinstance(tokenizer, (str, bytes)) or not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise ValueError(f"tokenizer must be a tokenizer object (e.g. mmkit.tokenizer.world_tokenizer() or "
                         f"load_tokenizer(folder)) or None for the world tokenizer, got {tokenizer!r:.60}")
    return tokenizer


def pad_ids(seqs: Sequence, value: int, min_width: int = 0) -> torch.Tensor:
    """Right-pad id sequences (lists or 1-D tensors) with ``value`` into one (B, W) long tensor, W = the longest
    (at least ``min_width``)."""
    width = max([len(x) for x in seqs] + [min_width])
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out


def pad_texts(tok, texts: Sequence[str], max_len: int, pad_id: int | None = None) -> torch.Tensor:
    """Plain text ids (no specials) of ``texts``, each cut at ``max_len``, right-padded: (B, W) long.

    ``pad_id`` defaults to the tokenizer's [PAD]; W is the longest text (at least 1).
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str, e.g. ['a red circle at the top']")
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"pad_texts: max_len must be a whole number >= 1 (tokens kept per text), got {max_len!r}")
    ids = [x[:max_len] for x in tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []
    return pad_ids(ids, tok.pad_token_id if pad_id is None else pad_id, min_width=1)


def decode_rows(tok, seqs: torch.Tensor, eos_id: int) -> list[str]:
    """Generated ids (B, T) -> B readable strings, each cut at its first ``eos_id``. Ids a model's (padded) output
    layer has beyond the tokenizer's vocabulary read as [UNK] (an untrained model can sample them)."""
    out, n = [], len(tok)
    for row in seqs.tolist():
        if eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(decode(tok, [i if 0 <= i < n else tok.unk_token_id for i in row]))
    return out


# --- the tokenizer's recipe and loader (mmkit.hub reads "kind": "tokenizer" folders with load_tokenizer) ------
@registry.recipe(WORLD_TOKENIZER_NAME, "WordPiece tokenizer (EN + ZH by character) trained on the Shapes World's text",
                 kind="tokenizer")
def train_world_tokenizer_recipe(out_dir: Path, fast: bool) -> dict:
    tok = train_world_tokenizer()          # deterministic and a few seconds: fast mode changes nothing
    tok.save_pretrained(out_dir)
    return {"vocab_size": len(tok)}


registry.register_loader("tokenizer", lambda folder, device="cpu": load_tokenizer(folder))
