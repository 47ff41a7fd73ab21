"""The user's own pictures: a folder of images plus ``captions.jsonl``, as a torch Dataset.

Format (what :func:`save_world_as_folder` writes, and what a user puts next to their photos)::

    my_photos/
        captions.jsonl          one JSON object per line
        images/mug.jpg
        images/cat.png
        ...

    {"image": "images/mug.jpg", "caption": "a red mug on a desk"}
    {"image": "images/cat.png", "text": "a sleeping cat"}          <- "text" is accepted for "caption"

``image`` is a path relative to the folder (absolute paths work too); other keys are kept in
``dataset.rows[i].extra`` and otherwise ignored; blank lines are skipped. An image may appear on several
lines (several captions).

Items have the keys of :class:`mmkit.data.datasets.ImageTextDataset` that the collate function needs::

    image       float32 (3, S, S) in [0, 1]   resized to the model's image size with PIL (no torchvision)
    text        str                           the caption
    image_path  str                           as written in captions.jsonl
    line        int                           line number in captions.jsonl (1-based)
    index       int

so ``DataLoader(ImageTextFolder("my_photos", image_size=64), collate_fn=make_collate(tok))`` works.

Pictures are converted to RGB: transparent ones (RGBA, LA, palette images with transparency) are
composited on white, like the Shapes World's studio backdrop; grayscale (L, 1, 16-bit), palette (P) and
CMYK are converted; EXIF orientation (phone photos) is applied. Non-square pictures are fitted with
``fit="pad"`` (default: the whole picture, padded with white), ``"crop"`` (centre square) or
``"stretch"``.

Problems raise :class:`UserDataError` naming the file, the line and the fix: missing folder, missing
captions.jsonl, malformed JSON, missing "image" or caption, missing / unreadable / truncated image. With
``on_error="skip"`` bad rows are left out instead and ``dataset.report`` lists what was skipped and why.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from mmkit.data.text import CAPTION_STYLES, LANGS, caption
from mmkit.data.world import render, sample_scene, split_seeds
from mmkit.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "UserDataError", "SkippedRow", "LoadReport", "Row", "ImageTextFolder", "load_image_text_folder",
    "to_rgb", "fit_square", "load_image", "save_world_as_folder", "CAPTIONS_FILE",
]

CAPTIONS_FILE = "captions.jsonl"
ON_ERROR = ("raise", "skip")
FITS = ("pad", "crop", "stretch")
WHITE = (255, 255, 255)
_EXAMPLE_ROW = '{"image": "images/0001.png", "caption": "a red circle at the top left"}'


class UserDataError(ValueError):
    """A problem with the user's folder; the message names the file (and line) and how to fix it."""


@dataclass(frozen=True)
class SkippedRow:
    line: int           # line number in captions.jsonl (1-based)
    image: str | None   # the "image" value of the row, if it had one
    reason: str         # what was wrong (the message the row would have raised)


