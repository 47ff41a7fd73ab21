"""Does a generated image show what its prompt asked for? A model-free faithfulness check (M6 §4.1 evaluation).

    objs = parse_prompt("a small red circle at the top left")      # [Wanted(shape="circle", colour="red", ...)]
    found = detect_objects(image)                                   # (3, H, W) in [0, 1] -> [Detected(...), ...]
    r = faithfulness(image, "a small red circle at the top left")   # Faithfulness(ok=True, attributes={...}, ...)
    faithfulness_score(images, prompts)                             # {"all_right": 0.8, "colour": 0.95, ...}

M6 §4.1 shows generated images and judges them by eye ("the generated objects resemble the real ones"; the
*military style camouflage high heels* that "do not exist in the real world"). The Shapes World lets us measure
instead, and without any learned model (a learned judge would share the generator's blind spots): the pixels
of a world image say everything a prompt can ask for.

* **objects**: pixels whose chroma (max - min of R, G, B) exceeds ``chroma_threshold``; the background, its
  gradient and the grey shadows have almost none. 4-connected components of at least ``min_pixels`` pixels are
  the objects.
* **colour**: the hue of the component's most saturated pixels, nearest (on the colour wheel) to the hue of one
  of the six palette colours (:data:`mmkit.data.world.BASE_RGB`).
* **shape by fill ratio**: covered pixels / box pixels, where anti-aliased edge pixels count by their chroma and
  the box is measured to sub-pixel precision (its width = the widest row of coverage): a square fills its box
  (~1), a circle pi/4 (~0.79), the world's upward triangle half (~0.5). A 5-pixel circle and triangle can fill
  alike, so a box whose mass sits low (the triangle's wide base) also reads as a triangle.
* **size**: the box's larger side against the boundary between the world's small and large diameters.
* **position by centroid**: the component's centre of mass, in the 3x3 grid of named positions.

A prompt's objects come from :func:`parse_prompt` (English or Chinese world phrases; attributes a prompt does not
name are not checked). A prompt is *faithful* when the image holds exactly as many objects as it names and
every named attribute of every object is right.
"""
from __future__ import annotations

import colorsys
import re
from typing import NamedTuple, Sequence

import torch

from mmkit.data.world import (BASE_RGB, COLOURS, COLOURS_ZH, POSITIONS, POSITIONS_ZH, SHAPES, SHAPES_ZH,
                              SIZE_RADIUS, SIZES, SIZES_ZH)

__all__ = ["Wanted", "Detected", "Faithfulness", "FaithfulnessConfig", "parse_prompt", "detect_objects",
           "faithfulness", "faithfulness_score", "wanted_from_scene", "pixel_chroma", "ATTRIBUTES"]

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")


class FaithfulnessConfig(NamedTuple):
    chroma_threshold: float = 0.25   # a pixel belongs to an object when max(RGB) - min(RGB) > this ([0, 1] scale);
                                     # world objects have chroma 0.6-0.9, background and shadows < 0.05
    min_pixels: int = 4              # smaller components are noise (a small object at 32 px covers ~15-25 pixels)
    # shape thresholds, measured on 800 rendered 32 px val objects (fill: circle 0.68-0.93, square 0.95-1.0,
    # triangle 0.52-0.83; vertical centre of mass in the box: triangle 0.58-0.73, circle / square 0.40-0.59)
    square_fill: float = 0.94        # fill ratio (coverage / sub-pixel box) at or above this: square (~1.0)
    circle_fill: float = 0.67        # below this: triangle (~0.5); between the two: circle (pi/4 ~ 0.79) ...
    triangle_low: float = 0.585      # ... unless the mass sits this low in the box: an upward triangle
    # a box side (fraction of the image) above this is "large": midway between the largest small diameter
    # (2 x 0.085) and the smallest large one (2 x 0.12) of mmkit.data.world.SIZE_RADIUS
    large_extent: float = SIZE_RADIUS["small"][1] + SIZE_RADIUS["large"][0]


class Wanted(NamedTuple):
    """One object a prompt asks for; None = the prompt does not say."""
    shape: str | None
    colour: str | None
    size: str | None
    position: str | None


class Detected(NamedTuple):
    """One object found in an image's pixels."""
    shape: str
    colour: str
    size: str
    position: str
    fill: float                      # object pixels / bounding-box pixels
    extent: float                    # larger box side, fraction of the image side
    centroid: tuple                  # (x, y), fractions of the image side
    pixels: int                      # pixels in the component


class Faithfulness(NamedTuple):
    ok: bool                         # right object count and every named attribute right
    count_ok: bool                   # as many objects found as the prompt names
    attributes: dict                 # attribute -> (right, checked) over the prompt's objects
    wanted: list                     # [Wanted]
    detected: list                   # [Detected]


