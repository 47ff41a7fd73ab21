"""Clips of the Shapes World: one object moving across the 3x3 grid over T frames, with the ground truth a
video-language task needs (captions, questions), for any model (mPLUG §5.4.2 zero-shot "video").

    clip = sample_clip(seed=7, n_frames=8)             # Clip(frames=[Scene] * 8, mover, start, end, direction, ...)
    x = render_clip(clip, size=32)                     # float (8, 3, 32, 32) in [0, 1]
    clip_caption(clip, "en")                           # "a small red circle moves from the top left to the top right"
    clip_questions(clip, "zh")                         # [QA("移动的物体是什么颜色的？", "红色", "colour", "zh"), ...]
    ds = ClipDataset("test", 64, n_frames=8, image_size=32)   # items: frames (T, 3, S, S), caption, question, answer ..

A clip is a path along one row (the mover goes left or right) or one column (up or down) of the grid, from the cell
at one end to the cell at the other, its centre interpolated linearly over the frames; 0 to ``max_static`` other
objects sit still in cells off the path, so nothing ever overlaps. Every frame is a :class:`~mmkit.data.world.Scene`
(the mover's ``position`` is the cell its centre is in), rendered by the world's renderer. Deterministic:
``sample_clip(seed)`` draws everything from ``Rng(f"clip-{seed}")``; :class:`ClipDataset` reads the split's seeds
(``mmkit.data.world.split_seeds``), so train, val and test clips never share a seed.

Questions come in two kinds (``CLIP_QTYPES``): "colour" and "shape" of the moving object can be answered from any
single frame (an image model transfers zero-shot); "direction", "start" and "end" need the order of the frames.
Answers use the world's words (``COLOURS``, ``SHAPES``, ``POSITIONS`` and their Chinese names) plus the four
directions (``DIRECTIONS`` / ``DIRECTIONS_ZH``), which are not in the image VQA answer list.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from mmkit.data.text import QA, noun_phrase
from mmkit.data.world import (COLOURS, COLOURS_ZH, POSITIONS, POSITIONS_ZH, SHAPES, SHAPES_ZH, SIZES, SPLITS, Rng,
                              Scene, WorldObject, make_object, scene_to_tensor, split_seeds)

__all__ = ["DIRECTIONS", "DIRECTIONS_ZH", "CLIP_QTYPES", "STATIC_QTYPES", "Clip", "sample_clip", "render_clip",
           "clip_caption", "clip_questions", "ClipDataset"]

DIRECTIONS: dict[str, tuple[int, int]] = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (drow, dcol)
DIRECTIONS_ZH: dict[str, str] = {"right": "右", "left": "左", "down": "下", "up": "上"}
CLIP_QTYPES: tuple[str, ...] = ("colour", "shape", "direction", "start", "end")
STATIC_QTYPES: tuple[str, ...] = ("colour", "shape")          # answerable from one frame


class Clip(NamedTuple):
    frames: list                  # T Scenes; the mover is frames[t].objects[0]
    mover: WorldObject            # the moving object as it starts
    start: str                    # its first cell (a POSITIONS name)
    end: str                      # its last cell
    direction: str                # "right", "left", "down" or "up"
    static: tuple                 # the objects that stay put
    seed: int


def _cell_centre(position: str) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) / 3, (row + 0.5) / 3


def _cell_of(cx: float, cy: float) -> str:
    col, row = min(2, max(0, int(cx * 3))), min(2, max(0, int(cy * 3)))
    return POSITIONS[3 * row + col]


def sample_clip(seed: int, n_frames: int = 8, max_static: int = 1) -> Clip:
    """A clip of ``n_frames`` (>= 2) frames from ``seed``: a mover crossing a row or a column, and up to
    ``max_static`` (0-2) still objects elsewhere."""
    if n_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames to move, got n_frames={n_frames}")
    if not 0 <= max_static <= 2:
        raise ValueError(f"max_static must be 0, 1 or 2 (cells off the mover's path that stay free of it), got {max_static}")
    rng = Rng(f"clip-{seed}")
    direction = rng.choice(tuple(DIRECTIONS))
    line = rng.randint(0, 2)                                       # the row (or column) it travels along
    dr, dc = DIRECTIONS[direction]
    if dr == 0:                                                    # along row `line`
        cols = (0, 2) if dc > 0 else (2, 0)
        path = [POSITIONS[3 * line + c] for c in range(3)]
        start, end = POSITIONS[3 * line + cols[0]], POSITIONS[3 * line + cols[1]]
    else:                                                          # along column `line`
        rows = (0, 2) if dr > 0 else (2, 0)
        path = [POSITIONS[3 * r + line] for r in range(3)]
        start, end = POSITIONS[3 * rows[0] + line], POSITIONS[3 * rows[1] + line]
    mover = make_object(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), start, rng)
    free = [p for p in POSITIONS if p not in path]
    static = tuple(make_object(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), p, rng)
                   for p in rng.sample(free, rng.randint(0, max_static)))
    (x0, y0), (x1, y1) = _cell_centre(start), _cell_centre(end)
    jx, jy = mover.cx - x0, mover.cy - y0                          # keep the start's jitter along the way
    frames = []
    for t in range(n_frames):
        f = t / (n_frames - 1)
        cx, cy = x0 + (x1 - x0) * f + jx, y0 + (y1 - y0) * f + jy
        obj = dataclasses.replace(mover, cx=cx, cy=cy, position=_cell_of(cx, cy))
        frames.append(Scene(objects=(obj,) + static, seed=seed))
    return Clip(frames, mover, start, end, direction, static, seed)


def render_clip(clip: Clip, size: int = 32) -> torch.Tensor:
    """The frames as a float tensor (T, 3, size, size) in [0, 1]."""
    return torch.stack([scene_to_tensor(f, size) for f in clip.frames])


def clip_caption(clip: Clip, lang: str = "en") -> str:
    """What happens in the clip: "a small red circle moves from the top left to the top right" /
    "小的红色圆形从左上方移动到右上方"."""
    who = noun_phrase(clip.mover, ("size", "colour", "shape"), lang, article="a")
    if lang == "en":
        return f"{who} moves from the {clip.start} to the {clip.end}"
    return f"{who}从{POSITIONS_ZH[clip.start]}移动到{POSITIONS_ZH[clip.end]}"


def clip_questions(clip: Clip, lang: str = "en") -> list[QA]:
    """One question of every type of ``CLIP_QTYPES`` about the mover, with its answer."""
    o = clip.mover
    if lang == "en":
        who = f"the {o.colour} {o.shape}"
        return [QA("what colour is the moving object?", o.colour, "colour", lang),
                QA("what shape is the moving object?", o.shape, "shape", lang),
                QA(f"which way does {who} move?", clip.direction, "direction", lang),
                QA(f"where does {who} start?", clip.start, "start", lang),
                QA(f"where does {who} end?", clip.end, "end", lang)]
    who = COLOURS_ZH[o.colour] + SHAPES_ZH[o.shape]
    return [QA("移动的物体是什么颜色的？", COLOURS_ZH[o.colour], "colour", lang),
            QA("移动的物体是什么形状的？", SHAPES_ZH[o.shape], "shape", lang),
            QA(f"{who}向哪个方向移动？", DIRECTIONS_ZH[clip.direction], "direction", lang),
            QA(f"{who}从哪里出发？", POSITIONS_ZH[clip.start], "start", lang),
            QA(f"{who}最后在哪里？", POSITIONS_ZH[clip.end], "end", lang)]


class ClipDataset(Dataset):
    """Clips of a split: item i is ``sample_clip(split_seeds(split, n, start)[i])``.

    Item: frames (T, 3, S, S) float32 in [0, 1], caption str, question str, answer str, qtype str (one question per
    clip, its type cycling through ``qtypes`` with the index), lang, seed, index [, clip]. ``lang="both"``
    alternates EN (even items) and ZH (odd).
    """

    def __init__(self, split: str = "test", n: int = 64, *, n_frames: int = 8, image_size: int = 32, lang: str = "en",
                 max_static: int = 1, start: int = 0, qtypes: tuple = CLIP_QTYPES, return_clip: bool = False):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
        if lang not in ("en", "zh", "both"):
            raise ValueError(f"lang must be 'en', 'zh' or 'both', got {lang!r}")
        unknown = [t for t in qtypes if t not in CLIP_QTYPES]
        if unknown or not qtypes:
            raise ValueError(f"qtypes must be a non-empty subset of {CLIP_QTYPES}, got {qtypes}")
        self.seeds = split_seeds(split, n, start=start)
        self.n_frames, self.image_size, self.lang, self.max_static = n_frames, image_size, lang, max_static
        self.qtypes, self.return_clip = tuple(qtypes), return_clip

    def __len__(self) -> int:
        return len(self.seeds)

    def clip(self, index: int) -> Clip:
        return sample_clip(self.seeds[index], self.n_frames, self.max_static)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        clip = self.clip(index)
        lang = ("en", "zh")[index % 2] if self.lang == "both" else self.lang
        qtype = self.qtypes[index % len(self.qtypes)]
        qa = next(q for q in clip_questions(clip, lang) if q.qtype == qtype)
        item = {"frames": render_clip(clip, self.image_size), "caption": clip_caption(clip, lang),
                "question": qa.question, "answer": qa.answer, "qtype": qtype, "lang": lang, "seed": clip.seed,
                "index": index}
        if self.return_clip:
            item["clip"] = clip
        return item
