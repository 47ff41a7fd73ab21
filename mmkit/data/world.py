"""The Shapes World: tiny synthetic "product photos" that every mmkit notebook, app and test trains on.

A scene is 1 to N objects (default 1-3) on a white, product-photo-like background (a faint vertical
gradient and a soft shadow under each object). Each object is

* a shape:    circle, square, triangle
* a colour:   red, green, blue, yellow, purple, orange
* a size:     small, large
* a position: one cell of a 3x3 grid (top left, top, top right, left, center, right, bottom left,
  bottom, bottom right). Objects occupy distinct cells, so "where is the red circle?" has one answer.

Inside each named value the renderer adds a little random jitter (the centre moves inside its cell, the
size varies by about +-10 %, the hue by a few degrees), so a model has to read pictures, not memorise
nine pixel patterns -- and can later read the shapes people draw in an app.

Determinism: ``sample_scene(seed)`` draws every random number from ``random.Random(seed)`` and stores
the results (centres, radii, colours, background) in the returned :class:`Scene`; ``render`` uses no
randomness at all. Same seed -> same scene -> identical pixels, on every machine and Python version
(we only use ``Random.random()``, the one method whose stream Python guarantees across versions).

Geometry guarantees (the text generators and tests rely on them):

* every object lies strictly inside its grid cell, with a margin of ``CELL_MARGIN`` of the image side,
  so objects never overlap and "left of" / "above" relations between cells hold for the pixels too;
* ``small`` objects have a half-extent ("radius") in ``SIZE_RADIUS["small"]`` and ``large`` ones in
  ``SIZE_RADIUS["large"]``; the ranges are separated by a factor of 1.4, so sizes are unambiguous;
* an object's bounding box is ``(cx - r, cy - r, cx + r, cy + r)`` (in fractions of the image side) for
  all three shapes (the triangle points up, its base spans the full box width), and the box centre is
  always painted in the object's colour.

Public API::

    scene = sample_scene(seed=7, min_objects=1, max_objects=3)
    img = render(scene, size=64)                   # PIL RGB, anti-aliased
    x = scene_to_tensor(scene, size=32)             # float (3, 32, 32) in [0, 1]
    box = object_box(scene.objects[0], 64)          # Box(x0, y0, x1, y1) in pixels
    scenes_per_second(size=64)                      # speed of sample_scene + render on this machine
"""
from __future__ import annotations

import colorsys
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:  # torch is imported lazily: importing the world must stay cheap
    import torch

# --------------------------------------------------------------------------------------------------
# Vocabulary (English names are the canonical values stored in WorldObject; *_ZH give Chinese names)
# --------------------------------------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major: POSITIONS[3 * row + col]

SHAPES_ZH: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COLOURS_ZH: dict[str, str] = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
}
SIZES_ZH: dict[str, str] = {"small": "小", "large": "大"}
POSITIONS_ZH: dict[str, str] = {
    "top left": "左上方", "top": "正上方", "top right": "右上方",
    "left": "左侧", "center": "中间", "right": "右侧",
    "bottom left": "左下方", "bottom": "正下方", "bottom right": "右下方",
}

# Base colour of each name (sRGB); jitter moves hue by up to HUE_JITTER and saturation/value a little.
BASE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}

# Geometry, all in fractions of the image side.
CELL = 1.0 / 3.0                       # side of one grid cell
CELL_MARGIN = 0.012                    # free space kept between an object's box and its cell border
MAX_CENTRE_JITTER = 0.04               # the centre moves at most this far from the cell centre
SIZE_RADIUS: dict[str, tuple[float, float]] = {  # half-extent range per size name
    "small": (0.065, 0.085),
    "large": (0.12, 0.145),
}
HUE_JITTER = 0.015                     # +- fraction of the colour wheel (0.015 = 5.4 degrees)
SHADOW_OFFSET = 0.018                  # soft shadow: offset down-right, in image sides
SHADOW_BLUR = 0.02                     # Gaussian blur radius of the shadow, in image sides
SHADOW_DARKNESS = 40                   # how much the shadow darkens the background (0-255)


