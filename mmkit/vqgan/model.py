"""VQGAN: the image tokenizer of M6's text-to-image (M6 §4.1), built from taming-transformers' own modules.

M6 §4.1: "we apply a trained vector-quantized generative adversarial network to representing images with
discrete image codes, and we then use the pretrained M6 to learn the relations between texts and codes" (the
two-stage framework of DALL-E; the VQGAN is Esser et al. 2021, "Taming Transformers"). This file is stage one:

    model = mmkit.load("vqgan-world")               # or VQGAN(VQGANConfig(...)), build_model("vqgan-world-tiny")
    codes = model.encode(images)                     # (B, 3, 32, 32) in [0, 1] -> (B, 8, 8) int64 in [0, n_embed)
    images = model.decode(codes)                     # (B, 8, 8) or flat (B, 64) codes -> (B, 3, 32, 32) in [0, 1]
    model = load_taming_checkpoint("vqgan_imagenet_f16_1024.ckpt", "vqgan_imagenet_f16_1024.yaml")

The network, top to bottom (module names are those of taming's ``VQModel``, so official weights line up):

    x (B, 3, H, W) in [0, 1] --*2-1--> [-1, 1] --encoder--> (B, z_channels, h, w)   h = H / 2**(len(ch_mult)-1)
        --quant_conv (1x1)--> z_e (B, embed_dim, h, w)
        --quantize: nearest row of quantize.embedding.weight (n_embed, embed_dim)--> indices (B, h, w), z_q
        --post_quant_conv (1x1)--> --decoder--> x_rec (B, 3, H, W) in [-1, 1] --(x+1)/2--> [0, 1]
    loss.discriminator: a PatchGAN (taming's NLayerDiscriminator) that only training uses

Taming's own ``VQModel`` does not import here (it needs an old pytorch-lightning and torchvision) and its loss
(``VQLPIPSWithDiscriminator``) downloads VGG weights for LPIPS, so the training objective is written below
(:meth:`VQGAN.forward`): L1 + L2 reconstruction, codebook and commitment losses, and a hinge GAN loss scaled by
taming's adaptive weight, switched on at ``disc_start``; dead codes are restarted. No perceptual (LPIPS) term:
nothing may download weights, and the world's flat colours need none.

How the GAN fits the kit's one training loop (:func:`mmkit.train.train`, one optimizer)
-------------------------------------------------------------------------------------
Taming trains with two optimizers, one for the autoencoder and one for the discriminator. Here ``forward``
returns ONE scalar, ``autoencoder_loss + discriminator_loss``, built so that each part's gradient reaches only
its own network:

* the discriminator loss sees the reconstruction *detached*, so it has no gradient in the autoencoder;
* the generator's GAN term runs the discriminator with *detached parameters* (``torch.func.functional_call``),
  so it pushes the reconstruction but leaves the discriminator alone.

One ``backward`` then fills both networks' gradients exactly as two separate losses would, and one AdamW step
updates both: simultaneous updates from the same batch instead of taming's alternating ones, with shared betas
(use taming's ``(0.5, 0.9)``) and LR schedule (``param_groups_fn`` can give the discriminator its own LR). Clip
the two networks separately with ``clip_fn=mmkit.train.local_clip_fn(is_discriminator_param)``. The step counter
that ``disc_start`` is compared with is a buffer (``loss.global_step``), so resume continues it exactly. No change
to ``train.py`` is needed. Under several processes (DDP) pass ``find_unused_parameters=True`` (the discriminator
gets no gradient before ``disc_start``) and leave ``restart_every = 0`` (restarts draw from each process's own batch).
"""
from __future__ import annotations

import contextlib
import io
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.registry import register_model, register_preset
from mmkit.config import load_config
from mmkit.evaluation.faithfulness import FaithfulnessConfig, pixel_chroma

__all__ = [
    "VQGANConfig", "VQGAN", "VQGANOutput", "CodebookStats", "codebook_usage", "hinge_d_loss", "vanilla_d_loss",
    "generator_loss", "adaptive_weight", "Quantized", "object_mask",
    "config_from_taming", "read_taming_state_dict", "load_taming_checkpoint", "TamingLoadReport", "OpaqueObject",
]


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

