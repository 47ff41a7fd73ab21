"""Inputs as sequences: image patches (linear or CNN features), 1-D / 2-D positions, segment types.

* ``PatchEmbedding``   ViT / VLMo linear patch projection
* ``ConvFeatureExtractor`` M6's CNN patch features (a laptop-scale stand-in for ResNet-50)
* ``CellCodeTokens``   patch features -> one token per grid cell, a soft code of the object it holds (issue 12)
* ``PositionEmbedding``, ``PositionEmbedding2D``, ``TypeEmbedding``
* ``ImageEmbeddings``  [CLS] + patches + positions (ViT / BEiT / CLIP), optional [MASK] for masked image modelling
* ``TextEmbeddings``   word + position + type, LayerNorm (BERT)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchEmbedding", "ConvFeatureExtractor", "PatchFeatures", "CellCodeTokens", "CellTokens", "cell_attribute_loss",
           "cell_attribute_accuracy", "ChannelLayerNorm", "PositionEmbedding", "PositionEmbedding2D", "TypeEmbedding",
           "pair", "ImageEmbeddings", "TextEmbeddings"]


# ---------------------------------------------------------------------------------------------------------
# Image inputs
# ---------------------------------------------------------------------------------------------------------

def pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbedding(nn.Module):
    """Split an image into P x P patches and project each linearly to D (ViT; VLMo §3.1; mPLUG §3.1).

    VLMo §3.1: the image (C, H, W) becomes N = HW / P^2 patches of P^2 C values, each multiplied by a
    (P^2 C) x D matrix. A Conv2d with kernel = stride = P computes exactly that linear map on every
    non-overlapping patch (same weights, just stored as (D, C, P, P)), so we use one. Output (B, N, D), the
    patches in row-major (raster) order; ``grid_size`` = (H/P, W/P).
    """

    def __init__(self, image_size: int | tuple[int, int], patch_size: int | tuple[int, int],
                 in_channels: int = 3, *, d_model: int):
        super().__init__()
        self.image_size, self.patch_size = pair(image_size), pair(patch_size)
        (H, W), (P, Q) = self.image_size, self.patch_size
        if H % P or W % Q:
            raise ValueError(f"image_size {H}x{W} is not divisible by patch_size {P}x{Q}; choose a patch size "
                             "that divides the image size, or resize the images")
        self.in_channels = in_channels
        self.grid_size = (H // P, W // Q)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, *self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"PatchEmbedding expects images of shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(images.shape)}; resize the images or build it with that image_size")
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


class PatchFeatures(NamedTuple):
    features: torch.Tensor          # (B, N, D), N = h * w grid cells in row-major order
    grid_size: tuple[int, int]      # (h, w)


class CellCodeTokens(nn.Module):
    """Visual tokens as a per-cell code: which object each cell of a grid holds, embedded like words.

    The patch features under each cell (a k x k window of the feature grid) -> that cell's linear head -> for each
    attribute a softmax over its values (index 0 = "empty") -> the probability-weighted rows of a code table per
    attribute, plus a learned vector per cell that says where:

        t_k = sum_a softmax(W_ka [v_i : i under cell k] + b_ka) @ E_a  +  c_k          (B, n_cells, D)

    Why (issue 12's ceiling analysis, notebook 04): the patch features of the tiny CNN carry every attribute of every
    cell (linear probes 0.96-0.99), yet a small Transformer fine-tuned on them never learns to match a question's
    words ("is there a red square?") against them in minutes; with a code of this form it does, as with perfect
    symbolic tokens. The head is trained first on which object each cell holds (:meth:`loss`, labels as
    ``mmkit.data.world.object_labels``), then kept fixed. Each cell reads only the patches under it, so a heat map
    of a cell token's gradient stays on that cell. ``classes`` counts each attribute's values plus "empty".
    """

    def __init__(self, feature_grid: tuple[int, int], d_in: int, d_model: int, cell_grid: int = 3,
                 classes: tuple[int, ...] = (7, 4, 3)):
        super().__init__()
        h, w = pair(feature_grid)
        self.n_cells, self.classes = cell_grid ** 2, tuple(classes)
        # cell r covers feature rows [r h / g, (r + 1) h / g): it reads the rows that span overlaps, every window as
        # wide as the widest (4x4 features, 3x3 cells: 2x2 windows starting at rows / columns 0, 1, 2)
        def starts(n: int) -> tuple[list[int], int]:
            lo = [r * n // cell_grid for r in range(cell_grid)]
            hi = [-(-(r + 1) * n // cell_grid) for r in range(cell_grid)]        # ceil((r + 1) n / g)
            k = max(b - a for a, b in zip(lo, hi))
            return [min(a, n - k) for a in lo], k
        rows, kh = starts(h)
        cols, kw = starts(w)
        window = [[(r0 + i) * w + (c0 + j) for i in range(kh) for j in range(kw)] for r0 in rows for c0 in cols]
        self.register_buffer("window", torch.tensor(window), persistent=False)          # (cells, kh * kw) indices
        n_out = sum(self.classes)
        self.weight = nn.Parameter(torch.randn(self.n_cells, kh * kw * d_in, n_out) * 0.02)   # W_k (cells, kk F, O)
        self.bias = nn.Parameter(torch.zeros(self.n_cells, n_out))                              # b_k
        # N(0, 1) rows as nn.Embedding draws them: the codes are fixed once the head is trained, so they start at
        # the scale the embedding LayerNorm of the model expects, and random directions are already distinct.
        self.codes = nn.ParameterList([nn.Parameter(torch.randn(k, d_model)) for k in self.classes])   # E_a (k, D)
        self.cell = nn.Parameter(torch.randn(self.n_cells, d_model))                                    # c_k (cells, D)

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`loss` trains (the per-cell heads; the code tables and cell vectors stay as drawn)."""
        return [self.weight, self.bias]

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, F) patch features -> (B, n_cells, sum(classes)) attribute logits of every cell."""
        under = feats[:, self.window].flatten(2)                                         # (B, cells, kk F)
        return torch.einsum("bcf,cfo->bco", under, self.weight) + self.bias

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        parts = self.logits(feats).split(self.classes, dim=-1)                          # per attribute (B, cells, k)
        return sum(p.softmax(-1) @ e for p, e in zip(parts, self.codes)) + self.cell   # (B, cells, D)

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over attributes of the mean cross-entropy per cell; ``labels`` (B, cells, attributes) long."""
        return cell_attribute_loss(self.logits(feats), labels, self.classes)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor,
                 names: tuple[str, ...] = ("colour", "shape", "size")) -> dict[str, float]:
        """Accuracy of each attribute over the occupied cells (label 0 = empty), and of "empty" over all cells."""
        return cell_attribute_accuracy(self.logits(feats), labels, self.classes, names, with_empty=True)


