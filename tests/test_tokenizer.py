"""The kit's WordPiece tokenizer (EN + ZH by character) and loading of local Hugging Face tokenizers."""
from __future__ import annotations

import json

import pytest

from mmkit.data import text_corpus
from mmkit.data.world import sample_scene, split_seeds
from mmkit.data.text import captions, product_description, questions
from mmkit.tokenizer import (SPECIAL_TOKENS, add_coordinate_tokens, add_image_code_tokens, decode, join_text,
                             load_tokenizer, train_tokenizer)
from mmkit import hub



def _val_texts(n=40):
    out = []
    for seed in split_seeds("val", n):
        sc = sample_scene(seed)
        for lang in ("en", "zh"):
            out += captions(sc, lang) + [q.question for q in questions(sc, lang)] + [product_description(sc, lang)]
    return out


def test_special_tokens_have_the_first_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token, tok.cls_token, tok.sep_token, tok.mask_token, tok.bos_token, tok.eos_token) == \
        ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]")


def test_round_trip_on_held_out_world_text_both_languages(tok):
    texts = _val_texts()
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids, f"[UNK] in {t!r}"
        assert decode(tok, ids) == t.lower(), t


def test_chinese_is_split_by_character(tok):
    pieces = tok.tokenize("左上方有一个小的红色圆形")
    assert pieces == list("左上方有一个小的红色圆形")


def test_any_lower_case_english_word_avoids_unk(tok):
    # Words the world never says still split into known WordPiece pieces (the alphabet is seeded, with ##c).
    for word in ("giraffe", "next", "quizzically", "xylophone", "jukebox", "2026"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (word, tok.convert_ids_to_tokens(ids))
        assert decode(tok, ids) == word


def test_pair_encoding_has_segment_ids(tok):
    enc = tok("a red circle", "红色圆形")
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "circle", "[SEP]", "红", "色", "圆", "形", "[SEP]"]
    assert enc["token_type_ids"] == [0] * 5 + [1] * 5


