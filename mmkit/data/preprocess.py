"""Turn any picture a person brings into the small image a world model expects, and say what was done.

    p = preprocess_image("photo.jpg", size=32)     # path, bytes, file object, PIL image or (H, W[, C]) uint8 array
    p.tensor        # float32 (3, 32, 32) in [0, 1]: what the model reads
    p.image         # the same as a PIL image (show it: "the image the model actually saw")
    p.notes         # ["downscaled from 6000x6000", "background (214, 205, 180) balanced to white", ...]

Steps (each one answers a way user pictures differ from the Shapes World's renderer):

1. **Open** (:func:`open_image`): any PIL format, EXIF orientation applied, the first frame of an animation, fully
   decoded (truncated files fail here). Unreadable, non-image, too small (< ``MIN_SIDE`` px) and too large
   (> ``MAX_PIXELS``) inputs raise :class:`ImageInputError` with a message a person can act on.
2. **Colour mode**: RGBA / LA / palette-with-transparency are composited on white, grayscale, 16-bit, CMYK
   converted (:func:`mmkit.data.userdata.to_rgb`).
3. **Square, working size**: padded to a square with the picture's own background colour (never cropped: position
   questions are about the whole frame, so cropping to the content would move objects between grid cells), then
   brought to ``work`` px: shrunk with a box filter, enlarged with nearest neighbours (a world image enlarged and
   shrunk back is unchanged).
4. **Background**: the median colour of the border is the background; when it is not already studio-white (cream
   paper, grey card, a tinted scan) each channel is scaled so that it becomes white.
5. **Hollow outlines** (``fill_outlines``): world objects are filled shapes; a person often draws only the outline.
   Background regions that the border cannot reach (the inside of a closed outline) are filled with the colour of
   the outline around them.
6. **Model size**: a box filter (an area average, like the renderer's supersampling) shrinks to ``size`` px; it
   also averages JPEG blocking and noise away.
"""
from __future__ import annotations

import io
import numbers
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mmkit.data.userdata import to_rgb

__all__ = ["ImageInputError", "Preprocessed", "open_image", "preprocess_image", "MIN_SIDE", "MAX_PIXELS", "MAX_SIDE",
           "MAX_MODEL_SIDE", "STUDIO_WHITE", "image_for_model", "array_to_uint8"]

MIN_SIDE = 8                       # pixels: smaller pictures cannot show a 3x3 grid of shapes
MAX_PIXELS = 50_000_000            # refuse larger pictures (a 6000x6000 photo, 36 MP, is fine; PIL's bomb check
                                   # starts at 89 MP)
MAX_SIDE = 10_000                  # and longer sides: a 1 kB PNG can claim 45000x8 pixels (0.4 MP, under
                                   # MAX_PIXELS), and padding that strip to a square once meant 45000^2 x 3 bytes
                                   # (~6 GB). Pictures are also shrunk before they are padded (step 3), so no
                                   # canvas is ever larger than the working size.
MAX_MODEL_SIDE = 1024              # the largest square side a model reads (full-size ViTs read 224-384)
STUDIO_WHITE = 248                 # the world's backdrop level (its gradient spans about 232-255)


class ImageInputError(ValueError):
    """A picture that cannot be used, with a message that says why and what to do."""


class Preprocessed(NamedTuple):
    tensor: torch.Tensor           # float32 (3, size, size) in [0, 1]
    image: Image.Image             # the same pixels as an RGB PIL image
    notes: list                    # what was changed, in plain words (empty: nothing)
    original_size: tuple           # (width, height) of the picture as opened
    background: tuple              # (r, g, b) background colour found on the border (before balancing)


def open_image(src: Any) -> Image.Image:
    """Open ``src`` (path, bytes, file object, PIL image, or uint8 array (H, W) / (H, W, 3|4)) fully decoded."""
    if src is None:
        raise ImageInputError("No image was given. Upload or paste a picture, draw one, or pick an example scene.")
    try:
        if isinstance(src, Image.Image):
            _check_size(*src.size)
            img = src.copy()
        elif isinstance(src, np.ndarray):
            img = Image.fromarray(array_to_uint8(src))
        elif isinstance(src, torch.Tensor):
            raise ImageInputError("Pass image tensors to image_for_model (float (3, S, S) in [0, 1]); "
                                  "preprocess_image takes files, bytes, PIL images and numpy arrays.")
        else:
            if isinstance(src, (bytes, bytearray)):
                fp = io.BytesIO(src)
            elif isinstance(src, (str, Path)):
                p = Path(src)
                if not p.exists():
                    raise ImageInputError(f"The image file {p.name!r} does not exist.")
                if p.is_dir():
                    raise ImageInputError(f"{p.name!r} is a folder, not an image file.")
                fp = p
            elif hasattr(src, "read"):
                fp = src
            else:
                raise ImageInputError(f"Cannot read an image from a {type(src).__name__}; pass a file path, bytes, a "
                                      "file object, a PIL image or a uint8 numpy array.")
            with warnings.catch_warnings():               # PIL's bomb warning: the size is checked right here
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp)
            with im:
                _check_size(*im.size)                       # from the header, before decoding anything
                im.seek(0)                                  # animations: the first frame
                if im.format == "JPEG":
                    im.draft("RGB", (512, 512))             # decode large JPEGs at a reduced scale: much faster
                im.load()
                img = ImageOps.exif_transpose(im)
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError("This file is not an image that can be read (PNG, JPEG, GIF, WebP, BMP, ...). "
                              "Upload a picture file.") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"The image is too large to open safely; keep it under {MAX_PIXELS / 1e6:.0f} MP.") \
            from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        what = "truncated or damaged" if "truncat" in str(e).lower() or isinstance(e, (SyntaxError, EOFError)) \
            else "unreadable"
        raise ImageInputError(f"The image file is {what} ({type(e).__name__}: {str(e)[:80]}). Save it again or "
                              "choose another picture.") from None
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageInputError(f"The image is only {w}x{h} pixels; it needs at least {MIN_SIDE}x{MIN_SIDE} to show "
                              "shapes. Use a larger picture.")
    _check_size(w, h)
    return img


