"""Shapes World datasets and the collate function: shapes, dtypes, determinism, splits, labels, padding."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mmkit.data import text_corpus
from mmkit.data.datasets import (
    DATASETS,
    Collator,
    EntailmentDataset,
    GroundingDataset,
    ImageOnlyDataset,
    ImageTextDataset,
    PairDataset,
    TextOnlyDataset,
    VQADataset,
    make_collate,
    make_dataset,
)
from mmkit.data.text import (
    CAPTION_STYLES,
    ENTAILMENT_LABELS,
    QTYPES,
    answer_vocab,
    caption,
    pair_statements,
    product_description,
    questions,
)
from mmkit.data.world import SPLITS, object_box, sample_scene, scene_to_tensor, split_of
from mmkit.tokenizer import train_tokenizer

S = 32  # image side used throughout (rendering 32 px is ~4x cheaper than 64 px)


@pytest.fixture(scope="module")
def tok():
    """A tiny WordPiece tokenizer trained on a few hundred world texts (about a second)."""
    return train_tokenizer(list(text_corpus(30, langs=("en", "zh"))), vocab_size=400)


# --- what every item and batch looks like -------------------------------------------------------------
TEXT_OF = {"image_text": "text", "text": "text", "vqa": "question", "grounding": "expression",
           "pair": "statement", "entailment": "hypothesis", "image": None}
EXPECTED = {  # key -> (dtype, shape) for tensors of one item; str / int for the rest
    "image_text": {"image": (torch.float32, (3, S, S)), "text": str, "lang": str, "style": str, "seed": int, "index": int},
    "text": {"text": str, "lang": str, "source": str, "seed": int, "index": int},
    "image": {"image": (torch.float32, (3, S, S)), "seed": int, "index": int},
    "vqa": {"image": (torch.float32, (3, S, S)), "question": str, "answer": str, "answer_index": int,
            "qtype": str, "qtype_index": int, "lang": str, "seed": int, "index": int},
    "grounding": {"image": (torch.float32, (3, S, S)), "expression": str, "box": (torch.float32, (4,)),
                  "box_pixels": (torch.float32, (4,)), "object_index": int, "lang": str, "seed": int, "index": int},
    "pair": {"images": (torch.float32, (2, 3, S, S)), "statement": str, "label": int, "kind": str, "lang": str,
             "seeds": (torch.int64, (2,)), "index": int},
    "entailment": {"image": (torch.float32, (3, S, S)), "hypothesis": str, "label": int, "label_name": str,
                   "kind": str, "lang": str, "seed": int, "index": int},
}


def _ds(task, split="val", n=6, **kw):
    return make_dataset(task, split, n, **({"image_size": S} | kw))


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_item_keys_shapes_and_dtypes(task):
    ds = _ds(task)
    assert len(ds) == 6
    for i in (0, 5, -1):
        item = ds[i]
        assert set(item) == set(EXPECTED[task]), task
        for key, want in EXPECTED[task].items():
            v = item[key]
            if isinstance(want, tuple):
                assert isinstance(v, torch.Tensor) and v.dtype == want[0] and tuple(v.shape) == want[1], (task, key)
            else:
                assert type(v) is want, (task, key, type(v))
        for key in ("image", "images"):
            if key in item:
                assert 0.0 <= item[key].min() and item[key].max() <= 1.0
        if TEXT_OF[task]:
            assert item[TEXT_OF[task]].strip()


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_collated_batches(task, tok):
    ds = _ds(task, n=5)
    loader = DataLoader(ds, batch_size=4, collate_fn=make_collate(tok, max_length=24))
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [4, 1]
    b = batches[0]
    assert b["index"].tolist() == [0, 1, 2, 3] and b["index"].dtype == torch.int64
    if task == "pair":
        assert b["images"].shape == (4, 2, 3, S, S) and b["seeds"].shape == (4, 2)
    elif "image" in EXPECTED[task]:
        assert b["image"].shape == (4, 3, S, S) and b["image"].dtype == torch.float32
    for key in ("label", "answer_index", "object_index", "qtype_index"):
        if key in b:
            assert b[key].dtype == torch.int64 and b[key].shape == (4,)
    if task == "grounding":
        assert b["box"].shape == b["box_pixels"].shape == (4, 4)
    if TEXT_OF[task] is None:
        assert "input_ids" not in b
    else:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool and ids.shape == mask.shape
        assert ids.shape[0] == 4 and ids.shape[1] <= 24
        assert isinstance(b[TEXT_OF[task]], list) and len(b[TEXT_OF[task]]) == 4
        assert (ids[:, 0] == tok.cls_token_id).all()
        assert (ids[~mask] == tok.pad_token_id).all()


# --- determinism and splits ----------------------------------------------------------------------------
def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_items_are_deterministic_and_cache_changes_nothing(task):
    kw = {"lang": "both"} if task != "image" else {}
    a, b = _ds(task, **kw), _ds(task, cache_images=True, **kw)
    for i in (3, 0, 3):          # out of order, and twice (second time from the cache)
        _equal(a[i], b[i])
    c = _ds(task, start=2, n=4, **kw)   # item i of a dataset starting at 2 == item i + 2
    _equal({k: v for k, v in c[1].items() if k != "index"}, {k: v for k, v in a[3].items() if k != "index"})


def test_image_is_the_rendered_scene_and_text_seed_changes_only_text():
    ds = ImageTextDataset("test", 20, image_size=S, return_scene=True)
    item = ds[4]
    assert item["scene"] == sample_scene(item["seed"])
    assert torch.equal(item["image"], scene_to_tensor(item["scene"], S))
    assert item["text"] == caption(item["scene"], item["style"], "en")
    other = ImageTextDataset("test", 20, image_size=S, text_seed=1)
    assert all(torch.equal(ds[i]["image"], other[i]["image"]) for i in range(3))
    assert [ds[i]["text"] for i in range(20)] != [other[i]["text"] for i in range(20)]


def test_splits_are_disjoint_and_seeds_stay_inside_their_split():
    seen = {}
    for split in SPLITS:
        seeds = set()
        for task in ("image_text", "vqa", "pair"):
            ds = make_dataset(task, split, 30, image_size=S)
            for i in range(len(ds)):
                seeds.update(ds.seeds(i))
        seeds.update(PairDataset(split, 3, start=100).seeds(2))
        assert {split_of(s) for s in seeds} == {split}
        seen[split] = seeds
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    # items read their seeds from the split ranges: the first val item is the first val seed
    assert ImageOnlyDataset("val", 1, image_size=S)[0]["seed"] == SPLITS["val"][0]
    assert PairDataset("test", 2, image_size=S)[1]["seeds"].tolist() == [SPLITS["test"][0] + 2, SPLITS["test"][0] + 3]
    # two datasets of one split with non-overlapping (start, n) share no scene
    a, b = ImageTextDataset("train", 10), ImageTextDataset("train", 10, start=10)
    assert not {a.seed(i) for i in range(10)} & {b.seed(i) for i in range(10)}


# --- task-specific content -----------------------------------------------------------------------------
def test_image_text_languages_and_styles():
    ds = ImageTextDataset("val", 40, image_size=S, lang="both", styles=("full", "shape_count"), return_scene=True)
    items = [ds[i] for i in range(40)]
    assert {it["lang"] for it in items} == {"en", "zh"}
    assert {it["style"] for it in items} == {"full", "shape_count"}
    for it in items:
        assert it["text"] == caption(it["scene"], it["style"], it["lang"])
    zh = ImageTextDataset("val", 5, image_size=S, lang="zh", styles="full")
    assert all(zh[i]["lang"] == "zh" and zh[i]["style"] == "full" for i in range(5))
    assert ImageTextDataset("val", 3, image_size=S).styles == CAPTION_STYLES


def test_text_only_sources():
    ds = TextOnlyDataset("train", 30, sources=("description", "caption"), return_scene=True)
    items = [ds[i] for i in range(30)]
    assert {it["source"] for it in items} == {"description", "caption"}
    for it in items:
        if it["source"] == "description":
            assert it["text"] == product_description(it["scene"], "en")
        else:
            assert it["text"] in [caption(it["scene"], s, "en") for s in CAPTION_STYLES]


@pytest.mark.parametrize("lang", ["en", "zh", "both"])
def test_vqa_answers_in_vocabulary_and_index_consistent(lang):
    ds = VQADataset("val", 120, image_size=S, lang=lang, return_scene=True)
    assert ds.answers == answer_vocab(lang) and ds.num_answers == len(set(ds.answers))
    qtypes = set()
    for i in range(len(ds)):
        it = ds[i]
        assert it["answer"] in answer_vocab(it["lang"])
        assert ds.answers[it["answer_index"]] == it["answer"]
        assert QTYPES[it["qtype_index"]] == it["qtype"]
        assert (it["question"], it["answer"], it["qtype"], it["lang"]) in questions(it["scene"], it["lang"])
        qtypes.add(it["qtype"])
    assert qtypes == set(QTYPES)   # every question type occurs in 120 items


def test_vqa_qtype_filter():
    ds = VQADataset("train", 30, image_size=S, qtypes=("colour", "count"))
    assert {ds[i]["qtype"] for i in range(30)} == {"colour", "count"}
    rel = VQADataset("train", 10, image_size=S, qtypes="relation", return_scene=True)
    assert rel.min_objects == 2 and all(ds_item["qtype"] == "relation" and len(ds_item["scene"]) >= 2
                                        for ds_item in (rel[i] for i in range(10)))
    with pytest.raises(ValueError, match="max_objects >= 2"):
        VQADataset("train", 10, qtypes=["relation"], max_objects=1)


@pytest.mark.parametrize("size", [32, 64])
def test_grounding_boxes_normalised_and_match_pixels(size):
    ds = GroundingDataset("val", 25, image_size=size, return_scene=True)
    for i in range(len(ds)):
        it = ds[i]
        box, px = it["box"], it["box_pixels"]
        assert (box >= 0).all() and (box <= 1).all() and box[0] < box[2] and box[1] < box[3]
        assert torch.allclose(px, box * size, atol=1e-4)
        obj = it["scene"].objects[it["object_index"]]
        assert torch.allclose(px, torch.tensor(tuple(object_box(obj, size))), atol=1e-4)
        # the expression names the object (its shape word, or "object" when the shape is left out) ...
        assert obj.shape in it["expression"] or "object" in it["expression"]
        # ... and the box is where the picture shows it: the centre pixel has the object's colour
        cx, cy = int((px[0] + px[2]) / 2), int((px[1] + px[3]) / 2)
        pixel = it["image"][:, cy, cx] * 255
        assert (pixel - torch.tensor(obj.rgb, dtype=torch.float32)).abs().max() < 40, (i, pixel, obj.rgb)


def test_pair_labels_balanced_and_true():
    ds = PairDataset("train", 200, image_size=8, return_scene=True)   # 8 px: labels are what is tested
    labels = []
    for i in range(len(ds)):
        it = ds[i]
        left, right = it["scenes"]
        assert it["seeds"].tolist() == [left.seed, right.seed] and left.seed + 1 == right.seed
        truth = {(s.statement, s.label) for s in pair_statements(left, right, it["lang"])}
        assert (it["statement"], bool(it["label"])) in truth
        labels.append(it["label"])
    assert 0.4 <= sum(labels) / len(labels) <= 0.6, sum(labels)


def test_entailment_labels_balanced_and_consistent():
    ds = EntailmentDataset("train", 240, image_size=8)
    counts = {name: 0 for name in ENTAILMENT_LABELS}
    for i in range(len(ds)):
        it = ds[i]
        assert ENTAILMENT_LABELS[it["label"]] == it["label_name"]
        counts[it["label_name"]] += 1
    assert all(0.22 <= c / len(ds) <= 0.45 for c in counts.values()), counts


def test_precompute_fills_the_cache():
    ds = ImageOnlyDataset("val", 7, image_size=S)
    assert ds.cache_bytes == 0
    ds.precompute()
    assert ds.cache_images and ds.cache_bytes == 7 * 3 * S * S
    pairs = PairDataset("val", 3, image_size=S).precompute()
    assert pairs.cache_bytes == 6 * 3 * S * S
    ds.clear_cache()
    assert ds.cache_bytes == 0


# --- collate: hand-checked padding and masks ----------------------------------------------------------
@pytest.fixture(scope="module")
def hand_tok():
    """A WordPiece tokenizer with a hand-written vocabulary, so expected ids can be written down."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "small", "red",
                                         "circle", "yes", "no"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def test_collate_padding_and_masks_hand_checked(hand_tok):
    items = [{"text": "red circle", "answer": "yes", "label": 1, "box": torch.tensor([0.0, 0.1, 0.5, 0.6])},
             {"text": "a small red circle", "answer": "no", "label": 0, "box": torch.tensor([0.2, 0.2, 0.4, 0.4])}]
    b = make_collate(hand_tok, max_length=16, extra_text_keys=("answer",))(items)
    assert b["input_ids"].tolist() == [[2, 7, 8, 3, 0, 0], [2, 5, 6, 7, 8, 3]]
    assert b["attention_mask"].tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert b["answer_input_ids"].tolist() == [[2, 9, 3], [2, 10, 3]]
    assert b["answer_attention_mask"].all()
    assert b["text"] == ["red circle", "a small red circle"] and b["answer"] == ["yes", "no"]
    assert b["label"].tolist() == [1, 0] and b["label"].dtype == torch.int64
    assert torch.equal(b["box"], torch.stack([items[0]["box"], items[1]["box"]]))
    # truncation keeps [SEP]; fixed-length padding; Hugging Face style 0/1 masks
    b = Collator(hand_tok, max_length=4)(items)
    assert b["input_ids"].tolist() == [[2, 7, 8, 3], [2, 5, 6, 3]]
    b = Collator(hand_tok, max_length=8, pad_to_max_length=True, mask_dtype=torch.long)(items)
    assert b["input_ids"].tolist() == [[2, 7, 8, 3, 0, 0, 0, 0], [2, 5, 6, 7, 8, 3, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert b["attention_mask"].dtype == torch.long


def test_collate_passes_token_type_ids_and_bools():
    class FakeTok:  # returns token_type_ids, like a BERT tokenizer does for some configs
        def __call__(self, texts, **kw):
            n = len(texts)
            return {"input_ids": torch.ones(n, 3, dtype=torch.int32), "attention_mask": torch.ones(n, 3, dtype=torch.int32),
                    "token_type_ids": torch.zeros(n, 3, dtype=torch.int32)}

    b = make_collate(FakeTok(), max_length=8)([{"question": "q?", "flag": True}, {"question": "r?", "flag": False}])
    assert b["token_type_ids"].shape == (2, 3) and b["token_type_ids"].dtype == torch.int64
    assert b["flag"].dtype == torch.bool and b["flag"].tolist() == [True, False]


def test_collate_with_trained_tokenizer_masks_count_tokens(tok):
    ds = VQADataset("val", 6, image_size=S, lang="both")
    items = [ds[i] for i in range(6)]
    b = make_collate(tok, max_length=64)(items)
    for row, it in enumerate(items):
        n = len(tok(it["question"])["input_ids"])
        assert b["attention_mask"][row].sum().item() == n
        assert b["input_ids"][row, :n].tolist() == tok(it["question"])["input_ids"]
        assert (b["input_ids"][row, n:] == tok.pad_token_id).all()


# --- errors name the problem and the fix --------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: ImageTextDataset("dev", 10), r"unknown split 'dev'.*'train', 'val', 'test'"),
    (lambda: ImageTextDataset("val", 10, lang="fr"), r"unknown language 'fr'.*'both'"),
    (lambda: VQADataset("val", 10, lang="de"), r"unknown language 'de'"),
    (lambda: ImageTextDataset("val", 100_001), r"split 'val' holds 100000 items; start=0, n=100001 does not fit"),
    (lambda: GroundingDataset("test", 10, start=99_995), r"start \+ n <= 100000"),
    (lambda: PairDataset("val", 50_001), r"holds 50000 items \(2 scenes per item\)"),
    (lambda: ImageTextDataset("val", -1), r"does not fit"),
    (lambda: ImageTextDataset("val", 10, styles=("fancy",)), r"unknown caption style 'fancy'"),
    (lambda: VQADataset("val", 10, qtypes=("why",)), r"unknown question type 'why'"),
    (lambda: TextOnlyDataset("val", 10, sources=("poems",)), r"unknown text source 'poems'"),
    (lambda: ImageOnlyDataset("val", 10, image_size=4), r"image_size must be an int >= 8"),
    (lambda: ImageOnlyDataset("val", 10, max_objects=12), r"max_objects <= 9"),
    (lambda: make_dataset("captioning", "val", 10), r"unknown dataset task 'captioning'"),
    (lambda: Collator(None).tokenize(["x"]), r"has no tokenizer"),
    (lambda: Collator(None)([{"image": torch.zeros(3, 8, 8)}, {"image": torch.zeros(3, 16, 16)}]), r"cannot stack 'image'"),
])
def test_bad_options_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_index_out_of_range():
    ds = ImageOnlyDataset("val", 3, image_size=S)
    with pytest.raises(IndexError, match="index 3 out of range for 3 items"):
        ds[3]
    assert len(list(ds)) == 3     # plain iteration stops at the IndexError
    assert ds[-1]["index"] == 2


