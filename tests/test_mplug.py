"""mPLUG (mmkit/mplug/model.py, convert.py): the fusion layer plans (paper vs official), equality with Hugging Face
BERT / ViT / CLIP modules with copied weights (asymmetric co-attention layer, connected layer, the whole fusion
network, the decoder, the vision towers), import from local HF folders (§5.1), full-size parameter counts against the
official README, cached == uncached == transformers generation, save / load, clear errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mmkit
from mmkit.config import load_config, replace_config
from mmkit.mplug.convert import from_pretrained_hf, load_text, load_vision, mplug_config_from_hf, resize_positions
from mmkit.mplug.model import (MPLUG, OFFICIAL_PARAMS, MPLUGConfig, MPLUGForClassification, fusion_plan)
from mmkit.nn import padding_mask

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")

# A micro mPLUG: every layer kind, 16 px images in 4 px patches (16 patches + [CLS]), width 32.
MICRO = dict(vocab_size=512, d_model=32, n_heads=4, d_ff=64, vision_width=32, vision_heads=4, vision_d_ff=64,
             vision_layers=2, text_layers=2, fusion_layers=4, stride=1, decoder_layers=2, image_size=16, patch_size=4,
             queue_size=8, embed_dim=16, max_text_len=32)


def micro(seed: int = 0, **kw) -> MPLUG:
    torch.manual_seed(seed)
    return MPLUG(MPLUGConfig(**{**MICRO, **kw})).eval()


def perturb(module: nn.Module, seed: int = 1, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its init (LayerNorms start at 1 / 0) so that copies are really checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def text_batch(B: int = 3, L: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 384, (B, L), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 3:] = False
    ids[~mask] = 0
    return ids, mask


def hf_additive(keep: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1 or Lq, Lk) bool -> HF eager's additive mask."""
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


# --- BERT weights into our blocks (test-side copies, independent of mmkit.mplug.convert) ---------------------------
def _copy(dst, src):
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(dst, "bias", None) is not None:
            dst.bias.copy_(src.bias)


def copy_bert_layer(block, hf):
    for ours, theirs in ((block.self_attn.q_proj, hf.attention.self.query), (block.self_attn.k_proj, hf.attention.self.key),
                         (block.self_attn.v_proj, hf.attention.self.value),
                         (block.self_attn.out_proj, hf.attention.output.dense),
                         (block.self_attn_norm, hf.attention.output.LayerNorm), (block.ffn.fc1, hf.intermediate.dense),
                         (block.ffn.fc2, hf.output.dense), (block.ffn_norm, hf.output.LayerNorm)):
        _copy(ours, theirs)
    if block.cross_attn is not None:
        ca = hf.crossattention
        for ours, theirs in ((block.cross_attn.q_proj, ca.self.query), (block.cross_attn.k_proj, ca.self.key),
                             (block.cross_attn.v_proj, ca.self.value), (block.cross_attn.out_proj, ca.output.dense),
                             (block.cross_attn_norm, ca.output.LayerNorm)):
            _copy(ours, theirs)


def bert_config(cross: bool, layers: int = 1, **kw):
    from transformers import BertConfig
    return BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=layers,
                      hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation="eager", is_decoder=cross, add_cross_attention=cross, vocab_size=512,
                      max_position_embeddings=32, **kw)


# --- the fusion plans ------------------------------------------------------------------------------------------
def test_fusion_plans_paper_and_official_layouts():
    A, C = "asym", "connected"
    plan = lambda **kw: fusion_plan(MPLUGConfig(**kw))                                              # noqa: E731
    assert plan(fusion_layers=4, stride=1) == (A, C, A, C)                        # §3.2: N = 2 blocks of S = 1 + 1
    assert plan(fusion_layers=6, stride=2) == (A, A, C, A, A, C)
    # X-PLUG/mPLUG FusionEncoder: layer k is connected iff k != 0 and k % stride_layer == 0
    assert plan(fusion_layers=6, stride=3, skip_layout="official") == (A, A, A, C, A, A)   # config_bert_stride3.json
    assert plan(fusion_layers=6, stride=6, skip_layout="official") == (A,) * 6             # config_bert.json: never
    assert C not in fusion_plan(load_config("mplug-large"))                   # the released large model, as shipped
    assert fusion_plan(load_config("mplug-base")).count(C) == 1
    assert plan(fusion="connected", fusion_layers=3) == (C, C, C)                          # Figure 1a
    assert plan(fusion="co_attention", fusion_layers=2) == ("co", "co")                    # Figure 1b
    assert plan(fusion="asymmetric", fusion_layers=2) == (A, A)                            # ALBEF / BLIP
    with pytest.raises(ValueError, match="multiple of 3"):
        MPLUGConfig(fusion_layers=4, stride=2)


