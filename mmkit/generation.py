"""Decoding for the kit's generators: transformers' ``generate()`` on M6, and M6 §4.5 poem constraints.

    from transformers import LogitsProcessorList
    from mmkit.generation import HFGenerationAdapter, PoemFormatProcessor, check_poem

    hf = HFGenerationAdapter(m6)                                     # wraps, shares the weights
    out = hf.generate(images=imgs, encoder_ids=enc, max_new_tokens=20)               # greedy
    out = hf.generate(images=imgs, num_beams=4, num_return_sequences=2, max_new_tokens=20)
    out = hf.generate(images=imgs, do_sample=True, top_k=20, top_p=0.9, max_new_tokens=20)
    # out (B * num_return_sequences, 1 + T): [BOS] then the generated ids, [PAD] after [EOS]

    poem = PoemFormatProcessor(tok)                                  # M6 §4.5 format as a LogitsProcessor
    out = hf.generate(encoder_ids=enc, logits_processor=LogitsProcessorList([poem]),
                      max_new_tokens=poem.max_new_tokens, do_sample=True, top_k=30)
    gen = m6.generate(None, enc, poem.max_new_tokens, logits_processor=poem)   # the same object, M6's own loop
    check_poem(decode(tok, out[0]))                                  # [] = every rule holds

Why an adapter. M6 is "encoder-decoder in one": the image and the (masked) encoder text are a *prefix* of the
same sequence as the decoder text, under one unified mask (M6 §3.2). transformers' ``generate()`` (greedy,
beam search, top-k / top-p sampling, logits processors, stopping criteria, ``num_return_sequences``) expects a
decoder-only model ``forward(input_ids, past_key_values, ...) -> .logits``. :class:`HFGenerationAdapter` is that
model: the decoder ids are ``input_ids`` (starting at [BOS]), and the prefix travels as *model kwargs*
(``images``, ``encoder_ids``): ``generate()`` repeats every tensor kwarg ``expand_size`` times along the batch
(``repeat_interleave``, in ``GenerationMixin._expand_inputs_for_generation``), exactly like ``input_ids``, so
beams and ``num_return_sequences`` each see their own row's prefix.

The KV cache. ``generate()`` builds a transformers ``DynamicCache`` and, after the first step, feeds only the
newest token. The adapter supports it: each layer's :class:`mmkit.layers.KVCache` interface (``append``) is
served by the ``DynamicCache`` (``update``), so beam search's ``reorder_cache`` moves our keys/values too. The
first call encodes [visual | encoder | decoder prompt] under the unified mask and fills the cache; each later call
embeds the new decoder token at its decoder position and lets it attend to every non-padding prefix key and every
earlier decoder key: the same computation as ``M6Model.generate``. ``use_cache=False`` recomputes the whole
sequence every step (the reference path; any model whose ``forward(images, encoder_ids, decoder_input_ids)``
returns ``.logits`` works that way). Models register their cached step with :func:`register_cached_forward`.

Poems (M6 §4.5): "at least 4 lines; an even number of lines; each line exactly 5 or 7 words; all lines the same
number of words; [generate] until the model generates an <eos> token, or the number of lines exceeds a limit of
16", "done in a search framework that we generate short sentences ending with punctuation until the number of
words meets the constraint". :class:`PoemFormatProcessor` is that search as a constraint mask on the logits,
usable by any decoding method; :func:`check_poem` checks finished text independently.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn
from transformers import GenerationMixin, LogitsProcessor, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmkit.masking import SEG_DECODER, SEG_PAD, unified_mask

__all__ = [
    "MMKitGenerationConfig", "HFGenerationAdapter", "register_cached_forward",
    "PoemFormatProcessor", "PoemState", "check_poem", "poem_lines", "is_cjk_char",
    "LINE_ENDS", "RULE_MIN_LINES", "RULE_EVEN_LINES", "RULE_LINE_LENGTH", "RULE_SAME_LENGTH", "RULE_MAX_LINES",
    "RULE_FORMAT", "GenerationSpeed", "generation_speed",
]


# =========================================================================================================
# Part 1: transformers' generate() on an mmkit encoder-decoder-in-one model
# =========================================================================================================

class MMKitGenerationConfig(PreTrainedConfig):
    """The little a transformers ``generate()`` needs to know about a wrapped mmkit model.

    Built from the model's own config by :meth:`HFGenerationAdapter.__init__`; not a model config (the wrapped
    model keeps its own dataclass config, which holds the architecture).
    """

    model_type = "mmkit-generation"

    def __init__(self, vocab_size: int = 512, pad_token_id: int = 0, bos_token_id: int = 5, eos_token_id: int = 6,
                 num_hidden_layers: int = 4, max_position_embeddings: int = 256, use_cache: bool = True,
                 **kwargs: Any):
        self.vocab_size = vocab_size                  # rows of the output layer (logits width)
        self.num_hidden_layers = num_hidden_layers    # one DynamicCache layer per transformer block
        self.max_position_embeddings = max_position_embeddings  # decoder positions (M6: max_text_len)
        self.use_cache = use_cache                    # False when the model has no registered cached step
        kwargs.setdefault("tie_word_embeddings", False)  # the wrapped model ties its own weights (M6 §3.2)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         **kwargs)


# A model's cached step: fn(model, images, encoder_ids, input_ids (B, t), layer_caches, past_length) -> logits
# (B, t, V). ``layer_caches[i]`` offers ``append(key, value) -> (all keys, all values)`` (the KVCache interface
# mmkit.layers.MultiHeadAttention uses); ``past_length`` = positions already cached (0 on the first call).
CachedForward = Callable[..., torch.Tensor]
_CACHED_FORWARDS: dict[type, CachedForward] = {}


def register_cached_forward(model_cls: type, fn: CachedForward) -> None:
    """Let :class:`HFGenerationAdapter` use transformers' KV cache with ``model_cls`` (and its subclasses)."""
    _CACHED_FORWARDS[model_cls] = fn


