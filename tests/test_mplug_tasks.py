"""mPLUG downstream tasks on tiny models (shapes and behaviour, not accuracy targets): VQA by open-vocabulary
generation (answer, confidence, alternatives, heat maps, the app entry), captioning (beam = greedy at one beam,
language forcing, SCST rewards), retrieval (ITC top-k reranked by ITM), grounding (coordinate tokens, a memorised box
beats the centre baseline), SNLI-VE / NLVR2 heads, and zero-shot clips (mmkit/data/clips.py + frame concatenation)."""
from __future__ import annotations

import re

import pytest
import torch

import mmkit.hub as hub
import mmkit.zoo
from mmkit.data.clips import (CLIP_QTYPES, DIRECTIONS, ClipDataset, clip_caption, clip_questions, render_clip,
                              sample_clip)
from mmkit.data.datasets import EntailmentDataset, GroundingDataset, PairDataset
from mmkit.data.scenes import SceneBank
from mmkit.data.text import answer_vocab, captions
from mmkit.data.world import POSITIONS
from mmkit.evaluation.grounding import centre_boxes, grounding_accuracy
from mmkit.evaluation.vqa import VQAAnswer
from mmkit.mplug.model import MPLUG, MPLUGConfig, MPLUGForClassification
from mmkit.mplug.tasks import captioning as C
from mmkit.mplug.tasks import classify as K
from mmkit.mplug.tasks import grounding as G
from mmkit.mplug.tasks import retrieval as R
from mmkit.mplug.tasks import video as Vd
from mmkit.mplug.tasks import vqa as Q
from mmkit.registry import vqa_entries
from mmkit.train import CELL_NAMER, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
S = 16
MICRO = dict(vocab_size=512, d_model=32, n_heads=4, d_ff=64, vision_width=32, vision_heads=4, vision_d_ff=64,
             vision_layers=1, text_layers=1, fusion_layers=2, stride=1, decoder_layers=1, image_size=S, patch_size=4,
             queue_size=8, embed_dim=16, max_text_len=64)
CJK = re.compile(r"[\u4e00-\u9fff]")


def micro(seed: int = 0, **kw) -> MPLUG:
    torch.manual_seed(seed)
    return MPLUG(MPLUGConfig(**{**MICRO, **kw})).eval()


@pytest.fixture(scope="module")
def bank():
    return SceneBank.build("test", 8, image_size=S)


