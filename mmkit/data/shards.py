"""Sharded image-text corpora for real-size runs: webdataset-style tar shards, read by random access.

    paths = write_world_shards("data/world", n=4000, shard_size=1000)        # the Shapes World as shards
    paths = write_world_shards("data/crawl", n=4000, kind="crawl")           # raw crawled pages (with defects)
    report = clean_shards("data/crawl/*.tar", "data/clean", disable=["perplexity"])   # M6 §2.3 as a filter pass
    ds = ImageTextShards("data/clean/*.tar", image_size=32)                  # a map-style dataset over the shards
    ds[0]  # {"image": (3, 32, 32) float in [0, 1], "text": str, "lang": "en", "seed": int, "index": 0, "key": ...}

Format (the webdataset convention, readable by ``webdataset`` / ``tar`` as well): each shard ``shard-000000.tar``
holds samples as consecutive members sharing a key: ``KEY.png`` (or ``.jpg``; the encoded image), ``KEY.txt``
(the text: a caption, or a page body) and ``KEY.json`` (``{"lang": .., "title": .., "seed": ..}``).

Streaming without giving up exact resume. :func:`mmkit.train.train` reaches any step without replaying the ones
before it, so it needs ``len(ds)`` and ``ds[i]``. :class:`ImageTextShards` therefore reads only the tar *headers*
when it opens the shards (an index of byte offsets: ~100 bytes per sample), and ``ds[i]`` seeks to sample ``i``'s
members and decodes them on demand: memory does not grow with the corpus, and every process reads only the
samples of its own slices. ``train``'s ``num_workers`` DataLoader workers decode in parallel.
"""
from __future__ import annotations

import glob
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from mmkit.data.cleaning import clean
from mmkit.data.crawl import crawl
from mmkit.data.datasets import ImageTextDataset
from mmkit.data.world import render

__all__ = ["SHARD_NAME", "write_shards", "world_samples", "crawl_samples", "write_world_shards", "shard_paths",
           "ImageTextShards", "ShardSample", "clean_shards", "CleanShardsReport", "read_samples"]

