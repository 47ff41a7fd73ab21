"""mmkit.layers: masks by hand, equality with Hugging Face BERT/ViT modules (copied weights), KV-cache
decoding equals a full causal forward, fully-masked rows, pluggable FFNs, and the error messages."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.nn import (
    ConvFeatureExtractor, FeedForward, ImageEmbeddings, KVCache, TextEmbeddings, MultiHeadAttention, PatchEmbedding, PositionEmbedding,
    PositionEmbedding2D, TransformerBlock, TypeEmbedding, causal_mask, check_mask, combine_masks, init_weights,
    padding_mask, to_additive,
)

ATOL = 1e-5
T, F_ = True, False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- masks ------------------------------------------------------------------------------------------------

def test_causal_mask_4x4():
    expected = torch.tensor([[T, F_, F_, F_],
                             [T, T, F_, F_],
                             [T, T, T, F_],
                             [T, T, T, T]])
    m = causal_mask(4)
    assert m.dtype == torch.bool and torch.equal(m, expected)


def test_causal_mask_offset_for_cached_decoding():
    # 2 new queries at absolute positions 3 and 4, keys 0..4
    expected = torch.tensor([[T, T, T, T, F_],
                             [T, T, T, T, T]])
    assert torch.equal(causal_mask(2, offset=3), expected)


def test_padding_mask_batch():
    am = torch.tensor([[1, 1, 0],
                       [1, 0, 0]])
    m = padding_mask(am)
    assert m.shape == (2, 1, 1, 3) and m.dtype == torch.bool
    assert torch.equal(m[:, 0, 0], torch.tensor([[T, T, F_], [T, F_, F_]]))
    assert torch.equal(padding_mask(am.bool()), m)
    with pytest.raises(ValueError, match="0/1"):
        padding_mask(torch.tensor([[0.0, float("-inf")]]))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        padding_mask(torch.ones(3))


def test_combine_masks_causal_and_padding():
    am = torch.tensor([[1, 1, 1],
                       [1, 1, 0]])
    m = combine_masks(causal_mask(3), None, padding_mask(am))
    expected = torch.tensor([[[T, F_, F_], [T, T, F_], [T, T, T]],
                             [[T, F_, F_], [T, T, F_], [T, T, F_]]])
    assert m.shape == (2, 1, 3, 3)
    assert torch.equal(m[:, 0], expected)
    assert combine_masks(None, None) is None
    with pytest.raises(TypeError, match="bool"):
        combine_masks(causal_mask(3), torch.zeros(3, 3))


def test_to_additive_values():
    add = to_additive(torch.tensor([[T, F_]]))
    assert add[0, 0] == 0 and torch.isneginf(add[0, 1])
    assert to_additive(None) is None
    f = torch.tensor([0.0, -1.0])
    assert torch.equal(to_additive(f, torch.float64), f.double())


def test_check_mask_names_expected_shape():
    assert check_mask(causal_mask(3), 2, 4, 3, 3).shape == (1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"\(B, heads, L_q, L_k\) = \(2, 4, 3, 5\).*padding_mask"):
        check_mask(torch.ones(2, 5, dtype=torch.bool), 2, 4, 3, 5)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        check_mask(torch.ones(2, 1, 1, 5, dtype=torch.long), 2, 4, 3, 5)


# --- Hugging Face oracles (tiny configs, eager attention, no downloads) ------------------------------------

D, H, DFF = 32, 4, 64


def _perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its default init (LayerNorms included) so the comparison means something."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def _copy(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(dst, "bias", None) is not None:
            dst.bias.copy_(src.bias)


def _bert_config(**kw):
    from transformers import BertConfig
    return BertConfig(hidden_size=D, num_attention_heads=H, intermediate_size=DFF, num_hidden_layers=1,
                      hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, attn_implementation="eager", **kw)


def _copy_bert_attention(attn: MultiHeadAttention, norm: nn.LayerNorm, hf_attention) -> None:
    # BertAttention = .self (query/key/value) + .output (dense, LayerNorm)
    _copy(attn.q_proj, hf_attention.self.query)
    _copy(attn.k_proj, hf_attention.self.key)
    _copy(attn.v_proj, hf_attention.self.value)
    _copy(attn.out_proj, hf_attention.output.dense)
    _copy(norm, hf_attention.output.LayerNorm)


def _copy_bert_layer(block: TransformerBlock, hf) -> None:
    _copy_bert_attention(block.self_attn, block.self_attn_norm, hf.attention)
    if block.cross_attn is not None:
        _copy_bert_attention(block.cross_attn, block.cross_attn_norm, hf.crossattention)
    _copy(block.ffn.fc1, hf.intermediate.dense)
    _copy(block.ffn.fc2, hf.output.dense)
    _copy(block.ffn_norm, hf.output.LayerNorm)


def _hf_additive(bool_mask: torch.Tensor) -> torch.Tensor:
    # HF eager attention adds a float mask: 0 where allowed, finfo.min where not (4-D, extended).
    return torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)


def test_post_norm_block_matches_bert_layer_with_padding():
    from transformers.models.bert.modeling_bert import BertLayer
    hf = _perturb(BertLayer(_bert_config()))
    block = TransformerBlock(D, H, DFF, norm_first=False, layer_norm_eps=1e-12, activation="gelu").eval()
    _copy_bert_layer(block, hf)

    x = torch.randn(3, 6, D)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        expected = hf(x, attention_mask=_hf_additive(padding_mask(am)))
        got = block(x, mask=padding_mask(am))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_pre_norm_block_matches_vit_layer():
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer
    cfg = ViTConfig(hidden_size=D, num_attention_heads=H, intermediate_size=DFF, num_hidden_layers=1,
                    hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, qkv_bias=True, attn_implementation="eager")
    hf = _perturb(ViTLayer(cfg))
    block = TransformerBlock(D, H, DFF, norm_first=True, layer_norm_eps=1e-12).eval()
    a = hf.attention  # transformers 5 ViTAttention: q_proj/k_proj/v_proj/o_proj
    for ours, theirs in [(block.self_attn.q_proj, a.q_proj), (block.self_attn.k_proj, a.k_proj),
                         (block.self_attn.v_proj, a.v_proj), (block.self_attn.out_proj, a.o_proj),
                         (block.self_attn_norm, hf.layernorm_before), (block.ffn_norm, hf.layernorm_after),
                         (block.ffn.fc1, hf.mlp.fc1), (block.ffn.fc2, hf.mlp.fc2)]:
        _copy(ours, theirs)

    x = torch.randn(2, 17, D)  # [CLS] + 4x4 patches
    with torch.no_grad():
        torch.testing.assert_close(block(x), hf(x), atol=ATOL, rtol=0)


def test_layer_scale_block_matches_beit_layer():
    """layer_scale_init: x + γ1 ⊙ SA(LN(x)); x + γ2 ⊙ FFN(LN(x)), as transformers' BeitLayer (layer scale on)."""
    from transformers import BeitConfig
    from transformers.models.beit.modeling_beit import BeitLayer
    cfg = BeitConfig(hidden_size=D, num_attention_heads=H, intermediate_size=DFF, num_hidden_layers=1,
                     hidden_act="gelu", layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, layer_scale_init_value=0.1, use_relative_position_bias=False,
                     attn_implementation="eager")
    hf = _perturb(BeitLayer(cfg))                       # moves λ1, λ2 off 0.1 too
    block = TransformerBlock(D, H, DFF, norm_first=True, layer_norm_eps=1e-6, layer_scale_init=0.1).eval()
    assert torch.equal(block.self_attn_scale.detach(), torch.full((D,), 0.1)) and block.cross_attn_scale is None
    a = hf.attention  # transformers 5 BeitAttention: q_proj, k_proj (no bias), v_proj, o_proj
    for ours, theirs in [(block.self_attn.q_proj, a.q_proj), (block.self_attn.v_proj, a.v_proj),
                         (block.self_attn.out_proj, a.o_proj), (block.self_attn_norm, hf.layernorm_before),
                         (block.ffn_norm, hf.layernorm_after), (block.ffn.fc1, hf.mlp.fc1), (block.ffn.fc2, hf.mlp.fc2)]:
        _copy(ours, theirs)
    with torch.no_grad():
        block.self_attn.k_proj.weight.copy_(a.k_proj.weight)
        block.self_attn.k_proj.bias.zero_()              # BEiT's key has no bias
        block.self_attn_scale.copy_(hf.lambda_1)
        block.ffn_scale.copy_(hf.lambda_2)
        x = torch.randn(2, 17, D)                        # [CLS] + 4x4 patches
        torch.testing.assert_close(block(x), hf(x), atol=ATOL, rtol=0)


