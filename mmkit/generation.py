"""Decoding for the kit's generators through transformers' ``generate()``, knowing no model in particular.

    from mmkit.generation import HFGenerationAdapter, decode_texts

    hf = HFGenerationAdapter(m6)                                     # wraps, shares the weights
    out = hf.generate(images=imgs, encoder_ids=enc, max_new_tokens=20)               # greedy
    out = hf.generate(images=imgs, num_beams=4, num_return_sequences=2, max_new_tokens=20)
    out = hf.generate(images=imgs, do_sample=True, top_k=20, top_p=0.9, max_new_tokens=20)
    # out (B * num_return_sequences, 1 + T): [BOS] then the generated ids, [PAD] after [EOS]

    texts = decode_texts(m6, tok, images=imgs, method="beam", langs=["en"] * B)    # strings, cut at [EOS]

Why an adapter. M6 is "encoder-decoder in one": the image and the (masked) encoder text are a *prefix* of the
same sequence as the decoder text, under one unified mask (M6 §3.2). transformers' ``generate()`` (greedy,
beam search, top-k / top-p sampling, logits processors, stopping criteria, ``num_return_sequences``) expects a
decoder-only model ``forward(input_ids, past_key_values, ...) -> .logits``. :class:`HFGenerationAdapter` is that
model: the decoder ids are ``input_ids`` (starting at [BOS]), and the prefix travels as *model kwargs*
(``images``, ``encoder_ids``): ``generate()`` repeats every tensor kwarg ``expand_size`` times along the batch
(``repeat_interleave``, in ``GenerationMixin._expand_inputs_for_generation``), exactly like ``input_ids``, so
beams and ``num_return_sequences`` each see their own row's prefix.

The KV cache. ``generate()`` builds a transformers ``DynamicCache`` and, after the first step, feeds only the
newest token. The adapter supports it: each layer's :class:`mmkit.nn.KVCache` interface (``append``) is
served by the ``DynamicCache`` (``update``), so beam search's ``reorder_cache`` moves our keys/values too. The
first call encodes [visual | encoder | decoder prompt] under the unified mask and fills the cache; each later call
embeds the new decoder token at its decoder position and lets it attend to every non-padding prefix key and every
earlier decoder key: the same computation as ``M6Model.generate``. ``use_cache=False`` recomputes the whole
sequence every step (the reference path; any model whose ``forward(images, encoder_ids, decoder_input_ids)``
returns ``.logits`` works that way). Models register their cached step with :func:`register_cached_forward`.

A model plugs in by registering its incremental step (``register_cached_forward``); M6 does so in
:mod:`mmkit.m6.model`. :func:`first_token_language` / :class:`FirstTokenLanguage` fix the language a text starts in.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmkit.nn.modes import evaluating
from mmkit.tokenizer import decode_rows

__all__ = [
    "MMKitGenerationConfig", "HFGenerationAdapter", "register_cached_forward", "DECODING", "decode_texts",
    "language_token_mask", "first_token_language", "one_language", "FirstTokenLanguage", "sample_next",
]


def sample_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids: argmax, or a draw from softmax(logits / temperature) restricted to the
    ``top_k`` most likely tokens and / or the smallest set with probability >= ``top_p`` (nucleus). The one
    sampling step of the models' own decoding loops (M6, mPLUG); transformers' generate() has its own."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]       # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        p = srt.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p >= top_p                  # tokens after the nucleus already reached top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


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
# mmkit.nn.MultiHeadAttention uses); ``past_length`` = positions already cached (0 on the first call).
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
    """One layer of a transformers ``Cache`` behind :class:`mmkit.nn.KVCache`'s interface.

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
        with evaluating(self.model):
            return super().generate(input_ids, **prefix, **kwargs)


# =========================================================================================================
# Part 2: decoding texts, and fixing the language a text starts in
# =========================================================================================================

DECODING: tuple[str, ...] = ("greedy", "beam", "sample")   # the decoding methods decode_texts offers

_LANG_TOKENS: dict = {}


