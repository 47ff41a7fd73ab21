"""Weights from local Hugging Face folders into mPLUG, as mPLUG §5.1 initialises it (nothing downloads).

    cfg = mplug_config_from_hf("ckpt/clip-vit-b16", "ckpt/bert-base-uncased", text_layers=6, fusion_layers=6)
    model = from_pretrained_hf(cfg, "ckpt/clip-vit-b16", "ckpt/bert-base-uncased")   # MPLUG, momentum copies synced

§5.1: "The text encoder is initialized using the first 6 layers of the BERT_base model and the skip-connected network
is initialized using the last 6 layers of the BERT_base. We initialize the visual encoder by CLIP-ViT". The official
code also initialises the decoder (``BertLMHeadModel.from_pretrained``) from BERT: its embeddings, its layers 0..11
(self-attention + FFN) and, from a ``BertForMaskedLM`` folder, the prediction head. Cross-attention layers have no
BERT counterpart and keep their fresh initialisation; so do the ITC projections, the ITM head and the queues.

* :func:`load_vision` copies a ``CLIPVisionModel`` (or the vision tower of a ``CLIPModel``) or a ``ViTModel`` into
  ``model.vision`` (position embeddings resized bilinearly when the grid differs, as the official
  ``resize_pos_embed``);
* :func:`load_text` copies a ``BertModel`` / ``BertForMaskedLM`` into the text encoder (first layers), the fusion
  network (last layers; both sides of a co-attention layer) and the decoder (first layers), and the MLM / LM heads;
* :func:`mplug_config_from_hf` reads the architecture fields from the two HF configs; :func:`from_pretrained_hf`
  builds the model and loads both.

Models are read with ``from_pretrained(path, local_files_only=True)``: a folder a user prepared (``save_pretrained``),
never a hub name. Set ``HF_HUB_OFFLINE=1`` to be sure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, BertForMaskedLM, CLIPVisionModel

from mmkit.config import replace_config
from mmkit.mplug.model import MPLUG, MPLUGConfig

__all__ = ["load_hf", "vision_fields", "text_fields", "mplug_config_from_hf", "load_vision", "load_text",
           "from_pretrained_hf", "resize_positions"]


def load_hf(path_or_model: Any) -> nn.Module:
    """A Hugging Face model from a local folder (``local_files_only``), or the module itself when given one."""
    if isinstance(path_or_model, nn.Module):
        return path_or_model
    p = Path(path_or_model)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json). Prepare one with "
                                "model.save_pretrained(folder) on a machine that has the weights; nothing is downloaded")
    cfg = AutoConfig.from_pretrained(p, local_files_only=True)
    if cfg.model_type == "clip":                              # a whole CLIP: take its vision tower
        return CLIPVisionModel.from_pretrained(p, local_files_only=True)
    if cfg.model_type == "bert" and any("ForMaskedLM" in a for a in (cfg.architectures or [])):
        return BertForMaskedLM.from_pretrained(p, local_files_only=True)
    return AutoModel.from_pretrained(p, local_files_only=True)


def _state(hf: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The HF state dict with a leading wrapper prefix (``vision_model.``, ``bert.``) removed."""
    out = {}
    for k, v in hf.state_dict().items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _kind(hf: nn.Module) -> str:
    t = getattr(hf.config, "model_type", "")
    if t in ("clip_vision_model", "clip"):
        return "clip"
    if t == "vit":
        return "vit"
    if t == "bert":
        return "bert"
    raise ValueError(f"cannot import a {type(hf).__name__} (model_type {t!r}); mPLUG reads CLIP-ViT / ViT vision towers "
                     "and BERT text models")


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

def vision_fields(hf_config) -> dict[str, Any]:
    """The MPLUGConfig vision fields of a CLIP vision / ViT config."""
    clip = getattr(hf_config, "model_type", "") in ("clip_vision_model", "clip")
    if getattr(hf_config, "model_type", "") == "clip":
        hf_config = hf_config.vision_config
    return dict(image_size=hf_config.image_size, patch_size=hf_config.patch_size, in_channels=hf_config.num_channels,
                vision_width=hf_config.hidden_size, vision_layers=hf_config.num_hidden_layers,
                vision_heads=hf_config.num_attention_heads, vision_d_ff=hf_config.intermediate_size,
                vision_activation=hf_config.hidden_act, vision_layer_norm_eps=hf_config.layer_norm_eps,
                vision_pre_norm=clip, vision_patch_bias=not clip, vision_stem="patch")


def text_fields(hf_config) -> dict[str, Any]:
    """The MPLUGConfig text-side fields of a BERT config."""
    return dict(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_heads=hf_config.num_attention_heads,
                d_ff=hf_config.intermediate_size, activation=hf_config.hidden_act,
                layer_norm_eps=hf_config.layer_norm_eps, type_vocab_size=hf_config.type_vocab_size,
                pad_token_id=hf_config.pad_token_id or 0)