@dataclass
class VQGANConfig:
    model_type: str = "vqgan"
    # -- autoencoder: taming's `ddconfig` (keyword arguments of its Encoder / Decoder) --------------------------
    resolution: int = 32           # side of the training images in pixels (the world at 32 px, like m6-tiny's
                                   # images). encode() takes any side divisible by the downsampling factor; the
                                   # code LM and the recipe use this one. Official ImageNet models: 256
    in_channels: int = 3           # RGB in
    out_ch: int = 3                # RGB out
    ch: int = 32                   # base width of the conv stacks. A multiple of 32: taming's GroupNorm has 32
                                   # groups (official ImageNet models: 128)
    ch_mult: tuple = (1, 1, 2)     # width multiplier per resolution level; len(ch_mult) - 1 halvings, so 32 px ->
                                   # 8x8 codes (factor 4). Official f16 models: (1, 1, 2, 2, 4)
    num_res_blocks: int = 1        # ResNet blocks per level (official: 2)
    attn_resolutions: tuple = ()   # feature-map sides that get a self-attention block (official: (16,)); the
                                   # middle of the encoder and decoder always has one, at the code grid
    dropout: float = 0.0           # dropout inside the ResNet blocks (official: 0)
    resamp_with_conv: bool = True  # strided / upsampling convs rather than pooling / nearest only (official)
    z_channels: int = 32           # encoder output channels (official: 256)
    local_encoder: bool = False    # encoder without its middle self-attention and with a per-pixel channel norm in
                                   # place of GroupNorm (whose statistics span the image), so a code depends on its
                                   # neighbourhood only and a plain backdrop always gets the same codes. Measured
                                   # (training.backdrop_code_entropy): with taming's encoder a backdrop position
                                   # carried 3.0 bits, changing with the object elsewhere in the image, all of it
                                   # noise a code LM must learn to sample; local, on one backdrop, 0.3. The decoder
                                   # is taming's either way (official: False)
    # -- vector quantizer (taming's VectorQuantizer2) ---------------------------------------------------------
    n_embed: int = 256             # codebook size K: the image-code vocabulary of the code LM (official: 1024 or
                                   # 16384)
    embed_dim: int = 32            # size of each code vector (official: 256)
    beta: float = 0.25             # commitment weight (VQ-VAE eq. 3; taming hard-codes 0.25)
    legacy_beta: bool = False      # taming's VectorQuantizer2(legacy=True), its default and what official models
                                   # trained with, puts beta on the codebook term instead of the commitment term
                                   # (a known bug). False: the VQ-VAE paper's loss. Only training is affected
    # -- training objective (taming's VQLPIPSWithDiscriminator minus LPIPS) ----------------------------------
    l1_weight: float = 1.0         # weight of |x - x_rec| (taming's pixelloss_weight)
    l2_weight: float = 1.0         # weight of (x - x_rec)^2 (taming: none). On the world, L1 alone spends the
                                   # codes on faint background shades (90% of the pixels) and mixes up object
                                   # colours; L2 weighs the few large colour errors more: measured after 800
                                   # steps, val MSE 0.0062 -> 0.0022, object colours right 29% -> 57%
    object_weight: float = 1.0     # weight of object pixels (object_mask of the target) in the L1 / L2
                                   # terms; background weighs 1. World objects cover ~10% of the pixels, so their
                                   # colours and shapes barely move an unweighted loss (taming: none)
    codebook_weight: float = 1.0   # weight of the codebook + beta * commitment term (taming's codebook_weight)
    disc_weight: float = 0.1       # scales the adaptive weight of the GAN term (taming: 0.75-0.8). Lower here:
                                   # the tiny discriminator barely tells world images from good reconstructions
                                   # (its hinge loss stays near 1); at 0.8 from step 1000 its noise cost 1.5 dB val
                                   # PSNR and drew faint stripes, at 0.1 from step 1100 nothing measurable (30.74 vs
                                   # 30.72 dB without GAN, same recipe otherwise)
    disc_factor: float = 1.0       # multiplies both GAN losses once the discriminator is on
    disc_start: int = 1100         # training forward passes (= optimizer steps without gradient accumulation)
                                   # before the GAN losses switch on (taming: 0 to 250001)
    disc_loss: str = "hinge"       # "hinge" (VQGAN) or "vanilla" (softplus, the original GAN)
    disc_num_layers: int = 2       # strided layers of the PatchGAN: receptive field 34 px for 2, 70 px for 3
    disc_ndf: int = 16             # discriminator base width (taming's default 64: 2.8M parameters at 3 layers;
                                   # 16 with 2 layers: 43K, so the shipped checkpoint stays small)
    disc_in_channels: int = 3      # channels the discriminator sees (RGB)
    use_actnorm: bool = False      # ActNorm instead of BatchNorm in the discriminator (taming option)
    # -- codebook health -------------------------------------------------------------------------------------
    usage_decay: float = 0.95      # EMA decay of each code's share of the quantized positions (loss.code_usage)
    restart_every: int = 10        # every N training forward passes, codes whose usage EMA fell below
                                   # restart_threshold / n_embed are moved onto encoder outputs of the batch, those
                                   # the codebook fits worst first (the "random restart" of Jukebox, Dhariwal et al.
                                   # 2020, aimed); 0 = never (taming). Without it the world's codebook collapsed to
                                   # 13-23 used codes of 256 (perplexity 7.7) and objects lost their colours
    restart_threshold: float = 0.03  # "dead" = used at less than this fraction of the uniform rate 1 / n_embed

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"VQGANConfig: {msg}")
        need(self.ch > 0 and self.ch % 32 == 0, f"ch={self.ch} must be a positive multiple of 32 (taming's GroupNorm "
             "uses 32 groups, so every width ch * ch_mult[i] must divide into 32 groups)")
        need(len(self.ch_mult) >= 1 and all(int(m) >= 1 for m in self.ch_mult), f"ch_mult={self.ch_mult} needs >= 1 "
             "positive entries")
        need(self.z_channels % 32 == 0, f"z_channels={self.z_channels} must be a multiple of 32 (GroupNorm)")
        f = 2 ** (len(self.ch_mult) - 1)
        need(self.resolution % f == 0, f"resolution={self.resolution} is not divisible by the downsampling factor "
             f"{f} = 2**(len(ch_mult)-1)")
        need(self.n_embed >= 2 and self.embed_dim >= 1, "need n_embed >= 2 and embed_dim >= 1")
        need(self.disc_loss in ("hinge", "vanilla"), f"disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        need(self.disc_num_layers >= 1 and self.disc_ndf >= 1, "need disc_num_layers >= 1 and disc_ndf >= 1")
        need(0.0 <= self.usage_decay < 1.0, f"usage_decay must be in [0, 1), got {self.usage_decay}")
        need(self.restart_every >= 0, f"restart_every must be >= 0, got {self.restart_every}")
        need(self.object_weight >= 1.0, f"object_weight must be >= 1 (1 = unweighted), got {self.object_weight}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid for ``resolution`` x ``resolution`` images (8 for 32 px at factor 4)."""
        return self.resolution // self.downsample_factor

    def ddconfig(self) -> dict:
        """Taming's ``ddconfig`` (Encoder / Decoder keyword arguments) for this config."""
        return dict(ch=self.ch, out_ch=self.out_ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
                    resamp_with_conv=self.resamp_with_conv, in_channels=self.in_channels,
                    resolution=self.resolution, z_channels=self.z_channels, double_z=False)


# ---------------------------------------------------------------------------------------------------------
# Loss pieces (hand-checkable functions) and codebook statistics
# ---------------------------------------------------------------------------------------------------------

def object_mask(images: torch.Tensor, chroma: float = FaithfulnessConfig().chroma_threshold) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) float: 1 on the pixels the faithfulness check counts as an object
    (:func:`mmkit.evaluation.faithfulness.pixel_chroma` above its threshold), the pixels ``object_weight`` weighs up."""
    return (pixel_chroma(images) > chroma).unsqueeze(1).float()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (the form taming trains VQGANs with; the paper writes the log loss; Lim & Ye 2017):
    ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))``. Real patches are pushed to logits >= 1 and
    reconstructions to <= -1; patches already beyond the margin give no gradient, which keeps D from
    overpowering the small generator."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The original GAN's discriminator loss: ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's GAN term ``-mean(D(x_rec))``: raise the discriminator's "real" score of reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0, eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """The VQGAN objective's adaptive weight (Esser et al. 2021; taming's ``calculate_adaptive_weight``):
    ``lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + eps) * disc_weight``, ``L`` the decoder's last layer,
    clamped to [0, max_weight] and detached.

    Why: the GAN gradient's scale is arbitrary (it depends on how confident D happens to be) while the
    reconstruction gradient shrinks as training goes; dividing by the ratio of their norms at the last layer
    makes the GAN term push exactly as hard as reconstruction does there (times ``disc_weight``), so it can
    sharpen edges without ever swamping the reconstruction.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(g_rec) / (torch.norm(g_gan) + eps)
    return torch.clamp(w, 0.0, max_weight).detach() * disc_weight