def _cached_forward_for(model: nn.Module) -> CachedForward | None:
    for cls in type(model).__mro__:
        if cls in _CACHED_FORWARDS:
            return _CACHED_FORWARDS[cls]
    return None


class _HFCacheLayer:
    """One layer of a transformers ``Cache`` behind :class:`mmkit.layers.KVCache`'s interface.

    ``MultiHeadAttention`` calls ``cache.append(k, v)`` and gets every key/value so far back; here the
    ``DynamicCache`` stores them, so ``generate()`` can reorder (beam search) and measure them itself.
    """

    cross_key = cross_value = None      # M6 has no cross-attention: its context is in the same sequence

    def __init__(self, cache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key, value, self.layer_idx)        # (B, H, past + new, hd) each


def _m6_cached_forward(model, images, encoder_ids, input_ids, caches, past_length: int) -> torch.Tensor:
    """M6's incremental step, the same computation as ``M6Model.generate(use_cache=True)``.

    First call (``past_length == 0``): [visual | encoder | decoder prompt] under the unified mask (M6 §3.2),
    filling every layer's cache. Later calls: only the new decoder tokens, at decoder positions ``past_length -
    prefix_length ...``; they attend to every real prefix key (encoder padding stays masked), every cached decoder
    key and, causally, to each other.
    """
    B, t = input_ids.shape
    dev = input_ids.device
    n_vis = 0 if images is None else model.num_visual_tokens
    prefix_seg = model._segments(B, n_vis, encoder_ids, None, dev)                   # (B, Lp)
    Lp = prefix_seg.shape[1]
    if past_length == 0:
        seg = torch.cat([prefix_seg, torch.full_like(input_ids, SEG_DECODER)], dim=1)  # (B, Lp + t)
        x = model._embed(images, encoder_ids, input_ids)                              # (B, Lp + t, D)
        h = model._transform(x, unified_mask(segment_ids=seg).mask[:, None], caches)
    else:
        done = past_length - Lp                                                       # decoder tokens cached
        if done < 1:
            raise ValueError(f"the cache holds {past_length} positions but the prefix alone has {Lp}: it was "
                             "filled for other inputs; let generate() build a fresh cache")
        x = model.drop(model.embed_norm(model.embed_text(input_ids, SEG_DECODER, offset=done)))  # (B, t, D)
        prefix_ok = (prefix_seg != SEG_PAD)[:, None, :].expand(B, t, Lp)            # (B, t, Lp)
        causal = torch.ones(t, done + t, dtype=torch.bool, device=dev).tril(done)    # (t, done + t)
        mask = torch.cat([prefix_ok, causal.expand(B, t, done + t)], dim=2)          # (B, t, Lk)
        h = model._transform(x, mask[:, None], caches)                                # (B, t, D)
    return model.lm_head(h[:, -t:])                                                   # (B, t, V)


