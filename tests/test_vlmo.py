"""VLMo's model (mmkit/vlmo/model.py) and weight import (mmkit/vlmo/convert.py): the Multiway block against transformers'
BeitLayer (image route) and a pre-norm BERT layer built from HF pieces (text route), the fusion route's expert split by
hand, expert routing per layer, padding, heads, downstream models, HF BEiT / ViT / BERT folders imported exactly,
and the full-size parameter counts (VLMo §4.1: 175M, 562M)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mmkit
from mmkit.config import replace_config
from mmkit.data.text import answer_vocab
from mmkit.nn import padding_mask
from mmkit.vlmo.convert import load_text_weights, load_vision_weights
from mmkit.vlmo.model import (IMAGE_TYPE, SECOND_IMAGE_TYPE, TEXT_TYPE, VLMo, VLMoConfig, VLMoForImageClassification,
                              VLMoForNLVR2, VLMoForVQA, sincos_2d)

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")

# A small VLMo for exact checks: 3 layers (VL expert in the top 2), width 32, 16 px images in 4x4 patches.
SMALL = VLMoConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64, n_vl_layers=2, image_size=16, patch_size=4,
                   vocab_size=60, max_text_len=12)


def perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its init (LayerNorms, layer scales, types included) so comparisons mean something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def small(seed: int = 0, **kw) -> VLMo:
    torch.manual_seed(seed)
    return perturb(VLMo(replace_config(SMALL, **kw) if kw else SMALL))


def text_batch(B: int = 3, T: int = 7, V: int = 60, lengths=(7, 5, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, V, (B, T), generator=g)
    ids[:, 0] = 2                                                        # [T_CLS]
    am = torch.arange(T)[None] < torch.tensor(lengths)[:, None]          # (B, T) True = real token
    return ids.masked_fill(~am, 0), am


# --- the tiny preset and the three routes --------------------------------------------------------------------

def test_tiny_preset_fits_the_world_tokenizer_and_gives_every_output(tok):
    cfg = mmkit.load_config("vlmo-tiny")
    assert len(tok) == 384 < cfg.vocab_size and (cfg.pad_token_id, cfg.mask_token_id) == (tok.pad_token_id,
                                                                                          tok.mask_token_id)
    assert (cfg.image_size, cfg.patch_size, cfg.grid_size, cfg.n_vl_layers) == (64, 8, 8, 1)
    torch.manual_seed(0)
    m = mmkit.build_model(cfg).eval()
    assert m.num_backbone_parameters() < 2e6
    enc = tok(["a small red circle at the top left", "三个物体"], padding="longest", return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"].bool()
    assert (ids[:, 0] == tok.cls_token_id).all()                          # [T_CLS] = BERT's [CLS]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        img = m(images, itc=True, bool_masked_pos=torch.zeros(2, 64, dtype=torch.bool))
        txt = m(input_ids=ids, attention_mask=am, itc=True, mlm=True)
        pair = m(images, ids, am, itm=True, mlm=True)
    T = ids.shape[1]
    assert img.route == "vision" and img.hidden_states.shape == (2, 65, 128) and img.text_len == 0
    assert img.features.shape == (2, 128) and img.mim_logits.shape == (2, 64, 256)
    assert txt.route == "language" and txt.hidden_states.shape == (2, T, 128) and txt.mlm_logits.shape == (2, T, 512)
    assert pair.route == "fusion" and pair.hidden_states.shape == (2, T + 65, 128) and pair.text_len == T
    assert pair.itm_logits.shape == (2, 2) and pair.mlm_logits.shape == (2, T, 512) and pair.features is None
    # VLMo §3.5 / the official code: the fused sequence is [text; image], so its first token is [T_CLS], and ITM
    # (like VQA / NLVR2) reads the BERT pooler of that vector
    torch.testing.assert_close(pair.cls, pair.hidden_states[:, 0])
    torch.testing.assert_close(pair.pooled, m.pooler(pair.hidden_states[:, 0]))
    torch.testing.assert_close(pair.itm_logits, m.itm_head(pair.pooled))


def expert_calls(model: VLMo, run) -> dict:
    """{(layer, expert): [input lengths]} of every expert call while ``run()`` executes."""
    calls: dict = {}
    handles = []
    for i, block in enumerate(model.blocks):
        for name in ("vision", "language", "vl"):
            expert = getattr(block.ffn, name)
            if expert is not None:
                handles.append(expert.register_forward_hook(
                    lambda mod, inp, out, key=(i, name): calls.setdefault(key, []).append(inp[0].shape[1])))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def test_experts_are_chosen_by_modality_and_layer():
    """VLMo §3.2: image-only -> V-FFN, text-only -> L-FFN in every layer; a pair -> L-FFN on the text part and V-FFN on
    the image part in the bottom L-F layers, VL-FFN on everything in the top F layers (which alone hold one)."""
    m = small()
    assert [b.ffn.vl is not None for b in m.blocks] == [False, True, True]          # F = 2 of L = 3
    images, (ids, am) = torch.rand(3, 3, 16, 16), text_batch()
    N1, T = 17, ids.shape[1]                                                        # [I_CLS] + 16 patches
    assert expert_calls(m, lambda: m(images)) == {(i, "vision"): [N1] for i in range(3)}
    assert expert_calls(m, lambda: m(input_ids=ids, attention_mask=am)) == {(i, "language"): [T] for i in range(3)}
    assert expert_calls(m, lambda: m(images, ids, am)) == {(0, "language"): [T], (0, "vision"): [N1],
                                                          (1, "vl"): [T + N1], (2, "vl"): [T + N1]}
    base = mmkit.build_model("vlmo-base", device="meta")
    assert [i for i, b in enumerate(base.blocks) if b.ffn.vl is not None] == [10, 11]   # Base: top 2 of 12
    large = mmkit.build_model("vlmo-large", device="meta")
    assert [i for i, b in enumerate(large.blocks) if b.ffn.vl is not None] == [21, 22, 23]


# --- one Multiway block against references with copied weights -----------------------------------------------

def test_image_route_of_a_multiway_block_equals_beit_layer():
    """The shared attention + V-FFN + layer scale of one block = transformers' BeitLayer (layer scale on)."""
    from transformers import BeitConfig
    from transformers.models.beit.modeling_beit import BeitLayer
    hf = perturb(BeitLayer(BeitConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
                                      layer_norm_eps=1e-6, layer_scale_init_value=0.1, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, use_relative_position_bias=False,
                                      attn_implementation="eager")))
    block = small().blocks[0]
    a = hf.attention
    with torch.no_grad():
        for ours, theirs in ((block.self_attn.q_proj, a.q_proj), (block.self_attn.v_proj, a.v_proj),
                             (block.self_attn.out_proj, a.o_proj), (block.self_attn_norm, hf.layernorm_before),
                             (block.ffn.vision.norm, hf.layernorm_after), (block.ffn.vision.mlp.fc1, hf.mlp.fc1),
                             (block.ffn.vision.mlp.fc2, hf.mlp.fc2)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        block.self_attn.k_proj.weight.copy_(a.k_proj.weight)
        block.self_attn.k_proj.bias.zero_()                                          # BEiT's key has no bias
        block.self_attn_scale.copy_(hf.lambda_1)
        block.ffn_scale.copy_(hf.lambda_2)
        x = torch.randn(2, 17, 32)
        got = block(x, ffn_kwargs={"route": "vision"})
        torch.testing.assert_close(got, hf(x), atol=ATOL, rtol=0)
        assert (got - x).abs().mean() > 0.01                                          # the block did something


def test_text_route_of_a_multiway_block_equals_a_prenorm_bert_layer_from_hf_pieces():
    """Text route = x + γ1 ⊙ O(BertSelfAttention(LN1(x))); x + γ2 ⊙ W2 BertIntermediate(LN2(x)), with padding."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertIntermediate, BertSelfAttention
    bc = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
                    attention_probs_dropout_prob=0.0, attn_implementation="eager")
    sa, inter = perturb(BertSelfAttention(bc)), perturb(BertIntermediate(bc))
    out_proj, fc2 = perturb(nn.Linear(32, 32)), perturb(nn.Linear(64, 32))
    ln1, ln2 = perturb(nn.LayerNorm(32, eps=1e-6)), perturb(nn.LayerNorm(32, eps=1e-6))
    g1, g2 = torch.rand(32), torch.rand(32)
    block = small().blocks[0]
    with torch.no_grad():
        for ours, theirs in ((block.self_attn.q_proj, sa.query), (block.self_attn.k_proj, sa.key),
                             (block.self_attn.v_proj, sa.value), (block.self_attn.out_proj, out_proj),
                             (block.self_attn_norm, ln1), (block.ffn.language.norm, ln2),
                             (block.ffn.language.mlp.fc1, inter.dense), (block.ffn.language.mlp.fc2, fc2)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        block.self_attn_scale.copy_(g1)
        block.ffn_scale.copy_(g2)
        x = torch.randn(3, 7, 32)
        _, am = text_batch()
        additive = torch.zeros(3, 1, 1, 7).masked_fill(~am[:, None, None, :], torch.finfo(torch.float32).min)
        h = x + g1 * out_proj(sa(ln1(x), attention_mask=additive)[0])
        expected = h + g2 * fc2(inter(ln2(h)))
        got = block(x, mask=padding_mask(am), ffn_kwargs={"route": "language"})
    rows = am[..., None].expand_as(x)                                                # padded queries may differ
    torch.testing.assert_close(got[rows], expected[rows], atol=ATOL, rtol=0)


def test_fusion_route_splits_experts_below_and_uses_the_vl_expert_on_top_by_hand():
    m = small()
    bottom, top = m.blocks[0], m.blocks[2]
    x, T = torch.randn(2, 5 + 17, 32), 5
    with torch.no_grad():
        for block in (bottom, top):
            h = x + block.self_attn_scale * block.self_attn(block.self_attn_norm(x))  # eq. (1), one attention for all
            f = block.ffn
            if f.vl is None:
                ffn = torch.cat([f.language(h[:, :T]), f.vision(h[:, T:])], 1)     # L-FFN | V-FFN
            else:
                ffn = f.vl(h)                                                         # VL-FFN on every position
            expected = h + block.ffn_scale * ffn                                      # eq. (2)
            torch.testing.assert_close(block(x, ffn_kwargs={"route": "fusion", "text_len": T}), expected,
                                       atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="unknown route"):
        bottom.ffn(x, route="audio")


def test_padding_never_changes_a_real_token_and_fusion_sees_the_image():
    m = small()
    images = torch.rand(3, 3, 16, 16)
    ids, am = text_batch()
    with torch.no_grad():
        full_t = m(input_ids=ids, attention_mask=am).hidden_states
        full_f = m(images, ids, am).hidden_states
        for b, n in enumerate((7, 5, 3)):                                              # each row alone, unpadded
            alone_t = m(input_ids=ids[b:b + 1, :n]).hidden_states
            alone_f = m(images[b:b + 1], ids[b:b + 1, :n]).hidden_states
            torch.testing.assert_close(full_t[b, :n], alone_t[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(full_f[b, :n], alone_f[0, :n], atol=ATOL, rtol=0)        # text part
            torch.testing.assert_close(full_f[b, 7:], alone_f[0, n:], atol=ATOL, rtol=0)        # image part
        # the dual encoder keeps the modalities apart; the fusion [T_CLS] depends on the image
        other = m(images.flip(0), ids, am)
        assert (other.cls - m(images, ids, am).cls).abs().max() > 1e-3
        torch.testing.assert_close(m(input_ids=ids, attention_mask=am).cls, full_t[:, 0])


def test_masked_image_modelling_replaces_the_chosen_patches_only():
    m = small()
    images = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = True
    with torch.no_grad():
        e = m.embed_image(images, mask)
        plain = m.embed_image(images)
        changed = (e - plain).abs().amax(-1) > 0                                      # (2, 17) over [I_CLS] + patches
        assert changed[0].nonzero().flatten().tolist() == [6] and not changed[1].any()
        torch.testing.assert_close(e[0, 6], m.image_embed.mask_token[0, 0] + m.image_embed.pos_embed.weight[6]
                                   + m.type_embed.weight[IMAGE_TYPE])
        out = m(images, bool_masked_pos=mask)
        torch.testing.assert_close(out.mim_logits, m.mim_head(out.hidden_states[:, 1:]))


# --- downstream models -----------------------------------------------------------------------------------------

def test_downstream_models_keep_every_pretrained_weight_and_give_their_logits():
    pre = small()
    images, (ids, am) = torch.rand(3, 3, 16, 16), text_batch()
    vqa = VLMoForVQA.from_pretrained_vlmo(pre).eval()
    nlvr2 = VLMoForNLVR2.from_pretrained_vlmo(pre).eval()
    cells = VLMoForImageClassification.from_pretrained_vlmo(pre).eval()
    for new in (vqa, nlvr2, cells):
        sd = new.state_dict()
        for k, v in pre.state_dict().items():
            if not (isinstance(new, VLMoForNLVR2) and k == "type_embed.weight"):
                assert torch.equal(sd[k], v), f"{type(new).__name__}: {k}"
    # the official NLVR2 head: the second image's type starts as the image type; text and image rows unchanged
    tw = nlvr2.type_embed.weight
    assert torch.equal(tw[SECOND_IMAGE_TYPE], pre.type_embed.weight[IMAGE_TYPE])
    assert torch.equal(tw[:2], pre.type_embed.weight[:2])
    with torch.no_grad():
        v = vqa(images, ids, am)
        assert v.logits.shape == (3, 66)
        torch.testing.assert_close(v.pooled, pre.pooler(pre(images, ids, am).cls))   # the pooled fusion [T_CLS]
        pair = torch.stack([images, images.flip(0)], 1)                              # (B, 2, 3, S, S)
        n = nlvr2(pair, ids, am)
        left = nlvr2.pooler(VLMo.forward(nlvr2, pair[:, 0], ids, am).cls)
        right = nlvr2.pooler(VLMo.forward(nlvr2, pair[:, 1], ids, am, image_type_id=SECOND_IMAGE_TYPE).cls)
        assert n.logits.shape == (3, 2)
        torch.testing.assert_close(n.pooled, torch.cat([left, right], -1))
        c = cells(images)
        assert c.logits.shape == (3, 9, 14) and c.route == "vision"
    with pytest.raises(ValueError, match=r"\(B, 2, C, S, S\)"):
        nlvr2(images, ids, am)
    assert mmkit.load_config("vlmo-tiny-vqa").n_answers == len(answer_vocab("both"))   # the world's answers


# --- weight import from local Hugging Face folders ---------------------------------------------------------------

def _hf_vision(kind: str):
    from transformers import BeitConfig, BeitModel, ViTConfig, ViTModel
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16,
                  patch_size=4, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "beit":
        cfg = BeitConfig(**common, use_absolute_position_embeddings=True, use_relative_position_bias=False,
                         use_shared_relative_position_bias=False, layer_scale_init_value=0.1, use_mean_pooling=False,
                         use_mask_token=True)
        return perturb(BeitModel(cfg, add_pooling_layer=False))
    return perturb(ViTModel(ViTConfig(**common), add_pooling_layer=False))


@pytest.mark.parametrize("kind", ["beit", "vit"])
def test_vision_weights_from_a_local_hf_folder_reproduce_its_encoder(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = _hf_vision(kind)
    hf.save_pretrained(tmp_path)
    m = small(seed=3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = load_vision_weights(m, tmp_path)
    assert "blocks.2.ffn.vision.mlp.fc2.weight" in report.copied and "blocks.0.self_attn.k_proj.bias" in report.copied
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ours = m(images).hidden_states
        theirs = hf(pixel_values=(images - 0.5) / 0.5).last_hidden_state                 # BEiT / ViT normalisation
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        if kind == "beit":                                                               # [MASK] patches too
            mask = torch.rand(2, 16) < 0.4
            torch.testing.assert_close(m(images, bool_masked_pos=mask).hidden_states,
                                       hf(pixel_values=(images - 0.5) / 0.5, bool_masked_pos=mask).last_hidden_state,
                                       atol=ATOL, rtol=0)
        else:
            assert all(torch.equal(b.self_attn_scale, torch.ones(32)) for b in m.blocks)  # ViT: γ = 1
    # the language / VL experts and the text side are untouched
    after = m.state_dict()
    for k in ("blocks.0.ffn.language.mlp.fc1.weight", "blocks.2.ffn.vl.norm.weight", "text_embed.word.weight"):
        assert torch.equal(after[k], before[k]), k


def test_text_embeddings_from_a_local_bert_folder(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = perturb(BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=20, hidden_dropout_prob=0.0),
                           add_pooling_layer=False))
    hf.save_pretrained(tmp_path)
    m = small()
    report = load_text_weights(m, tmp_path)
    assert "text_embed.word.weight[:50]" in report.copied
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():   # word + position + BERT's type 0, LayerNorm; T_type set to 0
        torch.testing.assert_close(m.embed_text(ids), hf.embeddings(ids), atol=ATOL, rtol=0)
    assert torch.equal(m.type_embed.weight[TEXT_TYPE], torch.zeros(32))


def test_import_refuses_what_does_not_fit(tmp_path):
    from transformers import BeitConfig, BeitModel
    rel = BeitModel(BeitConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                               image_size=16, patch_size=4, use_relative_position_bias=True), add_pooling_layer=False)
    rel.save_pretrained(tmp_path / "rel")
    with pytest.raises(ValueError, match="relative position biases"):
        load_vision_weights(small(), tmp_path / "rel")
    report = load_vision_weights(small(), tmp_path / "rel", allow_relative_position_bias=True)
    assert any("pos_embed" in what for what, _ in report.skipped)
    with pytest.raises(ValueError, match="width 32"):
        load_vision_weights(small(d_model=64, d_ff=128), tmp_path / "rel")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vision_weights(small(), tmp_path / "nothing-here")


# --- full size (VLMo §4.1) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, yaml_file, paper", [("vlmo-base", "vlmo_base.yaml", 175e6),
                                                    ("vlmo-large", "vlmo_large.yaml", 562e6)])
def test_full_size_backbones_match_the_paper_within_3_percent(name, yaml_file, paper):
    cfg = mmkit.load_config(name)
    assert cfg == mmkit.load_config(ROOT / "scaled" / "configs" / yaml_file), "YAML and preset disagree"
    m = mmkit.build_model(cfg, device="meta")
    assert all(p.is_meta for p in m.parameters())
    n = m.num_backbone_parameters()                        # embeddings + blocks + final norm, no task heads
    assert abs(n / paper - 1) < 0.03, f"{name}: {n:,} vs {paper:,.0f}"
    D, L, F = cfg.d_model, cfg.n_layers, cfg.n_vl_layers
    attention = 4 * D * D + 4 * D + 2 * D + 2 * D           # q, k, v, o (+ biases), LayerNorm, γ1, γ2
    expert = 2 * D * cfg.d_ff + cfg.d_ff + D + 2 * D        # fc1, fc2 (+ biases), its LayerNorm
    embeddings = (3 * cfg.patch_size ** 2 * D + D + 2 * D + (cfg.num_patches + 1) * D   # patches, [I_CLS], [MASK], V_pos
                  + cfg.vocab_size * D + cfg.max_text_len * D + 2 * D + 3 * D)          # words, T_pos, LN, types
    assert n == L * attention + (2 * L + F) * expert + embeddings + 2 * D              # by hand


# --- clear errors ---------------------------------------------------------------------------------------------

def test_errors_name_the_problem_and_the_fix():
    m = small()
    ids, am = text_batch()
    with pytest.raises(ValueError, match="image_size=16"):
        m(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="max_text_len=12"):
        m(input_ids=torch.full((1, 13), 7))
    with pytest.raises(ValueError, match="images, input_ids or both"):
        m()
    with pytest.raises(ValueError, match="two calls"):
        m(torch.rand(3, 3, 16, 16), ids, am, itc=True)
    with pytest.raises(ValueError, match="fusion pass"):
        m(input_ids=ids, itm=True)
    with pytest.raises(ValueError, match="image-only passes"):
        m(torch.rand(3, 3, 16, 16), ids, bool_masked_pos=torch.zeros(3, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_vl_layers"):
        VLMoConfig(n_layers=2, n_vl_layers=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VLMoConfig(image_size=30, patch_size=4)


# --- phase B: the routing table, the standard-Transformer ablation, 2-D sin-cos positions ------------------------

def test_routing_table_names_the_experts_that_really_run():
    """VLMo §3.2 hard routing, read from the modules, checked against forward hooks on every expert: in a fusion pass
    the bottom layer sends the text to L-FFN and the image to V-FFN, the top F = 2 layers send everything to VL-FFN."""
    m = small()
    ids, am = text_batch(1, 4, lengths=(4,))
    seen = []
    hooks = [e.register_forward_hook(lambda mod, i, o, li=li, name=name: seen.append((li, name, i[0].shape[1])))
             for li, b in enumerate(m.blocks) for name, e in (("V-FFN", b.ffn.vision), ("L-FFN", b.ffn.language),
                                                               ("VL-FFN", b.ffn.vl)) if e is not None]
    with torch.no_grad():
        m(torch.rand(1, 3, 16, 16), ids, am)
    for h in hooks:
        h.remove()
    table = m.routing_table("fusion", text_len=4, image_len=17)
    assert table[0] == ["L-FFN"] * 4 + ["V-FFN"] * 17 and table[1] == table[2] == ["VL-FFN"] * 21
    ran = {(li, name): n for li, name, n in seen}
    assert ran == {(0, "L-FFN"): 4, (0, "V-FFN"): 17, (1, "VL-FFN"): 21, (2, "VL-FFN"): 21}
    assert m.routing_table("vision", image_len=2) == [["V-FFN"] * 2] * 3
    assert m.routing_table("language", text_len=3) == [["L-FFN"] * 3] * 3
    with pytest.raises(ValueError, match="unknown route"):
        m.routing_table("audio")


def test_standard_transformer_ablation_has_one_ffn_for_every_route():
    """Table 5 "Std TRM": multiway=False keeps one FFN (stored as the vision expert) that every token of every route
    meets; a Multiway checkpoint's attention + V-FFN load into it unchanged (only L-FFN / VL-FFN are left out)."""
    std = small(multiway=False)
    assert all(b.ffn.language is None and b.ffn.vl is None for b in std.blocks) and list(std.config.vl_layers) == []
    assert std.routing_table("fusion", 2, 3) == [["FFN"] * 5] * 3
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(std.blocks[0].ffn(h, "fusion", 2), std.blocks[0].ffn.vision(h))
    torch.testing.assert_close(std.blocks[0].ffn(h, "language"), std.blocks[0].ffn.vision(h))
    missing, unexpected = std.load_state_dict(small().state_dict(), strict=False)
    assert missing == [] and unexpected and all(".language." in k or ".vl." in k for k in unexpected)


def test_sincos_2d_positions_hand_case_and_model_init():
    # grid 2, D = 4: one frequency (1.0); row r, column c -> [sin r, cos r, sin c, cos c] in raster order
    s1, c1 = torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))
    want = torch.tensor([[0, 1, 0, 1], [0, 1, s1, c1], [s1, c1, 0, 1], [s1, c1, s1, c1]])
    torch.testing.assert_close(sincos_2d(2, 4), want)
    m = VLMo(replace_config(SMALL, image_pos_init="sincos2d"))
    pos = m.image_embed.pos_embed.weight
    assert torch.equal(pos[0], torch.zeros(32)) and torch.equal(pos[1:], sincos_2d(4, 32))   # [I_CLS] gets 0
    with pytest.raises(ValueError, match="image_pos_init"):
        VLMoConfig(image_pos_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 6)
