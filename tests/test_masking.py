"""mmkit.m6.masking and mmkit.objectives.mlm: hand-written mask matrices, task builders, BERT MLM statistics, prefix-LM splits."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmkit.m6.masking import (IGNORE_INDEX, SpecialIds, collate, image_captioning, language_modeling,
                              multimodal_to_text, prefix_lm_split, replace_spans, span_noise_mask, text_denoising,
                              unified_mask)
from mmkit.objectives.mlm import mlm_mask, word_ids_from_tokens

SP = SpecialIds(pad_id=0, mask_id=4, bos_id=5, eos_id=6)
SPECIALS = list(range(7))  # [PAD] [UNK] [CLS] [SEP] [MASK] [BOS] [EOS], as mmkit.tokenizer.SPECIAL_TOKENS


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def runs(mask):
    """Contiguous True runs of a 1-D bool tensor as (start, length)."""
    out, start = [], None
    for i, m in enumerate(mask.tolist() + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - start))
            start = None
    return out


# ------------------------------------------------------------------------------------------- unified mask (M6 §3.2)
def test_unified_mask_2_visual_3_encoder_3_decoder():
    um = unified_mask(2, 3, 3)
    #            V  V  E  E  E  D  D  D
    expected = B([[1, 1, 1, 1, 1, 0, 0, 0],   # V: bidirectional over V+E, never D
                  [1, 1, 1, 1, 1, 0, 0, 0],
                  [1, 1, 1, 1, 1, 0, 0, 0],   # E
                  [1, 1, 1, 1, 1, 0, 0, 0],
                  [1, 1, 1, 1, 1, 0, 0, 0],
                  [1, 1, 1, 1, 1, 1, 0, 0],   # D: all of V+E, causal over D
                  [1, 1, 1, 1, 1, 1, 1, 0],
                  [1, 1, 1, 1, 1, 1, 1, 1]])
    assert um.mask.dtype == torch.bool and torch.equal(um.mask, expected)
    assert um.segment_ids.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]


def test_language_modelling_mask_is_plain_causal():
    um = unified_mask(0, 0, 4)
    assert torch.equal(um.mask, B([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert um.segment_ids.tolist() == [2, 2, 2, 2]


def test_captioning_mask_no_encoder_text():
    um = unified_mask(2, 0, 2)
    assert torch.equal(um.mask, B([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))


def test_unified_mask_batch_with_padding():
    # lengths (visual, encoder, decoder): (2, 1, 2), (2, 0, 1), (1, 1, 2); aligned widths (2, 1, 2)
    um = unified_mask([2, 2, 1], [1, 0, 1], [2, 1, 2])
    assert um.mask.shape == (3, 5, 5)
    assert um.segment_ids.tolist() == [[0, 0, 1, 2, 2], [0, 0, -1, 2, -1], [0, -1, 1, 2, 2]]
    #                 V  V  E  D  D
    ex0 = B([[1, 1, 1, 0, 0],
             [1, 1, 1, 0, 0],
             [1, 1, 1, 0, 0],
             [1, 1, 1, 1, 0],
             [1, 1, 1, 1, 1]])
    ex1 = B([[1, 1, 0, 0, 0],
             [1, 1, 0, 0, 0],
             [0, 0, 1, 0, 0],    # pad query row: itself only (no NaN); pad column never seen by real rows
             [1, 1, 0, 1, 0],
             [0, 0, 0, 0, 1]])   # pad query row
    ex2 = B([[1, 0, 1, 0, 0],
             [0, 1, 0, 0, 0],    # the padded visual slot
             [1, 0, 1, 0, 0],
             [1, 0, 1, 1, 0],
             [1, 0, 1, 1, 1]])
    assert torch.equal(um.mask, torch.stack([ex0, ex1, ex2]))


def test_unified_mask_ints_broadcast_and_widths():
    um = unified_mask(1, [0, 1], 1, widths=(2, 1, 2))
    assert um.segment_ids.tolist() == [[0, -1, -1, 2, -1], [0, -1, 1, 2, -1]]
    assert unified_mask(1, 1, 1, widths=(1, 2, 1)).mask.shape == (4, 4)  # ints stay unbatched


def test_unified_mask_from_segment_ids_any_layout():
    # packed layout: [v e d d pad]
    um = unified_mask(segment_ids=torch.tensor([0, 1, 2, 2, -1]))
    assert torch.equal(um.mask, B([[1, 1, 0, 0, 0],
                                   [1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 0],
                                   [0, 0, 0, 0, 1]]))
    assert torch.equal(unified_mask(segment_ids=unified_mask(2, 3, 3).segment_ids).mask, unified_mask(2, 3, 3).mask)


def test_unified_mask_errors_name_the_problem():
    with pytest.raises(ValueError, match="width"):
        unified_mask([3], [1], [1], widths=(2, 1, 1))
    with pytest.raises(ValueError, match="entries"):
        unified_mask([1, 2], [1, 2, 3], 1)
    with pytest.raises(ValueError, match="segment ids"):
        unified_mask(segment_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="not both"):
        unified_mask(1, segment_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match=">= 0"):
        unified_mask(-1, 0, 1)


def test_mask_with_sdpa_no_nan_pads_and_future_are_invisible():
    g = gen(1)
    exs = [text_denoising(list(range(10, 22)), special=SP, generator=g), language_modeling([7, 8, 9], special=SP),
           image_captioning([11, 12], special=SP, n_visual=3),
           multimodal_to_text([13, 14, 15, 16, 17, 18, 19], special=SP, n_visual=2, generator=g)]
    b = collate(exs, pad_id=SP.pad_id)
    Bsz, L = b.segment_ids.shape
    q, k, v = (torch.randn(Bsz, 2, L, 8, generator=g) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask[:, None])
    assert torch.isfinite(out).all()
    real = b.segment_ids >= 0
    # changing padding keys/values changes no real position's output
    pad = ~real
    k2, v2 = k.clone(), v.clone()
    k2[pad[:, None].expand_as(k2[..., 0])] = 100.0
    v2[pad[:, None].expand_as(v2[..., 0])] = -100.0
    out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=b.mask[:, None])
    assert torch.allclose(out[real[:, None].expand_as(out[..., 0])], out2[real[:, None].expand_as(out2[..., 0])],
                          atol=1e-5)
    # changing the last decoder position changes nothing before it, nor anything in the encoder block
    v3 = v.clone()
    last = L - 1
    v3[0, :, last] += 1.0                        # example 0 has the longest decoder: `last` is a real position
    out3 = F.scaled_dot_product_attention(q, k, v3, attn_mask=b.mask[:, None])
    assert torch.allclose(out[0, :, :last], out3[0, :, :last], atol=1e-6)
    assert not torch.allclose(out[0, :, last], out3[0, :, last])


# ----------------------------------------------------------------------------------- span noising (M6 §3.3)
def test_span_masking_rate_is_15_percent_on_average():
    g = gen(0)
    masked = total = 0
    for i in range(2000):
        n = 10 + i % 31                           # texts of 10..40 tokens
        m = span_noise_mask(n, generator=g)
        assert abs(int(m.sum()) - 0.15 * n) < 1   # each draw: floor or ceil of 15% (stochastic rounding)
        masked, total = masked + int(m.sum()), total + n
    assert abs(masked / total - 0.15) < 0.005, masked / total   # expected exactly 0.15; sd ~0.0004


def test_span_lengths_are_geometric_with_mean_3_and_spans_never_touch():
    g = gen(0)
    lengths = []
    for _ in range(20):
        m = span_noise_mask(1000, generator=g)
        r = runs(m)
        assert sum(length for _, length in r) == 150
        lengths += [length for _, length in r]
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert abs(lengths.mean().item() - 3.0) < 0.25          # geometric, p = 1/3 (last span per text clipped)
    assert abs((lengths == 1).float().mean().item() - 1 / 3) < 0.05  # P(l=1) = p


def test_short_texts_still_get_one_span_and_one_token_text():
    g = gen(0)
    for n in (1, 2, 3, 5):
        for _ in range(20):
            assert span_noise_mask(n, generator=g).sum() >= 1
    assert span_noise_mask(0, generator=g).shape == (0,)
    m = span_noise_mask(10, generator=g, rate=1.0)           # everything masked: one span
    assert m.all()


def test_replace_spans_hand_case():
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    noise = B([0, 1, 1, 0, 1, 0, 0])
    assert replace_spans(ids, noise, 4).tolist() == [10, 4, 13, 4, 15, 16]
    assert replace_spans(ids, B([1, 1, 1, 1, 1, 1, 1]), 4).tolist() == [4]


@pytest.mark.parametrize("builder", ["text_denoising", "multimodal_to_text"])
def test_denoising_one_mask_per_span_and_whole_text_target(builder):
    g = gen(3)
    for i in range(300):
        text = torch.randint(7, 100, (5 + i % 30,), generator=g)
        if builder == "text_denoising":
            ex = text_denoising(text, special=SP, generator=g)
            assert ex.n_visual == 0
        else:
            ex = multimodal_to_text(text, special=SP, n_visual=4, generator=g)
            assert ex.n_visual == 4
        spans = runs(ex.noise_mask)
        assert len(spans) >= 1
        assert (ex.encoder_ids == SP.mask_id).sum() == len(spans)           # ONE [MASK] per span
        assert len(ex.encoder_ids) == len(text) - int(ex.noise_mask.sum()) + len(spans)
        assert not ((ex.encoder_ids[1:] == SP.mask_id) & (ex.encoder_ids[:-1] == SP.mask_id)).any()
        assert torch.equal(ex.encoder_ids[ex.encoder_ids != SP.mask_id], text[~ex.noise_mask])  # rest kept in order
        assert ex.decoder_input_ids.tolist() == [SP.bos_id] + text.tolist()  # decoder regenerates everything
        assert ex.labels.tolist() == text.tolist() + [SP.eos_id]
        assert (ex.n_encoder, ex.n_decoder) == (len(ex.encoder_ids), len(text) + 1)


def test_denoising_is_deterministic_with_a_seeded_generator():
    text = list(range(10, 50))
    a = [text_denoising(text, special=SP, generator=gen(7)).encoder_ids.tolist() for _ in range(2)]
    assert a[0] == a[1]
    draws = {tuple(text_denoising(text, special=SP, generator=gen(s)).encoder_ids.tolist()) for s in range(10)}
    assert len(draws) > 1


def test_language_modelling_and_captioning_examples():
    lm = language_modeling([7, 8, 9], special=SP)
    assert (lm.task, lm.encoder_ids.tolist(), lm.n_visual, lm.n_encoder) == ("language_modeling", [], 0, 0)
    assert lm.decoder_input_ids.tolist() == [5, 7, 8, 9] and lm.labels.tolist() == [7, 8, 9, 6]
    assert torch.equal(unified_mask(lm.n_visual, lm.n_encoder, lm.n_decoder).mask, torch.ones(4, 4).tril().bool())
    cap = image_captioning(torch.tensor([7, 8]), special=SP, n_visual=2)
    assert (cap.encoder_ids.tolist(), cap.n_visual, cap.n_encoder, cap.n_decoder) == ([], 2, 0, 3)
    assert cap.decoder_input_ids.tolist() == [5, 7, 8] and cap.labels.tolist() == [7, 8, 6]
    assert torch.equal(unified_mask(cap.n_visual, cap.n_encoder, cap.n_decoder).mask,
                       B([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="n_visual"):
        image_captioning([7], special=SP, n_visual=0)
    with pytest.raises(ValueError, match="1-D"):
        language_modeling([[7, 8]], special=SP)


def test_collate_pads_and_builds_the_mask():
    exs = [language_modeling([7, 8], special=SP),
           multimodal_to_text([9, 10, 11], special=SP, n_visual=2, generator=gen(0))._replace(
               encoder_ids=torch.tensor([9, 4]), n_encoder=2)]   # fix the noise for a hand-written case
    b = collate(exs, pad_id=SP.pad_id)
    assert b.encoder_ids.tolist() == [[0, 0], [9, 4]]
    assert b.decoder_input_ids.tolist() == [[5, 7, 8, 0], [5, 9, 10, 11]]
    assert b.labels.tolist() == [[7, 8, 6, IGNORE_INDEX], [9, 10, 11, 6]]
    assert b.segment_ids.tolist() == [[-1, -1, -1, -1, 2, 2, 2, -1], [0, 0, 1, 1, 2, 2, 2, 2]]
    assert (b.n_visual.tolist(), b.n_encoder.tolist(), b.n_decoder.tolist()) == ([0, 2], [0, 2], [3, 4])
    assert b.tasks == ("language_modeling", "multimodal_to_text")
    #                  V  V  E  E  D  D  D  D
    ex0 = B([[1, 0, 0, 0, 0, 0, 0, 0],
             [0, 1, 0, 0, 0, 0, 0, 0],
             [0, 0, 1, 0, 0, 0, 0, 0],
             [0, 0, 0, 1, 0, 0, 0, 0],
             [0, 0, 0, 0, 1, 0, 0, 0],
             [0, 0, 0, 0, 1, 1, 0, 0],
             [0, 0, 0, 0, 1, 1, 1, 0],
             [0, 0, 0, 0, 0, 0, 0, 1]])
    ex1 = B([[1, 1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 1, 1, 0],
             [1, 1, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(b.mask, torch.stack([ex0, ex1]))
    assert collate(exs, pad_id=0, n_visual=5).segment_ids.shape == (2, 5 + 2 + 4)
    with pytest.raises(ValueError, match="n_visual"):
        collate(exs, pad_id=0, n_visual=1)


def test_special_ids_from_tokenizer():
    tok = SimpleNamespace(pad_token_id=0, mask_token_id=4, bos_token_id=5, eos_token_id=6)
    assert SpecialIds.from_tokenizer(tok) == SP
    with pytest.raises(ValueError, match="bos_token"):
        SpecialIds.from_tokenizer(SimpleNamespace(pad_token_id=0, mask_token_id=4, bos_token_id=None,
                                                  eos_token_id=6))


# ------------------------------------------------------------------------------- BERT MLM (VLMo / mPLUG §3.3)
def test_mlm_rate_and_80_10_10_proportions():
    g = gen(0)
    ids = torch.randint(7, 1000, (200, 128), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3                               # [CLS] ... [SEP]
    out = mlm_mask(ids, mask_id=4, vocab_size=1000, special_ids=SPECIALS, generator=g)
    chosen = out.labels != IGNORE_INDEX
    n_cand, n = 200 * 126, int(chosen.sum())
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert (out.input_ids[~chosen] == ids[~chosen]).all()      # nothing else touched
    assert abs(n / n_cand - 0.15) < 0.01                       # 25k tokens: sd 0.0022
    masked = (out.input_ids == 4) & chosen
    kept = (out.input_ids == ids) & chosen
    rand = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.03           # ~3.8k chosen: sd 0.0065
    assert abs(rand.sum().item() / n - 0.1) < 0.025            # sd 0.005
    assert abs(kept.sum().item() / n - 0.1) < 0.025
    assert ((out.input_ids[rand] >= 7) & (out.input_ids[rand] < 1000)).all()   # random ids are never special


def test_mlm_never_touches_specials_or_padding():
    g = gen(1)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0], [2, 13, 3, 0, 0, 0, 0, 0]])
    for _ in range(300):
        out = mlm_mask(ids, mask_id=4, vocab_size=50, special_ids=SPECIALS, generator=g, rate=0.5)
        special = ids < 7
        assert (out.labels[special] == IGNORE_INDEX).all() and torch.equal(out.input_ids[special], ids[special])
        assert ((out.labels != IGNORE_INDEX).sum(1) >= 1).all()  # at_least_one


def test_mlm_whole_word_masking_all_pieces_or_none():
    tokens = ["[CLS]", "a", "sm", "##all", "##er", "red", "cir", "##cle", "[SEP]"]
    assert word_ids_from_tokens(tokens).tolist() == [0, 1, 2, 2, 2, 3, 4, 4, 5]
    ids = torch.tensor([2, 10, 11, 12, 13, 14, 15, 16, 3])
    g = gen(2)
    hit = torch.zeros(len(ids))
    for _ in range(500):
        out = mlm_mask(ids, mask_id=4, vocab_size=100, special_ids=SPECIALS, generator=g, tokens=tokens, rate=0.3)
        chosen = out.labels != IGNORE_INDEX
        assert len({bool(c) for c in chosen[2:5]}) == 1 and chosen[6] == chosen[7]   # whole words
        assert not chosen[0] and not chosen[-1]
        hit += chosen.float()
    assert (hit[1:8] > 0).all()
    # word ids with None for specials (HF's encoding.word_ids() style) give the same choice as the tokens
    wid = [None, 1, 2, 2, 2, 3, 4, 4, None]
    a = mlm_mask(ids, mask_id=4, vocab_size=100, special_ids=SPECIALS, generator=gen(5), word_ids=wid)
    b = mlm_mask(ids, mask_id=4, vocab_size=100, special_ids=SPECIALS, generator=gen(5), tokens=tokens)
    assert torch.equal(a.labels != IGNORE_INDEX, b.labels != IGNORE_INDEX)
    batch = mlm_mask(ids.expand(3, -1), mask_id=4, vocab_size=100, special_ids=SPECIALS, generator=g,
                     tokens=[tokens] * 3)
    assert batch.labels.shape == (3, 9)


def test_mlm_deterministic_and_errors():
    ids = torch.arange(7, 40)
    a = mlm_mask(ids, mask_id=4, vocab_size=50, special_ids=SPECIALS, generator=gen(9))
    b = mlm_mask(ids, mask_id=4, vocab_size=50, special_ids=SPECIALS, generator=gen(9))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="probs"):
        mlm_mask(ids, mask_id=4, vocab_size=50, special_ids=SPECIALS, probs=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="match"):
        mlm_mask(ids, mask_id=4, vocab_size=50, special_ids=SPECIALS, word_ids=[0, 1])


# ------------------------------------------------------------------------------------- prefix LM (mPLUG §3.3)
def test_prefix_lm_fixed_split_hand_case():
    s = prefix_lm_split([10, 11, 12, 13, 14], special=SP, n_visual=1, split=2)
    assert (s.prefix_ids.tolist(), s.suffix_ids.tolist(), s.split) == ([10, 11], [12, 13, 14], 2)
    ex = s.example
    assert ex.task == "prefix_lm" and ex.encoder_ids.tolist() == [10, 11]
    assert ex.decoder_input_ids.tolist() == [5, 12, 13, 14] and ex.labels.tolist() == [12, 13, 14, 6]
    assert (ex.n_visual, ex.n_encoder, ex.n_decoder) == (1, 2, 4)
    #                V  P  P  B  S  S  S
    expected = B([[1, 1, 1, 0, 0, 0, 0],   # image + prefix: bidirectional
                  [1, 1, 1, 0, 0, 0, 0],
                  [1, 1, 1, 0, 0, 0, 0],
                  [1, 1, 1, 1, 0, 0, 0],   # [BOS] + suffix: context + causal
                  [1, 1, 1, 1, 1, 0, 0],
                  [1, 1, 1, 1, 1, 1, 0],
                  [1, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(s.mask.mask, expected)
    assert s.mask.segment_ids.tolist() == [0, 1, 1, 2, 2, 2, 2]


def test_prefix_lm_random_split_boundaries():
    text = list(range(10, 16))                         # n = 6
    g = gen(0)
    seen = set()
    for _ in range(300):
        s = prefix_lm_split(text, special=SP, generator=g)
        assert 1 <= s.split <= 5 and s.prefix_ids.tolist() + s.suffix_ids.tolist() == text
        assert len(s.prefix_ids) == s.split
        seen.add(s.split)
    assert seen == {1, 2, 3, 4, 5}                      # uniform over [min_prefix, n - min_suffix]
    seen = {prefix_lm_split(text, special=SP, generator=g, min_prefix=0, min_suffix=3).split for _ in range(200)}
    assert seen == {0, 1, 2, 3}
    assert prefix_lm_split(text, special=SP, split=0, min_prefix=0).mask.mask.shape == (7, 7)  # pure LM
    assert collate([prefix_lm_split(text, special=SP, generator=g).example,
                    text_denoising(text, special=SP, generator=g)], pad_id=0).mask.shape[0] == 2
    with pytest.raises(ValueError, match="cannot split"):
        prefix_lm_split([10], special=SP)
    with pytest.raises(ValueError, match="outside"):
        prefix_lm_split(text, special=SP, split=6)