def _register_m6() -> None:
    from mmkit.models.m6 import M6Model

    register_cached_forward(M6Model, _m6_cached_forward)


_register_m6()


class HFGenerationAdapter(PreTrainedModel, GenerationMixin):
    """transformers' ``generate()`` for an mmkit encoder-decoder-in-one model (M6). Shares the model's weights.

    ``generate(input_ids=None, images=None, encoder_ids=None, **generate_kwargs)``: ``input_ids`` (B, t) is the
    decoder prompt and must start with [BOS] (default: [BOS] alone); ``images`` (B, C, H, W) and ``encoder_ids``
    (B, We) are the prefix (encoder padding = ``pad_token_id``). Every ``generate()`` option works: greedy,
    ``num_beams``, ``do_sample`` with ``top_k`` / ``top_p`` / ``temperature``, ``logits_processor``,
    ``stopping_criteria``, ``num_return_sequences``, ``return_dict_in_generate`` / ``output_scores``. The result
    holds the prompt, then the new tokens, then [PAD] after each row's [EOS].

    ``use_cache`` (default: True when the model class registered a cached step, see
    :func:`register_cached_forward`) selects transformers' KV cache; ``use_cache=False`` recomputes everything.
    """

    config_class = MMKitGenerationConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, config: MMKitGenerationConfig | None = None):
        mc = getattr(model, "config", None)
        if config is None:
            missing = [k for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
                       if getattr(mc, k, None) is None]
            if missing:
                raise ValueError(f"{type(model).__name__}.config lacks {missing}: pass config="
                                 "MMKitGenerationConfig(vocab_size=..., pad_token_id=..., bos_token_id=..., "
                                 "eos_token_id=...)")
            config = MMKitGenerationConfig(
                vocab_size=mc.vocab_size, pad_token_id=mc.pad_token_id, bos_token_id=mc.bos_token_id,
                eos_token_id=mc.eos_token_id, num_hidden_layers=getattr(mc, "n_layers", 1),
                max_position_embeddings=getattr(mc, "max_text_len", 512),
                use_cache=_cached_forward_for(model) is not None)
        super().__init__(config)
        self.model = model
        self._cached_forward = _cached_forward_for(model)
        self.generation_config.use_cache = config.use_cache and self._cached_forward is not None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Never re-initialise: the wrapped model's (trained) weights are used as they are."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.wte

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                encoder_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                attention_mask: torch.Tensor | None = None, return_dict: bool = True,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids (B, t): decoder tokens (all of them, or only the new ones when a cache is given)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("the decoder prompt (input_ids) may not contain padding: M6 counts decoder positions "
                             "from [BOS], so rows of different lengths must be generated in separate calls "
                             "(put a variable-length prompt into encoder_ids, which may be padded)")
        ref = images if images is not None else encoder_ids
        if ref is not None and ref.shape[0] != input_ids.shape[0]:
            raise ValueError(f"the prefix has batch size {ref.shape[0]} but input_ids has {input_ids.shape[0]}; "
                             "pass images / encoder_ids with one row per input_ids row")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is not None:
            if self._cached_forward is None:
                raise ValueError(f"{type(self.model).__name__} has no cached step registered: generate with "
                                 "use_cache=False, or register one with mmkit.generation.register_cached_forward")
            past = past_key_values.get_seq_length()
            caches = [_HFCacheLayer(past_key_values, i) for i in range(self.config.num_hidden_layers)]
            logits = self._cached_forward(self.model, images, encoder_ids, input_ids, caches, past)
            return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
        logits = self.model(images=images, encoder_ids=encoder_ids, decoder_input_ids=input_ids).logits
        return CausalLMOutputWithPast(logits=logits)                                  # (B, t, V)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, images: torch.Tensor | None = None,
                 encoder_ids: torch.Tensor | None = None, **kwargs: Any):
        """transformers' ``generate()`` with M6's prefix as model kwargs. See the class docstring."""
        if images is None and encoder_ids is None:
            raise ValueError("generate needs images and/or encoder_ids (for plain language modelling pass "
                             "encoder_ids of shape (B, 0))")
        bos = self.config.bos_token_id
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids (the decoder prompt) must be (B, t >= 1), got {tuple(input_ids.shape)}")
            if not bool((input_ids[:, 0] == bos).all()):
                raise ValueError(f"the decoder prompt must start with [BOS] (id {bos}), as in training; got first "
                                 f"ids {input_ids[:, 0].tolist()}")
        else:
            B = (images if images is not None else encoder_ids).shape[0]
            input_ids = torch.full((B, 1), bos, dtype=torch.long, device=self.device)
        room = self.config.max_position_embeddings - input_ids.shape[1] + 1   # the last new token is never fed
        if kwargs.get("max_new_tokens") is not None and kwargs["max_new_tokens"] > room:
            raise ValueError(f"max_new_tokens={kwargs['max_new_tokens']} does not fit: the decoder has "
                             f"{self.config.max_position_embeddings} positions and the prompt uses "
                             f"{input_ids.shape[1]}; ask for at most {room} (or build the model with a larger "
                             "max_text_len)")
        if kwargs.get("use_cache") and self._cached_forward is None:
            raise ValueError(f"{type(self.model).__name__} has no cached step registered: use_cache=True is not "
                             "possible; leave it out (False by default for this model)")
        prefix = {k: v for k, v in (("images", images), ("encoder_ids", encoder_ids)) if v is not None}
        was_training = self.model.training
        self.model.eval()
        try:
            return super().generate(input_ids, **prefix, **kwargs)
        finally:
            self.model.train(was_training)