def test_forward_shapes_and_padding_invariance():
    m = micro()
    ids, mask = text_batch()
    images = torch.rand(3, 3, 16, 16)
    dec = torch.randint(7, 384, (3, 5))
    dec[:, 0] = 5
    out = m(images, ids, dec, dec, encoder_mask=mask)
    assert out.logits.shape == (3, 5, 512) and out.context.states.shape == (3, 17 + 7, 32)
    assert out.context.mask.shape == (3, 24) and not bool(out.context.mask[2, 17 + 3:].any())
    assert torch.isfinite(out.loss)
    # a padded row gives what the row gives alone, unpadded
    for b, n in ((1, 5), (2, 3)):
        alone = m(images[b:b + 1], ids[b:b + 1, :n], dec[b:b + 1])
        torch.testing.assert_close(alone.logits, out.logits[b:b + 1], atol=ATOL, rtol=0)
    # tied heads: the LM head is the decoder's word embedding, the MLM head the text encoder's
    assert m.decoder.head.decoder.weight is m.decoder.embeddings.word.weight
    assert m.mlm_head.decoder.weight is m.text.embeddings.word.weight


# --- oracles: Hugging Face layers with copied weights ------------------------------------------------------------
def test_asymmetric_coattention_layer_equals_bert_layer_with_cross_attention():
    """mPLUG §3.2 eq. (1)-(3) is a BERT decoder layer read bidirectionally: SA -> CA(image) -> FFN, post-norm."""
    from transformers.models.bert.modeling_bert import BertLayer
    m = micro()
    ours = m.fusion.layers[0]
    assert m.fusion.plan[0] == "asym"
    hf = perturb(BertLayer(bert_config(cross=True), layer_idx=0))
    copy_bert_layer(ours, hf)
    l, v = torch.randn(3, 7, 32), torch.randn(3, 17, 32)
    _, mask = text_batch()
    with torch.no_grad():
        expected = hf(l, attention_mask=hf_additive(padding_mask(mask)), encoder_hidden_states=v)
        got = ours(l, mask=padding_mask(mask), context=v)
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)