def test_layer_scale_and_ffn_norm_options_are_off_by_default():
    """The defaults build exactly the block every other system uses: no γ parameters, a LayerNorm before the FFN."""
    plain = TransformerBlock(D, H, DFF, cross_attention=True)
    assert plain.self_attn_scale is None and plain.cross_attn_scale is None and plain.ffn_scale is None
    assert isinstance(plain.ffn_norm, nn.LayerNorm)
    assert not any("scale" in k for k in plain.state_dict())
    scaled = TransformerBlock(D, H, DFF, cross_attention=True, layer_scale_init=1e-5, ffn_norm=False)
    assert {k for k in scaled.state_dict() if "scale" in k} == {"self_attn_scale", "cross_attn_scale", "ffn_scale"}
    assert isinstance(scaled.ffn_norm, nn.Identity)
    # with every γ = 1 a scaled block computes what the plain block computes (same weights)
    post = TransformerBlock(D, H, DFF, norm_first=False).eval()
    post_scaled = TransformerBlock(D, H, DFF, norm_first=False, layer_scale_init=1.0).eval()
    post_scaled.load_state_dict(post.state_dict(), strict=False)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(post_scaled(x), post(x), atol=ATOL, rtol=0)
        post_scaled.ffn_scale.fill_(0.0)                 # γ2 = 0: the FFN branch is switched off
        expected = post.self_attn_norm(x + post.self_attn(x))
        torch.testing.assert_close(post_scaled(x), post.ffn_norm(expected), atol=ATOL, rtol=0)


