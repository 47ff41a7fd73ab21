"""Shared layers, written once and tested against Hugging Face modules: every system composes these.

    attention.py   boolean masks (True = may attend), KVCache, MultiHeadAttention (self / cross, SDPA)
    blocks.py      FeedForward, TransformerBlock (pre / post-norm, optional cross-attention, pluggable FFN)
    embeddings.py  patch / CNN features, per-cell code tokens, 1-D / 2-D positions, segment types
    moe.py         Mixture-of-Experts FFN and expert parallelism (M6 §3.4)
    init.py        BERT-style initialisation
    modes.py       evaluating(model): eval mode for a block, the caller's mode restored after
"""
from mmkit.nn.attention import (KVCache, MultiHeadAttention, causal_mask, check_mask, combine_masks, padding_mask,
                                to_additive)
from mmkit.nn.blocks import ACTIVATIONS, FeedForward, TransformerBlock
from mmkit.nn.embeddings import (CellCodeTokens, CellTokens, ChannelLayerNorm, ConvFeatureExtractor, ImageEmbeddings,
                                 PatchEmbedding, PatchFeatures, PositionEmbedding, PositionEmbedding2D, TextEmbeddings,
                                 TypeEmbedding, cell_attribute_accuracy, cell_attribute_loss)
from mmkit.nn.init import init_weights
from mmkit.nn.modes import evaluating

__all__ = [
    "causal_mask", "padding_mask", "combine_masks", "to_additive", "check_mask", "KVCache", "MultiHeadAttention",
    "ACTIVATIONS", "FeedForward", "TransformerBlock", "PatchEmbedding", "ConvFeatureExtractor", "PatchFeatures", "CellCodeTokens", "cell_attribute_loss", "cell_attribute_accuracy",
    "ChannelLayerNorm", "PositionEmbedding", "PositionEmbedding2D", "TypeEmbedding", "ImageEmbeddings", "TextEmbeddings",
    "init_weights", "evaluating",
]