def fit(model, loss_fn, steps: int, lr: float = 3e-3):
    """A few plain AdamW steps (memorisation checks)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --- VQA (§5.2.1) --------------------------------------------------------------------------------------------------
def test_vqa_answers_are_generated_freely_with_confidence_and_alternatives(bank, tok):
    """Taught to answer "red circle" (two world words, but not one of the world's answers), the decoder writes it:
    nothing restricts generation to the answer list, which only ranks the alternatives afterwards."""
    m = micro()
    batch = {"images": bank.images(range(8)), "questions": ["what colour is the circle?"] * 8,
             "answers": ["red circle"] * 8}
    fit(m, lambda mm: Q.vqa_loss(mm, batch, tok), 40)
    a = Q.answer(m, bank.image(0), "What COLOR is the circle")
    assert isinstance(a, VQAAnswer) and a.answer == "red circle" and not a.in_vocabulary
    assert a.question == "what colour is the circle?" and a.lang == "en"
    own = Q.score_candidates(m, bank.images([0]), [a.question], [["red circle"]], tok)[0]
    assert a.confidence == pytest.approx(float(own.exp()), rel=1e-5) and a.confidence > 0.2
    probs = [p for _, p in a.alternatives]
    assert len(a.alternatives) == 5 and probs == sorted(probs, reverse=True)
    assert {x for x, _ in a.alternatives} <= set(answer_vocab("en")) and sum(probs) + a.confidence <= 1 + 1e-5
    assert Q.answer_batch(m, bank.images(range(2)), ["where is the circle?"] * 2, tok, num_beams=2) == ["red circle"] * 2
    zh = Q.answer(m, bank.image(1), "圆形是什么颜色的")
    assert zh.lang == "zh" and all(CJK.search(x) or x.isdigit() for x, _ in zh.alternatives)
    with pytest.raises(ValueError, match="question is empty"):
        Q.answer(m, bank.image(0), "  ")


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_vqa_heatmap_is_an_image_sized_map_in_0_1(bank, tok, method):
    heat = Q.answer_heatmap(micro(), bank.image(0), "what colour is the circle?", "red", tok, method=method)
    assert heat.shape == (S, S) and float(heat.min()) >= 0 and float(heat.max()) == pytest.approx(1.0)


def test_cells_front_end_replaces_only_the_image_front_end_and_its_namer_trains_alone(bank, tok):
    """vision_stem="cells" (the world VQA model, issue 14): [CLS] + one code token per 3x3 cell; with_config from a
    conv-stem model copies everything but the image front end; stage 0 trains only the namer, the VQA fine-tune keeps
    it fixed; the Grad-CAM heat map is read on the 3x3 cell tokens."""
    conv = micro(vision_stem="conv", vision_stem_channels=(8, 16))           # 16 px, P = 4: two stride-2 stages
    m = conv.with_config(vision_stem="cells", momentum_encoders=False)
    assert m.config.grid_size == 3 and m.num_image_tokens == 10
    assert m.embed_image(bank.images([0, 1])).shape == (2, 10, 32)
    old, new = conv.state_dict(), m.state_dict()
    fresh = {k for k in new if not (k in old and torch.equal(old[k], new[k]))}
    assert fresh and all(k.startswith(("vision.embeddings.patch.", "vision.embeddings.pos_embed.")) for k in fresh)
    with pytest.raises(ValueError, match="reads patches"):
        Q.namer_prefixes(conv)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    run = Q.train_cell_namer(m, bank, TrainConfig(**dict(CELL_NAMER, steps=3, warmup_steps=1, batch_size=8)),
                             aug_fraction=0.0, test_bank=bank)
    moved = {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert moved and all(k.startswith(Q.namer_prefixes(m)) for k in moved), moved
    assert set(run.eval) == {"colour", "shape", "size", "empty"} and run.eval_augmented == {}
    assert all(p.requires_grad for p in m.parameters())                     # restored afterwards
    namer = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(Q.namer_prefixes(m))}
    cfg = Q.VQAConfig(n_scenes=8, image_size=S, vision_lr_scale=0.5)
    Q.finetune_vqa(m.train(), cfg, TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, mixed_precision="no",
                                                 progress_bar=False), n_eval=0, tokenizer=tok, bank=bank)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in namer.items())
    heat = Q.answer_heatmap(m.eval(), bank.image(0), "what colour is the circle?", "red", tok)
    assert heat.shape == (S, S) and float(heat.max()) == pytest.approx(1.0)


def test_every_downstream_fine_tune_keeps_a_cells_models_namer_fixed(bank, tok):
    """Captioning (CE and SCST), grounding and the SNLI-VE / NLVR2 classifiers started from a cells model (as
    mplug-tiny-vqa) train everything but the namer of stage 0, which stays bit-identical; the flags come back."""
    cells = micro(vision_stem="conv", vision_stem_channels=(8, 16)).with_config(vision_stem="cells",
                                                                                 momentum_encoders=False)
    quick = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, mixed_precision="no", progress_bar=False)
    grounding_tok, first = G.coordinate_tokenizer(S + 1)

    def check(model, fine_tune):
        prefixes = Q.namer_prefixes(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fine_tune(model.train())
        now = model.state_dict()
        moved = {k for k in before if not torch.equal(before[k], now[k])}
        assert moved and not any(k.startswith(prefixes) for k in moved), moved
        assert all(p.requires_grad for p in model.parameters())

    check(cells, lambda m: C.finetune_captioning(m, bank, quick, quick, C.SCSTConfig(n_samples=2, baseline="mean",
                                                                                      max_new_tokens=6), tokenizer=tok))
    check(cells, lambda m: G.finetune_grounding(m, grounding_tok, first, S + 1, quick, n_train=4))
    for labels, images, data in ((3, 1, EntailmentDataset), (2, 2, PairDataset)):
        clf = MPLUGForClassification.from_pretrained_mplug(cells, labels, images)
        check(clf, lambda m: K.finetune_classifier(m, data("train", 4, image_size=S), quick, tok))


def test_relation_questions_are_read_in_one_direction_per_axis():
    assert Q.read_question("Is the red circle right of the blue square") == "is the blue square left of the red circle?"
    assert Q.read_question("what colour is the circle?") == "what colour is the circle?"


def test_vqa_evaluation_and_the_app_entry(bank, tok):
    ev = Q.evaluate_vqa(micro(), "test", n=3, tokenizer=tok)
    assert 0 <= ev.accuracy <= 1 and ev.n_questions == len(ev.records) > 3
    entry = next(e for e in vqa_entries() if e.checkpoint == "mplug-tiny-vqa")
    assert entry.answer is Q.answer and entry.heatmap is Q.answer_heatmap
    if hub.find_checkpoint("mplug-tiny-vqa") is None:                     # listed only once it exists
        assert entry not in mmkit.zoo.vqa_models()


# --- captioning (§5.2.2) -------------------------------------------------------------------------------------------
def test_captions_beam_search_language_forcing_and_scores(bank, tok):
    m = micro()
    imgs = bank.images(range(4))
    greedy = C.decode_captions(m, imgs, tok, "greedy", max_new_tokens=8)
    one_beam = C.decode_captions(m, imgs, tok, "beam", num_beams=1, max_new_tokens=8)
    assert greedy == one_beam                                     # transformers at 1 beam = the model's own loop
    beams = C.decode_captions(m, imgs, tok, "beam", num_beams=3, max_new_tokens=8, langs=["en", "zh", "en", "zh"])
    assert len(beams) == 4 and all(CJK.match(c) for c in beams[1::2]) and not any(CJK.match(c) for c in beams[::2])
    ev = C.evaluate_captioning(m, "test", n=4, tokenizer=tok, num_beams=2, max_new_tokens=8)
    assert ev.scores.n == 4 and 0 <= ev.scores.bleu4 <= 1 and ev.langs == ["en", "zh", "en", "zh"]


def test_caption_fine_tuning_memorises_a_caption(bank, tok):
    m = micro()
    batch = {"images": bank.images(range(4)), "captions": [captions(bank.scenes[0], "en")[0]] * 4}
    before = float(C.caption_loss(m, batch, tok)[0].detach())
    fit(m, lambda mm: C.caption_loss(mm, batch, tok), 80)
    assert float(C.caption_loss(m, batch, tok)[0].detach()) < 0.1 * before
    assert C.decode_captions(m, bank.images([0]), tok, "greedy")[0] == batch["captions"][0]


def test_scst_rewards_and_loss(bank, tok):
    s0, s1, s2 = bank.scenes[:3]
    ref = captions(s0, "en")[0]
    r = C.cider_rewards([ref, ref, ""], [s0, s1, s2], ["en"] * 3)      # scene 0's caption for scenes 0, 1; nothing
    assert r[0] > max(r[1], r[2]) and r[2] == 0                  # the scene's own caption is rewarded most
    m = micro().train()
    batch = {"images": bank.images(range(3)), "scenes": bank.scenes[:3], "langs": ["en", "zh", "en"]}
    cfg = C.SCSTConfig(n_samples=2, max_new_tokens=8)
    loss, metrics = C.scst_loss(m, batch, cfg, tok, generator=torch.Generator().manual_seed(0))
    again, _ = C.scst_loss(m, batch, cfg, tok, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(float(again.detach()))
    assert metrics["advantage"] == pytest.approx(metrics["reward"] - metrics["baseline"], abs=1e-6)
    loss.backward()
    assert m.decoder.head.dense.weight.grad is not None or metrics["advantage"] == 0
    # Luo 2020's baseline: each sample against the mean of its image's other samples, so the advantages of one image
    # sum to zero: (r1 - r2) + (r2 - r1) = 0 for two samples
    mean = C.SCSTConfig(n_samples=2, baseline="mean", max_new_tokens=8)
    _, mm = C.scst_loss(m, batch, mean, tok, generator=torch.Generator().manual_seed(0))
    assert mm["advantage"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="n_samples >= 2"):
        C.SCSTConfig(baseline="mean")
    with pytest.raises(ValueError, match="'greedy' or 'mean'"):
        C.SCSTConfig(baseline="best")


def test_sampled_captions_keep_one_language(bank, tok):
    """one_language: the first token in the row's language and no token of the other language after it (a sample
    at temperature 1 from an untrained model otherwise mixes them)."""
    from mmkit.generation import language_token_mask, one_language
    m = micro(3)
    langs = ["en", "zh"] * 4
    ids = torch.full((8, 1), tok.cls_token_id)
    out = m.generate(bank.images([0, 1] * 4), ids, 12, do_sample=True, temperature=1.5,
                     generator=torch.Generator().manual_seed(0),
                     logits_processor=one_language(tok, langs, m.config.vocab_size)).sequences
    en, zh = (language_token_mask(tok, lg, m.config.vocab_size) for lg in ("en", "zh"))
    for row, lang in zip(out.tolist(), langs):
        own, other = (en, zh) if lang == "en" else (zh, en)
        assert own[row[0]] and not any(other[t] for t in row), (lang, tok.convert_ids_to_tokens(row))


# --- retrieval (§5.2.3) --------------------------------------------------------------------------------------------
def test_retrieval_reranks_the_top_k_and_keeps_the_rest_in_itc_order(bank, tok):
    m = micro()
    from mmkit.mplug.tasks.inputs import encoder_inputs
    ids, mask = encoder_inputs(tok, [captions(s, "en")[0] for s in bank.scenes], 64)
    s = R.retrieval_scores(m, bank.images(range(8)), ids, mask, k=3)
    assert s.itc.shape == s.i2t.shape == s.t2i.shape == (8, 8)
    scored = s.i2t > -R.RANK_GAP / 2
    assert bool((scored.sum(1) == 3).all()) and bool((s.t2i > -R.RANK_GAP / 2).sum(0).eq(3).all())
    for i in range(8):                     # the candidates are the ITC top 3; the others keep the ITC order below
        assert set(scored[i].nonzero().flatten().tolist()) == set(s.itc[i].topk(3).indices.tolist())
        rest = ~scored[i]
        torch.testing.assert_close(s.i2t[i][rest] + R.RANK_GAP, s.itc[i][rest], atol=1e-3, rtol=0)
    ev = R.evaluate_retrieval(m, "test", n=8, k=3, tokenizer=tok)
    assert ev.reranked.i2t[10] == 1.0 and 0 <= ev.reranked.mean <= 1 and ev.itc.i2t[1] == pytest.approx(
        R.recall_at_k(s.itc).i2t[1])


def test_reranked_recall_by_hand():
    itc = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.3], [0.5, 0.4, 0.3]])
    i2t = torch.tensor([[-1.0, 2.0, -R.RANK_GAP], [-R.RANK_GAP, 3.0, 1.0], [0.0, 5.0, -R.RANK_GAP]])
    t2i = i2t.clone()
    r = R.reranked_recall(R.RetrievalScores(itc, i2t, t2i), ks=(1, 2))
    # image 0 ranks text 1 above its own (found at 2), image 1 finds its text first, image 2's text is no candidate
    assert r.i2t == pytest.approx({1: 1 / 3, 2: 2 / 3})
    # every text has one image scored above its own: texts 0 and 1 by ITM, text 2 (no candidate) by image 1
    assert r.t2i == pytest.approx({1: 0.0, 2: 1.0})


# --- grounding (§5.2.4) --------------------------------------------------------------------------------------------
def test_coordinate_tokens_round_trip_and_batch_layout():
    tok, first = G.coordinate_tokenizer(S + 1)
    assert first == 384 and tok.convert_ids_to_tokens(first + 5) == "<loc_5>"
    boxes = torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.1, 0.2, 0.33, 0.9]])
    bins = G.boxes_to_bins(boxes, S + 1)
    assert bins[0].tolist() == [0, 4, 8, 16]
    assert (G.bins_to_boxes(bins, S + 1) - boxes).abs().max() <= 0.5 / S + 1e-6
    ds = GroundingDataset("train", 3, image_size=S)
    b = G.grounding_batch([ds[i] for i in range(3)], tok, first, S + 1)
    assert b["decoder_input_ids"].shape == (3, 5) and bool((b["decoder_input_ids"][:, 0] == tok.bos_token_id).all())
    assert torch.equal(b["labels"][:, :4] - first, G.boxes_to_bins(b["boxes"], S + 1))
    assert bool((b["labels"][:, 4] == tok.eos_token_id).all())
    with pytest.raises(ValueError, match="vocab_size >= 401"):
        G.check_vocabulary(micro(vocab_size=390), first, S + 1)


def test_grounding_memorises_boxes_and_beats_the_centre_baseline():
    tok, first = G.coordinate_tokenizer(S + 1)
    ds = GroundingDataset("train", 6, image_size=S)
    items = [ds[i] for i in range(6)]
    b = G.grounding_batch(items, tok, first, S + 1)
    m = fit(micro(), lambda mm: G.grounding_loss(mm, b), 150)
    pred = G.predict_boxes(m, b["images"], [it["expression"] for it in items], tok, first, S + 1)
    assert bool(((pred * S).round() == pred * S).all())                   # only coordinate tokens were written
    acc, base = grounding_accuracy(pred, b["boxes"]), grounding_accuracy(centre_boxes(b["boxes"]), b["boxes"])
    assert acc == 1.0 and base < 0.5, (acc, base)
    ev = G.evaluate_grounding(micro(), tok, first, S + 1, "test", n=5)
    assert ev.boxes.shape == (5, 4) and ev.baseline == grounding_accuracy(centre_boxes(ev.gold), ev.gold)


# --- SNLI-VE and NLVR2 (§5.2.5) ------------------------------------------------------------------------------------
def test_snli_ve_and_nlvr2_heads_learn_a_small_set(tok):
    collate = K.classification_collate(tok)
    ve = MPLUGForClassification.from_pretrained_mplug(micro(), num_labels=3)
    batch = collate([EntailmentDataset("train", 6, image_size=S)[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, S, S)
    fit(ve, lambda mm: K.classification_loss(mm, batch), 80)
    assert torch.equal(K.predict_labels(ve, batch), batch["label"])
    nlvr = MPLUGForClassification.from_pretrained_mplug(micro(), num_labels=2, num_images=2)
    pairs = collate([PairDataset("train", 6, image_size=S)[i] for i in range(6)])
    assert pairs["images"].shape == (6, 2, 3, S, S)
    fit(nlvr, lambda mm: K.classification_loss(mm, pairs), 80)
    assert torch.equal(K.predict_labels(nlvr, pairs), pairs["label"])
    assert nlvr.image_slots.abs().sum() > 0                             # the slot embeddings learned something
    from mmkit.evaluation.vqa import LabelPrior
    ev = K.evaluate_classifier(ve, EntailmentDataset("test", 9, image_size=S), tok,
                               prior=LabelPrior.of_dataset(EntailmentDataset("train", 30, image_size=S)))
    assert 0 <= ev.blind <= 1 and set(ev.blind_per_kind) == set(ev.per_kind)
    assert ev.n == 9 and 0 <= ev.accuracy <= 1 and ev.majority >= 1 / 3 and set(ev.per_kind) <= {
        "exists", "material", "product", "size", "weight", "count", "colour", "shape", "position", "relation"} | set(
        ev.per_kind)


def test_labels_read_by_the_decoder_are_the_label_words_log_likelihoods(tok):
    """read_with="answer_words": logit_k = log P(word_k [EOS] | [v; l]) from the kept decoder, equal to scoring each
    word as a VQA answer (Q.score_candidates); it learns a small set; bad settings are refused."""
    from mmkit.mplug.model import MPLUGClassifierConfig, SNLI_VE_WORDS
    from mmkit.tokenizer import word_ids
    base = micro(4)
    ids = word_ids(tok, SNLI_VE_WORDS)
    ve = MPLUGForClassification.from_pretrained_mplug(base, 3, read_with="answer_words", label_ids=ids).eval()
    assert ve.classifier is None and ve.decoder is not None and ve.config.label_ids == ids
    assert torch.equal(ve.decoder.state_dict()["blocks.0.self_attn.q_proj.weight"],
                       base.decoder.state_dict()["blocks.0.self_attn.q_proj.weight"])          # the decoder copied
    items = [EntailmentDataset("train", 4, image_size=S)[i] for i in range(4)]
    batch = K.classification_collate(tok)(items)
    with torch.no_grad():
        logits = ve.classify(batch["image"], batch["input_ids"], batch["attention_mask"])
    ref = Q.score_candidates(base, batch["image"], [x["hypothesis"] for x in items], [SNLI_VE_WORDS] * 4, tok)
    torch.testing.assert_close(logits, torch.stack(ref), atol=1e-5, rtol=1e-5)
    assert bool((logits < 0).all())                                                  # log-probabilities
    fit(ve, lambda mm: K.classification_loss(mm, batch), 300, lr=1e-3)
    assert torch.equal(K.predict_labels(ve, batch), batch["label"])
    for bad, match in ((dict(read_with="answer_words", label_ids=ids[:2]), "one non-empty token-id sequence"),
                       (dict(read_with="answer_words", label_ids=ids, decoder_layers=0), "keep decoder_layers >= 1"),
                       (dict(read_with="answer_words", label_ids=ids, num_images=2), "reads one image"),
                       (dict(read_with="decoder_state", label_ids=ids), "only with read_with='answer_words'"),
                       (dict(read_with="pooled"), "must be 'cls', 'answer_words' or 'decoder_state'")):
        with pytest.raises(ValueError, match=match):
            MPLUGClassifierConfig(**{**MICRO, "num_labels": 3, **bad})
    with pytest.raises(ValueError, match="cannot spell"):
        word_ids(tok, ("yes", "不知道"))


def test_nlvr2_reads_the_decoder_state_of_one_pass_per_image(tok):
    """read_with="decoder_state": the statement fused with each image alone, the decoder's [BOS] state of each pass
    concatenated, an MLP: equal to composing the pieces by hand; left and right are not interchangeable; it learns a
    small set."""
    base = micro(5)
    nlvr = MPLUGForClassification.from_pretrained_mplug(base, 2, 2, read_with="decoder_state").eval()
    assert nlvr.image_slots is None and nlvr.classifier.fc1.in_features == 2 * MICRO["d_model"]
    pairs = K.classification_collate(tok)([PairDataset("train", 6, image_size=S)[i] for i in range(6)])
    imgs, ids, mask = pairs["images"], pairs["input_ids"], pairs["attention_mask"]
    with torch.no_grad():
        logits = nlvr.classify(imgs, ids, mask)
        bos = torch.full((6, 1), base.config.bos_token_id)
        by_hand = []
        for j in range(2):
            ctx = base.context(imgs[:, j], ids, mask)                                # the copied weights: same pass
            by_hand.append(base.decoder(bos, ctx.states, ctx.mask, return_hidden=True)[:, 0])
        torch.testing.assert_close(logits, nlvr.classifier(torch.cat(by_hand, -1)), atol=1e-5, rtol=1e-5)
        assert (nlvr.classify(imgs.flip(1), ids, mask) - logits).abs().max() > 1e-6
    fit(nlvr, lambda mm: K.classification_loss(mm, pairs), 150, lr=1e-3)
    assert torch.equal(K.predict_labels(nlvr, pairs), pairs["label"])


def test_finetune_classifier_keeps_the_frozen_prefixes_bit_identical_and_restores_the_flags():
    """The NLVR2 recipe trains only the fusion network and the head (frozen=("vision.", "text.", "decoder.")): those
    weights must not move, the others must, and every requires_grad flag is as before afterwards."""
    from mmkit.train import TrainConfig
    nlvr = MPLUGForClassification.from_pretrained_mplug(micro(6), 2, 2, read_with="decoder_state").train()
    nlvr.text.requires_grad_(True)
    nlvr.itm_head.requires_grad_(False)                                  # a flag set before: kept
    before = {k: v.clone() for k, v in nlvr.state_dict().items()}
    frozen = ("vision.", "text.", "decoder.")
    K.finetune_classifier(nlvr, PairDataset("train", 16, image_size=S), TrainConfig(
        steps=3, batch_size=8, lr=1e-2, warmup_steps=1, mixed_precision="no", progress_bar=False, log_every=0),
        frozen=frozen)
    after = nlvr.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("fusion.", "classifier.")) for k in moved), sorted(moved)[:5]
    assert any(k.startswith("fusion.") for k in moved) and any(k.startswith("classifier.") for k in moved)
    assert all(p.requires_grad for p in nlvr.text.parameters())
    assert not any(p.requires_grad for p in nlvr.itm_head.parameters())
    with pytest.raises(ValueError, match=r"no parameter name starts with \[.visoin\..\]"):
        K.finetune_classifier(nlvr, PairDataset("train", 8, image_size=S), TrainConfig(steps=1, batch_size=8,
                              mixed_precision="no", progress_bar=False, log_every=0), frozen=("visoin.",))


# --- clips and zero-shot video (§5.4.2) ----------------------------------------------------------------------------
def test_clips_move_one_object_across_the_grid():
    for seed in range(12):
        clip = sample_clip(seed, n_frames=5, max_static=2)
        assert clip == sample_clip(seed, n_frames=5, max_static=2)             # deterministic
        movers = [f.objects[0] for f in clip.frames]
        assert movers[0].position == clip.start and movers[-1].position == clip.end
        dr, dc = DIRECTIONS[clip.direction]
        xs, ys = [o.cx for o in movers], [o.cy for o in movers]
        track = xs if dc else ys
        assert track == sorted(track, reverse=(dc or dr) < 0) and abs(track[-1] - track[0]) == pytest.approx(2 / 3)
        assert len({round(v, 9) for v in (ys if dc else xs)}) == 1            # straight along its row / column
        r0, c0 = divmod(POSITIONS.index(clip.start), 3)
        on_path = {p for p in POSITIONS if (divmod(POSITIONS.index(p), 3)[0] == r0 if dc else
                                            divmod(POSITIONS.index(p), 3)[1] == c0)}
        assert all(o.position not in on_path for o in clip.static)
    clip = sample_clip(3, n_frames=4)
    assert render_clip(clip, 16).shape == (4, 3, 16, 16)
    en, zh = clip_caption(clip, "en"), clip_caption(clip, "zh")
    assert f"from the {clip.start} to the {clip.end}" in en and "移动到" in zh
    qs = clip_questions(clip, "en")
    assert [q.qtype for q in qs] == list(CLIP_QTYPES) and qs[0].answer == clip.mover.colour
    assert qs[2].answer == clip.direction and qs[3].answer == clip.start and qs[4].answer == clip.end
    ds = ClipDataset("test", 6, n_frames=3, image_size=16, lang="both")
    items = [ds[i] for i in range(6)]
    assert items[0]["frames"].shape == (3, 3, 16, 16) and [it["qtype"] for it in items[:5]] == list(CLIP_QTYPES)
    assert items[1]["lang"] == "zh" and CJK.search(items[1]["question"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_clip(0, n_frames=1)


def test_video_concatenates_frame_features_into_one_sequence(tok):
    m = micro()
    ds = ClipDataset("test", 4, n_frames=3, image_size=S)
    frames = torch.stack([ds[i]["frames"] for i in range(4)])                # (4, 3, 3, S, S)
    v = Vd.clip_embeds(m, frames)
    assert v.shape == (4, 3 * m.num_image_tokens, 32)
    torch.testing.assert_close(v[:, m.num_image_tokens:2 * m.num_image_tokens], m.embed_image(frames[:, 1]),
                               atol=1e-6, rtol=0)
    caps = Vd.caption_clips(m, frames, tok, max_new_tokens=5)
    answers = Vd.answer_clips(m, frames, [ds[i]["question"] for i in range(4)], tok)
    assert len(caps) == len(answers) == 4 and all(isinstance(x, str) for x in caps + answers)
    ev = Vd.evaluate_zero_shot_video(m, "test", n=5, n_frames=2, tokenizer=tok, k=3)
    assert ev.qa.n_questions == 5 and set(ev.qa.per_type) == set(CLIP_QTYPES) and 0 <= ev.retrieval.mean <= 1


def test_answer_refuses_a_model_without_a_decoder_a_string_tokenizer_and_wordless_questions(bank):
    """Issue 17 sweep: answer(vqgan, ...) / answer(..., tokenizer='world') failed deep inside (AttributeError,
    "'str' object is not callable"); a question of control characters reached the model."""
    m = micro()
    with pytest.raises(ValueError, match=r"needs an mPLUG model with its text decoder.*got MPLUGForClassification"):
        Q.answer(MPLUGForClassification.__new__(MPLUGForClassification), bank.image(0), "what colour is the circle?")
    with pytest.raises(ValueError, match="needs an mPLUG model.*got Linear"):
        Q.answer(torch.nn.Linear(2, 2), bank.image(0), "what colour is the circle?")
    with pytest.raises(ValueError, match="tokenizer must be a tokenizer object"):
        Q.answer(m, bank.image(0), "what colour is the circle?", tokenizer="world")
    with pytest.raises(ValueError, match="no words"):
        Q.answer(m, bank.image(0), "\x00\x07?!")