def test_cross_attention_block_matches_bert_decoder_layer():
    from transformers.models.bert.modeling_bert import BertLayer
    hf = _perturb(BertLayer(_bert_config(is_decoder=True, add_cross_attention=True), layer_idx=0))
    block = TransformerBlock(D, H, DFF, norm_first=False, layer_norm_eps=1e-12, cross_attention=True).eval()
    _copy_bert_layer(block, hf)

    x, ctx = torch.randn(2, 5, D), torch.randn(2, 7, D)
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cam = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    self_mask = combine_masks(causal_mask(5), padding_mask(am))  # (B, 1, 5, 5)
    with torch.no_grad():
        expected = hf(x, attention_mask=_hf_additive(self_mask), encoder_hidden_states=ctx,
                      encoder_attention_mask=_hf_additive(padding_mask(cam)))
        got = block(x, mask=padding_mask(am), is_causal=True, context=ctx, context_mask=padding_mask(cam))
        got_explicit = block(x, mask=self_mask, context=ctx, context_mask=padding_mask(cam))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_explicit, expected, atol=ATOL, rtol=0)


def test_patch_embedding_matches_vit_and_is_a_linear_on_patches():
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings
    cfg = ViTConfig(hidden_size=D, image_size=16, patch_size=4, num_channels=3, hidden_dropout_prob=0.0)
    hf = _perturb(ViTEmbeddings(cfg))
    pe = PatchEmbedding(16, 4, 3, d_model=D).eval()
    _copy(pe.proj, hf.patch_embeddings.projection)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        patches = pe(images)
        torch.testing.assert_close(patches, hf.patch_embeddings(images), atol=ATOL, rtol=0)
        assert patches.shape == (2, 16, D) and pe.grid_size == (4, 4) and pe.num_patches == 16

        # the whole ViT/VLMo §3.1 input: [CLS] + patches + learned 1-D positions
        pos = PositionEmbedding(17, D)
        pos.weight.copy_(hf.position_embeddings[0])
        ours = torch.cat([hf.cls_token.expand(2, -1, -1), patches], dim=1) + pos(17)
        torch.testing.assert_close(ours, hf(images), atol=ATOL, rtol=0)

        # Conv2d(kernel=stride=P) == one Linear applied to each flattened (C, P, P) patch, raster order
        flat = images.unfold(2, 4, 4).unfold(3, 4, 4)                 # (B, C, 4, 4, P, P)
        flat = flat.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 16)  # (B, N, C*P*P)
        linear = flat @ pe.proj.weight.reshape(D, -1).T + pe.proj.bias
        torch.testing.assert_close(patches, linear, atol=ATOL, rtol=0)