def test_batch_padding_and_attention_mask(tok):
    enc = tok(["a red circle", "a small red circle at the top left"], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[0] == 2
    n_short = len(tok("a red circle")["input_ids"])
    assert enc["attention_mask"][0].tolist() == [1] * n_short + [0] * (enc["input_ids"].shape[1] - n_short)
    assert (enc["input_ids"][0, n_short:] == tok.pad_token_id).all()


def test_save_and_reload_from_a_local_folder(tok, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    text = "a large purple triangle 在右下方"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert len(again) == len(tok)


def test_training_is_deterministic_and_matches_the_shipped_tokenizer(tok):
    # The shipped files were produced by `mmkit train tokenizer-world`; retraining gives the same vocabulary.
    shipped = hub.SHIPPED_DIR / "tokenizer-world" / "tokenizer.json"
    assert shipped.exists(), "the repository ships the kit's tokenizer"
    from mmkit.tokenizer import train_world_tokenizer

    fresh = train_world_tokenizer()
    assert fresh.get_vocab() == tok.get_vocab()
    small_a = train_tokenizer(list(text_corpus(30)), vocab_size=300)
    small_b = train_tokenizer(list(text_corpus(30)), vocab_size=300)
    assert small_a.get_vocab() == small_b.get_vocab()


def test_image_code_and_coordinate_tokens_get_consecutive_ids():
    tok = load_tokenizer("world")   # a fresh instance: adding tokens must not touch the fixture
    n0 = len(tok)
    first_code = add_image_code_tokens(tok, 16)
    first_loc = add_coordinate_tokens(tok, 8)
    assert first_code == n0 and first_loc == n0 + 16 and len(tok) == n0 + 24
    ids = tok("<code_3> <code_15> <loc_7>", add_special_tokens=False)["input_ids"]
    assert ids == [first_code + 3, first_code + 15, first_loc + 7]
    assert add_image_code_tokens(tok, 16) == first_code, "adding the same range again is a no-op"
    with pytest.raises(ValueError, match="already has"):
        add_image_code_tokens(tok, 32)
    with pytest.raises(ValueError, match="positive"):
        add_coordinate_tokens(tok, 0)


def test_a_users_local_bert_tokenizer_folder(tmp_path):
    """A user's bert-base-chinese / bert-base-uncased folder: here a tiny one the test builds and saves."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "红", "色", "圆", "形", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    tok = load_tokenizer(tmp_path / "bert")
    assert tok.convert_ids_to_tokens(tok("a red circles 红色圆形")["input_ids"]) == \
        ["[CLS]", "a", "red", "circle", "##s", "红", "色", "圆", "形", "[SEP]"]
    # BERT has no BOS/EOS; the kit's decoders need them, so they are added as new special tokens.
    assert tok.bos_token == "[BOS]" and tok.eos_token == "[EOS]"
    assert tok.bos_token_id >= len(vocab) and tok.eos_token_id >= len(vocab)


def test_bad_tokenizer_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder.*offline"):
        load_tokenizer(tmp_path / "bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_join_text_removes_only_the_spaces_around_chinese():
    assert join_text("左 上 方 的 圆 形") == "左上方的圆形"
    assert join_text("a red circle 在 左 边") == "a red circle在左边"
    assert join_text("a red circle") == "a red circle"


def test_shipped_tokenizer_recipe_file_says_how_it_was_made():
    info = json.loads((hub.SHIPPED_DIR / "tokenizer-world" / "recipe.json").read_text())
    assert info["kind"] == "tokenizer" and info["command"] == \
        "mmkit train tokenizer-world --out mmkit/checkpoints/tokenizer-world"


def test_invisible_and_control_characters_separate_words(tok):
    """Issue 17: BERT's normaliser deletes \\x00 and zero-width spaces, which merged "red\\x00circle" into one word."""
    want = tok("red circle")["input_ids"]
    for sep in ("\x00", "\u200b", "\u200c", "\ufeff", "\u2028", "\x1b", "\x7f"):
        assert tok(f"red{sep}circle")["input_ids"] == want, repr(sep)
        assert tok.tokenize(f"red{sep}circle") == ["red", "circle"], repr(sep)
    assert tok.tokenize("红色\u200b圆形") == list("红色圆形")
    assert tok("a\tred\ncircle")["input_ids"] == tok("a red circle")["input_ids"]      # ordinary whitespace unchanged


def test_lone_surrogates_do_not_crash(tok):
    """Issue 17: a lone surrogate (e.g. '\\ud800' from a bad decode) raised TypeError inside the Rust tokenizer."""
    assert tok("red \ud800 circle")["input_ids"] == tok("red circle")["input_ids"]
    assert tok(["red\udfffcircle", "a square"])["input_ids"][0] == tok("red circle")["input_ids"]
    assert tok("a red circle", "blue\ud83d")["input_ids"] == tok("a red circle", "blue")["input_ids"]   # pairs too
    from mmkit.tokenizer import pad_texts
    assert pad_texts(tok, ["red\ud800circle"], 8).tolist() == pad_texts(tok, ["red circle"], 8).tolist()


def test_a_saved_kit_tokenizer_keeps_the_separators(tok, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    for again in (load_tokenizer(tmp_path / "t"), __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "t")):
        assert again("red\x00circle")["input_ids"] == tok("red circle")["input_ids"]


def test_bad_ids_lengths_and_tokenizer_arguments_are_named(tok, tmp_path):
    """Issue 17 sweep: decode([10**9]) returned '' silently and decode([-1]) raised a raw OverflowError;
    pad_texts(max_len=0) dropped every token and max_len=-3 cut the last 3; a malformed tokenizer.json gave a raw
    JSONDecodeError without the file name; tokenizer='world' failed as "'str' object is not callable"."""
    import torch

    from mmkit.hub import CheckpointError
    from mmkit.tokenizer import decode_rows, pad_texts, tokenizer_or_world, world_tokenizer

    n = len(tok)
    for ids in ([10 ** 9], [-1], [5, n], ["a"], [1.5]):
        with pytest.raises(ValueError, match=rf"ids must be whole numbers from 0 to {n - 1}"):
            decode(tok, ids)
    assert decode(tok, tok("a red circle", add_special_tokens=False)["input_ids"]) == "a red circle"
    # a model's padded output layer can sample ids past the vocabulary: generated rows read them as [UNK], no error
    red = tok.convert_tokens_to_ids("red")
    assert decode_rows(tok, torch.tensor([[red, n + 3, red, tok.eos_token_id, 7]]), tok.eos_token_id) == ["red red"]
    for max_len in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_len must be a whole number >= 1"):
            pad_texts(tok, ["a red circle"], max_len)
    assert tokenizer_or_world(None) is world_tokenizer() and tokenizer_or_world(tok) is tok
    for bad in ("world", b"x", 5):
        with pytest.raises(ValueError, match="tokenizer must be a tokenizer object"):
            tokenizer_or_world(bad)
    tok.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(CheckpointError, match=r"t/tokenizer.json: this tokenizer file is not valid JSON \(line 1"):
        load_tokenizer(tmp_path / "t")