# ---------------------------------------------------------------------------------------------------------
# Reading prompts
# ---------------------------------------------------------------------------------------------------------

_POS_EN = {"top left": "top left", "top right": "top right", "bottom left": "bottom left",
           "bottom right": "bottom right", "upper left": "top left", "upper right": "top right",
           "lower left": "bottom left", "lower right": "bottom right", "top": "top", "bottom": "bottom",
           "left": "left", "right": "right", "center": "center", "centre": "center", "middle": "center"}
_POS_EN_RE = re.compile(r"\b(" + "|".join(sorted(_POS_EN, key=len, reverse=True)) + r")\b")
_ZH_POS = {v: k for k, v in POSITIONS_ZH.items()}
_ZH_POS_RE = re.compile("|".join(sorted(_ZH_POS, key=len, reverse=True)))
_ZH_COLOUR = {v: k for k, v in COLOURS_ZH.items()}
_ZH_SHAPE = {v: k for k, v in SHAPES_ZH.items()}
_CLAUSE_SPLIT = re.compile(r"\band\b|,|;|，|、|和|；|。")


def _parse_clause(clause: str) -> Wanted | None:
    low = clause.lower()
    shapes = [s for s in SHAPES if re.search(rf"\b{s}s?\b", low)] + [v for k, v in _ZH_SHAPE.items() if k in clause]
    if len(shapes) != 1:
        return None                                   # no object (or an ambiguous clause) named here
    colours = [c for c in COLOURS if re.search(rf"\b{c}\b", low)] + [v for k, v in _ZH_COLOUR.items() if k in clause]
    sizes = [s for s in SIZES if re.search(rf"\b{s}\b", low)]
    zh_pos = _ZH_POS_RE.findall(clause)
    rest = _ZH_POS_RE.sub("", clause)                 # 大 / 小 inside a position word are no sizes
    sizes += [k for k, v in SIZES_ZH.items() if f"{v}的" in rest]
    positions = [_POS_EN[m] for m in _POS_EN_RE.findall(low)] + [_ZH_POS[m] for m in zh_pos]
    one = lambda xs: xs[0] if len(set(xs)) == 1 else None   # noqa: E731  (two different values: unchecked)
    return Wanted(shapes[0], one(colours), one(sizes), one(positions))


def parse_prompt(text: str) -> list[Wanted]:
    """The objects an English or Chinese world prompt names, with the attributes it gives.

    ``"a small red circle at the top left and a large blue square in the center"`` -> two objects;
    ``"左上方有一个小的红色圆形"`` -> one. Clauses are split at "and", commas and 和/、/，; a clause names an object
    when it holds exactly one shape word. Attributes a clause does not name are None (not checked).
    """
    out = []
    for clause in _CLAUSE_SPLIT.split(text):
        w = _parse_clause(clause)
        if w is not None:
            out.append(w)
    return out


def wanted_from_scene(scene) -> list[Wanted]:
    """The objects of a world :class:`~mmkit.data.world.Scene` as fully specified :class:`Wanted`."""
    return [Wanted(o.shape, o.colour, o.size, o.position) for o in scene.objects]


# ---------------------------------------------------------------------------------------------------------
# Reading pixels
# ---------------------------------------------------------------------------------------------------------

_PALETTE_HUES = {c: colorsys.rgb_to_hsv(*(v / 255.0 for v in BASE_RGB[c]))[0] for c in COLOURS}


def _nearest_colour(rgb: Sequence[float]) -> str:
    h = colorsys.rgb_to_hsv(*rgb)[0]
    return min(COLOURS, key=lambda c: min(abs(h - _PALETTE_HUES[c]), 1.0 - abs(h - _PALETTE_HUES[c])))