class CodebookStats(NamedTuple):
    perplexity: float        # exp(entropy of the code frequencies): n_embed when all codes are equally used, 1 when one is
    used: int                # codes that occur at least once
    dead: int                # codes that never occur (n_embed - used)
    counts: torch.Tensor     # (n_embed,) int64 occurrences per code


def codebook_usage(indices: torch.Tensor, n_embed: int) -> CodebookStats:
    """How a set of code indices (any shape) uses an ``n_embed``-code book: perplexity, used and dead codes.

    A collapsed codebook (few codes used, the rest "dead") wastes vocabulary and blurs reconstructions; the
    perplexity is the effective number of codes in use.
    """
    counts = torch.bincount(indices.reshape(-1).long().cpu(), minlength=n_embed)[:n_embed]
    p = counts.double() / max(1, int(counts.sum()))
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return CodebookStats(float(entropy.exp()), used, n_embed - used, counts)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class VQGANOutput(NamedTuple):
    loss: torch.Tensor            # scalar: autoencoder loss + discriminator loss (their gradients reach disjoint
                                  # parameter sets, see the module doc)
    reconstruction: torch.Tensor  # (B, 3, H, W) on the [0, 1] scale (not clamped)
    indices: torch.Tensor         # (B, h, w) int64 code indices
    logs: dict                    # name -> float: rec_l1, mse01 (MSE on the [0, 1] scale), codebook, commitment,
                                  # perplexity, codes_used, disc_on [, g_loss, d_weight, d_loss, logits_*, restarted]


class Quantized(NamedTuple):
    z_q: torch.Tensor             # (B, E, h, w) code vectors, with the straight-through gradient to z_e
    indices: torch.Tensor         # (B, h, w) int64
    vq_loss: torch.Tensor         # codebook + beta * commitment (beta on the codebook term when legacy_beta)
    codebook: torch.Tensor        # ||sg[z_e] - e||^2, mean
    commitment: torch.Tensor      # ||z_e - sg[e]||^2, mean


def _quiet():
    """taming's Decoder prints the z shape when built; keep builds silent."""
    return contextlib.redirect_stdout(io.StringIO())


