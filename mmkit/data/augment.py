"""Training-time augmentations: Shapes World scenes drawn the way people draw them.

    cfg = AugmentConfig()                                  # every knob below, with its default
    img = draw_augmented(scene, random.Random(0), cfg)     # PIL RGB, cfg.canvas px: rotated, outlined, JPEG'd...
    x = augmented_tensor(scene, random.Random(0), size=32) # float (3, 32, 32) in [0, 1] after preprocess_image

The world's renderer (:func:`mmkit.data.world.render`) draws every object as a clean filled shape on a near-white
studio gradient. Images people bring are not like that: shapes are outlined with thick strokes (or drawn hollow),
slightly rotated and wobbly, colours are off the palette, backgrounds are cream, grey or noisy paper, and the file
went through JPEG. A model trained only on the renderer's images answers those far worse (measured in
``mmkit.m6.tasks.vqa``'s recipe notes). This module draws a scene's objects *itself* (its own polygon code, not
the renderer) from the scene's geometry (centre, radius, colour), with random:

=====================  ===========================================================================================
augmentation           what it does (``AugmentConfig`` field)
=====================  ===========================================================================================
shape rotation         each shape turns by up to ``max_rotation`` degrees about its centre
wobble, aspect         hand-drawn outlines: radial noise on the vertices (``wobble``), width/height ratio (``aspect``)
stroke                 a darker or black outline ``stroke_width`` wide (fraction of the side), with ``p_stroke``;
                       hollow shapes (outline only) with ``p_hollow``
colour                 hue / saturation / value jitter beyond the world's (``hue_jitter``, ``sat_range``, ...)
background             flat or gradient off-white, cream, grey or tinted paper (``bg_level``, ``bg_tint``),
                       pixel noise (``noise_std``)
scene rotation, shift  the whole picture turns by up to ``max_scene_rotation`` degrees and shifts a little
blur, JPEG             Gaussian blur (``p_blur``), JPEG re-encoding at quality ``jpeg_quality`` (``p_jpeg``)
=====================  ===========================================================================================

Every augmented picture then goes through :func:`mmkit.data.preprocess.preprocess_image`, the same function the
app applies to uploads, so the model trains on exactly the kind of 32 px image it will be shown. Geometry stays
inside the world's semantics: objects keep their grid cell (rotations and shifts are small), their size class
and their colour name.
"""
from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFilter

from mmkit.data.world import Scene, WorldObject
from mmkit.data.preprocess import preprocess_image

__all__ = ["AugmentConfig", "draw_augmented", "augmented_tensor", "augmented_batch_u8", "shape_polygon"]


@dataclass
class AugmentConfig:
    canvas: int = 128                       # side of the drawing before preprocessing (user pictures are larger
                                            # than 32 px; preprocessing downscales them with a box filter)
    max_rotation: float = 25.0              # each shape turns by up to this many degrees (squares, triangles)
    wobble: float = 0.06                    # radial vertex noise of hand-drawn outlines (fraction of the radius)
    aspect: tuple = (0.85, 1.15)            # width / height ratio of a shape
    radius_scale: tuple = (0.9, 1.12)       # size jitter (the size classes stay apart: small <= .085, large >= .12)
    p_stroke: float = 0.6                   # probability that a shape gets an outline
    stroke_width: tuple = (0.01, 0.045)     # outline width, fraction of the image side (0.045 at 128 px = 6 px)
    p_dark_stroke: float = 0.35             # outline black / dark grey (else a darker shade of the fill)
    p_hollow: float = 0.15                  # outline only, no fill (preprocess_image fills closed outlines)
    hue_jitter: float = 0.03                # +- fraction of the colour wheel (world: 0.015)
    sat_range: tuple = (0.8, 1.15)          # saturation multiplier
    val_range: tuple = (0.8, 1.1)           # value (brightness) multiplier
    bg_level: tuple = (205.0, 255.0)        # background brightness (world: 232-255)
    bg_tint: float = 14.0                   # +- warm/cool/green tint of the background (cream paper, grey card)
    p_bg_gradient: float = 0.5              # vertical gradient (else flat)
    noise_std: tuple = (0.0, 6.0)           # Gaussian pixel noise (0-255 scale)
    max_scene_rotation: float = 6.0         # the whole picture turns by up to this (objects stay in their cells)
    max_shift: float = 0.025                # the whole picture shifts by up to this fraction of the side
    p_blur: float = 0.3                     # Gaussian blur with radius up to 1.2 px at the canvas size
    p_jpeg: float = 0.6                     # JPEG re-encoding ...
    jpeg_quality: tuple = (15, 90)          # ... at a quality in this range