def test_blip_text_layer_is_the_same_computation():
    """BLIP's text layer (mode multimodal) is the same asymmetric co-attention layer."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextLayer
    cfg = BlipTextConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                         hidden_act="gelu")
    hf = perturb(BlipTextLayer(cfg, 0))
    ours = micro().fusion.layers[0]
    copy_bert_layer(ours, hf)
    l, v = torch.randn(2, 6, 32), torch.randn(2, 17, 32)
    with torch.no_grad():
        out = hf(l, encoder_hidden_states=v, mode="multimodal")
        expected = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(ours(l, context=v), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(image_skip_residual=True), dict(fusion="co_attention", fusion_layers=2),
                                dict(fusion_layers=6, stride=3, skip_layout="official", image_skip_residual=True)],
                         ids=["paper", "official-residual", "co-attention", "official-base-layout"])
def test_fusion_network_equals_a_composition_of_bert_layers(kw):
    """The whole network, layer kinds in plan order: asym = BertLayer(+CA) on the text, the image unchanged;
    connected = plain BertLayer on [v; l], split (eq. (4)-(5)); co = two BertLayers(+CA) reading the old (v, l)."""
    from transformers.models.bert.modeling_bert import BertLayer
    m = micro(**kw)
    ref_layers = []
    for k, (kind, layer) in enumerate(zip(m.fusion.plan, m.fusion.layers)):
        if kind == "co":
            pair = [perturb(BertLayer(bert_config(cross=True), 0), seed=10 * k + s) for s in (1, 2)]
            copy_bert_layer(layer.text, pair[0])
            copy_bert_layer(layer.image, pair[1])
            ref_layers.append(pair)
        else:
            hf = perturb(BertLayer(bert_config(cross=kind == "asym"), 0), seed=10 * k)
            copy_bert_layer(layer, hf)
            ref_layers.append(hf)
    v, l = torch.randn(3, 17, 32), torch.randn(3, 7, 32)
    _, mask = text_batch()
    t_add = hf_additive(padding_mask(mask))
    both_add = hf_additive(padding_mask(torch.cat([torch.ones(3, 17, dtype=torch.bool), mask], 1)))
    with torch.no_grad():
        rv, rl = v, l
        for kind, hf in zip(m.fusion.plan, ref_layers):
            if kind == "asym":
                rl = hf(rl, attention_mask=t_add, encoder_hidden_states=rv)
            elif kind == "connected":
                out = hf(torch.cat([rv, rl], 1), attention_mask=both_add)
                rv = rv + out[:, :17] if m.config.image_skip_residual else out[:, :17]
                rl = out[:, 17:]
            else:
                rv, rl = (hf[1](rv, encoder_hidden_states=rl, encoder_attention_mask=t_add),
                          hf[0](rl, attention_mask=t_add, encoder_hidden_states=rv))
        got = m.fuse(v, l, mask)
    torch.testing.assert_close(got.image, rv, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.text[mask], rl[mask], atol=ATOL, rtol=0)


def test_decoder_equals_bert_lm_head_model():
    """The decoder (§3.1; BertLMHeadModel in the official code): causal SA, CA to the context, FFN; tied LM head."""
    from transformers import BertLMHeadModel
    m = micro()
    hf = perturb(BertLMHeadModel(bert_config(cross=True, layers=4)))    # 4: the micro model needs 4 fusion layers
    sd = hf.state_dict()
    load_text(m, hf)                           # embeddings, SA + FFN of layers 0..1, cls.predictions
    for i, block in enumerate(m.decoder.blocks):
        copy_bert_layer(block, hf.bert.encoder.layer[i])          # + the cross-attention BERT has no counterpart for
    assert torch.equal(m.decoder.embeddings.word.weight, sd["bert.embeddings.word_embeddings.weight"])
    ctx, ids = torch.randn(2, 20, 32), torch.randint(7, 384, (2, 6))
    cmask = torch.ones(2, 20, dtype=torch.bool)
    cmask[1, 15:] = False
    hf.bert.encoder.layer = hf.bert.encoder.layer[:2]                  # the two layers the decoder took
    with torch.no_grad():
        expected = hf(ids, encoder_hidden_states=ctx, encoder_attention_mask=cmask.long()).logits
        got = m.decoder(ids, ctx, cmask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# --- vision towers and weight import from local HF folders (mPLUG §5.1) -------------------------------------------
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny CLIP vision tower, ViT and BERT-for-MLM built from configs and save_pretrained (nothing downloads)."""
    from transformers import BertForMaskedLM, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vis = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
               patch_size=4)
    perturb(CLIPVisionModel(CLIPVisionConfig(**vis))).save_pretrained(root / "clip")
    perturb(ViTModel(ViTConfig(**vis), add_pooling_layer=False)).save_pretrained(root / "vit")
    perturb(BertForMaskedLM(bert_config(cross=False, layers=4))).save_pretrained(root / "bert")
    return root


