"""Small picture helpers shared by the CLI, notebooks and apps (no model code here)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, captions: Sequence[str] | None = None,
              scale: int = 2, pad: int = 4, caption_lines: int = 3) -> Image.Image:
    """Tile PIL images into one picture, each optionally with a wrapped caption under it."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncols = ncols or min(n, 8)
    nrows = (n + ncols - 1) // ncols
    w, h = images[0].size
    w, h = w * scale, h * scale
    chars = max(8, w // 6)
    text_h = 11 * caption_lines + 2 if captions else 0
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        grid.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(200, 200, 200))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + h + 1 + 11 * j), line, fill=(0, 0, 0))
    return grid


def save_grid(images: Sequence[Image.Image], path: str | Path, **kwargs) -> Path:
    from mmkit.io import atomic_write_bytes
    import io

    buf = io.BytesIO()
    make_grid(images, **kwargs).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def draw_boxes(img: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               scale: int = 4, colour: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """``img`` enlarged ``scale`` times (nearest) with pixel boxes ``(x0, y0, x1, y1)`` and optional labels."""
    big = img.convert("RGB").resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, scale // 2))
        if labels:
            draw.text((x0 + 2, max(0, y0 - 11)), labels[i], fill=colour)
    return big


def show(img: Image.Image, scale: int = 4) -> Image.Image:
    """An enlarged copy (nearest neighbour) so 32/64 px scenes are visible in a notebook."""
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