@dataclass
class LoadReport:
    """What ``on_error="skip"`` left out. ``str(report)`` is a readable summary."""

    captions_file: Path
    n_rows: int = 0                                          # non-blank lines in captions.jsonl
    n_loaded: int = 0                                        # rows in the dataset
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped

    def __str__(self) -> str:
        head = f"{self.captions_file}: loaded {self.n_loaded} of {self.n_rows} rows"
        if self.ok:
            return head + ", nothing skipped"
        lines = [f"{head}, skipped {len(self.skipped)}:"]
        lines += [f"  line {s.line}{f' ({s.image})' if s.image else ''}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class Row:
    line: int                         # line number in captions.jsonl (1-based)
    image: str                        # path as written in the file
    path: Path                        # resolved path of the image
    caption: str
    extra: dict = field(default_factory=dict)   # any other keys of the JSON object


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is
    composited on ``background`` (white); grayscale, 1-bit, palette and CMYK are converted; 16-bit and
    float grayscale ("I;16", "I", "F") are scaled to 0-255."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0                       # 16-bit -> 8-bit
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0                       # float image in [0, 1]
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def fit_square(img: Image.Image, size: int, fit: str = "pad", background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Resize an RGB image to ``size`` x ``size``: ``"pad"`` keeps all of it (white borders), ``"crop"``
    takes the centre square, ``"stretch"`` ignores the aspect ratio. Already-right images are untouched."""
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; use one of {FITS}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    resample = Image.Resampling.LANCZOS   # sharp and alias-free when shrinking photos
    if fit == "stretch" or w == h:
        return img.resize((size, size), resample, reducing_gap=3.0)
    if fit == "crop":
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return img.resize((size, size), resample, box=box, reducing_gap=3.0)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(img.resize((nw, nh), resample, reducing_gap=3.0), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def load_image(path: str | Path, size: int | None = None, fit: str = "pad") -> Image.Image:
    """Open, fully decode (so truncated files fail here), apply EXIF orientation, convert to RGB and,
    if ``size`` is given, fit to ``size`` x ``size``. Raises the underlying PIL / OS error."""
    with Image.open(path) as im:
        im.load()
        img = ImageOps.exif_transpose(im)   # a rotated copy for phone photos, else a plain copy
    img = to_rgb(img)
    return fit_square(img, size, fit) if size is not None else img


def _image_problem(exc: BaseException) -> str:
    """A plain-language reason for a failed image read."""
    text = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can read (wrong extension, corrupt, or an unsupported format)"
    if "truncated" in text.lower():
        return "the file is truncated (an incomplete download or copy?)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"the image is too large to open safely ({text})"
    if isinstance(exc, IsADirectoryError):
        return "the path is a folder, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {text}"


def _to_tensor(img: Image.Image) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)                              # (S, S, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # uint8 (3, S, S)


# --------------------------------------------------------------------------------------------------
# The folder dataset
# --------------------------------------------------------------------------------------------------
class ImageTextFolder(Dataset):
    """A folder of images plus ``captions.jsonl``, as image-text items (see the module docstring).

    Args:
        folder: the folder holding ``captions_file`` (image paths are relative to it).
        image_size: side S of the returned images (the model's image size, e.g. 32 or 64).
        captions_file: name of (or path to) the JSON-lines file; default ``captions.jsonl``.
        on_error: ``"raise"`` (default) stops at the first bad row with a :class:`UserDataError`;
            ``"skip"`` leaves bad rows out and lists them in ``self.report``.
        fit: how non-square pictures become square: ``"pad"`` (white borders), ``"crop"``, ``"stretch"``.
        check_images: decode every image once now, so a broken file fails (or is skipped) at load time
            rather than in the middle of training (costs one decode per image).
        cache_images: keep the resized images in memory (uint8, 3*S*S bytes each).
    """

    def __init__(self, folder: str | Path, image_size: int = 64, *, captions_file: str | Path = CAPTIONS_FILE,
                 on_error: str = "raise", fit: str = "pad", check_images: bool = True,
                 cache_images: bool = False):
        if on_error not in ON_ERROR:
            raise ValueError(f"unknown on_error {on_error!r}; use 'raise' (stop at the first bad row) or "
                             "'skip' (leave bad rows out and list them in dataset.report)")
        if fit not in FITS:
            raise ValueError(f"unknown fit {fit!r}; use one of {FITS}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int (the model's image size, e.g. 32 or 64), got {image_size!r}")
        self.folder = Path(folder).expanduser()
        self.image_size, self.fit, self.on_error = image_size, fit, on_error
        self.cache_images = cache_images
        self._cache: dict[Path, torch.Tensor] = {}
        if not self.folder.exists():
            raise UserDataError(
                f"image folder {self.folder} does not exist. Fix: pass the folder that holds {CAPTIONS_FILE} and "
                "the images (mmkit.data.userdata.save_world_as_folder writes an example).")
        if not self.folder.is_dir():
            raise UserDataError(f"{self.folder} is a file, not a folder. Fix: pass the folder that holds "
                                f"{CAPTIONS_FILE} and the images, not a file inside it.")
        cf = Path(captions_file)
        self.captions_file = cf if cf.is_absolute() else self.folder / cf
        if not self.captions_file.is_file():
            others = sorted(p.name for p in self.folder.glob("*.json*"))
            hint = f" The folder has {others}; pass captions_file=... to use one." if others else ""
            raise UserDataError(
                f"{self.captions_file} not found.{hint} Fix: write {self.captions_file.name} in {self.folder} with "
                f"one JSON object per line, e.g. {_EXAMPLE_ROW}")
        self.report = LoadReport(self.captions_file)
        self.rows: list[Row] = self._read_rows(check_images)
        self.report.n_loaded = len(self.rows)
        if not self.rows:
            why = f"\n{self.report}" if self.report.skipped else ""
            raise UserDataError(f"{self.captions_file}: no usable rows.{why}\nFix: add lines such as {_EXAMPLE_ROW}")

    # -- reading ----------------------------------------------------------------------------------
    def _where(self, line: int) -> str:
        return f"{self.captions_file}, line {line}"

    def _read_rows(self, check_images: bool) -> list[Row]:
        rows: list[Row] = []
        raw_lines = self.captions_file.read_bytes().splitlines()
        for lineno, raw in enumerate(raw_lines, start=1):
            if not raw.strip():
                continue
            self.report.n_rows += 1
            image_value = None
            try:
                obj = self._parse(lineno, raw)
                image_value = obj.get("image") if isinstance(obj.get("image"), str) else None
                row = self._row(lineno, obj)
                if check_images:
                    self._check_image(row)
            except UserDataError as e:
                if self.on_error == "raise":
                    raise
                msg, prefix = str(e), self._where(lineno) + ": "
                self.report.skipped.append(SkippedRow(lineno, image_value, msg[len(prefix):] if msg.startswith(prefix) else msg))
                continue
            rows.append(row)
        return rows

    def _parse(self, lineno: int, raw: bytes) -> dict:
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]                                   # UTF-8 byte-order mark (Windows editors)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserDataError(f"{self._where(lineno)}: not UTF-8 text ({e.reason} at byte {e.start}). "
                                "Fix: save captions.jsonl as UTF-8.") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserDataError(
                f"{self._where(lineno)}: malformed JSON ({e.msg} at column {e.colno}). Fix: each line must be one "
                f"JSON object with double-quoted keys and strings, e.g. {_EXAMPLE_ROW}") from None
        if not isinstance(obj, dict):
            raise UserDataError(f"{self._where(lineno)}: expected a JSON object, got a {type(obj).__name__}. "
                                f"Fix: write one object per line, e.g. {_EXAMPLE_ROW}")
        return obj

    def _row(self, lineno: int, obj: dict) -> Row:
        where = self._where(lineno)
        image = obj.get("image")
        if image is None:
            raise UserDataError(f'{where}: no "image" key (keys: {sorted(obj)}). Fix: add "image": '
                                f'"relative/path.png", e.g. {_EXAMPLE_ROW}')
        if not isinstance(image, str) or not image.strip():
            raise UserDataError(f'{where}: "image" must be a non-empty path string, got {image!r}. '
                                'Fix: write the path of the picture relative to the folder, e.g. "images/0001.png"')
        key = "caption" if "caption" in obj else "text" if "text" in obj else None
        if key is None:
            raise UserDataError(f'{where}: no caption for {image} (no "caption" or "text" key). '
                                'Fix: add "caption": "what the picture shows"')
        cap = obj[key]
        if not isinstance(cap, str):
            raise UserDataError(f'{where}: "{key}" for {image} must be a string, got {type(cap).__name__} {cap!r}. '
                                'Fix: put the caption in double quotes')
        if not cap.strip():
            raise UserDataError(f'{where}: empty caption for {image}. Fix: write what the picture shows in '
                                f'"{key}", or delete the line (or load with on_error="skip")')
        path = Path(image).expanduser()
        path = path if path.is_absolute() else self.folder / path
        extra = {k: v for k, v in obj.items() if k not in ("image", key)}
        return Row(lineno, image, path, cap.strip(), extra)

    def _check_image(self, row: Row) -> None:
        if not row.path.exists():
            raise UserDataError(
                f'{self._where(row.line)}: image file {row.path} not found ("image": "{row.image}" is read '
                f"relative to {self.folder}). Fix: correct the path (names are case-sensitive) or add the file")
        tensor = self._load(row)
        if self.cache_images:
            self._cache[row.path] = tensor

    def _load(self, row: Row) -> torch.Tensor:
        """uint8 (3, S, S), or a UserDataError naming the file and line."""
        try:
            img = load_image(row.path, self.image_size, self.fit)
        except FileNotFoundError:
            raise UserDataError(
                f'{self._where(row.line)}: image file {row.path} not found ("image": "{row.image}" is read '
                f"relative to {self.folder}). Fix: correct the path or add the file") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserDataError(
                f"{self._where(row.line)}: cannot read image {row.path}: {_image_problem(e)}. Fix: re-export the "
                'picture as PNG or JPEG, or delete the line (or load with on_error="skip")') from None
        return _to_tensor(img)

    # -- Dataset ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self.rows)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"ImageTextFolder index {index} out of range for {len(self.rows)} rows")
        row = self.rows[index]
        img = self._cache.get(row.path)
        if img is None:
            img = self._load(row)
            if self.cache_images:
                self._cache[row.path] = img
        return {"image": img.float().div_(255.0), "text": row.caption, "image_path": row.image,
                "line": row.line, "index": index}

    def __repr__(self) -> str:
        report = getattr(self, "report", None)
        skipped = f", {len(report.skipped)} skipped" if report is not None and report.skipped else ""
        return f"ImageTextFolder({str(self.folder)!r}, {len(getattr(self, 'rows', []))} rows, image_size={self.image_size}{skipped})"


def load_image_text_folder(folder: str | Path, image_size: int = 64, **kw) -> ImageTextFolder:
    """``ImageTextFolder(folder, image_size, **kw)``; see :class:`ImageTextFolder`."""
    return ImageTextFolder(folder, image_size, **kw)


# --------------------------------------------------------------------------------------------------
# Writing world scenes in that format
# --------------------------------------------------------------------------------------------------
def save_world_as_folder(out_dir: str | Path, n: int, *, split: str = "train", start: int = 0,
                         image_size: int = 64, lang: str = "en", styles: str | Sequence[str] = ("full",),
                         min_objects: int = 1, max_objects: int = 3, overwrite: bool = False) -> Path:
    """Write ``n`` Shapes World scenes of ``split`` as ``out_dir/images/NNNNNN.png`` plus
    ``out_dir/captions.jsonl`` (one row per image, language and caption style; ``lang="both"`` writes
    English and Chinese rows). Rows carry ``seed``, ``lang`` and ``style`` as extra keys. Returns the path
    of captions.jsonl. Refuses to overwrite an existing captions.jsonl unless ``overwrite=True``."""

    langs = LANGS if lang == "both" else (lang,)
    for lg in langs:
        if lg not in LANGS:
            raise ValueError(f"unknown language {lang!r}; use one of {LANGS + ('both',)}")
    styles = (styles,) if isinstance(styles, str) else tuple(styles)
    for st in styles:
        if st not in CAPTION_STYLES:
            raise ValueError(f"unknown caption style {st!r}; use some of {CAPTION_STYLES}")
    seeds = split_seeds(split, n, start=start)
    out = Path(out_dir).expanduser()
    captions_path = out / CAPTIONS_FILE
    if captions_path.exists() and not overwrite:
        raise FileExistsError(f"{captions_path} already exists. Fix: choose an empty folder or pass overwrite=True")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, seed in enumerate(seeds):
        scene = sample_scene(seed, min_objects, max_objects)
        rel = f"images/{i:06d}.png"
        buf = io.BytesIO()
        render(scene, image_size).save(buf, format="PNG")
        atomic_write_bytes(out / rel, buf.getvalue())
        for lg in langs:
            for st in styles:
                lines.append(json.dumps({"image": rel, "caption": caption(scene, st, lg), "seed": seed,
                                         "lang": lg, "style": st}, ensure_ascii=False))
    atomic_write_text(captions_path, "\n".join(lines) + ("\n" if lines else ""))
    return captions_path
