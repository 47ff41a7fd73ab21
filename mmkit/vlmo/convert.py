"""Weights for VLMo from local Hugging Face folders: BEiT / ViT for the attention and the vision expert (VLMo §3.4:
"we directly utilize the pretrained parameters of BEiT to initialize the attention module and vision expert"),
BERT for the text embeddings.

    report = load_vision_weights(model, "/path/to/beit-folder")   # patches, [I_CLS], positions, attention, V-FFN
    report = load_text_weights(model, "/path/to/bert-folder")     # word + position embeddings, LayerNorm
    report.copied, report.skipped                                  # parameter names of the VLMo, and why not

Both read the folder with ``transformers.AutoModel.from_pretrained(folder, local_files_only=True)`` (nothing is
downloaded) and copy module by module, so any checkpoint transformers can read works (a ``BeitForMaskedImageModeling``
folder too: AutoModel keeps its backbone).

What maps where (HF -> VLMo), for every layer i:

    layernorm_before / attention q,k,v,o / lambda_1  -> blocks.i.self_attn_norm / self_attn / self_attn_scale
    layernorm_after / mlp (fc1, fc2) / lambda_2      -> blocks.i.ffn.vision.norm / ffn.vision.mlp / ffn_scale
    embeddings: patch projection, cls_token, mask_token, position_embeddings -> image_embed
    final layernorm (when the model has one)         -> final_norm

BEiT's key projection has no bias (VLMo's gets a zero one). ViT has no layer scale: γ1 = γ2 = 1 reproduce it. The
image type V_type is set to zero, so the imported image encoder computes exactly what the Hugging Face encoder does
(tests/test_vlmo.py checks it). BEiT checkpoints with relative position biases (the released BEiT / VLMo weights)
do not fit VLMo §3.1's absolute positions: they are refused unless ``allow_relative_position_bias=True`` (then the
biases are dropped and the positions keep their init). BERT: word embeddings (its vocabulary must fit), the first
``max_text_len`` position embeddings with BERT's type-0 embedding folded in (both are added before the LayerNorm, so
the sum is exact), the LayerNorm; T_type is set to zero for the same reason as V_type.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from transformers import AutoModel

from mmkit.vlmo.model import IMAGE_TYPE, TEXT_TYPE, VLMo

__all__ = ["ImportReport", "load_vision_weights", "load_text_weights", "copy_vision_encoder", "copy_text_embeddings"]


class ImportReport(NamedTuple):
    copied: list            # VLMo parameter names that now hold the Hugging Face weights
    skipped: list           # (what, why) pairs: parts of either model that were not copied


def _first(obj, *paths: str):
    """The first attribute path that exists on ``obj`` (transformers renamed modules between versions)."""
    for path in paths:
        cur = obj
        for name in path.split("."):
            cur = getattr(cur, name, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise ValueError(f"{type(obj).__name__} has none of {paths}: not a BEiT / ViT / BERT module this importer knows")


def _copy_linear(dst: nn.Linear, src: nn.Linear, name: str, copied: list) -> None:
    if dst.weight.shape != src.weight.shape:
        raise ValueError(f"{name}: VLMo has {tuple(dst.weight.shape)}, the Hugging Face model {tuple(src.weight.shape)}; "
                         "build VLMo with the same width / FFN size / patch size")
    dst.weight.copy_(src.weight)
    copied.append(f"{name}.weight")
    if dst.bias is not None:
        if src.bias is not None:
            dst.bias.copy_(src.bias)
        else:
            dst.bias.zero_()                                          # BEiT's key projection has no bias
        copied.append(f"{name}.bias")


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm, name: str, copied: list) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)
    dst.eps = src.eps                                                 # the checkpoint's epsilon, for exactness
    copied += [f"{name}.weight", f"{name}.bias"]


@torch.no_grad()
def copy_vision_encoder(model: VLMo, hf: nn.Module, allow_relative_position_bias: bool = False) -> ImportReport:
    """Copy a Hugging Face ``BeitModel`` / ``ViTModel`` (an instance) into VLMo's image embeddings, attention and V-FFN
    (see the module doc). Widths, depth, patch size and image size must match."""
    c, hc = model.config, hf.config
    kind = hc.model_type
    if kind not in ("beit", "vit", "data2vec-vision"):
        raise ValueError(f"expected a BEiT or ViT model, got model_type={kind!r}")
    layers = list(_first(hf, "layers", "encoder.layer"))
    for ours, theirs, what in ((c.d_model, hc.hidden_size, "width"), (c.n_layers, len(layers), "layers"),
                               (c.n_heads, hc.num_attention_heads, "heads"), (c.d_ff, hc.intermediate_size, "FFN size"),
                               (c.patch_size, hc.patch_size, "patch size"), (c.image_size, hc.image_size, "image size")):
        if ours != theirs:
            raise ValueError(f"{kind} has {what} {theirs} but this VLMo has {ours}: build VLMo with the checkpoint's "
                             f"{what} (e.g. replace_config(cfg, ...))")
    if getattr(hc, "use_relative_position_bias", False) or getattr(hc, "use_shared_relative_position_bias", False):
        if not allow_relative_position_bias:
            raise ValueError("this BEiT uses relative position biases, which VLMo §3.1's learned absolute positions "
                             "cannot hold; pass allow_relative_position_bias=True to import everything else (the "
                             "biases are dropped, positions keep their init)")
    copied, skipped = [], []
    emb = hf.embeddings
    ie = model.image_embed
    _copy_linear(ie.patch.proj, emb.patch_embeddings.projection, "image_embed.patch.proj", copied)
    ie.cls_token.copy_(emb.cls_token)
    copied.append("image_embed.cls_token")
    if getattr(emb, "mask_token", None) is not None:
        ie.mask_token.copy_(emb.mask_token)
        copied.append("image_embed.mask_token")
    else:
        skipped.append(("image_embed.mask_token", f"the {kind} has no mask token"))
    pos = getattr(emb, "position_embeddings", None)
    if pos is not None:
        ie.pos_embed.weight.copy_(pos.reshape(-1, c.d_model))
        copied.append("image_embed.pos_embed.weight")
    else:
        skipped.append(("image_embed.pos_embed.weight", f"the {kind} has relative position biases only"))
    model.type_embed.weight[IMAGE_TYPE].zero_()                       # V_type = 0: exactly the HF encoder
    copied.append(f"type_embed.weight[{IMAGE_TYPE}]")

    for i, (block, layer) in enumerate(zip(model.blocks, layers)):
        p = f"blocks.{i}"
        att = layer.attention
        for name, paths in (("q_proj", ("q_proj", "attention.query")), ("k_proj", ("k_proj", "attention.key")),
                            ("v_proj", ("v_proj", "attention.value")), ("out_proj", ("o_proj", "output.dense"))):
            _copy_linear(getattr(block.self_attn, name), _first(att, *paths), f"{p}.self_attn.{name}", copied)
        _copy_norm(block.self_attn_norm, layer.layernorm_before, f"{p}.self_attn_norm", copied)
        vision = block.ffn.vision
        _copy_norm(vision.norm, layer.layernorm_after, f"{p}.ffn.vision.norm", copied)
        _copy_linear(vision.mlp.fc1, _first(layer, "mlp.fc1", "intermediate.dense"), f"{p}.ffn.vision.mlp.fc1", copied)
        _copy_linear(vision.mlp.fc2, _first(layer, "mlp.fc2", "output.dense"), f"{p}.ffn.vision.mlp.fc2", copied)
        for ours, theirs, name in ((block.self_attn_scale, getattr(layer, "lambda_1", None), "self_attn_scale"),
                                   (block.ffn_scale, getattr(layer, "lambda_2", None), "ffn_scale")):
            if ours is None:
                if isinstance(theirs, torch.Tensor):
                    raise ValueError(f"the {kind} has layer scale but this VLMo was built with layer_scale_init=None")
                continue
            ours.copy_(theirs if isinstance(theirs, torch.Tensor) else torch.ones_like(ours))   # ViT: γ = 1
            copied.append(f"{p}.{name}")
    final = getattr(hf, "layernorm", None)
    if isinstance(final, nn.LayerNorm):
        _copy_norm(model.final_norm, final, "final_norm", copied)
    else:
        skipped.append(("final_norm", f"the {kind} has no final LayerNorm (mean pooling)"))
    skipped.append(("language / VL experts, text embeddings, heads", "not in an image-only model"))
    return ImportReport(copied, skipped)


@torch.no_grad()
def copy_text_embeddings(model: VLMo, hf: nn.Module) -> ImportReport:
    """Copy a Hugging Face ``BertModel``'s embeddings (an instance) into VLMo's text embeddings."""
    c = model.config
    emb = hf.embeddings
    V, D = emb.word_embeddings.weight.shape
    if D != c.d_model:
        raise ValueError(f"BERT has width {D} but this VLMo has d_model={c.d_model}")
    if V > c.vocab_size:
        raise ValueError(f"BERT's vocabulary has {V} ids but this VLMo has vocab_size={c.vocab_size}: build VLMo with "
                         f"vocab_size >= {V}")
    te = model.text_embed
    te.word.weight[:V] = emb.word_embeddings.weight
    n_pos = emb.position_embeddings.weight.shape[0]
    if n_pos < c.max_text_len:
        raise ValueError(f"BERT has {n_pos} positions but this VLMo needs max_text_len={c.max_text_len}")
    type0 = emb.token_type_embeddings.weight[0] if getattr(emb, "token_type_embeddings", None) is not None else 0.0
    te.pos.weight.copy_(emb.position_embeddings.weight[:c.max_text_len] + type0)   # word + (pos + type 0): exact
    _copy_norm(te.norm, emb.LayerNorm, "text_embed.norm", [])
    model.type_embed.weight[TEXT_TYPE].zero_()                        # T_type = 0: exactly BERT's embeddings
    copied = ["text_embed.word.weight" + (f"[:{V}]" if V < c.vocab_size else ""), "text_embed.pos.weight",
              "text_embed.norm.weight", "text_embed.norm.bias", f"type_embed.weight[{TEXT_TYPE}]"]
    skipped = [("BERT's transformer layers", "VLMo §3.4 trains the language expert by MLM (stage 2)")]
    if V < c.vocab_size:
        skipped.append((f"text_embed.word.weight[{V}:]", "ids beyond BERT's vocabulary keep their init"))
    return ImportReport(copied, skipped)


def _load(folder: str | Path) -> nn.Module:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json); save one with "
                                "model.save_pretrained(folder) or download it once outside the kit")
    return AutoModel.from_pretrained(folder, local_files_only=True).eval()


def load_vision_weights(model: VLMo, folder: str | Path, allow_relative_position_bias: bool = False) -> ImportReport:
    """VLMo §3.4: the attention and V-FFN (+ image embeddings) from a local BEiT or ViT folder."""
    return copy_vision_encoder(model, _load(folder), allow_relative_position_bias)


def load_text_weights(model: VLMo, folder: str | Path) -> ImportReport:
    """The text embeddings (words, positions, LayerNorm) from a local BERT folder."""
    return copy_text_embeddings(model, _load(folder))