def test_vqa_sampler_focus_asks_one_type_more_often():
    import torch

    from mmkit.data.scenes import SceneBank
    from mmkit.data.vqa import VQASampler

    bank = SceneBank.build("train", 200, image_size=32)
    g = lambda: torch.Generator().manual_seed(0)                          # noqa: E731
    plain = VQASampler(bank).batch_fn(g(), 64)
    assert VQASampler(bank, focus_qtype="relation", focus_share=0.0).batch_fn(g(), 64)["questions"] == plain["questions"]
    only = VQASampler(bank, focus_qtype="relation", focus_share=1.0).batch_fn(g(), 64)
    assert set(only["qtypes"]) == {"relation"} and len(only["questions"]) == 64
    half = VQASampler(bank, focus_qtype="relation", focus_share=0.5).batch_fn(g(), 400)["qtypes"]
    usual = VQASampler(bank).batch_fn(g(), 400)["qtypes"]
    # half of the draws ask a relation (one-object scenes have none and are drawn again): ~0.4 vs ~0.1 usually
    assert half.count("relation") / 400 > usual.count("relation") / 400 + 0.2, (half.count("relation"),
                                                                               usual.count("relation"))
    with pytest.raises(ValueError, match="focus_qtype"):
        VQASampler(bank, focus_qtype="relations")
    with pytest.raises(ValueError, match="focus_share"):
        VQASampler(bank, focus_qtype="relation", focus_share=1.5)


def test_cell_data_mixes_drawn_views_by_share_and_keeps_each_label_with_its_scene():
    """mmkit.data.scenes.CellData: aug_fraction of a batch comes from the bank's drawn views (the last rows), and every
    row's labels are object_labels of the scene it shows."""
    from mmkit.data.scenes import CellData, SceneBank
    from mmkit.data.world import object_labels
    bank = SceneBank.build("train", 12, image_size=16, n_augmented=6)
    data = CellData(bank, aug_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    batch = data.batch_fn(g, 8)
    g = torch.Generator().manual_seed(0)                          # the same draws, by hand
    clean = torch.randint(12, (4,), generator=g).tolist()
    drawn = torch.randint(6, (4,), generator=g).tolist()
    assert torch.equal(batch["images"][:4], bank.images(clean)) and torch.equal(batch["images"][4:], bank.images(drawn, True))
    assert torch.equal(batch["labels"], object_labels([bank.scenes[i] for i in clean + drawn]))
    assert torch.equal(CellData(bank).batch_fn(torch.Generator().manual_seed(0), 4)["images"],
                       bank.images(torch.randint(12, (4,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(ValueError, match="needs augmented views"):
        CellData(SceneBank.build("train", 4, image_size=16), aug_fraction=0.3)