def test_image_embeddings_match_vit_with_and_without_masked_patches():
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings
    cfg = ViTConfig(hidden_size=D, image_size=16, patch_size=4, num_channels=3, hidden_dropout_prob=0.0)
    hf = _perturb(ViTEmbeddings(cfg, use_mask_token=True)).eval()
    ours = ImageEmbeddings(16, 4, 3, d_model=D, mask_token=True).eval()
    _copy(ours.patch.proj, hf.patch_embeddings.projection)
    with torch.no_grad():
        ours.cls_token.copy_(hf.cls_token)
        ours.mask_token.copy_(hf.mask_token)
        ours.pos_embed.weight.copy_(hf.position_embeddings[0])
        images = torch.randn(2, 3, 16, 16)
        masked = torch.rand(2, 16) < 0.4                                # BEiT-style masked positions
        torch.testing.assert_close(ours(images), hf(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(images, masked), hf(images, bool_masked_pos=masked), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="mask token"):
        ImageEmbeddings(16, 4, 3, d_model=D)(images, masked)


def test_image_embeddings_match_clip_vision_embeddings_with_pre_norm():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=D, image_size=16, patch_size=4, num_channels=3, intermediate_size=DFF,
                           num_attention_heads=H, num_hidden_layers=1)
    hf = _perturb(CLIPVisionEmbeddings(cfg)).eval()
    pre = _perturb(CLIPVisionModel(cfg).pre_layrnorm).eval()
    ours = ImageEmbeddings(16, 4, 3, d_model=D, patch_bias=False, pre_norm=True, layer_norm_eps=cfg.layer_norm_eps).eval()
    assert ours.patch.proj.bias is None
    with torch.no_grad():
        ours.patch.proj.weight.copy_(hf.patch_embedding.weight)
        ours.cls_token.copy_(hf.class_embedding.view(1, 1, -1))
        ours.pos_embed.weight.copy_(hf.position_embedding.weight)
        _copy(ours.pre_norm, pre)
        images = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(ours(images), pre(hf(images)), atol=ATOL, rtol=0)


def test_text_embeddings_match_bert_embeddings_and_offset_positions():
    from transformers.models.bert.modeling_bert import BertEmbeddings
    cfg = _bert_config(vocab_size=50, max_position_embeddings=20, type_vocab_size=2)
    hf = _perturb(BertEmbeddings(cfg)).eval()
    ours = TextEmbeddings(50, D, max_len=20, n_types=2, layer_norm_eps=1e-12).eval()
    with torch.no_grad():
        ours.word.weight.copy_(hf.word_embeddings.weight)
        ours.pos.weight.copy_(hf.position_embeddings.weight)
        ours.token_type.weight.copy_(hf.token_type_embeddings.weight)
        _copy(ours.norm, hf.LayerNorm)
        ids, types = torch.randint(0, 50, (2, 7)), torch.randint(0, 2, (2, 7))
        torch.testing.assert_close(ours(ids, types), hf(ids, token_type_ids=types), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(ids), hf(ids), atol=ATOL, rtol=0)             # type 0 by default
        # positions 3.. of a longer text: what a KV-cached decoder step embeds
        full = ours(torch.cat([ids[:, :3], ids], 1))
        torch.testing.assert_close(ours(ids, offset=3), full[:, 3:], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="vocab_size"):
        ours(torch.tensor([[50]]))


# --- KV cache ---------------------------------------------------------------------------------------------

def test_kv_cache_self_attention_equals_full_causal_forward():
    attn = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 6, 16)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        full = attn(x, mask=padding_mask(am), is_causal=True)
        cache = KVCache()
        # a 2-token prompt (L_q = L_k = 2), a 2-token chunk on top of the cache (L_q=2, L_k=4: the causal
        # mask must be offset), then one token at a time (L_q=1, L_k grows)
        steps = []
        for a, b in [(0, 2), (2, 4), (4, 5), (5, 6)]:
            steps.append(attn(x[:, a:b], mask=padding_mask(am[:, :b]), is_causal=True, cache=cache))
    assert cache.length == 6 and cache.key.shape == (2, 4, 6, 4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_kv_cache_decoder_stack_with_cross_attention(norm_first):
    blocks = nn.ModuleList(TransformerBlock(16, 4, 32, norm_first=norm_first, cross_attention=True, kv_dim=24)
                           for _ in range(2)).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 24)
    cmask = padding_mask(torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]]))

    def run(h, caches=None):
        for i, b in enumerate(blocks):
            h = b(h, is_causal=True, context=ctx, context_mask=cmask, cache=None if caches is None else caches[i])
        return h

    calls = []
    blocks[0].cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = run(x)
        calls.clear()
        caches = [KVCache() for _ in blocks]
        steps = torch.cat([run(x[:, t:t + 1], caches) for t in range(5)], dim=1)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)
    assert len(calls) == 1, "cross-attention keys must be computed once and reused from the cache"
    assert all(c.length == 5 and c.cross_key.shape == (2, 4, 7, 4) for c in caches)
    for c in caches:
        c.reset()
    assert caches[0].length == 0 and caches[0].cross_key is None


