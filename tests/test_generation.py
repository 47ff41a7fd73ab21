"""mmkit/generation.py: transformers' generate() driving M6 (same tokens as M6Model.generate, beams, sampling,
stopping) and M6 §4.5 poem constraints (every poem from an untrained model obeys every rule; check_poem on
hand-written and world poems; hand-computed allowed sets), plus clear errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import mmkit
from mmkit.config import replace_config
from mmkit.data import text as T
from mmkit.data.world import sample_scene
from mmkit.bench.m6 import generation_speed
from mmkit.generation import HFGenerationAdapter
from mmkit.m6.tasks.poems import (RULE_EVEN_LINES, RULE_FORMAT, RULE_LINE_LENGTH, RULE_MAX_LINES, RULE_MIN_LINES,
                                  RULE_SAME_LENGTH, PoemFormatProcessor, PoemState, check_poem, is_cjk_char, poem_lines)
from mmkit.m6.model import M6Model
from mmkit.tokenizer import decode

BOS, EOS, PAD = 5, 6, 0


pytestmark = pytest.mark.usefixtures("one_thread")   # decoding tiny models: 10x faster on busy cores



@pytest.fixture(scope="module")
def poem(tok):
    return PoemFormatProcessor(tok)


def _model(seed=0, **overrides) -> M6Model:
    torch.manual_seed(seed)
    return M6Model(replace_config(mmkit.load_config("m6-tiny"), **overrides)).eval()


@pytest.fixture(scope="module")
def m6():
    return _model(0)                                    # the m6-tiny preset, untrained (tied output layer)


@pytest.fixture(scope="module")
def m6_untied():
    # Untrained + tied embeddings mostly repeats [BOS], and at init_std 0.02 every row says the same whatever its
    # prefix. Untied, init_std 0.1: varied text that depends on the image / encoder text, so the equality tests
    # below would catch a mixed-up row or a wrong position.
    return _model(1, tie_word_embeddings=False, init_std=0.1)


def _images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


ENC = torch.tensor([[20, 21, 22, 0], [30, 31, 0, 0], [40, 41, 42, 43]])   # padded encoder text (pad = 0)


class _Bias(LogitsProcessor):
    """Add ``value`` to the logits of ``ids`` (a model that loves / hates some tokens)."""

    def __init__(self, ids, value):
        self.ids, self.value = list(ids), value

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] += self.value
        return scores


class _ForceEosAt(LogitsProcessor):
    """Row ``row`` must emit [EOS] as its ``step``-th new token (counted after the one-token [BOS] prompt)."""

    def __init__(self, row, step, prompt_len=1):
        self.row, self.step, self.prompt_len = row, step, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = scores.clone()
            scores[self.row] = float("-inf")
            scores[self.row, EOS] = 0.0
        return scores


# ---------------------------------------------------------------------------------------------------------
# check_poem: the independent checker
# ---------------------------------------------------------------------------------------------------------

GOOD = [
    "红圆居左上，白底映清光。静看形与色，简约见匠心。",                      # 4 lines of 5
    "红圆居左上，\n白底映清光。\n静看形与色，\n简约见匠心。",                 # the world's newline layout
    "红 圆 居 左 上 ， 白 底 映 清 光 。 静 看 形 与 色 ， 简 约 见 匠 心 。",  # tokenizer.decode spacing
    "小小橙圆在正上，简约之中见匠心。一幅小景动人心，素雅清新入眼来。"
    "白底素净映清光，素雅清新入眼来。简约之中见匠心，色彩斑斓入画来。",        # 8 lines of 7
    "上马出东门，摧车欲问道。却顾所来径，苍苍横翠微。相去既远离，衣带日以疏。"
    "浮云卷水来，纷纷予还往。相见无杂言，但道桑麻长。安得此中人，与之共同老。",  # M6 Figure 11 (12 lines)
    "红圆居左上。" * 16,                                                    # 16 lines: the limit
]

BAD = {
    "红圆居左上，白底映清光。静看形与色，": [RULE_MIN_LINES, RULE_EVEN_LINES],
    "红圆居左上，白底映清光。": [RULE_MIN_LINES],
    "": [RULE_MIN_LINES],
    "红圆居左上，白底映清光。静看形与色，简约见匠心。清简自成章，": [RULE_EVEN_LINES],
    "红圆居左上方，白底映清光白，静看形与色色，简约见匠心心。": [RULE_LINE_LENGTH],        # 6 each
    "红圆居左上，白底素净映清光。静看形与色，简约见匠心。": [RULE_SAME_LENGTH],            # 5,7,5,5
    "红圆居左上，白底映清光。静看形色，简约见匠心。": [RULE_LINE_LENGTH, RULE_SAME_LENGTH],  # 5,5,4,5
    "红圆居左上。" * 18: [RULE_MAX_LINES],
    "红圆a居左上，白底映清光。静看形与色，简约见匠心。": [RULE_FORMAT],                   # non-character
    "红圆居左上，白底映清光。静看形与色，简约见匠心": [RULE_MIN_LINES, RULE_EVEN_LINES, RULE_FORMAT],  # no final mark
    "红圆居左上，，白底映清光。静看形与色，": [RULE_LINE_LENGTH, RULE_SAME_LENGTH, RULE_FORMAT],  # empty line
}


@pytest.mark.parametrize("text", GOOD)
def test_check_poem_accepts_good_poems(text):
    assert check_poem(text) == []


@pytest.mark.parametrize("text", list(BAD))
def test_check_poem_names_each_broken_rule(text):
    assert check_poem(text) == BAD[text]
    why = check_poem(text, details=True)
    assert [w.split(":")[0] for w in why] == BAD[text] and all(": " in w for w in why)


def test_check_poem_helpers():
    assert poem_lines("红圆居左上，\n白底映清光。") == (["红圆居左上", "白底映清光"], [])
    assert is_cjk_char("红") and not is_cjk_char("，") and not is_cjk_char("a") and not is_cjk_char("红圆")
    # the rules are parameters: 4-character lines are fine when asked for
    assert check_poem("红圆左上，白底清光。静看形色，简约匠心。", line_lengths=(4,)) == []
    assert check_poem("红圆居左上，白底映清光。", min_lines=2) == []


def test_world_poems_are_valid_and_accepted_token_by_token(tok, poem):
    """The world's poems pass check_poem, and the processor allows every one of their tokens (it never forbids a
    legal poem), then allows [EOS]; with alternate=True too, since they alternate "，" / "。"."""
    alt = PoemFormatProcessor(tok, alternate=True)
    scenes = [sample_scene(s, max_objects=4) for s in range(40)] + [sample_scene(s, min_objects=5, max_objects=9)
                                                                    for s in range(1000, 1010)]
    for scene in scenes:
        for n in (5, 7):
            text = T.poem(scene, n)
            assert check_poem(text) == [], text
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert decode(tok, ids) == text.replace("\n", "")
            for proc in (poem, alt):
                seq = torch.tensor([[BOS] + ids + [EOS]])
                for i in range(1, seq.shape[1]):
                    allowed = proc.allowed(seq[:, :i], 512)[0]
                    assert allowed[seq[0, i]], (text, i, tok.convert_ids_to_tokens(int(seq[0, i])))


# ---------------------------------------------------------------------------------------------------------
# PoemFormatProcessor: hand-computed allowed sets on a toy vocabulary
# ---------------------------------------------------------------------------------------------------------

# toy ids: 0 pad, 1 bos, 2 eos, 3 "，", 4 "。", 10..19 characters, 5 a non-character (say "a")
TOY = dict(char_ids=range(10, 20), line_end_ids=[3, 4], eos_token_id=2, bos_token_id=1)
CH = list(range(10, 20))


def _allowed(proc, ids, V=24):
    row = proc.allowed(torch.tensor([ids], dtype=torch.long), V)[0]
    return set(torch.nonzero(row).flatten().tolist())


def _line(n, end=3):
    return [10] * n + [end]


def test_processor_allowed_sets_hand_computed():
    p = PoemFormatProcessor(**TOY)
    assert _allowed(p, [1]) == set(CH)                                   # start: characters only, no EOS
    assert _allowed(p, []) == set(CH)                                    # M6Model.generate passes no [BOS]
    assert _allowed(p, [1, 10, 11, 12, 13]) == set(CH)                   # 4 chars: the line goes on
    assert _allowed(p, [1] + [10] * 5) == set(CH) | {3, 4}               # 5: end here or go on to 7
    assert _allowed(p, [1] + [10] * 6) == set(CH)                        # 6 is not a length
    assert _allowed(p, [1] + [10] * 7) == {3, 4}                         # 7: must end
    assert _allowed(p, [1] + _line(5) + [10] * 5) == {3, 4}              # the first line fixed 5
    assert _allowed(p, [1] + _line(7) + [10] * 5) == set(CH)             # ... or 7
    assert _allowed(p, [1] + _line(5) * 3) == set(CH)                    # 3 lines: odd, no EOS
    assert _allowed(p, [1] + _line(5) * 2) == set(CH)                    # 2 lines: too few for EOS
    assert _allowed(p, [1] + _line(5) * 4) == set(CH) | {2}              # 4 lines: EOS allowed
    assert _allowed(p, [1] + _line(7) * 14) == set(CH) | {2}
    assert _allowed(p, [1] + _line(7) * 16) == {2}                       # 16 lines: EOS forced
    assert _allowed(p, [1] + _line(5) * 4 + [2]) == set(range(24))       # ended: unconstrained
    assert _allowed(p, [1] + _line(5) * 4 + [2, 0, 0]) == set(range(24))
    # broken rows (illegal prompt, -inf beam) may only stop
    assert _allowed(p, [1, 10, 5]) == {2}                                # non-character inside a line
    assert _allowed(p, [1, 10, 3]) == {2}                                # a line of 1
    assert _allowed(p, [1] + _line(5) + _line(7)) == {2}                 # second line of another length
    # the poem starts after the last [BOS]: a decoder prompt continues the first line
    assert _allowed(p, [1] + [10] * 7 + [1] + [11] * 5) == set(CH) | {3, 4}
    assert p.state([1] + _line(5) * 2 + [10, 11]) == PoemState((5, 5), 2, False, False)
    # alternate: line k ends with line_end_ids[k % 2]
    a = PoemFormatProcessor(**TOY, alternate=True)
    assert _allowed(a, [1] + [10] * 5) == set(CH) | {3}
    assert _allowed(a, [1] + _line(5, 3) + [10] * 5) == {4}
    assert _allowed(a, [1] + [10] * 5 + [4]) == {2}                      # wrong mark: broken
    # other formats: 4-character quatrains of exactly 2 lines
    q = PoemFormatProcessor(**TOY, line_lengths=(4,), min_lines=2, max_lines=2)
    assert _allowed(q, [1] + [10] * 4) == {3, 4}
    assert _allowed(q, [1] + _line(4) * 2) == {2}
    assert q.max_new_tokens == 2 * 5 + 1 and PoemFormatProcessor(**TOY).max_new_tokens == 16 * 8 + 1
    # __call__: forbidden logits become -inf, allowed ones are untouched
    scores = torch.randn(2, 24)
    out = p(torch.tensor([[0] * 17 + [1] + [10] * 7, [1] + _line(5) * 4]), scores)   # left padding: ignored
    assert torch.equal(torch.isfinite(out[0]).nonzero().flatten(), torch.tensor([3, 4]))
    assert torch.equal(out[0, [3, 4]], scores[0, [3, 4]])
    assert torch.isfinite(out[1]).sum() == len(CH) + 1


def test_processor_from_tokenizer(tok, poem):
    vocab = tok.get_vocab()
    assert poem.line_end_ids == [vocab["，"], vocab["。"]]
    assert (poem.eos_token_id, poem.bos_token_id) == (tok.eos_token_id, tok.bos_token_id) == (EOS, BOS)
    assert len(poem.char_ids) > 100
    assert all(is_cjk_char(t) for t in tok.convert_ids_to_tokens(poem.char_ids))
    assert vocab["红"] in poem.char_ids and vocab["red"] not in poem.char_ids and vocab["，"] not in poem.char_ids
    assert not set(poem.char_ids) & set(tok.all_special_ids)


# ---------------------------------------------------------------------------------------------------------
# Many poems from an untrained M6: every decoding method, every rule
# ---------------------------------------------------------------------------------------------------------

def _assert_poems(tok, seqs, expect_eos=True):
    """Every row decodes to a valid poem and (for full-length generation) ended with [EOS], then only [PAD]."""
    texts = []
    for row in seqs.tolist():
        row = row[1:] if row and row[0] == BOS else row                     # HF rows start with the prompt
        text = decode(tok, row)
        assert check_poem(text, details=True) == [], text
        if expect_eos:
            assert EOS in row, f"no [EOS]: the poem was cut by max_new_tokens: {text}"
            assert all(t == PAD for t in row[row.index(EOS) + 1:]), row
        texts.append(text)
    return texts


def test_many_poems_from_untrained_m6_obey_every_rule(tok, poem, m6):
    B = 16
    imgs = _images(B, seed=1)
    enc = torch.zeros(B, 0, dtype=torch.long)                              # image in, no prompt (as captioning)
    procs = LogitsProcessorList([poem])
    hf = HFGenerationAdapter(m6)
    n_tok = poem.max_new_tokens
    poems = []
    # transformers sampling: top-k, top-p, both, temperature; different seeds
    for seed, kw in enumerate([dict(top_k=20), dict(top_p=0.9), dict(top_k=50, top_p=0.95, temperature=1.5)]):
        torch.manual_seed(seed)
        out = hf.generate(images=imgs, encoder_ids=enc, max_new_tokens=n_tok, do_sample=True,
                          logits_processor=procs, **kw)
        poems += _assert_poems(tok, out)
    # the model's own loop with the same processor object (top-k / top-p sampling)
    g = m6.generate(imgs, enc, n_tok, do_sample=True, top_k=30, top_p=0.95,
                    generator=torch.Generator().manual_seed(7), logits_processor=poem)
    poems += _assert_poems(tok, g.sequences)
    # a model that wants to stop at once stops at the first legal point: 4 lines
    eager = LogitsProcessorList([_Bias([EOS], 50.0), poem])
    torch.manual_seed(3)
    out = hf.generate(images=imgs[:8], encoder_ids=enc[:8], max_new_tokens=n_tok, do_sample=True, top_k=40,
                      logits_processor=eager)
    short = _assert_poems(tok, out)
    assert {len(poem_lines(t)[0]) for t in short} == {4}
    # a model that loves punctuation ends its first line at 5 characters: 5-character poems
    punct = LogitsProcessorList([_Bias(poem.line_end_ids, 50.0), poem])
    out = hf.generate(images=imgs[:8], encoder_ids=enc[:8], max_new_tokens=n_tok, do_sample=True, top_k=40,
                      logits_processor=punct)
    fives = _assert_poems(tok, out)
    assert {len(poem_lines(t)[0][0]) for t in fives} == {5}
    # a model that never wants to stop is stopped after 16 lines
    never = LogitsProcessorList([_Bias([EOS], -1e4), PoemFormatProcessor(tok, alternate=True)])
    out = hf.generate(images=imgs[:4], encoder_ids=enc[:4], max_new_tokens=n_tok, do_sample=True, top_k=40,
                      logits_processor=never)
    long = _assert_poems(tok, out)
    assert {len(poem_lines(t)[0]) for t in long} == {16}
    assert all([c for c in t if c in "，。"] == ["，", "。"] * 8 for t in long)   # alternate=True marks
    # greedy (both loops) and beam search with several returned sequences
    out = hf.generate(images=imgs[:4], encoder_ids=enc[:4], max_new_tokens=n_tok, logits_processor=procs)
    poems += _assert_poems(tok, out)
    poems += _assert_poems(tok, m6.generate(imgs[:4], enc[:4], n_tok, logits_processor=poem).sequences)
    out = hf.generate(images=imgs[:2], encoder_ids=enc[:2], max_new_tokens=n_tok, num_beams=3,
                      num_return_sequences=3, logits_processor=procs)
    poems += _assert_poems(tok, out)
    poems += short + fives + long
    assert len(poems) == 3 * 16 + 16 + 8 + 8 + 4 + 4 + 4 + 2 * 3     # 98 poems
    counts = {len(poem_lines(t)[0]) for t in poems}
    assert min(counts) == 4 and max(counts) == 16 and all(c % 2 == 0 for c in counts)
    assert {len(poem_lines(t)[0][0]) for t in poems} == {5, 7}


def test_poem_with_text_prompt_and_decoder_prompt(tok, poem, m6):
    """Title in the encoder (M6 Figure 11 style) and a decoder prompt that starts the first line."""
    hf = HFGenerationAdapter(m6)
    title = torch.tensor([tok("红色的圆", add_special_tokens=False)["input_ids"]] * 2)
    start = torch.tensor([[BOS] + tok("红圆", add_special_tokens=False)["input_ids"]] * 2)
    torch.manual_seed(0)
    out = hf.generate(start, encoder_ids=title, max_new_tokens=poem.max_new_tokens, do_sample=True, top_k=20,
                      logits_processor=LogitsProcessorList([poem]))
    texts = _assert_poems(tok, out)
    assert all(t.startswith("红圆") for t in texts)


# ---------------------------------------------------------------------------------------------------------
# transformers generate() == M6Model.generate
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["image+text", "image", "text"])
def test_hf_greedy_equals_m6_greedy(m6_untied, m6, prefix):
    imgs = None if prefix == "text" else _images(3)
    enc = None if prefix == "image" else ENC
    for model in (m6_untied, m6):
        hf = HFGenerationAdapter(model)
        ref = model.generate(imgs, enc, 24).sequences                          # (3, T), no [BOS]
        for cache in (True, False):
            out = hf.generate(images=imgs, encoder_ids=enc, max_new_tokens=24, use_cache=cache)
            assert out[:, 0].tolist() == [BOS] * 3
            assert torch.equal(out[:, 1:], ref), (prefix, cache)
    varied = m6_untied.generate(imgs, enc, 24).sequences
    assert len(set(varied.flatten().tolist())) > 10 and (varied[0] != varied[1]).sum() > 5   # prefix matters


def test_hf_equals_m6_with_poem_constraint_and_eos(tok, poem, m6_untied):
    hf = HFGenerationAdapter(m6_untied)
    imgs = _images(3, seed=4)
    ref = m6_untied.generate(imgs, ENC, poem.max_new_tokens, logits_processor=poem).sequences
    out = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=poem.max_new_tokens,
                      logits_processor=LogitsProcessorList([poem]))
    assert torch.equal(out[:, 1:1 + ref.shape[1]], ref)
    assert (out[:, 1 + ref.shape[1]:] == PAD).all()
    _assert_poems(tok, out)


def test_stops_at_eos_and_stopping_criteria(m6_untied):
    hf = HFGenerationAdapter(m6_untied)
    imgs = _images(3)
    # row 1 must end at its 4th token: [EOS] there, [PAD] after; the others go on
    out = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=12,
                      logits_processor=LogitsProcessorList([_ForceEosAt(1, 3)]))
    assert out.shape == (3, 13)
    assert out[1, 4] == EOS and (out[1, 5:] == PAD).all()
    assert EOS not in out[0].tolist() and EOS not in out[2].tolist()
    assert torch.equal(out[[0, 2]], hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=12)[[0, 2]])

    # when every row has ended, generation stops before max_new_tokens
    class AllEos(LogitsProcessor):
        def __call__(self, ids, scores):
            return scores.masked_fill(torch.arange(scores.shape[1]) != EOS, float("-inf")) if ids.shape[1] >= 3 \
                else scores

    out = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=12, logits_processor=LogitsProcessorList([AllEos()]))
    assert out.shape == (3, 4) and (out[:, 3] == EOS).all()

    # a custom stopping criterion (stop once 5 tokens follow the prompt)
    class FiveNew(StoppingCriteria):
        def __call__(self, ids, scores, **kw):
            return torch.full((ids.shape[0],), ids.shape[1] >= 6, dtype=torch.bool)

    out = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=12,
                      stopping_criteria=StoppingCriteriaList([FiveNew()]))
    assert out.shape == (3, 6)


def _teacher_forced_logprob(hf, seq, images, encoder_ids):
    """Sum of log p(token) over the new tokens of each row (up to and including [EOS])."""
    logits = hf(input_ids=seq[:, :-1], images=images, encoder_ids=encoder_ids, use_cache=False).logits
    lp = logits.float().log_softmax(-1).gather(-1, seq[:, 1:, None])[..., 0]       # (B, T)
    keep = torch.ones_like(lp, dtype=torch.bool)
    for b, row in enumerate(seq[:, 1:].tolist()):
        if EOS in row:
            keep[b, row.index(EOS) + 1:] = False
    return (lp * keep).sum(1)


def test_beam_search(m6_untied):
    hf = HFGenerationAdapter(m6_untied)
    imgs = _images(3, seed=2)
    greedy = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=10)
    # num_beams=1 is greedy
    assert torch.equal(hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=10, num_beams=1), greedy)
    # wider beams find sequences at least as likely as greedy's (length_penalty=0: plain sum of log-probs).
    # Not a theorem of beam search, but true for these inputs, by a margin.
    g_score = _teacher_forced_logprob(hf, greedy, imgs, ENC)
    for beams in (2, 4):
        out = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=10, num_beams=beams, length_penalty=0.0,
                          return_dict_in_generate=True, output_scores=True)
        b_score = _teacher_forced_logprob(hf, out.sequences, imgs, ENC)
        assert torch.allclose(b_score, out.sequences_scores, atol=1e-3)       # HF's score is that sum
        assert (b_score >= g_score - 1e-4).all(), (beams, b_score, g_score)
    assert (b_score > g_score + 1e-3).any(), "beam search should beat greedy somewhere"
    # cache and no cache give the same beams; each row's beams see that row's prefix (model kwargs expanded
    # with repeat_interleave like input_ids): batch of 3 == three batches of 1
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    out = hf.generate(images=imgs, encoder_ids=ENC, **kw)
    assert out.shape[0] == 6
    assert torch.equal(out, hf.generate(images=imgs, encoder_ids=ENC, use_cache=False, **kw))
    for b in range(3):
        one = hf.generate(images=imgs[b:b + 1], encoder_ids=ENC[b:b + 1], **kw)
        assert torch.equal(out[2 * b:2 * b + 2, :one.shape[1]], one)


def test_sampling_respects_top_k_top_p_and_the_poem_sets(tok, poem, m6_untied):
    """Every sampled token is allowed by the poem constraint at its step and lies within top-k / the top-p
    nucleus of the constrained distribution (recomputed from the raw logits)."""
    hf = HFGenerationAdapter(m6_untied)
    imgs = _images(6, seed=5)
    enc = torch.zeros(6, 0, dtype=torch.long)
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.8)):
        torch.manual_seed(11)
        out = hf.generate(images=imgs, encoder_ids=enc, max_new_tokens=40, do_sample=True,
                          logits_processor=LogitsProcessorList([poem]), return_dict_in_generate=True,
                          output_logits=True, num_return_sequences=2, **kw)
        seq = out.sequences                                                      # (12, 41)
        for t, raw in enumerate(out.logits):                                     # raw (12, V) at step t
            prefix, chosen = seq[:, :t + 1], seq[:, t + 1]
            masked = poem(prefix, raw.float())
            live = torch.isfinite(masked).any(-1) & (prefix != EOS).all(-1)      # rows still writing
            assert poem.allowed(prefix, raw.shape[-1])[live].gather(1, chosen[live, None]).all()
            probs = masked.softmax(-1)
            p_chosen = probs.gather(1, chosen[:, None])[:, 0]
            if "top_k" in kw:   # at most k-1 tokens are strictly more likely than the chosen one
                assert ((probs > p_chosen[:, None]).sum(-1)[live] < kw["top_k"]).all()
            if "top_p" in kw:   # the tokens strictly more likely than the chosen one hold < top_p
                assert ((probs * (probs > p_chosen[:, None])).sum(-1)[live] < kw["top_p"] + 1e-5).all()
        for row in seq.tolist():                                               # legal prefixes of poems
            assert not poem.state(row).broken


def test_model_without_cached_step_uses_the_no_cache_path(m6_untied):
    """Any model whose forward(images, encoder_ids, decoder_input_ids) returns .logits works, without a cache."""

    class Plain(torch.nn.Module):                     # not an M6Model: no cached step registered
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, images=None, encoder_ids=None, decoder_input_ids=None):
            return self.inner(images, encoder_ids, decoder_input_ids)

    hf = HFGenerationAdapter(Plain(m6_untied))
    assert hf.generation_config.use_cache is False
    imgs = _images(3)
    out = hf.generate(images=imgs, encoder_ids=ENC, max_new_tokens=10, num_beams=2)
    assert torch.equal(out, HFGenerationAdapter(m6_untied).generate(images=imgs, encoder_ids=ENC, max_new_tokens=10,
                                                                     num_beams=2))
    with pytest.raises(ValueError, match="no cached step registered"):
        hf.generate(images=imgs, max_new_tokens=3, use_cache=True)


def test_adapter_wraps_without_touching_weights(m6_untied):
    before = {k: v.clone() for k, v in m6_untied.state_dict().items()}
    m6_untied.train()
    hf = HFGenerationAdapter(m6_untied)
    assert hf.model is m6_untied and hf.generation_config.use_cache
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (BOS, EOS, PAD)
    hf.generate(images=_images(1), max_new_tokens=3)
    assert m6_untied.training, "generate restores the caller's train/eval mode"
    m6_untied.eval()
    after = m6_untied.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_generation_speed_runs(m6):
    rows = generation_speed(m6, images=_images(2), max_new_tokens=4, repeats=1)
    assert [r.name for r in rows] == ["M6Model.generate, KV cache", "M6Model.generate, no cache",
                                      "HF generate, KV cache", "HF generate, no cache"]
    assert all(r.new_tokens == 8 and r.tokens_per_s > 0 for r in rows)


# ---------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------

def test_bad_arguments(tok, m6):
    hf = HFGenerationAdapter(m6)
    imgs = _images(2)
    with pytest.raises(ValueError, match="images and/or encoder_ids"):
        hf.generate(max_new_tokens=3)
    with pytest.raises(ValueError, match=r"start with \[BOS\]"):
        hf.generate(torch.tensor([[7, 8], [7, 8]]), images=imgs, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"\(B, t >= 1\)"):
        hf.generate(torch.tensor([BOS, 8]), images=imgs, max_new_tokens=3)
    with pytest.raises(ValueError, match="may not contain padding"):
        hf.generate(torch.tensor([[BOS, 8], [BOS, 9]]), images=imgs, attention_mask=torch.tensor([[1, 1], [0, 1]]),
                    max_new_tokens=3)
    with pytest.raises(ValueError, match="batch size 3 but input_ids has 2"):
        hf.generate(torch.tensor([[BOS], [BOS]]), images=_images(3), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens=300 does not fit"):
        hf.generate(images=imgs, max_new_tokens=300)
    with pytest.raises(ValueError, match="imags"):                                # typos: transformers' check
        hf.generate(images=imgs, imags=imgs, max_new_tokens=3)

    class NoIds:
        vocab_size = 10

    with pytest.raises(ValueError, match="lacks"):
        HFGenerationAdapter(type("Bare", (torch.nn.Module,), {"config": NoIds()})())

    # PoemFormatProcessor
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PoemFormatProcessor()
    with pytest.raises(ValueError, match="no token for the line-end punctuation"):
        PoemFormatProcessor(tok, line_ends=("，", "¶"))
    with pytest.raises(ValueError, match="max_lines=15 is odd"):
        PoemFormatProcessor(tok, max_lines=15)
    with pytest.raises(ValueError, match="min_lines <= max_lines"):
        PoemFormatProcessor(tok, min_lines=18)
    with pytest.raises(ValueError, match="line_lengths must be positive"):
        PoemFormatProcessor(tok, line_lengths=(0, 5))
    with pytest.raises(ValueError, match="two roles"):
        PoemFormatProcessor(**{**TOY, "line_end_ids": [3, 10]})
    with pytest.raises(ValueError, match="no character tokens"):
        PoemFormatProcessor(tok, is_char=lambda t: False)
    p = PoemFormatProcessor(tok)
    with pytest.raises(ValueError, match="does not belong to this model"):
        p(torch.tensor([[BOS]]), torch.zeros(1, 100))
    with pytest.raises(ValueError, match=r"suppress_tokens"):        # [EOS] forced, but banned by another processor
        p(torch.tensor([[BOS] + [tok.convert_tokens_to_ids("红")] * 7]),
          torch.zeros(1, 512).index_fill(1, torch.tensor(p.line_end_ids), float("-inf")))
    with pytest.raises(ValueError, match="suppress_tokens"):          # the same inside transformers' generate
        hf.generate(encoder_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=p.max_new_tokens,
                    suppress_tokens=[EOS], do_sample=True, logits_processor=LogitsProcessorList([p]))
    with pytest.raises(ValueError, match=r"input_ids \(B, t\) and scores \(B, V\)"):
        p(torch.tensor([[BOS]]), torch.zeros(2, 512))