@pytest.mark.parametrize("tower", ["clip", "vit"])
def test_vision_tower_equals_hf_after_import(hf_folders, tower, monkeypatch):
    from transformers import CLIPVisionModel, ViTModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = mplug_config_from_hf(hf_folders / tower, hf_folders / "bert", replace_config(MPLUGConfig(**MICRO)),
                               image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    m = from_pretrained_hf(cfg, hf_folders / tower, hf_folders / "bert").eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        if tower == "clip":   # mPLUG applies CLIP's ln_post to every token (visual(..., skip_last_layer=True))
            hf = CLIPVisionModel.from_pretrained(hf_folders / tower, local_files_only=True).eval()
            post = getattr(hf, "vision_model", hf).post_layernorm            # transformers 5 flattens it
            expected = post(hf(pixel_values=x).last_hidden_state)
        else:
            hf = ViTModel.from_pretrained(hf_folders / tower, local_files_only=True, add_pooling_layer=False).eval()
            expected = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(m.embed_image(x), expected, atol=ATOL, rtol=0)
    assert cfg.vision_pre_norm == (tower == "clip") and cfg.vision_patch_bias == (tower == "vit")


def test_text_side_imports_first_and_last_bert_layers(hf_folders, monkeypatch):
    """§5.1: text encoder = BERT's first layers, fusion = its last layers; decoder and heads as the official code."""
    from transformers import BertForMaskedLM, BertModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = mplug_config_from_hf(hf_folders / "clip", hf_folders / "bert", MPLUGConfig(**MICRO))
    assert (cfg.text_layers, cfg.fusion_layers, cfg.decoder_layers) == (2, 4, 2)
    cfg = replace_config(cfg, fusion_layers=2)                      # BERT has 4 layers: first 2 / last 2
    m = from_pretrained_hf(cfg, hf_folders / "clip", hf_folders / "bert").eval()
    bert = BertModel.from_pretrained(hf_folders / "bert", local_files_only=True).eval()
    ids, mask = text_batch()
    with torch.no_grad():
        expected = bert(ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[2]
        got = m.embed_text(ids, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)
    layer = lambda i: bert.encoder.layer[i]                                                    # noqa: E731
    for k in range(2):                                               # fusion layer k <- BERT layer 2 + k (the last two)
        assert torch.equal(m.fusion.layers[k].self_attn.q_proj.weight, layer(2 + k).attention.self.query.weight)
        assert torch.equal(m.fusion.layers[k].ffn.fc2.weight, layer(2 + k).output.dense.weight)
    for i in range(2):                                               # decoder layer i <- BERT layer i
        assert torch.equal(m.decoder.blocks[i].ffn.fc1.weight, layer(i).intermediate.dense.weight)
    mlm = BertForMaskedLM.from_pretrained(hf_folders / "bert", local_files_only=True)
    assert torch.equal(m.mlm_head.decoder.bias, mlm.cls.predictions.bias)
    for name in ("vision", "text", "vision_proj", "text_proj"):     # momentum copies start equal (ALBEF copy_params)
        for p, q in zip(getattr(m, name).parameters(), m.momentum_model[name].parameters()):
            assert torch.equal(p, q)


def test_import_names_the_mismatch(hf_folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = micro(d_model=64, n_heads=4, d_ff=128)
    with pytest.raises(ValueError, match="d_model=64.*d_model=32"):
        load_text(m, hf_folders / "bert")
    with pytest.raises(ValueError, match="vision_pre_norm"):
        load_vision(micro(vision_activation="quick_gelu", vision_pre_norm=False), hf_folders / "clip")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_vision(micro(), hf_folders / "missing")


def test_position_embeddings_resize_like_the_official_code():
    pos = torch.randn(1 + 16, 8)
    assert torch.equal(resize_positions(pos, 17), pos)
    big = resize_positions(pos, 1 + 64)                                       # 4x4 -> 8x8 grid, [CLS] kept
    assert big.shape == (65, 8) and torch.equal(big[0], pos[0])
    grid = pos[1:].view(4, 4, 8)
    assert torch.allclose(big[1:].view(8, 8, 8).mean((0, 1)), grid.mean((0, 1)), atol=0.1)


# --- full size -----------------------------------------------------------------------------------------------
def test_full_size_parameter_counts_against_the_official_readme():
    """X-PLUG/mPLUG README: base 350M, large 600M. Counted ("online"): ViT (+ the ViT-L bridge), text encoder with its
    embeddings, the 6 fusion layers that run, the decoder with its own embeddings and LM head, ITC projections,
    temperature, ITM head and MLM transform. Not counted: the momentum copies (an ALBEF training device), CLIP's text
    tower and visual.proj, and the 6 never-used layers + embedding table of the official FusionModel."""
    base = mmkit.build_model("mplug-base", device="meta").parameter_counts()
    large = mmkit.build_model("mplug-large", device="meta").parameter_counts()
    # hand counts: CLIP ViT-B/16 at 256 px (conv 589,824 + cls 768 + 257 x 768 positions + ln_pre + 12 x 7,087,872
    # + ln_post); BERT-base embeddings 23,837,184 + 6 x 7,087,872; fusion: 5 co-attention layers of 9,451,776 + 1
    # connected (no cross-attention) 7,087,872; decoder: embeddings + 12 x 9,451,776 + LM transform + bias 30,522
    assert base["vision"] == 589_824 + 768 + 257 * 768 + 1536 + 12 * 7_087_872 + 1536 == 85_845_504
    assert base["text_encoder"] == 23_837_184 + 6 * 7_087_872
    assert base["fusion"] == 5 * 9_451_776 + 7_087_872
    assert base["decoder"] == 23_837_184 + 12 * 9_451_776 + 592_128 + 30_522
    assert large["fusion"] == 6 * 9_451_776                  # stride 6: no connected layer, all six co-attention
    # base 345.46M: -1.3% of 350M (the README rounds to 2 figures; the official connected layer also carries an unused
    # 2.36M cross-attention). large 565.94M: -5.7% of "600M", a figure rounded to one significant digit (0.6B); the
    # only extra module is CLIP-L (303.2M) and its 0.79M bridge to width 768, so 6% is the tolerance here.
    assert abs(base["online"] / OFFICIAL_PARAMS["mplug-base"] - 1) < 0.02
    assert abs(large["online"] / OFFICIAL_PARAMS["mplug-large"] - 1) < 0.06
    assert base["online"] == 345_455_735 and large["online"] == 565_942_647


@pytest.mark.parametrize("name", ["base", "large"])
def test_scaled_yaml_equals_the_preset(name):
    assert load_config(ROOT / f"scaled/configs/mplug_{name}.yaml") == load_config(f"mplug-{name}")


# --- generation ------------------------------------------------------------------------------------------------
def test_cached_generation_equals_uncached_and_transformers():
    m = micro()
    images, (ids, mask) = torch.rand(3, 3, 16, 16), text_batch()
    cached = m.generate(images, ids, 6, encoder_mask=mask)
    plain = m.generate(images, ids, 6, encoder_mask=mask, use_cache=False)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.logits, plain.logits, atol=ATOL, rtol=0)
    hf = m.hf_generator()
    greedy = hf.generate(images=images, encoder_ids=ids, max_new_tokens=6)[:, 1:]
    assert torch.equal(greedy[:, :cached.sequences.shape[1]], cached.sequences)
    beams = hf.generate(images=images, encoder_ids=ids, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    beams_plain = hf.generate(images=images, encoder_ids=ids, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                              use_cache=False)
    assert beams.shape[0] == 6 and torch.equal(beams, beams_plain)      # the context slots follow their beams
    g = lambda: torch.Generator().manual_seed(3)                                                # noqa: E731
    s1 = m.generate(images, ids, 6, encoder_mask=mask, do_sample=True, top_k=5, generator=g())
    s2 = m.generate(images, ids, 6, encoder_mask=mask, do_sample=True, top_k=5, generator=g())
    assert torch.equal(s1.sequences, s2.sequences)


def test_generation_stops_rows_at_eos():
    m = micro()
    with torch.no_grad():
        m.decoder.head.decoder.bias[m.config.eos_token_id] = 50.0       # [EOS] always wins
    out = m.generate(torch.rand(2, 3, 16, 16), None, 5)
    assert out.sequences.shape == (2, 1) and bool((out.sequences == m.config.eos_token_id).all())


# --- save / load, classifier -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_ties_momentum_and_queue(tmp_path):
    from mmkit.hub import load_model_dir
    from mmkit.train import save_checkpoint
    m = micro()
    with torch.no_grad():
        m.queue.image[:2] = 1.0
        m.queue.count.fill_(2)
    save_checkpoint(tmp_path / "ckpt", m)
    back = load_model_dir(tmp_path / "ckpt")
    assert type(back) is MPLUG and back.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.decoder.head.decoder.weight is back.decoder.embeddings.word.weight
    assert len(back.queue) == 2


def test_classifier_from_pretrained_copies_the_encoders_and_drops_the_decoder():
    m = micro()
    nlvr = MPLUGForClassification.from_pretrained_mplug(m, num_labels=2, num_images=2).eval()
    assert nlvr.decoder is None and nlvr.momentum_model is None and nlvr.queue is None
    assert torch.equal(nlvr.fusion.layers[1].ffn.fc1.weight, m.fusion.layers[1].ffn.fc1.weight)
    assert torch.equal(nlvr.image_slots, torch.zeros(2, 32))
    ids, mask = text_batch()
    pair = torch.rand(3, 2, 3, 16, 16)
    assert nlvr.classify(pair, ids, mask).shape == (3, 2)
    # with zero slots, the visual sequence is the two images' v^0 side by side
    v = nlvr.visual_sequence(pair)
    torch.testing.assert_close(v[:, :17], nlvr.embed_image(pair[:, 0]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"\(B, 2, 3, S, S\)"):
        nlvr.classify(pair[:, 0], ids, mask)
    counts = nlvr.parameter_counts()
    assert counts["decoder"] == 0 and counts["task_heads"] == 2 * 32 + 32 * 32 + 32 + 32 * 2 + 2


# --- errors ----------------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    m = micro()
    ids, mask = text_batch()
    with pytest.raises(ValueError, match="image_size=16"):
        m(torch.rand(3, 3, 32, 32), ids)
    with pytest.raises(ValueError, match="give one text per image"):
        m(torch.rand(2, 3, 16, 16), ids)
    with pytest.raises(ValueError, match="max_text_len"):
        m(torch.rand(3, 3, 16, 16), torch.ones(3, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="pass .*images.* to the step"):
        m(torch.rand(3, 3, 16, 16), step=lambda model: 0)
    with pytest.raises(ValueError, match="unknown fusion"):
        MPLUGConfig(fusion="both")
    with pytest.raises(ValueError, match="patch size"):
        MPLUGConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="no decoder"):
        MPLUGForClassification.from_pretrained_mplug(m, 3).generate(torch.rand(1, 3, 16, 16))
    assert m(step=lambda model: model is m)                                # the step gets the model itself
    with torch.no_grad():
        assert math.isfinite(float(m(torch.rand(3, 3, 16, 16), ids).context.states.sum()))