def _jitter_rgb(rgb: Sequence[int], rng: random.Random, cfg: AugmentConfig) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    h = (h + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter)) % 1.0
    s = min(1.0, s * rng.uniform(*cfg.sat_range))
    v = min(1.0, v * rng.uniform(*cfg.val_range))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle_deg: float = 0.0, aspect: float = 1.0,
                  wobble: float = 0.0, rng: random.Random | None = None) -> list[tuple[float, float]]:
    """Vertices of a circle (32-gon), square or upward triangle of half-extent ``r`` at (cx, cy), turned by
    ``angle_deg``, stretched by ``aspect`` (width / height) and with radial ``wobble`` noise (needs ``rng``)."""
    if shape == "circle":
        base = [(math.cos(2 * math.pi * k / 32), math.sin(2 * math.pi * k / 32)) for k in range(32)]
    elif shape == "square":
        base = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        base = [(0, -1), (1, 1), (-1, 1)]
    else:
        raise ValueError(f"unknown shape {shape!r}; use circle, square or triangle")
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    sx, sy = math.sqrt(aspect), 1 / math.sqrt(aspect)
    out = []
    for x, y in base:
        k = 1.0 + (rng.uniform(-wobble, wobble) if (wobble and rng is not None) else 0.0)
        x, y = x * sx * k, y * sy * k
        out.append((cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)))
    return out


def _background(rng: random.Random, cfg: AugmentConfig, n: int) -> Image.Image:
    level = rng.uniform(*cfg.bg_level)
    tint = [rng.uniform(-cfg.bg_tint, cfg.bg_tint) for _ in range(3)]
    top = [min(255.0, level + t) for t in tint]
    if rng.random() < cfg.p_bg_gradient:
        drop = rng.uniform(-15, 15)
        bottom = [min(255.0, max(0.0, c + drop)) for c in top]
    else:
        bottom = top
    col = Image.new("RGB", (1, 2))
    col.putdata([tuple(int(c) for c in top), tuple(int(c) for c in bottom)])
    return col.resize((n, n), Image.Resampling.BILINEAR)


def draw_augmented(scene: Scene, rng: random.Random, cfg: AugmentConfig | None = None) -> Image.Image:
    """Draw ``scene`` as a person might (see the module doc): an RGB picture of side ``cfg.canvas``."""
    import numpy as np

    cfg = cfg or AugmentConfig()
    n = cfg.canvas
    img = _background(rng, cfg, n)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o, rng, cfg, n)
    if cfg.max_scene_rotation or cfg.max_shift:
        bg = img.getpixel((1, 1))
        dx, dy = (rng.uniform(-cfg.max_shift, cfg.max_shift) * n for _ in range(2))
        img = img.rotate(rng.uniform(-cfg.max_scene_rotation, cfg.max_scene_rotation),
                         resample=Image.Resampling.BILINEAR, translate=(dx, dy), fillcolor=bg)
    if rng.random() < cfg.p_blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    std = rng.uniform(*cfg.noise_std)
    if std > 0.5:
        arr = np.asarray(img, dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, std, arr.shape)
        img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < cfg.p_jpeg:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(*cfg.jpeg_quality))
        buf.seek(0)
        with Image.open(buf) as im:
            img = im.convert("RGB")
    return img


def _draw_object(draw: ImageDraw.ImageDraw, o: WorldObject, rng: random.Random, cfg: AugmentConfig, n: int):
    fill = _jitter_rgb(o.rgb, rng, cfg)
    r = o.radius * rng.uniform(*cfg.radius_scale) * n
    angle = 0.0 if o.shape == "circle" else rng.uniform(-cfg.max_rotation, cfg.max_rotation)
    poly = shape_polygon(o.shape, o.cx * n, o.cy * n, r, angle, rng.uniform(*cfg.aspect), cfg.wobble, rng)
    stroke = rng.random() < cfg.p_stroke
    hollow = stroke and rng.random() < cfg.p_hollow
    width = max(1, round(rng.uniform(*cfg.stroke_width) * n)) if stroke else 0
    if hollow:                                  # a hollow shape is drawn in its own colour
        width = max(width, round(0.02 * n))
        outline = fill
    elif rng.random() < cfg.p_dark_stroke:
        g = rng.randint(0, 70)
        outline = (g, g, g)
    else:
        k = rng.uniform(0.5, 0.8)
        outline = tuple(int(c * k) for c in fill)
    draw.polygon(poly, fill=None if hollow else fill)
    if width:
        draw.line(poly + poly[:1], fill=outline, width=width, joint="curve")


def augmented_tensor(scene: Scene, rng: random.Random, size: int = 32, cfg: AugmentConfig | None = None) -> torch.Tensor:
    """:func:`draw_augmented` then :func:`mmkit.data.preprocess.preprocess_image`: float (3, size, size) in [0, 1]."""
    return preprocess_image(draw_augmented(scene, rng, cfg), size=size).tensor


def augmented_batch_u8(scenes: Sequence[Scene], seed: int = 0, size: int = 32,
                       cfg: AugmentConfig | None = None) -> torch.Tensor:
    """One augmented view of each scene as uint8 (N, 3, size, size) (about 1-2 ms per scene): an image cache."""
    rng = random.Random(seed)
    out = torch.zeros(len(scenes), 3, size, size, dtype=torch.uint8)
    for i, s in enumerate(scenes):
        out[i] = augmented_tensor(s, rng, size, cfg).mul(255).round_().to(torch.uint8)
    return out