def test_kv_cache_reorder_for_beam_search():
    block = TransformerBlock(16, 4, 32, cross_attention=True).eval()
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    idx = torch.tensor([1, 0, 1])  # beam search keeps row 1 twice and row 0 once
    with torch.no_grad():
        full = block(x[idx], is_causal=True, context=ctx[idx])
        cache = KVCache()
        first = block(x[:, :2], is_causal=True, context=ctx, cache=cache)
        cache.reorder(idx)
        assert cache.key.shape[0] == 3 and cache.cross_key.shape[0] == 3
        rest = [block(x[idx, t:t + 1], is_causal=True, context=ctx[idx], cache=cache) for t in (2, 3)]
    torch.testing.assert_close(torch.cat([first[idx], *rest], dim=1), full, atol=ATOL, rtol=0)


# --- masks inside attention -------------------------------------------------------------------------------

def _reference_attention(attn: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention; rows with no allowed key average nothing (0 per head)."""
    B, L, Dm = x.shape
    q, k, v = (p(x).view(B, L, attn.n_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim ** 0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return attn.out_proj((probs @ v).transpose(1, 2).reshape(B, L, Dm))


def test_bool_and_additive_masks_agree_with_reference():
    attn = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.rand(2, 4, 5, 5) > 0.4
    mask[..., 0] = True  # every row may attend somewhere
    with torch.no_grad():
        out_bool = attn(x, mask=mask)
        out_add = attn(x, mask=to_additive(mask))
        torch.testing.assert_close(out_bool, out_add, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_bool, _reference_attention(attn, x, mask), atol=ATOL, rtol=0)
        # is_causal on top of a padding mask == the combined bool mask == the combined additive mask
        pm = padding_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        combined = combine_masks(causal_mask(5), pm)
        a = attn(x, mask=pm, is_causal=True)
        torch.testing.assert_close(a, attn(x, mask=combined), atol=ATOL, rtol=0)
        torch.testing.assert_close(a, attn(x, mask=to_additive(pm), is_causal=True), atol=ATOL, rtol=0)


def test_fully_masked_rows_give_zero_not_nan():
    attn = MultiHeadAttention(16, 4)
    x = torch.randn(2, 4, 16, requires_grad=True)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2] = False           # query 2 of sample 0 may attend to nothing
    per_head = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    per_head[1, 0, 1] = False       # only head 0 of query 1, sample 1, is empty
    for m in (mask, to_additive(mask)):
        out = attn(x, mask=m)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0, 2], torch.zeros(16))
        keep = torch.ones(2, 4, dtype=torch.bool)
        keep[0, 2] = False
        torch.testing.assert_close(out[keep], _reference_attention(attn, x, mask.expand(2, 4, 4, 4))[keep],
                                   atol=ATOL, rtol=0)
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in attn.parameters()) and torch.isfinite(x.grad).all()
        attn.zero_grad(); x.grad = None
    out = attn(x, mask=per_head)  # partially empty row: that head contributes 0, the others attend
    torch.testing.assert_close(out, _reference_attention(attn, x, per_head), atol=ATOL, rtol=0)
    # a whole cross-attention context of padding (e.g. an empty image slot) is also safe
    ctx_mask = padding_mask(torch.tensor([[1, 1, 1], [0, 0, 0]]))
    out = attn(x, torch.randn(2, 3, 16), mask=ctx_mask)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(4, 16))


def test_attention_probs_are_what_forward_computes():
    """MultiHeadAttention.attention_probs: a hand-computed case, then equality with forward for self, causal, padded,
    per-head, additive, empty-row and cross-attention masks (the forward walks of notebooks 03, 07, 08 read it)."""
    attn = MultiHeadAttention(2, 1).eval()
    with torch.no_grad():                      # identity projections: scores = x x^T / sqrt(2)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.weight.copy_(torch.eye(2)); lin.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    probs, out = attn.attention_probs(x)
    e = torch.exp(torch.tensor(1 / 2 ** 0.5))
    torch.testing.assert_close(probs[0, 0], torch.tensor([[e, 1.0], [1.0, e]]) / (1 + e))
    torch.testing.assert_close(out, probs[0] @ x)
    probs, _ = attn.attention_probs(x, is_causal=True)
    torch.testing.assert_close(probs[0, 0], torch.tensor([[1.0, 0.0], [1.0 / (1 + e), e / (1 + e)]]))

    attn = MultiHeadAttention(16, 4).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    empty = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    empty[0, 0, 2] = False
    per_head = torch.rand(2, 4, 5, 5) > 0.5
    per_head[..., 0] = True
    pm = padding_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    cases = [dict(), dict(is_causal=True), dict(mask=pm), dict(mask=pm, is_causal=True), dict(mask=per_head),
             dict(mask=to_additive(per_head)), dict(mask=empty)]
    with torch.no_grad():
        for kw in cases:
            probs, out = attn.attention_probs(x, **kw)
            torch.testing.assert_close(out, attn(x, **kw), atol=ATOL, rtol=0)
            rows = probs.sum(-1)
            assert torch.allclose(rows[rows > 0], torch.ones(()), atol=1e-5)    # each live row sums to 1
        assert torch.equal(attn.attention_probs(x, mask=empty)[0][0, :, 2], torch.zeros(4, 5))   # no key: all 0
        cross = padding_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
        probs, out = attn.attention_probs(x, ctx, mask=cross)
        torch.testing.assert_close(out, attn(x, ctx, mask=cross), atol=ATOL, rtol=0)
        assert probs.shape == (2, 4, 5, 3) and float(probs[0, ..., 2].abs().max()) == 0.0
    with pytest.raises(ValueError, match="self-attention only"):
        attn.attention_probs(x, ctx, is_causal=True)


# --- FFN, pluggable FFN -----------------------------------------------------------------------------------

def test_feedforward_activations():
    x = torch.randn(3, 8)
    for name, fn in [("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
                     ("relu", F.relu), ("silu", F.silu)]:
        ffn = FeedForward(8, 16, activation=name)
        torch.testing.assert_close(ffn(x), ffn.fc2(fn(ffn.fc1(x))))
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu"):
        FeedForward(8, 16, activation="swish")


class TwoExperts(nn.Module):
    """A stand-in for VLMo's modality experts: picks an FFN by a keyword argument."""

    def __init__(self, d: int):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(d, 2 * d), FeedForward(d, 2 * d)])

    def forward(self, x, modality: int):
        return self.experts[modality](x)