SHARD_NAME = "shard-{:06d}.tar"
IMAGE_EXTS = ("png", "jpg", "jpeg")


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0                                     # reproducible shards: same samples, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[dict], out_dir: str | Path, shard_size: int = 1000) -> list[Path]:
    """Write ``samples`` (dicts ``{"__key__": str, "png" | "jpg": bytes, "txt": str, "json": dict}``) into tar shards
    of ``shard_size`` samples in ``out_dir``; returns the shard paths. Each shard is written to a temporary name and
    renamed when complete, so a reader never sees half a shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, tar, tmp, count = [], None, None, 0

    def close() -> None:
        tar.close()
        final = out / SHARD_NAME.format(len(paths))
        tmp.replace(final)
        paths.append(final)

    for s in samples:
        if tar is None:
            tmp = out / (SHARD_NAME.format(len(paths)) + ".tmp")
            tar = tarfile.open(tmp, "w")
        key = str(s["__key__"])
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (the extension follows the first dot)")
        for ext, value in s.items():
            if ext == "__key__":
                continue
            data = (json.dumps(value, ensure_ascii=False).encode() if ext == "json"
                    else value.encode("utf-8") if isinstance(value, str) else bytes(value))
            _add(tar, f"{key}.{ext}", data)
        count += 1
        if count == shard_size:
            close()
            tar, count = None, 0
    if tar is not None:
        close()
    return paths


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def world_samples(n: int, split: str = "train", start: int = 0, image_size: int = 64, lang: str = "both",
                  styles: Sequence[str] | None = None, min_objects: int = 1, max_objects: int = 3) -> Iterator[dict]:
    """Clean Shapes World image-caption pairs as shard samples (what the world datasets render)."""
    ds = ImageTextDataset(split, n, start=start, lang=lang, styles=styles, image_size=image_size,
                          min_objects=min_objects, max_objects=max_objects, return_scene=True)
    for i in range(n):
        it = ds[i]
        yield {"__key__": f"{split}-{it['seed']}", "png": _png(render(it["scene"], size=image_size)),
               "txt": it["text"], "json": {"lang": it["lang"], "seed": int(it["seed"]), "style": it["style"]}}


def crawl_samples(n: int, split: str = "train", start: int = 0, noise: float = 0.5) -> Iterator[dict]:
    """Raw crawled product pages (``mmkit.data.crawl``: HTML, spam, tiny or blurred images, mismatched pairs ...)
    as shard samples: the page body is the text, the title and the injected defects go to the JSON."""
    for item in crawl(n, split=split, start=start, noise=noise):
        ext = "jpg" if item.image_format == "JPEG" else "png"
        yield {"__key__": item.id.replace(".", "_"), ext: item.image, "txt": bytes(item.body),
               "json": {"lang": item.lang, "seed": int(item.seed), "title": item.title.decode("utf-8", "replace"),
                        "title_bytes": list(item.title) if _invalid_utf8(item.title) else None,
                        "defects": list(item.defects)}}


def _invalid_utf8(b: bytes) -> bool:
    try:
        bytes(b).decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def write_world_shards(out_dir: str | Path, n: int = 1000, kind: str = "pairs", shard_size: int = 250,
                       split: str = "train", start: int = 0, image_size: int = 64, noise: float = 0.5,
                       lang: str = "both") -> list[Path]:
    """The Shapes World in shard format, so every data path of a real corpus runs here: ``kind="pairs"`` (clean
    image-caption pairs) or ``"crawl"`` (raw pages for :func:`clean_shards`)."""
    if kind == "pairs":
        samples = world_samples(n, split, start, image_size=image_size, lang=lang)
    elif kind == "crawl":
        samples = crawl_samples(n, split, start, noise=noise)
    else:
        raise ValueError(f"kind must be 'pairs' or 'crawl', got {kind!r}")
    return write_shards(samples, out_dir, shard_size)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

def shard_paths(pattern: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files from a glob (``data/*.tar``), a folder (every ``*.tar`` in it) or a list; sorted, checked."""
    if isinstance(pattern, (list, tuple)):
        paths = [Path(p) for p in pattern]
    else:
        p = Path(pattern)
        paths = sorted(p.glob("*.tar")) if p.is_dir() else sorted(Path(x) for x in glob.glob(str(pattern)))
    if not paths:
        raise FileNotFoundError(f"no tar shards match {pattern!r}: write some with mmkit.data.shards.write_world_shards "
                                "(or `python scaled/make_shards.py`), or give a folder / glob of *.tar files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard file(s) {missing[:3]} do not exist")
    return paths


class ShardSample(NamedTuple):
    shard: int                          # index into the dataset's shard list
    key: str                            # the sample key
    members: dict                       # extension -> (byte offset of the data, size)


def _scan(path: Path, shard_index: int) -> list[ShardSample]:
    """The samples of one shard from its tar headers only (data blocks are skipped, not read)."""
    out: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if key not in out:
                    out[key] = {}
                    order.append(key)
                out[key][ext.lower()] = (m.offset_data, m.size)
    except tarfile.ReadError as e:
        raise ValueError(f"{path} is not a readable tar shard ({e}): re-write it (write_shards) or remove it") from None
    return [ShardSample(shard_index, k, out[k]) for k in order]