class PixelChannelNorm(nn.Module):
    """A LayerNorm over the channels of each pixel, ``(B, C, H, W) -> (B, C, H, W)``, with GroupNorm's parameter
    names (``weight``, ``bias``): the normalisation of ``VQGANConfig.local_encoder``, local where GroupNorm's
    statistics span the whole image."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # (B, H, W, C)
        return y.permute(0, 3, 1, 2)


def make_local(encoder: nn.Module) -> nn.Module:
    """Taming's Encoder made local in place (``VQGANConfig.local_encoder``): its middle attention becomes the
    identity and every GroupNorm a :class:`PixelChannelNorm` of the same width. Returns ``encoder``."""
    encoder.mid.attn_1 = nn.Identity()
    for module in list(encoder.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, PixelChannelNorm(child.num_channels, child.eps))
    return encoder


class VQGANLoss(nn.Module):
    """What only training needs, under ``loss.*`` as in taming (``loss.discriminator.*`` keys line up with official
    checkpoints; their ``loss.perceptual_loss.*`` LPIPS weights have no counterpart here)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

        self.discriminator = NLayerDiscriminator(input_nc=c.disc_in_channels, ndf=c.disc_ndf,
                                                 n_layers=c.disc_num_layers, use_actnorm=c.use_actnorm)
        self.discriminator.apply(weights_init)                 # N(0, 0.02) convs, N(1, 0.02) BatchNorm gains
        # training forward passes so far: compared with disc_start; a buffer so checkpoints and resume keep it
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
        # EMA of each code's share of the quantized positions (uniform = 1 / n_embed): finds dead codes. It starts
        # at 0, so the first restart moves every code the encoder has not chosen yet onto an encoder output: a
        # data-dependent initialisation of the codebook (taming's uniform(-1/K, 1/K) init sits far from z_e).
        self.register_buffer("code_usage", torch.zeros(c.n_embed))