def language_token_mask(tok, lang: str, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: tokens that can start a text in ``lang`` ("en": Latin letters, "zh": Chinese characters)."""
    key = (id(tok), lang, vocab_size)
    if key not in _LANG_TOKENS:
        cjk = re.compile(r"[\u4e00-\u9fff]")
        ok = torch.zeros(vocab_size, dtype=torch.bool)
        special = set(tok.all_special_ids)
        for t, i in tok.get_vocab().items():
            if i >= vocab_size or i in special:
                continue
            ok[i] = bool(cjk.search(t)) if lang == "zh" else (t.isascii() and t.isalpha())
        _LANG_TOKENS[key] = ok
    return _LANG_TOKENS[key]


def first_token_language(tok, langs: Sequence[str | None], vocab_size: int):
    """A ``logits_processor(ids, logits)`` (a model's own loop) that makes row ``b`` start in ``langs[b]`` ("en",
    "zh" or None = free). Only the first token is constrained; the model goes on in the language it started."""
    masks = torch.stack([language_token_mask(tok, lang, vocab_size) if lang
                         else torch.ones(vocab_size, dtype=torch.bool) for lang in langs])   # (B, V)

    def process(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if ids.shape[1]:
            return logits
        return logits.masked_fill(~masks.to(logits.device), float("-inf"))
    return process


def one_language(tok, langs: Sequence[str | None], vocab_size: int):
    """A ``logits_processor(ids, logits)`` that keeps row ``b`` in ``langs[b]`` for the whole text: the first token
    as :func:`first_token_language`, and no later token of the other language (shared tokens, punctuation and the
    special ids stay allowed). For sampling, where a free run may start in one language and drift into the other."""
    first = first_token_language(tok, langs, vocab_size)
    other = {"en": "zh", "zh": "en"}
    banned = torch.stack([language_token_mask(tok, other[lang], vocab_size) if lang
                          else torch.zeros(vocab_size, dtype=torch.bool) for lang in langs])   # (B, V)

    def process(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not ids.shape[1]:
            return first(ids, logits)
        return logits.masked_fill(banned.to(logits.device), float("-inf"))
    return process


class FirstTokenLanguage(LogitsProcessor):
    """transformers ``LogitsProcessor``: row ``b``'s first generated token is in ``langs[b // expand]`` (see
    :func:`first_token_language`); ``expand`` = beams x returned sequences."""

    def __init__(self, tok, langs: Sequence[str | None], vocab_size: int, expand: int = 1):
        self.fn = first_token_language(tok, [lg for lg in langs for _ in range(expand)], vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.fn(input_ids[:, 1:], scores)          # transformers passes [BOS] + generated ids


def generation_kwargs(method: str, num_beams: int = 4, top_k: int = 20, top_p: float = 0.9,
                      temperature: float = 1.0) -> dict:
    """``generate()`` keyword arguments of a decoding method in :data:`DECODING`."""
    if method == "greedy":
        return dict(do_sample=False, num_beams=1)
    if method == "beam":
        return dict(do_sample=False, num_beams=num_beams, early_stopping=True)
    if method == "sample":
        return dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature)
    raise ValueError(f"unknown decoding method {method!r}; use one of {DECODING}")


@torch.no_grad()
def decode_texts(model, tok, *, images=None, encoder_ids=None, method: str = "greedy", max_new_tokens: int = 48,
                 num_beams: int = 4, top_k: int = 20, top_p: float = 0.9, temperature: float = 1.0, seed: int = 0,
                 langs: Sequence[str | None] | None = None, logits_processor=None) -> list[str]:
    """Decode with transformers' ``generate()`` through :class:`HFGenerationAdapter`: greedy, beam search
    (``num_beams``) or top-k / top-p sampling (seeded); returns the decoded texts, each cut at [EOS].

    ``langs`` fixes each row's language through its first token; ``logits_processor`` adds constraints
    (e.g. M6 §4.5's poem format).
    """
    kw = generation_kwargs(method, num_beams, top_k, top_p, temperature)
    procs = list(logits_processor or [])
    if langs is not None:
        procs.append(FirstTokenLanguage(tok, langs, model.config.vocab_size, kw.get("num_beams", 1)))
    torch.manual_seed(seed)
    out = HFGenerationAdapter(model).generate(images=images, encoder_ids=encoder_ids, max_new_tokens=max_new_tokens,
                                              logits_processor=LogitsProcessorList(procs), **kw)   # (B, 1 + T)
    return decode_rows(tok, out[:, 1:], model.config.eos_token_id)