def test_pluggable_ffn_receives_ffn_kwargs():
    ffn = TwoExperts(16)
    block = TransformerBlock(16, 4, ffn=ffn).eval()
    assert block.ffn is ffn
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        out = [block(x, ffn_kwargs={"modality": m}) for m in (0, 1)]
        h = x + block.self_attn(block.self_attn_norm(x))
        for m in (0, 1):
            torch.testing.assert_close(out[m], h + ffn.experts[m](block.ffn_norm(h)))
    assert not torch.allclose(out[0], out[1])


# --- image features and embeddings ------------------------------------------------------------------------

def test_conv_feature_extractor_grid_lines_up_by_position():
    fx = ConvFeatureExtractor(3, channels=(8, 16), d_model=24).eval()
    assert fx.grid_size(32) == (8, 8) and fx.grid_size((30, 17)) == (8, 5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, grid = fx(images)
        assert feats.shape == (2, 64, 24) and grid == (8, 8)
        # change the top-left corner: only cells near (0, 0) change; sample 1 and far cells do not
        poked = images.clone()
        poked[0, :, :2, :2] += 5.0
        feats2, _ = fx(poked)
    changed = (feats2 - feats).abs().amax(-1) > 1e-6             # (B, N)
    assert changed[0, 0] and not changed[1].any()
    cells = changed[0].view(8, 8).nonzero()
    assert cells.max() <= 1, f"a corner pixel changed far-away cells {cells.tolist()}"


def test_position_embeddings_1d_2d_and_type():
    pe = PositionEmbedding(8, 4)
    assert pe(5).shape == (1, 5, 4)
    torch.testing.assert_close(pe(2, offset=3)[0], pe.weight[3:5])
    torch.testing.assert_close(pe(position_ids=torch.tensor([[0, 7]]))[0], pe.weight[[0, 7]])
    with pytest.raises(ValueError, match="exceed max_len=8"):
        pe(6, offset=3)
    with pytest.raises(ValueError, match="max_len=8"):
        pe(position_ids=torch.tensor([[8]]))

    pe2 = PositionEmbedding2D((3, 4), 5)
    grid = pe2()
    assert grid.shape == (1, 12, 5)
    torch.testing.assert_close(grid[0, 1 * 4 + 2], pe2.row[1] + pe2.col[2])  # raster order: cell (1, 2)
    assert pe2((2, 2)).shape == (1, 4, 5)
    with pytest.raises(ValueError, match="larger than"):
        pe2((4, 4))

    te = TypeEmbedding(2, 4)
    torch.testing.assert_close(te(torch.tensor([[0, 1]]))[0], te.weight)
    assert te(1).shape == (1, 1, 4)
    with pytest.raises(ValueError, match="n_types=2"):
        te(torch.tensor([[2]]))


def test_init_weights_bert_style():
    block = TransformerBlock(64, 4, 256)
    model = nn.ModuleDict({"block": block, "pos": PositionEmbedding(512, 64),
                           "emb": nn.Embedding(100, 64, padding_idx=0)})
    nn.init.constant_(block.ffn_norm.weight, 3.0)
    assert init_weights(model, std=0.02) is model
    w = block.ffn.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(model["pos"].weight.std().item() - 0.02) < 0.002
    assert torch.equal(block.ffn.fc1.bias, torch.zeros(256))
    assert torch.equal(block.ffn_norm.weight, torch.ones(64))
    assert torch.equal(model["emb"].weight[0], torch.zeros(64))


# --- error messages ---------------------------------------------------------------------------------------

def test_error_messages_name_the_problem():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        MultiHeadAttention(30, 4)
    attn = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"\(B, L, d_model=16\)"):
        attn(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, heads, L_q, L_k\) = \(2, 4, 3, 3\)"):
        attn(torch.randn(2, 3, 16), mask=torch.ones(2, 3, dtype=torch.bool))  # a raw (B, L) mask
    with pytest.raises(ValueError, match=r"context must be \(B=2, L_k, kv_dim=16\)"):
        attn(torch.randn(2, 3, 16), torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="self-attention only"):
        attn(torch.randn(2, 3, 16), torch.randn(2, 5, 16), is_causal=True)
    with pytest.raises(ValueError, match="kv_dim=24.*pass context"):
        MultiHeadAttention(16, 4, kv_dim=24)(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="no cross-attention.*cross_attention=True"):
        TransformerBlock(16, 4)(torch.randn(2, 3, 16), context=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="32x32 is not divisible by patch_size 5x5"):
        PatchEmbedding(32, 5, d_model=16)
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, 32, 32\), got \(1, 3, 16, 16\)"):
        PatchEmbedding(32, 4, d_model=16)(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="same length"):
        ConvFeatureExtractor(channels=(8, 16), strides=(2,), d_model=16)
    cache = KVCache()
    cache.append(torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 4))
    with pytest.raises(ValueError, match="cannot append"):
        cache.append(torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4))


