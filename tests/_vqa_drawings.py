"""Pictures drawn *outside* the Shapes World's renderer, with questions and answers, for the VQA tests.

Independent PIL drawing code (nothing from mmkit.data.world.render or mmkit.data.augment): shapes on a 3x3 grid
with thick dark or same-hue strokes, a slight rotation, an off-white background and JPEG compression, at
160-240 px. Questions use the world's vocabulary (colour, shape, count, position), so answers are comparable.
"""
from __future__ import annotations

import io
import math
import random
from typing import NamedTuple

from PIL import Image, ImageDraw

COLOURS = {"red": (230, 30, 40), "green": (30, 170, 60), "blue": (30, 80, 230), "yellow": (245, 210, 0),
           "purple": (150, 50, 200), "orange": (250, 140, 0)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
      "circle": "圆形", "square": "正方形", "triangle": "三角形", "top left": "左上方", "top": "正上方",
      "top right": "右上方", "left": "左侧", "center": "中间", "right": "右侧", "bottom left": "左下方",
      "bottom": "正下方", "bottom right": "右下方"}
COUNT_ZH = ("零个", "一个", "两个", "三个", "四个")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


class Drawn(NamedTuple):
    png: bytes                 # the picture, JPEG-compressed then stored (as a user would upload it)
    objects: list              # [(shape, colour, cell)]


def _polygon(shape, cx, cy, r, angle):
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in (2 * math.pi * k / 40 for k in range(40))]
    elif shape == "square":
        pts = [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    else:
        pts = [(0, -1), (0.95, 0.85), (-0.95, 0.85)]
    a = math.radians(angle)
    return [(cx + r * (x * math.cos(a) - y * math.sin(a)), cy + r * (x * math.sin(a) + y * math.cos(a))) for x, y in pts]


def draw(rng: random.Random, n_objects: int | None = None) -> Drawn:
    side = rng.choice((160, 200, 240))
    bg = tuple(rng.randint(226, 246) + d for d in (6, 3, -6))
    img = Image.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(img)
    k = n_objects or rng.randint(1, 3)
    cells = rng.sample(range(9), k)
    objects = []
    for cell in cells:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        row, col = divmod(cell, 3)
        cx = (col + 0.5 + rng.uniform(-0.08, 0.08)) * side / 3
        cy = (row + 0.5 + rng.uniform(-0.08, 0.08)) * side / 3
        r = rng.uniform(0.08, 0.13) * side
        pts = _polygon(shape, cx, cy, r, rng.uniform(-12, 12))
        fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
        stroke = (40, 40, 40) if rng.random() < 0.5 else tuple(int(c * 0.6) for c in fill)
        d.polygon(pts, fill=fill)
        d.line(pts + pts[:1], fill=stroke, width=max(2, side // rng.choice((30, 40, 50))))
        objects.append((shape, colour, CELLS[cell]))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(40, 85))
    return Drawn(buf.getvalue(), objects)


def question(drawn: Drawn, qtype: str, lang: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of ``qtype`` ("colour", "shape", "count", "position") about ``drawn``, or None when
    no object can be named uniquely for it."""
    objs = drawn.objects
    en = lang == "en"
    if qtype == "count":
        if rng.random() < 0.5:
            n = len(objs)
            return ("how many objects are there?", str(n)) if en else ("图中一共有几个物体？", COUNT_ZH[n])
        s = rng.choice(SHAPES)
        n = sum(o[0] == s for o in objs)
        return (f"how many {PLURAL[s]} are there?", str(n)) if en else (f"图中有几个{ZH[s]}？", COUNT_ZH[n])
    shape, colour, cell = rng.choice(objs)
    if qtype == "colour":
        if sum(o[0] == shape for o in objs) != 1:
            return None
        return (f"what colour is the {shape}?", colour) if en else (f"{ZH[shape]}是什么颜色的？", ZH[colour])
    if qtype == "shape":
        if sum(o[1] == colour for o in objs) != 1:
            return None
        return (f"what shape is the {colour} object?", shape) if en else (f"{ZH[colour]}的物体是什么形状的？", ZH[shape])
    if qtype == "position":
        if sum(o[0] == shape for o in objs) != 1:
            return None
        return (f"where is the {shape}?", cell) if en else (f"{ZH[shape]}在哪里？", ZH[cell])
    raise ValueError(qtype)


def drawn_pairs(n_per_type: int, seed: int = 0, qtypes=("colour", "shape", "count", "position")):
    """[(Drawn, question, answer, qtype, lang)]: ``n_per_type`` pairs of each type, languages alternating."""
    rng = random.Random(seed)
    out = []
    for t in qtypes:
        k = 0
        while k < n_per_type:
            dr = draw(rng)
            qa = question(dr, t, ("en", "zh")[k % 2], rng)
            if qa:
                out.append((dr, qa[0], qa[1], t, ("en", "zh")[k % 2]))
                k += 1
    return out