# =========================================================================================================
# Part 2: M6 §4.5 poem format constraints
# =========================================================================================================

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


# =========================================================================================================
# Part 3: measuring decoding speed (a benchmark helper, never asserted in tests)
# =========================================================================================================

class GenerationSpeed(NamedTuple):
    name: str
    new_tokens: int          # generated tokens (rows x steps) in the timed run
    seconds: float
    tokens_per_s: float


def generation_speed(model, images=None, encoder_ids=None, max_new_tokens: int = 64,
                     repeats: int = 3) -> list[GenerationSpeed]:
    """Tokens/s of greedy decoding, M6's own loop vs transformers' generate, with and without KV cache.

    Every run generates exactly ``max_new_tokens`` per row ([EOS] is suppressed) and the best of ``repeats``
    timings is kept. Returns one :class:`GenerationSpeed` per method.
    """
    eos = model.config.eos_token_id
    B = (images if images is not None else encoder_ids).shape[0]
    hf = HFGenerationAdapter(model)

    def no_eos(ids, logits):
        return logits.index_fill(-1, torch.tensor([eos], device=logits.device), float("-inf"))

    runs = {
        "M6Model.generate, KV cache": lambda: model.generate(images, encoder_ids, max_new_tokens,
                                                             logits_processor=no_eos),
        "M6Model.generate, no cache": lambda: model.generate(images, encoder_ids, max_new_tokens,
                                                             logits_processor=no_eos, use_cache=False),
        "HF generate, KV cache": lambda: hf.generate(images=images, encoder_ids=encoder_ids,
                                                     max_new_tokens=max_new_tokens, use_cache=True,
                                                     suppress_tokens=[eos]),
        "HF generate, no cache": lambda: hf.generate(images=images, encoder_ids=encoder_ids,
                                                     max_new_tokens=max_new_tokens, use_cache=False,
                                                     suppress_tokens=[eos]),
    }
    out = []
    for name, fn in runs.items():
        fn()                                                                  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(GenerationSpeed(name, B * max_new_tokens, best, B * max_new_tokens / best))
    return out