def _components(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """4-connected components of a (H, W) bool mask, as lists of (y, x)."""
    H, W = mask.shape
    seen = torch.zeros_like(mask)
    m, s = mask.tolist(), seen.tolist()
    comps = []
    for y0 in range(H):
        for x0 in range(W):
            if not m[y0][x0] or s[y0][x0]:
                continue
            stack, comp = [(y0, x0)], []
            s[y0][x0] = True
            while stack:
                y, x = stack.pop()
                comp.append((y, x))
                for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= yy < H and 0 <= xx < W and m[yy][xx] and not s[yy][xx]:
                        s[yy][xx] = True
                        stack.append((yy, xx))
            comps.append(comp)
    return comps


def pixel_chroma(images: torch.Tensor) -> torch.Tensor:
    """Chroma of every pixel, max - min of R, G, B: (..., 3, H, W) in [0, 1] -> (..., H, W). Above
    ``FaithfulnessConfig.chroma_threshold`` a pixel belongs to an object; the background and shadows are grey."""
    return images.amax(-3) - images.amin(-3)


def detect_objects(image: torch.Tensor, config: FaithfulnessConfig = FaithfulnessConfig()) -> list[Detected]:
    """The objects in one image (3, H, W) in [0, 1]: colour, shape, size, position read off the pixels (see module
    doc), largest first."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"detect_objects expects one RGB image (3, H, W) in [0, 1], got {tuple(image.shape)}")
    img = image.detach().float().cpu().clamp(0, 1)
    H, W = img.shape[1:]
    chroma = pixel_chroma(img)                                                      # (H, W)
    out = []
    for comp in _components(chroma > config.chroma_threshold):
        if len(comp) < config.min_pixels:
            continue
        ys = torch.tensor([p[0] for p in comp])
        xs = torch.tensor([p[1] for p in comp])
        c = chroma[ys, xs]                                                          # (n,)
        # coverage of each pixel: anti-aliased edge pixels are partly covered, their chroma says how much
        w = (c / c.quantile(0.9)).clamp(max=1.0)                                    # (n,)
        cover = torch.zeros(H, W)
        cover[ys, xs] = w
        # sub-pixel box: the widest row and the tallest column of coverage (a 5-pixel circle is not a square)
        width, height = float(cover.sum(1).max()), float(cover.sum(0).max())
        fill = float(w.sum()) / (width * height)
        cy = float((ys.float() + 0.5).mul(w).sum() / w.sum())
        cx = float((xs.float() + 0.5).mul(w).sum() / w.sum())
        low = (cy - float(ys.min())) / max(1.0, float(ys.max() - ys.min()) + 1.0)  # where the mass sits, top 0 .. 1
        if fill >= config.square_fill:
            shape = "square"
        elif fill < config.circle_fill or low > config.triangle_low:
            shape = "triangle"
        else:
            shape = "circle"
        core = c >= c.quantile(0.5)                                                 # the most saturated half
        colour = _nearest_colour(img[:, ys[core], xs[core]].mean(1).tolist())
        extent = max(width, height) / max(H, W)
        size = "large" if extent > config.large_extent else "small"
        cx, cy = cx / W, cy / H
        row, col = min(2, int(cy * 3)), min(2, int(cx * 3))
        out.append(Detected(shape, colour, size, POSITIONS[3 * row + col], round(fill, 3), round(extent, 3),
                            (round(cx, 3), round(cy, 3)), len(comp)))
    return sorted(out, key=lambda d: -d.pixels)


# ---------------------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------------------

def _agreement(w: Wanted, d: Detected) -> int:
    return sum(getattr(w, a) is not None and getattr(w, a) == getattr(d, a) for a in ATTRIBUTES)


def faithfulness(image: torch.Tensor, prompt: str | Sequence[Wanted],
                 config: FaithfulnessConfig = FaithfulnessConfig()) -> Faithfulness:
    """Compare one image (3, H, W) with a prompt (text, or its :class:`Wanted` objects).

    Each wanted object is matched to the not yet matched detected object that agrees with it on the most
    attributes (ties: the larger); its named attributes are then right or wrong. A wanted object left without a
    detection gets every named attribute wrong.
    """
    wanted = parse_prompt(prompt) if isinstance(prompt, str) else list(prompt)
    detected = detect_objects(image, config)
    attrs = {a: [0, 0] for a in ATTRIBUTES}
    free = list(detected)
    all_right = True
    for w in wanted:
        d = max(free, key=lambda d: _agreement(w, d), default=None)
        if d is not None:
            free.remove(d)
        for a in ATTRIBUTES:
            if getattr(w, a) is None:
                continue
            right = d is not None and getattr(d, a) == getattr(w, a)
            attrs[a][0] += int(right)
            attrs[a][1] += 1
            all_right &= right
    count_ok = len(detected) == len(wanted)
    return Faithfulness(bool(all_right and count_ok and wanted), count_ok,
                        {a: tuple(v) for a, v in attrs.items()}, wanted, detected)


def faithfulness_score(images: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence,
                       config: FaithfulnessConfig = FaithfulnessConfig()) -> dict[str, float]:
    """Summary over (image, prompt) pairs: ``all_right`` (fraction of prompts whose every attribute and the object
    count are right: the headline number), ``count`` and the accuracy of each attribute over the named objects."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: pass one prompt per image")
    results = [faithfulness(img, p, config) for img, p in zip(images, prompts)]
    n = max(1, len(results))
    out = {"all_right": sum(r.ok for r in results) / n, "count": sum(r.count_ok for r in results) / n}
    for a in ATTRIBUTES:
        right = sum(r.attributes[a][0] for r in results)
        checked = sum(r.attributes[a][1] for r in results)
        out[a] = right / checked if checked else float("nan")
    out["n"] = len(results)
    return out