def _check_size(w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"The image is {w}x{h} pixels ({w * h / 1e6:.0f} MP); the limit is "
                              f"{MAX_PIXELS / 1e6:.0f} MP. Resize it (the model sees 32x32 anyway).")
    if max(w, h) > MAX_SIDE:
        raise ImageInputError(f"The image is {w}x{h} pixels; sides longer than {MAX_SIDE:,} pixels are refused. "
                              "Crop or resize it to the part with the shapes (the model sees 32x32 anyway).")


def array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """An (H, W) / (H, W, 1|3|4) image array as uint8 0-255, or ImageInputError saying what is wrong with it.

    uint8 passes; other integer arrays must hold 0-255; float arrays must hold [0, 1] (the torch / matplotlib
    convention) and are scaled by 255. Channels-first (3, H, W) arrays, NaNs and out-of-range values are refused.
    """
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"The image array has shape {arr.shape} (channels first); pass (H, W, 3): "
                              "arr.transpose(1, 2, 0).")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise ImageInputError(f"The image array has shape {arr.shape}; pass (H, W) grayscale or (H, W, 3) RGB "
                              "(or RGBA).")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    _check_size(arr.shape[1], arr.shape[0])
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ImageInputError(f"The image array ({arr.dtype}) holds values from {lo} to {hi}; pixel values are "
                                  "0-255 (uint8). Rescale it first.")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageInputError("The image array holds NaN or infinite values.")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageInputError(f"The float image array holds values from {lo:g} to {hi:g}; float pixels are "
                                  "[0, 1]. For 0-255 values pass arr.astype('uint8') (or divide by 255).")
        return np.round(arr * 255.0).astype(np.uint8)
    raise ImageInputError(f"The image array has dtype {arr.dtype}; pass uint8 (0-255) or float (0-1) pixels.")


def _border_colour(arr: np.ndarray) -> np.ndarray:
    """Median colour of the outer ~4% ring of an (H, W, 3) array."""
    h, w, _ = arr.shape
    k = max(1, round(0.04 * min(h, w)))
    ring = np.concatenate([arr[:k].reshape(-1, 3), arr[-k:].reshape(-1, 3), arr[:, :k].reshape(-1, 3),
                           arr[:, -k:].reshape(-1, 3)])
    return np.median(ring.astype(np.float32), axis=0)             # only the ring as floats, not the whole picture


def _fill_holes(arr: np.ndarray, fg_threshold: float = 60.0) -> tuple[np.ndarray, int]:
    """Fill background regions the border cannot reach (inside closed outlines) with the surrounding colour.

    ``arr`` (H, W, 3) float in 0-255 on a (near-)white background. Returns (filled array, pixels filled)."""
    h, w, _ = arr.shape
    fg = (np.abs(arr - STUDIO_WHITE).max(axis=2) > fg_threshold)                # (H, W) ink
    free = np.pad(~fg, 1, constant_values=True)                                  # (H+2, W+2) background
    reach = np.zeros_like(free)
    reach[0, :] = reach[-1, :] = reach[:, 0] = reach[:, -1] = True               # the outside
    for _ in range(4 * (h + w)):              # flood the background from the outside, 4-connected
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= free
        if np.array_equal(grown, reach):
            break
        reach = grown
    holes = (free & ~reach)[1:-1, 1:-1]                                          # (H, W) enclosed background
    n = int(holes.sum())
    if not n:
        return arr, 0
    # Grow the colour of solid ink into the holes (and into the faint anti-aliased ink right around them, so a
    # thin or JPEG-blurred outline does not lend the filling its pale edge colour).
    dist = np.abs(arr - STUDIO_WHITE).max(axis=2)
    strong = dist > 2 * fg_threshold
    near = holes.copy()
    near[1:] |= holes[:-1]
    near[:-1] |= holes[1:]
    near[:, 1:] |= holes[:, :-1]
    near[:, :-1] |= holes[:, 1:]
    todo = holes | (near & fg & ~strong)
    if not strong.any():
        return arr, 0
    out, known = arr.copy(), strong & ~todo
    for _ in range(max(h, w)):                  # grow the outline colour inwards, one ring per pass
        if not todo.any():
            break
        acc = np.zeros_like(out)
        cnt = np.zeros((h, w), dtype=np.float32)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            src_known = np.roll(known, (dy, dx), axis=(0, 1))
            acc += np.roll(out, (dy, dx), axis=(0, 1)) * src_known[..., None]
            cnt += src_known
        step = todo & (cnt > 0)
        out[step] = acc[step] / cnt[step][:, None]
        known |= step
        todo &= ~step
    return out, n