def position_cell(position: str) -> tuple[int, int]:
    """(row, col) of a named grid position, e.g. ``"top right" -> (0, 2)``."""
    try:
        i = POSITIONS.index(position)
    except ValueError:
        raise ValueError(f"unknown position {position!r}; use one of {POSITIONS}") from None
    return divmod(i, 3)


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldObject:
    """One shape in a scene: its four named attributes plus the jittered geometry and colour."""

    shape: str                          # one of SHAPES
    colour: str                         # one of COLOURS
    size: str                           # one of SIZES
    position: str                       # one of POSITIONS (grid cell)
    cx: float                           # centre x, fraction of image width (jittered inside the cell)
    cy: float                           # centre y, fraction of image height
    radius: float                       # half-extent, fraction of image side (jittered inside SIZE_RADIUS)
    rgb: tuple[int, int, int]           # fill colour (jittered around BASE_RGB[colour])

    @property
    def row(self) -> int:
        return position_cell(self.position)[0]

    @property
    def col(self) -> int:
        return position_cell(self.position)[1]

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        """(shape, colour, size, position): everything the text generators may talk about."""
        return (self.shape, self.colour, self.size, self.position)


@dataclass(frozen=True)
class Background:
    """The off-white studio backdrop: a vertical gradient from ``top`` to ``bottom``."""

    top: tuple[int, int, int] = (252, 252, 251)       # colour of the first row
    bottom: tuple[int, int, int] = (238, 238, 236)    # colour of the last row


STUDIO = Background()     # the one backdrop text-to-image draws every scene on: no prompt names a shade, so a
                          # code LM should not spend its codes sampling one (T2IDataConfig.studio_backdrop)


@dataclass(frozen=True)
class Scene:
    """A list of objects in distinct grid cells; ``seed`` is the seed it was sampled from (or -1)."""

    objects: tuple[WorldObject, ...]
    seed: int = -1
    background: Background = field(default_factory=Background)

    def __post_init__(self) -> None:
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects of a scene must occupy distinct grid cells, got {positions}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")

    def __len__(self) -> int:
        return len(self.objects)

    def object_at(self, position: str) -> WorldObject | None:
        """The object in a grid cell, or None if the cell is empty."""
        for o in self.objects:
            if o.position == position:
                return o
        return None


class Box(NamedTuple):
    """An axis-aligned box in pixel coordinates (x to the right, y downward; x1/y1 exclusive edges)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    def normalised(self, size: int) -> "Box":
        """The same box divided by the image side (coordinates in [0, 1])."""
        return Box(self.x0 / size, self.y0 / size, self.x1 / size, self.y1 / size)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
class Rng:
    """A tiny wrapper over ``random.Random`` that only ever calls ``random()``.

    ``random.Random.random()`` is the one stream Python promises to keep identical across versions;
    ``randrange``/``choice``/``sample`` have changed before. Deriving everything from ``random()``
    keeps scenes identical forever.
    """

    def __init__(self, seed: int | str):
        self._r = random.Random(seed)

    def random(self) -> float:
        return self._r.random()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self._r.random()

    def randint(self, a: int, b: int) -> int:
        """Uniform integer in [a, b] (both inclusive)."""
        return a + min(int(self._r.random() * (b - a + 1)), b - a)

    def choice(self, seq: Sequence):
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, items: list) -> list:
        """Fisher-Yates shuffle in place (returns the list for convenience)."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(0, i)
            items[i], items[j] = items[j], items[i]
        return items

    def sample(self, seq: Sequence, k: int) -> list:
        return self.shuffle(list(seq))[:k]