def cell_attribute_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...],
                            names: tuple[str, ...] = ("colour", "shape", "size"),
                            with_empty: bool = False) -> dict[str, float]:
    """Accuracy of each attribute's argmax over the occupied cells (label 0 = empty) of per-cell logits (B, cells,
    sum(classes)); ``with_empty`` adds "empty": whether the first attribute's argmax says empty, over all cells."""
    parts = logits.split(tuple(classes), dim=-1)
    occupied = labels[..., 0] > 0
    out = {name: float((parts[j].argmax(-1) == labels[..., j])[occupied].float().mean())
           for j, name in enumerate(names)}
    if with_empty:
        out["empty"] = float(((parts[0].argmax(-1) == 0) == ~occupied).float().mean())
    return out


def cell_attribute_loss(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """Cross-entropy of per-cell attribute logits (B, cells, sum(classes)) against labels (B, cells, attributes):
    the mean over cells of each attribute, summed over the attributes."""
    parts = logits.split(tuple(classes), dim=-1)
    return sum(F.cross_entropy(p.reshape(-1, k), labels[..., j].reshape(-1))
               for j, (p, k) in enumerate(zip(parts, classes)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels at each pixel of a (B, C, H, W) map: batch-independent and local."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # normalise C, keep (B, C, H, W)


class ConvFeatureExtractor(nn.Module):
    """A small CNN that turns an image into a grid of patch features, lined up as a sequence (M6 §3.1).

    M6 §3.1 splits an image into patches, extracts each patch's features with a trained feature extractor
    (ResNet-50) and lines them up by position. At laptop scale a few strided conv stages stand in for the
    ResNet: each stage is conv3x3(stride s) -> LayerNorm over channels -> ReLU, so the output grid is the
    image downsampled by prod(strides) and cell (i, j) describes the patch under its receptive field. The norm
    is per pixel (not BatchNorm/GroupNorm), so a cell's features depend only on nearby pixels, never on batch
    or whole-image statistics. Neighbouring cells share some context (their receptive fields overlap), unlike
    running the CNN on each cropped patch; the result is the same kind of sequence. A 1x1 conv projects each
    cell to ``d_model``.

    ``forward(images)`` -> :class:`PatchFeatures` ``(features (B, N, D), grid_size (h, w))``.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64),
                 strides: tuple[int, ...] | None = None, *, d_model: int):
        super().__init__()
        strides = tuple(strides) if strides is not None else (2,) * len(channels)  # halve per stage by default
        if len(strides) != len(channels):
            raise ValueError(f"strides {strides} and channels {tuple(channels)} must have the same length "
                             "(one per stage)")
        self.strides, self.in_channels = strides, in_channels
        layers, c_in = [], in_channels
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1), ChannelLayerNorm(c), nn.ReLU()]
            c_in = c
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, d_model, kernel_size=1)  # per-cell linear map to the model width

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The (h, w) feature grid for an image of ``image_size``: N = h * w positions to embed."""
        h, w = pair(image_size)
        for s in self.strides:
            h, w = (h - 1) // s + 1, (w - 1) // s + 1  # conv3x3, padding 1: ceil(size / s)
        return h, w

    def forward(self, images: torch.Tensor) -> PatchFeatures:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"ConvFeatureExtractor expects images (B, C={self.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        f = self.proj(self.stages(images))                       # (B, D, h, w)
        return PatchFeatures(f.flatten(2).transpose(1, 2), (f.shape[2], f.shape[3]))  # (B, h*w, D)


class CellTokens(nn.Module):
    """Visual tokens as one code per world cell, read by a small CNN: :class:`ConvFeatureExtractor` ->
    :class:`CellCodeTokens`. It stands where a ViT's patch projection stands (``ImageEmbeddings(patch=...)``), so a
    model built on it sees [CLS] + one token per cell instead of [CLS] + patches.

    Why (issues 12-14): a tiny ViT trained from scratch on the world reads colour and size from its patch tokens but
    not shape (per-cell shape 0.45 for VLMo's patches, 0.67 for mPLUG's conv stem), and its fusion never learns to
    match a question's words against 64 patches in CPU-minutes. A CNN with one linear head per cell names every
    cell's object after a few hundred steps; its code is what the fusion then reads, as the detector's region
    features of pre-ViLT vision-language models (bottom-up attention) are. Train the namer first (:meth:`loss` on
    ``mmkit.data.world.object_labels``; :meth:`namer_parameters`), then keep it fixed.

    ``forward(images)`` takes normalised images (B, C, S, S) -> (B, cells, D).
    """

    def __init__(self, image_size: int, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128), *,
                 d_model: int, feature_dim: int = 128, cell_grid: int = 3, classes: tuple[int, ...] = (7, 4, 3)):
        super().__init__()
        self.cnn = ConvFeatureExtractor(in_channels, tuple(channels), d_model=feature_dim)
        self.code = CellCodeTokens(self.cnn.grid_size(image_size), feature_dim, d_model, cell_grid=cell_grid,
                                   classes=classes)
        self.num_patches = self.code.n_cells

    def namer_parameters(self) -> list[nn.Parameter]:
        """What :meth:`loss` trains: the CNN and the per-cell heads (the code tables and cell vectors stay as drawn)."""
        return list(self.cnn.parameters()) + self.code.head_parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.code(self.cnn(images).features)                               # (B, cells, D)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every cell's colour / shape / size (0 = empty) against ``labels`` (B, cells, 3)."""
        return self.code.loss(self.cnn(images).features, labels)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Per-attribute accuracy over the occupied cells, and of "empty" over all cells."""
        return self.code.accuracy(self.cnn(images).features, labels)


# ---------------------------------------------------------------------------------------------------------
# Position and type embeddings
# ---------------------------------------------------------------------------------------------------------

class PositionEmbedding(nn.Module):
    """Learned absolute 1-D position embeddings (BERT; VLMo §3.1 V_pos and T_pos).

    ``pe(L)`` returns (1, L, D) for positions 0..L-1; ``pe(L, offset=cache.length)`` for the L new tokens of an
    incremental decoding step; ``pe(position_ids=ids)`` (B, L) for arbitrary positions. Add the result to the
    token embeddings.
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, d_model) * 0.02)  # (max_len, D)

    def forward(self, length: int | None = None, offset: int = 0,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is not None:
            hi = int(position_ids.max()) if position_ids.numel() else -1
            if hi >= self.max_len or (position_ids.numel() and int(position_ids.min()) < 0):
                raise ValueError(f"position id {hi} is outside 0..{self.max_len - 1} (max_len={self.max_len}); "
                                 "raise max_len in the config or truncate the inputs")
            return self.weight[position_ids]                     # (B, L, D)
        if length is None:
            raise ValueError("PositionEmbedding needs a length (and optional offset) or position_ids")
        if offset + length > self.max_len:
            raise ValueError(f"positions {offset}..{offset + length - 1} exceed max_len={self.max_len} of this "
                             "PositionEmbedding; raise max_len in the config or truncate the inputs")
        return self.weight[offset:offset + length].unsqueeze(0)  # (1, L, D)


class PositionEmbedding2D(nn.Module):
    """Learned 2-D position embeddings for a patch grid: ``row[i] + col[j]`` for the cell (i, j).

    Factorised rows/columns (h + w vectors instead of h * w) tell the model where a patch (or an M6 §3.1 CNN
    feature) sits in the image. ``pe2d()`` returns (1, h*w, D) in the same row-major order as
    :class:`PatchEmbedding` / :class:`ConvFeatureExtractor` output; ``pe2d((h, w))`` a smaller grid's top-left.
    """

    def __init__(self, grid_size: int | tuple[int, int], d_model: int):
        super().__init__()
        self.grid_size = pair(grid_size)
        self.row = nn.Parameter(torch.randn(self.grid_size[0], d_model) * 0.02)  # (h, D)
        self.col = nn.Parameter(torch.randn(self.grid_size[1], d_model) * 0.02)  # (w, D)

    def forward(self, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        h, w = self.grid_size if grid_size is None else pair(grid_size)
        if h > self.grid_size[0] or w > self.grid_size[1]:
            raise ValueError(f"grid {h}x{w} is larger than this PositionEmbedding2D's "
                             f"{self.grid_size[0]}x{self.grid_size[1]}; build it with a larger grid_size")
        pos = self.row[:h, None, :] + self.col[None, :w, :]   # (h, w, D)
        return pos.reshape(1, h * w, -1)                       # (1, h*w, D)


class TypeEmbedding(nn.Module):
    """Learned segment / modality type embeddings (BERT token types; M6 §3.1; VLMo §3.1 V_type, T_type).

    ``te(ids)`` with a (B, L) long tensor -> (B, L, D); ``te(1)`` with an int -> (1, 1, D) broadcasting over
    a whole sequence of one type (e.g. all image patches).
    """

    def __init__(self, n_types: int, d_model: int):
        super().__init__()
        self.n_types = n_types
        self.weight = nn.Parameter(torch.randn(n_types, d_model) * 0.02)  # (n_types, D)

    def forward(self, type_ids: torch.Tensor | int) -> torch.Tensor:
        if isinstance(type_ids, int):
            if not 0 <= type_ids < self.n_types:
                raise ValueError(f"type id {type_ids} is outside 0..{self.n_types - 1} (n_types={self.n_types})")
            return self.weight[type_ids].view(1, 1, -1)        # (1, 1, D)
        if type_ids.numel() and (int(type_ids.min()) < 0 or int(type_ids.max()) >= self.n_types):
            raise ValueError(f"type ids must lie in 0..{self.n_types - 1} (n_types={self.n_types}), got values "
                             f"{int(type_ids.min())}..{int(type_ids.max())}")
        return self.weight[type_ids]                           # (B, L, D)


# ---------------------------------------------------------------------------------------------------------
# Whole input embeddings, as ViT / BEiT / CLIP and BERT have them (VLMo §3.1, mPLUG §3.1)
# ---------------------------------------------------------------------------------------------------------

class ImageEmbeddings(nn.Module):
    """[CLS] + linear patch embeddings + learned 1-D positions (ViT; VLMo §3.1 eq. for H^v_0; mPLUG §3.1).

    VLMo §3.1: ``H^v_0 = [v_[I_CLS], V v_i^p, ..., V v_N^p] + V_pos + V_type``. The type embedding belongs to the
    multimodal model (it knows which modality it is), so it is not added here. Optional pieces:

    * ``mask_token``: a learned vector that replaces the patches chosen by ``bool_masked_pos`` (B, N) (BEiT's
      masked image modelling, VLMo §3.4 stage 1);
    * ``pre_norm``: a LayerNorm on the whole sequence (CLIP's ``pre_layrnorm``);
    * ``patch_bias=False``: CLIP's patch projection has no bias.

    ``forward(images, bool_masked_pos=None)`` -> (B, 1 + N, D) (or (B, N, D) with ``cls_token=False``).
    """

    def __init__(self, image_size: int | tuple[int, int], patch_size: int | tuple[int, int], in_channels: int = 3,
                 *, d_model: int, cls_token: bool = True, mask_token: bool = False, patch_bias: bool = True,
                 pre_norm: bool = False, layer_norm_eps: float = 1e-5, dropout: float = 0.0,
                 patch: nn.Module | None = None):
        super().__init__()
        # ``patch``: any module images -> (B, N, D) with a ``num_patches`` (e.g. :class:`CellTokens`); default ViT's
        self.patch = patch if patch is not None else PatchEmbedding(image_size, patch_size, in_channels, d_model=d_model)
        if not patch_bias and patch is None:                                     # CLIP: the projection has no bias
            self.patch.proj.bias = None
        self.num_patches = self.patch.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if cls_token else None            # (1, 1, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model)) if mask_token else None          # (1, 1, D)
        self.pos_embed = PositionEmbedding(self.num_patches + int(cls_token), d_model)              # V_pos
        self.pre_norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if pre_norm else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch(images)                                                   # (B, N, D)
        B, N, _ = x.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token: build ImageEmbeddings(..., mask_token=True)")
            if tuple(bool_masked_pos.shape) != (B, N):
                raise ValueError(f"bool_masked_pos must be (B, N) = {(B, N)}, got {tuple(bool_masked_pos.shape)}")
            m = bool_masked_pos.to(x.dtype)[..., None]                           # (B, N, 1)
            x = x * (1 - m) + self.mask_token.to(x.dtype) * m                    # BEiT: [MASK] where masked
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)          # (B, 1 + N, D)
        x = x + self.pos_embed(x.shape[1])
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return self.dropout(x)


class TextEmbeddings(nn.Module):
    """Word + learned 1-D position (+ segment type) embeddings, LayerNorm, dropout: BERT's input (VLMo §3.1
    ``H^w_0 = [w_[T_CLS], w_1, ..., w_M, w_[T_SEP]] + T_pos + T_type``; mPLUG's text encoder).

    ``forward(input_ids, token_type_ids=None, offset=0)``: ids (B, L) -> (B, L, D); ``offset`` shifts the positions
    (incremental decoding with a KV cache). ``n_types=0`` leaves the type embedding out.
    """

    def __init__(self, vocab_size: int, d_model: int, max_len: int = 512, n_types: int = 2, pad_token_id: int = 0,
                 layer_norm_eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.pos = PositionEmbedding(max_len, d_model)
        self.token_type = TypeEmbedding(n_types, d_model) if n_types else None
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        V = self.word.num_embeddings
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"token ids must lie in 0..{V - 1} (vocab_size), got {int(input_ids.min())}.."
                             f"{int(input_ids.max())}; labels use -100, inputs never do")
        x = self.word(input_ids) + self.pos(input_ids.shape[1], offset=offset)    # (B, L, D)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else 0)
        return self.dropout(self.norm(x))