# --- per-cell code tokens (issue 12) ----------------------------------------------------------------------------

def test_cell_code_tokens_by_hand():
    """Cell k reads the patch features under it; its token is sum_a softmax(logits_a) @ E_a + c_k; the loss is the
    summed per-attribute cross-entropy."""
    from mmkit.nn import CellCodeTokens, cell_attribute_loss
    code = CellCodeTokens((4, 4), d_in=3, d_model=4, cell_grid=3, classes=(3, 2))
    # 4x4 features over 3x3 cells: cell (r, c) covers feature rows / columns [4r/3, 4(r+1)/3) -> 2x2 windows at 0, 1, 2
    assert code.window[0].tolist() == [0, 1, 4, 5] and code.window[4].tolist() == [5, 6, 9, 10]
    assert code.window[8].tolist() == [10, 11, 14, 15] and code.window.shape == (9, 4)
    feats = torch.randn(2, 16, 3)
    with torch.no_grad():
        code.weight.normal_()
        want = feats[:, [5, 6, 9, 10]].flatten(1) @ code.weight[4] + code.bias[4]
        assert torch.allclose(code.logits(feats)[:, 4], want, atol=1e-5)
        moved = feats.clone()
        moved[:, 15] += 10.0                                  # a feature outside cell 0's window, inside cell 8's
        assert torch.equal(code.logits(moved)[:, 0], code.logits(feats)[:, 0])
        assert not torch.allclose(code.logits(moved)[:, 8], code.logits(feats)[:, 8])
        code.weight.zero_()
        code.bias.zero_()
        code.bias[0] = torch.tensor([0.0, 0.0, 2.0, 1.0, -1.0])         # cell 0: attribute a (3 values), b (2)
        code.bias[1] = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0])          # cell 1; cells 2-8 stay uniform
    out = code(feats[:1])                                                 # (1, 9 cells, 4)
    p00 = torch.tensor([1.0, 1.0, torch.e ** 2]) / (2 + torch.e ** 2)
    p01 = torch.tensor([torch.e, 1 / torch.e]) / (torch.e + 1 / torch.e)
    p10 = torch.tensor([torch.e ** 5, 1.0, 1.0]) / (torch.e ** 5 + 2)
    p11 = torch.tensor([0.5, 0.5])
    E0, E1, cell = code.codes[0].detach(), code.codes[1].detach(), code.cell.detach()
    want = torch.stack([p00 @ E0 + p01 @ E1 + cell[0], p10 @ E0 + p11 @ E1 + cell[1]])
    assert out.shape == (1, 9, 4) and torch.allclose(out[0, :2], want, atol=1e-6)
    labels = torch.zeros(1, 9, 2, dtype=torch.long)
    labels[0, 0] = torch.tensor([2, 1])                                   # cell 0 holds value 2 / 1; the rest empty
    logp_a = [torch.log(p00[2]), torch.log(p10[0])] + [torch.log(torch.tensor(1 / 3))] * 7
    logp_b = [torch.log(p01[1]), torch.log(p11[0])] + [torch.log(torch.tensor(0.5))] * 7
    want_loss = -(sum(logp_a) + sum(logp_b)) / 9                          # mean over the 9 cells, summed over a, b
    with torch.no_grad():
        assert float(code.loss(feats[:1], labels)) == pytest.approx(float(want_loss), abs=1e-5)
        assert float(cell_attribute_loss(code.logits(feats[:1]), labels, (3, 2))) == pytest.approx(float(want_loss),
                                                                                                  abs=1e-5)
    # occupied: cell 0 only (a right: argmax 2; b wrong: argmax 0 vs label 1). "empty" = attribute a's argmax is 0:
    # cell 0 (argmax 2) is seen occupied, cell 1 (argmax 0) and the uniform cells 2-8 (first maximum, 0) empty: all right
    assert code.accuracy(feats[:1], labels, names=("a", "b")) == {"a": 1.0, "b": 0.0, "empty": 1.0}
    assert [p.shape for p in code.head_parameters()] == [(9, 12, 5), (9, 5)]