def _jitter_colour(colour: str, rng: Rng) -> tuple[int, int, int]:
    r, g, b = (c / 255 for c in BASE_RGB[colour])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    h = (h + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    s = min(1.0, s * rng.uniform(0.88, 1.05))
    v = min(1.0, v * rng.uniform(0.9, 1.05))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def make_object(
    shape: str,
    colour: str,
    size: str,
    position: str,
    rng: Rng | None = None,
) -> WorldObject:
    """Build one object. Without ``rng`` it sits exactly at its cell centre with the mid size and base
    colour (handy for hand-made test scenes); with ``rng`` position, size and hue are jittered."""
    for value, allowed, name in ((shape, SHAPES, "shape"), (colour, COLOURS, "colour"), (size, SIZES, "size")):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; use one of {allowed}")
    row, col = position_cell(position)
    lo, hi = SIZE_RADIUS[size]
    if rng is None:
        radius, dx, dy, rgb = (lo + hi) / 2, 0.0, 0.0, BASE_RGB[colour]
    else:
        radius = rng.uniform(lo, hi)
        # The box must stay CELL_MARGIN inside its cell: |dx| + radius <= CELL / 2 - CELL_MARGIN.
        max_shift = max(0.0, min(MAX_CENTRE_JITTER, CELL / 2 - CELL_MARGIN - radius))
        dx = rng.uniform(-max_shift, max_shift)
        dy = rng.uniform(-max_shift, max_shift)
        rgb = _jitter_colour(colour, rng)
    return WorldObject(
        shape=shape, colour=colour, size=size, position=position,
        cx=(col + 0.5) * CELL + dx, cy=(row + 0.5) * CELL + dy, radius=radius, rgb=rgb,
    )


def make_scene(specs: Sequence[tuple[str, str, str, str]], seed: int = -1) -> Scene:
    """A jitter-free scene from ``(shape, colour, size, position)`` tuples, e.g. for tests and slides::

        make_scene([("circle", "red", "small", "top left"), ("square", "blue", "large", "center")])
    """
    return Scene(objects=tuple(make_object(*s) for s in specs), seed=seed)


def sample_scene(seed: int, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """Sample a scene deterministically from ``seed`` (uniform object count, cells, and attributes)."""
    if not 1 <= min_objects <= max_objects <= len(POSITIONS):
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {len(POSITIONS)} (one object per grid cell), "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )
    rng = Rng(seed)
    n = rng.randint(min_objects, max_objects)
    positions = rng.sample(POSITIONS, n)
    objects = tuple(
        make_object(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), pos, rng) for pos in positions
    )
    # Studio backdrop: near-white, slightly warm or cool, a little darker at the bottom.
    top_level = rng.uniform(248, 255)
    bottom_level = top_level - rng.uniform(6, 16)
    tint = rng.uniform(-3, 3)  # > 0 warm (more red), < 0 cool (more blue)
    background = Background(
        top=_clip_rgb((top_level + tint, top_level, top_level - tint)),
        bottom=_clip_rgb((bottom_level + tint, bottom_level, bottom_level - tint)),
    )
    return Scene(objects=objects, seed=seed, background=background)


def _clip_rgb(c: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(min(255.0, max(0.0, v)))) for v in c)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Splits: fixed, disjoint seed ranges (documented here, relied on by every dataset and test)
# --------------------------------------------------------------------------------------------------
SPLITS: dict[str, tuple[int, int]] = {   # split -> [first seed, end seed)
    "train": (0, 10_000_000),            # ten million training scenes: more than any recipe uses
    "val": (10_000_000, 10_100_000),     # 100k validation scenes (model selection, learning curves)
    "test": (20_000_000, 20_100_000),    # 100k held-out scenes: the numbers reported in notes
}


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Seeds ``start .. start+n-1`` *inside* ``split`` (e.g. ``split_seeds("val", 100)``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
    lo, hi = SPLITS[split]
    if n < 0 or start < 0 or lo + start + n > hi:
        raise ValueError(f"split {split!r} holds seeds [{lo}, {hi}): start={start}, n={n} does not fit "
                         f"(need 0 <= start and start + n <= {hi - lo})")
    return range(lo + start, lo + start + n)


def split_of(seed: int) -> str | None:
    """The split a seed belongs to (None for seeds outside every split, e.g. hand-made scenes)."""
    return next((name for name, (lo, hi) in SPLITS.items() if lo <= seed < hi), None)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def object_box(obj: WorldObject, size: int = 64) -> Box:
    """Pixel bounding box of ``obj`` in a ``size`` x ``size`` rendering."""
    return Box((obj.cx - obj.radius) * size, (obj.cy - obj.radius) * size,
               (obj.cx + obj.radius) * size, (obj.cy + obj.radius) * size)


def scene_boxes(scene: Scene, size: int = 64) -> list[Box]:
    """Boxes of all objects, in the order of ``scene.objects``."""
    return [object_box(o, size) for o in scene.objects]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: WorldObject, canvas: int, fill, dx: float = 0.0, dy: float = 0.0):
    cx, cy, r = (obj.cx + dx) * canvas, (obj.cy + dy) * canvas, obj.radius * canvas
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "triangle":  # points up; the base spans the box width
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")