class ImageTextShards(torch.utils.data.Dataset):
    """Image-text pairs from tar shards, decoded on access (see the module doc).

    Items look like :class:`mmkit.data.datasets.ImageTextDataset`'s (``image`` float32 (3, S, S) in [0, 1], ``text``,
    ``lang``, ``seed``, ``index``) plus ``key``, so the tasks that read the world datasets read shards unchanged.
    Images are resized to ``image_size`` (bicubic; a square crop first when ``crop`` and the image is not square).
    Samples without an image or a text are skipped when the index is built (and counted in ``skipped``).
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], image_size: int = 32, crop: bool = True,
                 limit: int | None = None):
        self.paths = shard_paths(shards)
        self.image_size, self.crop = int(image_size), crop
        samples, self.skipped = [], 0
        for i, p in enumerate(self.paths):
            for s in _scan(p, i):
                if any(e in s.members for e in IMAGE_EXTS) and "txt" in s.members:
                    samples.append(s)
                else:
                    self.skipped += 1
            if limit is not None and len(samples) >= limit:
                break
        self.samples = samples[:limit] if limit is not None else samples
        if not self.samples:
            raise ValueError(f"the shards {[str(p) for p in self.paths[:3]]} hold no sample with an image and a text")

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, s: ShardSample, ext: str) -> bytes:
        off, size = s.members[ext]
        with open(self.paths[s.shard], "rb") as f:
            f.seek(off)
            return f.read(size)

    def raw(self, index: int) -> dict:
        """Sample ``index`` as stored: ``{"key", ext: bytes ...}``."""
        s = self.samples[index]
        return {"key": s.key, **{e: self._read(s, e) for e in s.members}}

    def image(self, index: int) -> torch.Tensor:
        s = self.samples[index]
        ext = next(e for e in IMAGE_EXTS if e in s.members)
        img = Image.open(io.BytesIO(self._read(s, ext))).convert("RGB")
        if self.crop and img.width != img.height:
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)        # (3, S, S)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        s = self.samples[index]
        meta = json.loads(self._read(s, "json")) if "json" in s.members else {}
        text = self._read(s, "txt").decode("utf-8", "replace")
        return {"image": self.image(index), "text": text, "lang": meta.get("lang"),
                "seed": int(meta.get("seed", index)), "index": index, "key": s.key}

    def precompute(self) -> "ImageTextShards":
        """Nothing to do: samples are read on access (kept for the ImageTextDataset interface)."""
        return self

    def __repr__(self) -> str:
        return f"ImageTextShards({len(self.paths)} shards, {len(self)} samples, image_size={self.image_size})"


def read_samples(shards: str | Path | Sequence[str | Path]) -> Iterator[dict]:
    """Every sample of the shards, as stored (``{"__key__": key, ext: bytes}``), in order: the streaming read."""
    for path in shard_paths(shards):
        cur: dict | None = None
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                if cur is not None and cur["__key__"] != key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = {"__key__": key}
                cur[ext.lower()] = tar.extractfile(m).read()
        if cur is not None:
            yield cur


# ---------------------------------------------------------------------------------------------------------
# Cleaning as a filter pass (M6 §2.3)
# ---------------------------------------------------------------------------------------------------------

class _Page(NamedTuple):
    """What :mod:`mmkit.data.cleaning` reads from a sample: id, title, body, image (+ lang, defects for scoring)."""
    id: str
    title: bytes
    body: bytes
    image: bytes
    lang: str | None
    defects: tuple
    meta: dict
    ext: str


def _pages(shards) -> Iterator[_Page]:
    for s in read_samples(shards):
        meta = json.loads(s["json"]) if "json" in s else {}
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        title = bytes(meta["title_bytes"]) if meta.get("title_bytes") else str(meta.get("title", "")).encode()
        yield _Page(s["__key__"], title, s.get("txt", b""), s.get(ext, b"") if ext else b"", meta.get("lang"),
                    tuple(meta.get("defects", ())), meta, ext or "png")


class CleanShardsReport(NamedTuple):
    seen: int                           # samples read
    kept: int                           # samples written
    shards: list                        # the cleaned shard paths
    table: str                          # the cleaner's per-rule report (seen / removed / transformed, examples)
    scores: str                         # precision / recall per rule against the crawl's recorded defects


def clean_shards(src, out_dir: str | Path, rules=None, disable: Iterable[str] = (), shard_size: int = 1000,
                 processes: int = 1) -> CleanShardsReport:
    """Run the M6 §2.3 cleaning rules (:func:`mmkit.data.cleaning.clean`) over shards as a filter pass: read ``src``
    as a stream, write the kept samples (cleaned title and body, the image file unchanged) to ``out_dir``."""
    run = clean(_pages(src), rules=rules, disable=disable, processes=processes)

    def kept() -> Iterator[dict]:
        for item in run:
            page = item.source
            meta = {k: v for k, v in page.meta.items() if k not in ("title_bytes",)}
            meta.update(title=item.title, transforms=list(item.transforms))
            yield {"__key__": item.id, page.ext: item.image, "txt": item.body, "json": meta}

    paths = write_shards(kept(), out_dir, shard_size)
    report = run.report
    return CleanShardsReport(report.total, report.kept, paths, report.table(), run.score().table())