def preprocess_image(src: Any, size: int = 32, *, work: int = 64, normalise_background: bool = True,
                     fill_outlines: bool = True) -> Preprocessed:
    """Any picture -> the ``size`` px RGB image a world model reads (see the module doc for the steps).

    Raises :class:`ImageInputError` (a ``ValueError``) with a readable message for unusable input, and a
    ``ValueError`` naming ``size`` / ``work`` when they are not whole numbers from 1 to ``MAX_MODEL_SIDE``.
    """
    for name, v in (("size", size), ("work", work)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= MAX_MODEL_SIDE:
            raise ValueError(f"preprocess_image: {name} must be a whole number of pixels from 1 to {MAX_MODEL_SIDE} "
                             f"(the side of the square image the model reads, e.g. 32), got {v!r}")
    img = open_image(src)
    notes = []
    original = img.size
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            notes.append("transparent pixels put on white")
        elif img.mode in ("L", "1", "I", "I;16", "F"):
            notes.append("grayscale picture: colour questions cannot be answered from it")
        img = to_rgb(img)
    arr = np.asarray(img, dtype=np.uint8)
    bg = _border_colour(arr)                                                     # (3,) float

    # 3. shrink so the longer side is at most `work` (first: a 10000x8 strip never becomes a 10000^2 canvas), pad to
    #    a square with the background colour, enlarge small pictures to the working size
    w, h = img.size
    side = max(w, h)
    if side > work:
        if w == h and side % work == 0 and side // work > 1:
            img = img.reduce(side // work)                        # exact for world images enlarged by a whole factor
        else:
            f = work / side
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX, reducing_gap=2.0)
    if w != h:
        sw, sh = img.size
        canvas = Image.new("RGB", (max(sw, sh), max(sw, sh)), tuple(int(round(c)) for c in bg))
        canvas.paste(img, ((max(sw, sh) - sw) // 2, (max(sw, sh) - sh) // 2))
        img = canvas
        notes.append(f"padded from {w}x{h} to a square")
    if img.size[0] < work:
        img = img.resize((work, work), Image.Resampling.NEAREST)
    if max(original) > size * 1.5:
        notes.append(f"downscaled from {original[0]}x{original[1]} to {size}x{size}")
    elif max(original) < size:
        notes.append(f"upscaled from {original[0]}x{original[1]} to {size}x{size}")
    x = np.asarray(img, dtype=np.float32)                                        # (work, work, 3)

    # 4. background to studio white
    studio = bool(bg.min() >= 228 and bg.max() - bg.min() <= 10)
    if normalise_background and not studio:
        if bg.mean() < 80:
            notes.append("dark background: the model knows shapes on light backgrounds; answers may be wrong")
        else:
            x = np.clip(x * (STUDIO_WHITE / np.maximum(bg, 1.0)), 0, 255)
            notes.append(f"background {tuple(int(c) for c in bg)} balanced to white")

    # 5. hollow outlines -> filled shapes
    if fill_outlines:
        x, n_filled = _fill_holes(x)
        if n_filled > 0.002 * x.shape[0] * x.shape[1]:
            notes.append("filled the inside of hollow outlines")

    # 6. model size
    img = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8), "RGB")
    if img.size[0] != size:
        img = img.resize((size, size), Image.Resampling.BOX)
    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return Preprocessed(t, img, notes, original, tuple(int(round(c)) for c in bg))


def image_for_model(image: Any, size: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1] for a model that reads ``size`` px images: tensors pass through (checked),
    anything else (path, PIL image, bytes, array) goes through :func:`preprocess_image`."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or tuple(image.shape) != (3, size, size) or not image.is_floating_point():
            raise ValueError(f"image tensors must be float (3, {size}, {size}) in [0, 1], got {tuple(image.shape)} "
                             f"{image.dtype}; pass a PIL image or a path to have it preprocessed")
        if not bool(torch.isfinite(image).all()):
            raise ValueError("the image tensor holds NaN or infinite values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"image tensors must hold values in [0, 1], this one goes from {lo:g} to {hi:g}"
                             + ("; divide a 0-255 image by 255" if hi > 1.0 else ""))
        return image.float()                  # float64 / float16 in [0, 1] are fine: the models compute in float32
    return preprocess_image(image, size=size).tensor