def render_background(background: Background, canvas: int, rows: int | None = None) -> Image.Image:
    """The backdrop alone: an RGB image of side ``canvas`` fading from ``top`` to ``bottom``.

    The gradient is computed for ``rows`` rows (default: ``canvas``) and stretched to the canvas; the
    renderer passes the output size, so after downsampling each output row gets its exact colour.
    """
    rows = rows or canvas
    last = max(1, rows - 1)
    column = Image.new("RGB", (1, rows))
    column.putdata([
        tuple(int(round(t + (b - t) * y / last)) for t, b in zip(background.top, background.bottom))
        for y in range(rows)
    ])
    return column.resize((canvas, canvas), Image.Resampling.NEAREST)


def _shadow_mask(scene: Scene, size: int, canvas: int) -> Image.Image:
    """Soft drop-shadow alpha ('L', side ``canvas``). Drawn and blurred at the output size (a blurred
    shadow needs no supersampling), then upscaled: 4-16x cheaper than blurring the big canvas."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for obj in scene.objects:
        _draw_shape(draw, obj, size, SHADOW_DARKNESS, dx=SHADOW_OFFSET, dy=SHADOW_OFFSET)
    mask = mask.filter(ImageFilter.GaussianBlur(max(0.5, SHADOW_BLUR * size)))
    return mask if canvas == size else mask.resize((canvas, canvas), Image.Resampling.BILINEAR)


def render(scene: Scene, size: int = 64, supersample: int = 4, shadow: bool = True) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    Anti-aliasing by supersampling: the shapes are drawn at ``supersample`` times the resolution and
    each output pixel is the average of its ``supersample`` x ``supersample`` block (``Image.reduce``,
    an exact area filter: no ringing, and 10x faster than a LANCZOS resize). The result depends only
    on ``scene`` and the arguments (no randomness).
    """
    if size < 8:
        raise ValueError(f"image size {size} is too small to show the 3x3 grid; use size >= 8 (32 or 64 are typical)")
    factor = max(1, int(supersample))
    canvas = size * factor
    img = render_background(scene.background, canvas, rows=size)
    if shadow:
        black = Image.new("RGB", (canvas, canvas), (0, 0, 0))
        img = Image.composite(black, img, _shadow_mask(scene, size, canvas))  # img * (1 - mask / 255)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj, canvas, obj.rgb)
    return img.reduce(factor) if factor > 1 else img


# --------------------------------------------------------------------------------------------------
# Tensors (torch imported lazily; no torchvision -- it is broken beside the CPU torch)
# --------------------------------------------------------------------------------------------------
def image_to_tensor(img: Image.Image) -> "torch.Tensor":
    """PIL image -> float tensor (3, H, W) in [0, 1] (converted to RGB first)."""
    import numpy as np
    import torch

    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)                          # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def tensor_to_image(x: "torch.Tensor") -> Image.Image:
    """Float tensor (3, H, W) in [0, 1] -> PIL RGB image (values are clamped)."""
    import numpy as np

    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(x.shape)}")
    arr = (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def scene_to_tensor(scene: Scene, size: int = 64) -> "torch.Tensor":
    """``render(scene, size)`` as a float tensor (3, size, size) in [0, 1]."""
    return image_to_tensor(render(scene, size))


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------
class RenderSpeed(NamedTuple):
    scenes_per_second: float   # sample_scene + render, single thread
    size: int                  # image side in pixels
    n: int                     # scenes timed


def scenes_per_second(size: int = 64, n: int = 300, seed: int = 0, max_objects: int = 3) -> RenderSpeed:
    """Time ``sample_scene`` + ``render`` for ``n`` scenes (a measurement, not a test)."""
    render(sample_scene(seed), size)  # warm the gradient cache
    t0 = time.perf_counter()
    for s in range(seed, seed + n):
        render(sample_scene(s, max_objects=max_objects), size)
    dt = time.perf_counter() - t0
    return RenderSpeed(n / dt, size, n)


def object_labels(scenes: Sequence[Scene]) -> "torch.Tensor":
    """(B, 9, 3) long: for each grid cell (``POSITIONS`` order) the index + 1 of the colour, shape and size of the
    object in it, 0 for an empty cell: targets for probing what an image encoder tells apart (M6 §3.1 stage 0,
    VLMo §4.5 image-only use)."""
    import torch

    out = torch.zeros(len(scenes), len(POSITIONS), 3, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            out[b, POSITIONS.index(o.position)] = torch.tensor(
                [COLOURS.index(o.colour) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1])
    return out