def mplug_config_from_hf(vision: Any, bert: Any, base: MPLUGConfig | None = None, **overrides) -> MPLUGConfig:
    """An MPLUGConfig whose vision tower and text side have the shapes of the given HF models (folders or modules):
    ``base`` (default ``MPLUGConfig()``) with :func:`vision_fields`, :func:`text_fields` and ``overrides``."""
    v, b = load_hf(vision), load_hf(bert)
    fields = {**vision_fields(v.config), **text_fields(b.config),
              "max_text_len": min(b.config.max_position_embeddings, (base or MPLUGConfig()).max_text_len), **overrides}
    return replace_config(base or MPLUGConfig(), **fields)


def _check(what: str, ours, theirs, field: str) -> None:
    if ours != theirs:
        raise ValueError(f"{what}: the Hugging Face model has {theirs} but the mPLUG config has {field}={ours}; build "
                         f"the config with {field}={theirs!r} (mplug_config_from_hf does)")


# ---------------------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------------------

def resize_positions(pos: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(1 + g^2, D) [CLS] + grid position embeddings -> (n_tokens, D), the grid resized bilinearly (the official
    ``resize_pos_embed``, used when fine-tuning at a higher resolution)."""
    if pos.shape[0] == n_tokens:
        return pos
    g_old, g_new = math.isqrt(pos.shape[0] - 1), math.isqrt(n_tokens - 1)
    if g_old ** 2 != pos.shape[0] - 1 or g_new ** 2 != n_tokens - 1:
        raise ValueError(f"position embeddings of {pos.shape[0]} and {n_tokens} tokens are not [CLS] + a square grid")
    grid = pos[1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()          # (1, D, g, g)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1).to(pos.dtype)])


@torch.no_grad()
def load_vision(model: MPLUG, vision: Any) -> list[str]:
    """Copy a CLIP vision tower or a ViT into ``model.vision`` (mPLUG §5.1 "initialize the visual encoder by
    CLIP-ViT"). Returns the names of ``model.vision``'s parameters that were copied (the bridge, if any, is not)."""
    hf = load_hf(vision)
    kind = _kind(hf)
    c = model.config
    f = vision_fields(hf.config)
    for field in ("vision_width", "vision_layers", "vision_heads", "vision_d_ff", "patch_size", "in_channels",
                  "vision_activation", "vision_pre_norm", "vision_patch_bias"):
        _check(f"vision tower ({kind})", getattr(c, field), f[field], field)
    sd = _state(hf, ("vision_model.", "vit."))
    ours = model.vision
    n_tok = ours.embeddings.pos_embed.weight.shape[0]
    pairs: dict[str, torch.Tensor] = {}
    if kind == "clip":
        pairs["embeddings.cls_token"] = sd["embeddings.class_embedding"].view(1, 1, -1)
        pairs["embeddings.patch.proj.weight"] = sd["embeddings.patch_embedding.weight"]
        pairs["embeddings.pos_embed.weight"] = resize_positions(sd["embeddings.position_embedding.weight"], n_tok)
        pairs["embeddings.pre_norm.weight"] = sd["pre_layrnorm.weight"]
        pairs["embeddings.pre_norm.bias"] = sd["pre_layrnorm.bias"]
        layer = "encoder.layers.{i}."
        names = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
                 "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.out_proj",
                 "self_attn_norm": "layer_norm1", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2", "ffn_norm": "layer_norm2"}
        final = "post_layernorm"
    else:
        pairs["embeddings.cls_token"] = sd["embeddings.cls_token"]
        pairs["embeddings.patch.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
        pairs["embeddings.patch.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
        pairs["embeddings.pos_embed.weight"] = resize_positions(sd["embeddings.position_embeddings"][0], n_tok)
        layer = "layers.{i}." if "layers.0.layernorm_before.weight" in sd else "encoder.layer.{i}."
        att = "attention." if f"{layer.format(i=0)}attention.q_proj.weight" in sd else "attention.attention."
        names = {"self_attn.q_proj": f"{att}q_proj", "self_attn.k_proj": f"{att}k_proj",
                 "self_attn.v_proj": f"{att}v_proj", "self_attn.out_proj": "attention.o_proj",
                 "self_attn_norm": "layernorm_before", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2",
                 "ffn_norm": "layernorm_after"}
        final = "layernorm"
    for i in range(c.vision_layers):
        for ours_name, theirs in names.items():
            for leaf in ("weight", "bias"):
                pairs[f"blocks.{i}.{ours_name}.{leaf}"] = sd[f"{layer.format(i=i)}{theirs}.{leaf}"]
    pairs["post_norm.weight"], pairs["post_norm.bias"] = sd[f"{final}.weight"], sd[f"{final}.bias"]
    _copy_into(ours, pairs, "vision")
    return sorted(pairs)


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------

_BERT_LAYER = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
               "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
               "self_attn_norm": "attention.output.LayerNorm", "ffn.fc1": "intermediate.dense",
               "ffn.fc2": "output.dense", "ffn_norm": "output.LayerNorm"}
_BERT_EMBEDDINGS = {"word.weight": "embeddings.word_embeddings.weight",
                    "pos.weight": "embeddings.position_embeddings.weight",
                    "token_type.weight": "embeddings.token_type_embeddings.weight",
                    "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
_BERT_HEAD = {"dense.weight": "cls.predictions.transform.dense.weight",
              "dense.bias": "cls.predictions.transform.dense.bias",
              "norm.weight": "cls.predictions.transform.LayerNorm.weight",
              "norm.bias": "cls.predictions.transform.LayerNorm.bias", "decoder.bias": "cls.predictions.bias"}


def _bert_layer(sd: dict, i: int, prefix: str) -> dict[str, torch.Tensor]:
    """Self-attention + FFN of BERT layer ``i`` under our TransformerBlock names (with ``prefix``)."""
    return {f"{prefix}{ours}.{leaf}": sd[f"encoder.layer.{i}.{theirs}.{leaf}"]
            for ours, theirs in _BERT_LAYER.items() for leaf in ("weight", "bias")}


def _embeddings(sd: dict, prefix: str, max_len: int) -> dict[str, torch.Tensor]:
    out = {f"{prefix}{ours}": sd[theirs] for ours, theirs in _BERT_EMBEDDINGS.items()}
    out[f"{prefix}pos.weight"] = out[f"{prefix}pos.weight"][:max_len]          # the first max_text_len positions
    return out


@torch.no_grad()
def load_text(model: MPLUG, bert: Any) -> list[str]:
    """Copy BERT into the text side (mPLUG §5.1): embeddings + layers 0..T-1 -> text encoder; the LAST F layers ->
    the F fusion layers (self-attention + FFN; both sides of a co-attention layer); embeddings + layers 0..Ld-1 ->
    decoder (as the official ``BertLMHeadModel.from_pretrained``); ``cls.predictions`` (BertForMaskedLM folders) ->
    the MLM head and the decoder's LM head. Returns the model's parameter names that were copied."""
    hf = load_hf(bert)
    if _kind(hf) != "bert":
        raise ValueError(f"load_text reads BERT models, got {type(hf).__name__}")
    c, f = model.config, text_fields(hf.config)
    for field in ("vocab_size", "d_model", "n_heads", "d_ff", "activation", "type_vocab_size"):
        _check("BERT", getattr(c, field), f[field], field)
    n_bert = hf.config.num_hidden_layers
    need = max(c.text_layers, c.fusion_layers, c.decoder_layers)
    if n_bert < need:
        raise ValueError(f"BERT has {n_bert} layers but the mPLUG config needs {need} (text_layers={c.text_layers}, "
                         f"fusion_layers={c.fusion_layers}, decoder_layers={c.decoder_layers}); use fewer layers")
    if hf.config.max_position_embeddings < c.max_text_len:
        raise ValueError(f"BERT has {hf.config.max_position_embeddings} positions but max_text_len={c.max_text_len}; "
                         f"build the config with max_text_len <= {hf.config.max_position_embeddings}")
    sd = _state(hf, ("bert.",))
    pairs = _embeddings(sd, "text.embeddings.", c.max_text_len)
    for i in range(c.text_layers):                                   # the first T layers
        pairs.update(_bert_layer(sd, i, f"text.blocks.{i}."))
    first = n_bert - c.fusion_layers                                 # the last F layers
    for k, kind in enumerate(model.fusion.plan):
        sides = ("text.", "image.") if kind == "co" else ("",)
        for side in sides:
            pairs.update(_bert_layer(sd, first + k, f"fusion.layers.{k}.{side}"))
    if model.decoder is not None:
        pairs.update(_embeddings(sd, "decoder.embeddings.", c.max_text_len))
        for i in range(c.decoder_layers):
            pairs.update(_bert_layer(sd, i, f"decoder.blocks.{i}."))
    if "cls.predictions.bias" in sd:
        for head in ("mlm_head.", "decoder.head.") if model.decoder is not None else ("mlm_head.",):
            pairs.update({f"{head}{ours}": sd[theirs] for ours, theirs in _BERT_HEAD.items()})
    _copy_into(model, pairs, "text")
    return sorted(pairs)


def _copy_into(module: nn.Module, pairs: dict[str, torch.Tensor], what: str) -> None:
    own = dict(module.named_parameters())
    for name, value in pairs.items():
        if name not in own:
            raise KeyError(f"{what}: the model has no parameter {name!r} (mPLUG layout changed?)")
        if own[name].shape != value.shape:
            raise ValueError(f"{what}: {name} is {tuple(own[name].shape)} here but {tuple(value.shape)} in the "
                             "Hugging Face model")
        own[name].copy_(value.to(own[name].dtype))


def from_pretrained_hf(config: MPLUGConfig, vision: Any, bert: Any) -> MPLUG:
    """Build ``MPLUG(config)`` and initialise it as mPLUG §5.1 does (see the module doc); the momentum encoders are
    then set equal to the online ones (ALBEF ``copy_params``)."""
    model = MPLUG(config)
    load_vision(model, vision)
    load_text(model, bert)
    model.reset_momentum()
    return model