def test_cell_tokens_are_the_cnn_then_the_cell_code_and_the_namer_leaves_the_codes_alone():
    """CellTokens = ConvFeatureExtractor -> CellCodeTokens (one token per cell, in place of a ViT's patch projection);
    what stage 0 trains (namer_parameters) is the CNN and the per-cell heads, not the code tables / cell vectors."""
    from mmkit.nn import CellTokens, ImageEmbeddings
    torch.manual_seed(0)
    tokens = CellTokens(16, 3, (8, 16), d_model=12, feature_dim=6)
    x = torch.randn(2, 3, 16, 16)
    feats = tokens.cnn(x).features                                        # (2, 4 * 4, 6): 16 px, two stride-2 stages
    assert feats.shape == (2, 16, 6) and tokens.num_patches == 9
    torch.testing.assert_close(tokens(x), tokens.code(feats))
    labels = torch.zeros(2, 9, 3, dtype=torch.long)
    labels[:, 4] = torch.tensor([1, 2, 1])
    torch.testing.assert_close(tokens.loss(x, labels), tokens.code.loss(feats, labels))
    namer = {id(p) for p in tokens.namer_parameters()}
    assert namer == {id(p) for p in tokens.cnn.parameters()} | {id(tokens.code.weight), id(tokens.code.bias)}
    assert not namer & ({id(p) for p in tokens.code.codes} | {id(tokens.code.cell)})
    emb = ImageEmbeddings(16, 4, 3, d_model=12, patch=tokens)             # [CLS] + 9 cell tokens + positions
    assert emb(x).shape == (2, 10, 12) and emb.patch is tokens