class VQGAN(nn.Module):
    """Encoder -> quantizer -> decoder from taming's modules, plus the PatchGAN discriminator (see module doc)."""

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        c = self.config = config or VQGANConfig()
        dd = c.ddconfig()
        with _quiet():
            self.encoder = Encoder(**dd)
            self.decoder = Decoder(**dd)
        if c.local_encoder:
            make_local(self.encoder)
        # sane_index_shape: indices come back as (B, h, w); no remap (official models do not use one)
        self.quantize = VectorQuantizer2(c.n_embed, c.embed_dim, beta=c.beta, remap=None, sane_index_shape=True,
                                         legacy=c.legacy_beta)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.loss = VQGANLoss(c)

    # -- shapes and checks -------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def num_codes(self) -> int:
        return self.config.n_embed

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight, where the adaptive GAN weight compares gradient norms (taming)."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.config, self.downsample_factor
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != c.in_channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VQGAN expects images of shape (B, {c.in_channels}, H, W), got {shape}; add a batch "
                             "dimension with images.unsqueeze(0) for a single image")
        if not images.is_floating_point():
            raise TypeError(f"VQGAN expects float images in [0, 1], got dtype {images.dtype}; for uint8 pixels pass "
                            "images.float() / 255")
        H, W = images.shape[-2:]
        if H % f or W % f or H < f or W < f:
            raise ValueError(f"image size {H}x{W} is not a multiple of the downsampling factor {f}: resize to "
                             f"{c.resolution}x{c.resolution} (this model's training size) or another multiple of {f}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -0.01 or hi > 1.01:
            hint = "0-255 pixels: divide by 255" if hi > 2 else "[-1, 1] inputs: pass (x + 1) / 2"
            raise ValueError(f"VQGAN expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (looks like {hint})")

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or flat (B, h*w) integer codes -> (B, h, w), with clear errors."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() \
                or indices.dtype == torch.bool:
            raise TypeError(f"decode expects integer code indices (torch.long), got "
                            f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        if indices.dim() == 2:                     # flat codes, e.g. what a code LM generates
            L, g = indices.shape[1], self.config.grid_size
            side = g if L == g * g else math.isqrt(L)
            if side * side != L:
                raise ValueError(f"decode got flat codes of length {L}, which is not a square grid (this model's "
                                 f"grid is {g}x{g} = {g * g}); pass (B, h, w) indices")
            indices = indices.view(indices.shape[0], side, side)
        if indices.dim() != 3:
            raise ValueError(f"decode expects code indices of shape (B, h, w) or (B, h*w), got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.n_embed):
            raise ValueError(f"code indices must be in [0, {self.config.n_embed}) (the codebook size), got values "
                             f"in [{int(indices.min())}, {int(indices.max())}]")
        return indices.long()

    # -- encode / decode ---------------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> z_e (B, embed_dim, h, w): the continuous encoder output before quantization."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images * 2.0 - 1.0))          # taming works in [-1, 1]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, H/f, W/f) int64 code indices in [0, n_embed)."""
        _, _, (_, _, indices) = self.quantize(self.encode_latent(images))
        return indices

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> z_q (B, embed_dim, h, w): the codebook vectors."""
        return self.quantize.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) -> reconstruction (B, 3, H, W) on taming's [-1, 1] scale (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or flat (B, h*w) int64 code indices -> (B, 3, h*f, w*f) images in [0, 1] (clamped)."""
        indices = self._check_indices(indices)
        return ((self.decode_latent(self.embed_codes(indices)) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``decode(encode(images))``: what the tokenizer keeps of an image."""
        return self.decode(self.encode(images))

    # -- the training objective ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> VQGANOutput:
        """The VQGAN training loss on a batch of (B, 3, H, W) images in [0, 1] (see the module doc)."""
        c = self.config
        z_e = self.encode_latent(images)                                   # (B, E, h, w)
        x = images * 2.0 - 1.0                                             # [-1, 1], taming's scale
        training = self.training and torch.is_grad_enabled()
        restarted = 0
        if training and c.restart_every and int(self.loss.global_step) % c.restart_every == c.restart_every - 1:
            restarted = self._restart_dead_codes(z_e)                      # before the codebook is used this step

        q = self.quantize_st(z_e)                                          # codes + VQ-VAE losses
        indices = q.indices
        x_rec = self.decode_latent(q.z_q)                                  # (B, 3, H, W) in ~[-1, 1]

        # Reconstruction: L1 (taming's pixel loss; less blurry than L2 alone, as robust to outliers) and an
        # optional L2. Without it nothing ties the codes to the image.
        rec_l1 = (x - x_rec).abs().mean()
        rec_mse = F.mse_loss(x_rec, x)
        if c.object_weight != 1.0:
            weight = 1.0 + (c.object_weight - 1.0) * object_mask(images)             # (B, 1, H, W)
            err = x - x_rec
            rec_loss = c.l1_weight * (weight * err.abs()).mean() + c.l2_weight * (weight * err ** 2).mean()
        else:
            rec_loss = c.l1_weight * rec_l1 + c.l2_weight * rec_mse

        logs = {"rec_l1": rec_l1.detach(), "mse01": rec_mse.detach() / 4.0, "codebook": q.codebook.detach(),
                "commitment": q.commitment.detach()}
        loss = rec_loss + c.codebook_weight * q.vq_loss
        disc_on = int(self.loss.global_step) >= c.disc_start and c.disc_factor > 0
        if disc_on:
            D = self.loss.discriminator
            # Generator GAN term -D(x_rec): the discriminator judges 8-16 px patches (PatchGAN), so it asks for
            # sharp, locally realistic edges that a pixel loss averages away. D runs with detached parameters:
            # this term moves the autoencoder only.
            frozen = {n: p.detach() for n, p in D.named_parameters()}
            g_loss = generator_loss(torch.func.functional_call(D, frozen, (x_rec,)))
            if training:
                # Adaptive weight (Esser et al. 2021): balance the two gradients at the decoder's last layer.
                d_weight = adaptive_weight(rec_loss, g_loss, self.last_layer, c.disc_weight)
            else:
                d_weight = torch.zeros(())                                 # taming: 0 outside training
            # Discriminator loss on real images and detached reconstructions: trains D only.
            d_fn = hinge_d_loss if c.disc_loss == "hinge" else vanilla_d_loss
            logits_real, logits_fake = D(x.detach()), D(x_rec.detach())
            d_loss = d_fn(logits_real, logits_fake)
            loss = loss + d_weight * c.disc_factor * g_loss + c.disc_factor * d_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight, d_loss=d_loss.detach(),
                        logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean())

        if training:
            with torch.no_grad():
                counts = torch.bincount(indices.reshape(-1), minlength=c.n_embed).to(self.loss.code_usage.dtype)
                self.loss.code_usage.mul_(c.usage_decay).add_(counts / counts.sum(), alpha=1.0 - c.usage_decay)
                self.loss.global_step.add_(1)
        stats = codebook_usage(indices.detach(), c.n_embed)
        logs.update(perplexity=stats.perplexity, codes_used=stats.used, disc_on=float(disc_on))
        if c.restart_every:
            logs["restarted"] = restarted
        logs = {k: float(v) for k, v in logs.items()}
        return VQGANOutput(loss, (x_rec + 1.0) / 2.0, indices, logs)

    def quantize_st(self, z_e: torch.Tensor) -> "Quantized":
        """Vector quantization with its two losses and the straight-through estimator (VQ-VAE §3.1-3.2)."""
        c = self.config
        # Each z_e vector -> index of its nearest codebook row (taming's VectorQuantizer2 does the search; its own
        # loss is recomputed below term by term, so that both terms can be logged).
        with torch.no_grad():
            _, _, (_, _, indices) = self.quantize(z_e)                     # (B, h, w)
        e = self.embed_codes(indices)                                      # (B, E, h, w) the chosen code vectors
        # Codebook loss ||sg[z_e] - e||^2 (VQ-VAE eq. 3, 2nd term): argmin has no gradient, so this is what moves
        # the code vectors towards the encoder outputs assigned to them.
        codebook = F.mse_loss(e, z_e.detach())
        # Commitment loss ||z_e - sg[e]||^2 (3rd term, weight beta): keeps the encoder's outputs close to their
        # codes, so they do not drift and grow faster than the codebook can follow.
        commitment = F.mse_loss(z_e, e.detach())
        vq_loss = (c.beta * codebook + commitment) if c.legacy_beta else (codebook + c.beta * commitment)
        # Straight-through estimator: the decoder sees e; the encoder receives the decoder's gradient as if
        # quantization were the identity.
        z_q = z_e + (e - z_e).detach()
        return Quantized(z_q, indices, vq_loss, codebook, commitment)

    @torch.no_grad()
    def _restart_dead_codes(self, z_e: torch.Tensor) -> int:
        """Move codes whose usage EMA fell below ``restart_threshold / n_embed`` onto encoder outputs of this batch,
        favouring those the codebook fits worst (drawn with torch's global generator, which train() seeds per
        step). Returns how many moved."""
        c, usage = self.config, self.loss.code_usage
        dead = (usage < c.restart_threshold / c.n_embed).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, c.embed_dim)   # (B*h*w, E)
        # Where to put them: encoder outputs drawn with probability proportional to their squared distance to the
        # nearest code, i.e. where the codebook fits worst. Uniform draws land mostly on the (majority) background;
        # these land on rare patches (an object of an uncommon colour) that share a code with something else.
        w = self.quantize.embedding.weight.detach()
        err = torch.cdist(flat, w.to(flat.dtype)).amin(1).pow(2)           # (B*h*w,)
        n = dead.numel()
        if n > flat.shape[0] or float(err.sum()) <= 0:
            pick = torch.randint(flat.shape[0], (n,), device=flat.device)
        else:
            pick = torch.multinomial(err.float(), n, replacement=False)
        self.quantize.embedding.weight[dead] = flat[pick].to(self.quantize.embedding.weight.dtype)
        usage[dead] = 1.0 / c.n_embed                                      # a fresh code gets a grace period
        return int(dead.numel())


# ---------------------------------------------------------------------------------------------------------
# Official taming checkpoints
# ---------------------------------------------------------------------------------------------------------

# VQLPIPSWithDiscriminator's defaults, used when an official config leaves a loss parameter out (so that the
# discriminator built here has the shape of the one in the checkpoint).
_TAMING_LOSS_DEFAULTS = dict(codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3, disc_in_channels=3,
                             disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False,
                             disc_ndf=64, disc_loss="hinge", disc_start=0)


def _as_plain(obj: Any) -> Any:
    if hasattr(obj, "_content") and obj.__class__.__module__.startswith("omegaconf"):   # a DictConfig / ListConfig
        from omegaconf import OmegaConf
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def config_from_taming(config: Any) -> VQGANConfig:
    """A :class:`VQGANConfig` from a taming model config: a YAML path (``vqgan_imagenet_f16_1024.yaml``), the parsed
    dict (``{"model": {"target": ..., "params": {...}}}``), or its ``params`` alone (with ``ddconfig``). A
    :class:`VQGANConfig` or an mmkit preset name (``"vqgan-imagenet-f16-1024"``) passes through."""
    import yaml

    if isinstance(config, VQGANConfig):
        return config
    if isinstance(config, str) and not Path(config).exists() and not config.endswith((".yaml", ".yml")):
        cfg = load_config(config)
        if not isinstance(cfg, VQGANConfig):
            raise ValueError(f"preset {config!r} is not a VQGAN config")
        return cfg
    if isinstance(config, (str, Path)):
        p = Path(config)
        if not p.exists():
            raise FileNotFoundError(f"taming config {p} does not exist (it is the .yaml that comes with the .ckpt)")
        config = yaml.safe_load(p.read_text(encoding="utf-8"))
    config = _as_plain(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"a taming config must be a YAML path or a mapping, got {type(config).__name__}")
    model = config.get("model", config)
    target = model.get("target", "taming.models.vqgan.VQModel")
    if target != "taming.models.vqgan.VQModel":
        raise ValueError(f"model.target is {target!r}; only taming.models.vqgan.VQModel checkpoints are supported (Gumbel"
                         " and segmentation VQ models use other quantizers / outputs)")
    params = model.get("params", model)
    if "ddconfig" not in params or "n_embed" not in params or "embed_dim" not in params:
        raise ValueError("the taming config has no model.params.ddconfig / n_embed / embed_dim: is this the VQGAN's "
                         "config (e.g. vqgan_imagenet_f16_1024.yaml), not a transformer's?")
    if params.get("remap") is not None:
        raise ValueError("this checkpoint remaps code indices (model.params.remap); mmkit's VQGAN does not support that")
    dd = dict(params["ddconfig"])
    if dd.get("double_z", False):
        raise ValueError("ddconfig.double_z is true: that is a KL autoencoder, not a VQGAN")
    loss_params = dict(_TAMING_LOSS_DEFAULTS)
    loss_params.update((params.get("lossconfig") or {}).get("params") or {})
    return VQGANConfig(
        resolution=int(dd["resolution"]), in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)),
        ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))),
        num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", ())),
        dropout=float(dd.get("dropout", 0.0)), resamp_with_conv=bool(dd.get("resamp_with_conv", True)),
        z_channels=int(dd["z_channels"]), n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]),
        beta=0.25, legacy_beta=True,                  # what VQModel builds: VectorQuantizer2(beta=0.25), legacy default
        restart_every=0, l1_weight=float(loss_params["pixelloss_weight"]), l2_weight=0.0, codebook_weight=float(loss_params["codebook_weight"]),
        disc_weight=float(loss_params["disc_weight"]), disc_factor=float(loss_params["disc_factor"]),
        disc_start=int(loss_params["disc_start"]), disc_loss=str(loss_params["disc_loss"]),
        disc_num_layers=int(loss_params["disc_num_layers"]), disc_ndf=int(loss_params["disc_ndf"]),
        disc_in_channels=int(loss_params["disc_in_channels"]), use_actnorm=bool(loss_params["use_actnorm"]),
    )


class OpaqueObject:
    """Stands in for a pickled object of a class that weights-only loading does not know (an OmegaConf config,
    a Lightning callback, a numpy scalar, a path): it keeps the constructor arguments and pickled state as plain
    data and runs no code of the original class. ``pickled_name`` says what it replaced."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.pickled_name}>"


# Plain data types that pickled configs name as values (OmegaConf stores key / element types such as
# builtins.int): they stand for themselves. Building one from pickled arguments runs no code of the file.
_PLAIN_TYPES = {f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, complex, bool, str)}
_PLAIN_TYPES["builtins.NoneType"] = type(None)


def _opaque(name: str):
    if name in _PLAIN_TYPES:
        return _PLAIN_TYPES[name]
    if name == "collections.defaultdict":
        return lambda *args: {}                       # the weights-only unpickler fills only real dicts
    return type(f"Opaque[{name}]", (OpaqueObject,), {"pickled_name": name, "__module__": __name__})


# Modules whose objects official checkpoints carry as training metadata next to the tensors. References to
# anything else (builtins.exec, subprocess, ...) are never needed to read weights: such a file is refused.
_METADATA_MODULES = ("omegaconf.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "torchmetrics.",
                     "numpy.", "pathlib.", "argparse.", "collections.", "typing.", "taming.")


def _load_with_placeholders(path: Path, first_error: Exception) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` with the checkpoint's non-tensor globals mapped to :class:`OpaqueObject`
    placeholders (by name, through ``torch.serialization.safe_globals``): torch's weights-only unpickler still
    decides everything else, and no code named in the file is ever imported or called."""
    names: set[str] = set()
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))   # static scan, zip files
    except Exception:
        pass
    error: Exception = first_error
    for _ in range(64):
        bad = sorted(n for n in names if not n.startswith(_METADATA_MODULES) and n not in _PLAIN_TYPES)
        if bad:
            raise pickle.UnpicklingError(
                f"{path}: refusing to load: the file's pickle refers to {bad}, which a weights file never needs (it "
                "may be malicious). Nothing from it was run. If you trust the file, re-save only its 'state_dict' "
                "tensors with the code that wrote it (in a sandbox), and load that file instead") from error
        with torch.serialization.safe_globals([(_opaque(n), n) for n in sorted(names)]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True), sorted(names)
            except pickle.UnpicklingError as e:
                error = e
        m = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if not m or m.group(1) in names:
            raise pickle.UnpicklingError(f"{path}: weights-only loading failed even with placeholders for the "
                                         f"training metadata {sorted(names)}: {error}") from error
        names.add(m.group(1))
    raise pickle.UnpicklingError(f"{path}: too many unknown globals in the pickle") from error


def read_taming_state_dict(ckpt_path: str | Path) -> tuple[dict[str, torch.Tensor], list[str], Any]:
    """Read a taming ``.ckpt`` safely: returns (state_dict, placeholder global names, the whole loaded object).

    ``torch.load(weights_only=True)`` first. Official (pytorch-lightning) checkpoints also pickle training
    metadata (OmegaConf configs, callbacks, numpy scalars) that weights-only loading refuses; those objects are
    then rebuilt as inert :class:`OpaqueObject` placeholders (see :func:`_load_with_placeholders`) and only the
    tensors under ``"state_dict"`` are used.
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj, placeholders = torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as e:
        obj, placeholders = _load_with_placeholders(path, e)
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state_dict of tensors (expected {{'state_dict': {{name: tensor}}}} as "
                         f"taming's VQModel checkpoints; got {type(obj).__name__} with keys "
                         f"{list(obj)[:8] if isinstance(obj, Mapping) else '-'})")
    return dict(sd), placeholders, obj


class TamingLoadReport(NamedTuple):
    loaded: int                    # tensors copied into the model
    ignored_loss_keys: list        # checkpoint keys under loss.* with no counterpart here (LPIPS: loss.perceptual_loss.*)
    missing_loss_keys: list        # model keys under loss.* the checkpoint lacks (left at their initial values)
    placeholders: list             # pickled globals read as inert placeholders (training metadata)
    global_step: int | None        # the checkpoint's training step (becomes loss.global_step), when it has one


def load_taming_checkpoint(ckpt_path: str | Path, config: Any, verbose: bool = True) -> VQGAN:
    """An official taming VQGAN (``VQModel``) checkpoint as an eval-mode :class:`VQGAN`.

    Args:
        ckpt_path: the ``.ckpt`` (e.g. ``vqgan_imagenet_f16_1024/checkpoints/last.ckpt``), read with
            :func:`read_taming_state_dict` (weights only, never arbitrary pickles).
        config: its model config: the YAML path (``configs/model.yaml``), the parsed dict, a
            :class:`VQGANConfig` or a preset name such as ``"vqgan-imagenet-f16-1024"`` (see :func:`config_from_taming`).
        verbose: print what was not loaded.
    The autoencoder keys (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``,
    ``post_quant_conv.*``) must match exactly; ``loss.*`` keys load where they exist on both sides (the
    discriminator) and the rest is reported in ``model.load_report`` (:class:`TamingLoadReport`).
    """
    cfg = config_from_taming(config)
    sd, placeholders, obj = read_taming_state_dict(ckpt_path)
    model = VQGAN(cfg)
    own = model.state_dict()
    core_missing = sorted(k for k in own if not k.startswith("loss.") and k not in sd)
    core_unexpected = sorted(k for k in sd if not k.startswith("loss.") and k not in own)
    if core_missing or core_unexpected:
        raise RuntimeError(f"{ckpt_path} does not match its config as a taming VQModel: missing {core_missing[:6]}, "
                           f"unexpected {core_unexpected[:6]}. Is the YAML the one that came with this checkpoint?")
    bad_shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad_shapes:
        raise RuntimeError(f"{ckpt_path}: tensor shapes disagree with the config (wrong YAML?): {bad_shapes[:4]}")
    take = {k: v for k, v in sd.items() if k in own}
    ignored = sorted(k for k in sd if k.startswith("loss.") and k not in own)
    missing_loss = sorted(k for k in own if k.startswith("loss.") and k not in sd)
    model.load_state_dict(take, strict=False)
    step = obj.get("global_step") if isinstance(obj, Mapping) else None
    step = int(step) if isinstance(step, int) else None
    if step is not None:
        model.loss.global_step.fill_(step)
    report = TamingLoadReport(len(take), ignored, missing_loss, placeholders, step)
    model.load_report = report
    if verbose:
        def groups(keys):
            return sorted({".".join(k.split(".")[:2]) for k in keys})
        print(f"mmkit: loaded {len(take)} tensors from {ckpt_path} (n_embed {cfg.n_embed}, {cfg.grid_size}x"
              f"{cfg.grid_size} codes at {cfg.resolution} px)")
        if ignored:
            print(f"  ignored {len(ignored)} training-only loss tensors with no counterpart here: {groups(ignored)} "
                  "(LPIPS: mmkit's objective has no perceptual term)")
        if missing_loss:
            print(f"  not in the checkpoint, left as initialised: {missing_loss[:6]}")
        if placeholders:
            print(f"  read {len(placeholders)} pickled metadata classes as inert placeholders (no code from the file ran):"
                  f" {placeholders}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Registration and presets (the recipe: mmkit.vqgan.training)
# ---------------------------------------------------------------------------------------------------------

register_model("vqgan", VQGANConfig, VQGAN)

# The shipped world tokenizer (issue 12): 64 px -> 16x16 codes of 512, a local encoder, object pixels weighted x2,
# trained on scenes drawn on the studio backdrop. Why each (measured, notebook 06 section 6 shows the ceilings):
# * 64 px: the pixel check reads real 32 px renders right only ~0.95 of the time (64 px: 1.00), so no 32 px
#   tokenizer can reach 0.95. The 32 px / 8x8 / 256 tokenizer it replaces read its reconstructions right 0.58.
# * 16x16 codes (factor 4): 64 px at 8x8 codes of 1024 mixed up colours (read right 0.22 after 1500 steps).
# * local_encoder + one backdrop: with taming's encoder the codes of a plain backdrop changed with the object
#   elsewhere in the image (3.0 bits per background position, 32 px); local, on one backdrop: 0.26 bits, and the
#   same 800-step code LM drew held-out prompts right 0.26 instead of 0.15 (counts 0.98 instead of 0.87).
register_preset("vqgan-world-tiny", lambda: VQGANConfig(resolution=64, n_embed=512, object_weight=2.0,
                                                        local_encoder=True, disc_start=1700))
# Text-to-image's tokenizer before issue 12, kept as VLMo's masked-image-modelling targets (its 32 px images, 8x8
# patches, 256-way MIM head): 32 px -> 8x8 codes of 256, taming's encoder, the world's own backdrops.
register_preset("vqgan-world-32", lambda: VQGANConfig())
# The architecture of taming's vqgan_imagenet_f16_1024 (configs/model.yaml of the official download): 256 px ->
# 16x16 codes of 1024. load_taming_checkpoint(ckpt, "vqgan-imagenet-f16-1024") works without the YAML.
register_preset("vqgan-imagenet-f16-1024", lambda: VQGANConfig(
    resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
    n_embed=1024, embed_dim=256, legacy_beta=True, l2_weight=0.0, disc_weight=0.75, disc_start=0, disc_num_layers=2,
    disc_ndf=64, restart_every=0))

