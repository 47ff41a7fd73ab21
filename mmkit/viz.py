"""Small picture helpers shared by the CLI, notebooks and apps (no model code here)."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import NamedTuple, Sequence

from PIL import Image, ImageDraw, ImageFont

from mmkit.io import atomic_write_bytes


# Fonts for text drawn into images: DejaVu Sans (shipped inside matplotlib, so always there) for Latin text and
# symbols such as ✓ / ✗, and a CJK font (WenQuanYi Zen Hei, which setup.sh installs) for Chinese characters. PIL's
# bitmap default font draws both as empty boxes.
_CJK_FONT_FILES = ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                   "/usr/share/fonts/truetype/arphic/uming.ttc")


class WalkStep(NamedTuple):
    """One step of a forward walk (the "open the box" sections of notebooks 03, 07, 08: each system's anatomy)."""

    name: str          # what happens
    equation: str      # the paper's formula (or the code's, where the paper is silent)
    shape: tuple       # shape of the tensor this step produces
    note: str          # what to notice


@functools.lru_cache(maxsize=16)
def fonts(size: int = 12) -> tuple[ImageFont.FreeTypeFont, ImageFont.FreeTypeFont | None]:
    """(Latin / symbol font, CJK font or None) at ``size`` px."""
    import matplotlib

    latin = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    cjk = next((ImageFont.truetype(f, size) for f in _CJK_FONT_FILES if Path(f).exists()), None)
    return latin, cjk


def use_cjk_font() -> str | None:
    """Let matplotlib draw Chinese: register the kit's CJK TrueType font (see :func:`fonts`) as the fallback after
    DejaVu Sans, glyph by glyph (DejaVu alone draws Chinese as empty boxes and warns "Glyph ... missing"). Returns
    the font's family name, or None when no CJK font is installed (``bash setup.sh`` installs one)."""
    import logging

    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    path = next((f for f in _CJK_FONT_FILES if Path(f).exists()), None)
    if path is None:
        return None
    font_manager.fontManager.addfont(path)
    name = font_manager.FontProperties(fname=path).get_name()
    plt.rcParams["font.family"] = ["DejaVu Sans", name]
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)   # its medium weight stands in for normal
    return name


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF or 0x3000 <= o <= 0x303F


def _runs(text: str, size: int):
    """Split ``text`` into (run, font) pieces: CJK characters in the CJK font, the rest in DejaVu Sans."""
    latin, cjk = fonts(size)
    out: list[tuple[str, ImageFont.FreeTypeFont]] = []
    for ch in text:
        f = cjk if (cjk is not None and _is_cjk(ch)) else latin
        if out and out[-1][1] is f:
            out[-1] = (out[-1][0] + ch, f)
        else:
            out.append((ch, f))
    return out


def text_width(text: str, size: int = 12) -> float:
    """Pixel width of ``text`` drawn by :func:`draw_text`."""
    return sum(f.getlength(r) for r, f in _runs(text, size))


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 12,
              fill=(0, 0, 0)) -> None:
    """Draw ``text`` (English, Chinese, ✓ / ✗ ...) at ``xy`` with real fonts, switching font by script."""
    x, y = xy
    for run, f in _runs(text, size):
        draw.text((x, y), run, font=f, fill=fill)
        x += f.getlength(run)


def wrap_text(text: str, width: float, size: int = 12, max_lines: int = 3) -> list[str]:
    """Lines of ``text`` that fit ``width`` px (words kept whole when they fit; Chinese breaks anywhere); when it
    needs more than ``max_lines`` lines, the last one ends with "…" so nothing is cut silently."""
    lines, cur = [], ""
    for token in re.findall(r"\S+\s*|\s+", text):
        pieces = [token] if text_width(token.rstrip(), size) <= width else list(token)
        for piece in pieces:
            if cur and text_width((cur + piece).rstrip(), size) > width:
                lines.append(cur.rstrip())
                cur = piece.lstrip()
            else:
                cur += piece
    if cur.strip():
        lines.append(cur.rstrip())
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and text_width(last + "…", size) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "…"]
    return lines


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, captions: Sequence[str] | None = None,
              scale: int = 2, pad: int = 4, caption_lines: int = 3, font_size: int = 12,
              min_tile: int = 96) -> Image.Image:
    """Tile PIL images into one picture, each optionally with a wrapped caption under it.

    Tiles are enlarged with nearest neighbours (every pixel of a 32 px scene stays a visible square) by ``scale``,
    or more so that each tile is at least ``min_tile`` px wide. Captions use real fonts (Chinese and ✓ / ✗ draw
    as themselves) and end with "…" where they had to be cut.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncols = ncols or min(n, 8)
    nrows = (n + ncols - 1) // ncols
    w0, h0 = images[0].size
    scale = max(scale, -(-min_tile // max(w0, 1)))
    w, h = w0 * scale, h0 * scale
    line_h = int(font_size * 1.3)
    text_h = line_h * caption_lines + 4 if captions else 0
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        grid.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(200, 200, 200))
        if captions:
            for j, line in enumerate(wrap_text(captions[i], w, font_size, caption_lines)):
                draw_text(draw, (x, y + h + 2 + line_h * j), line, font_size)
    return grid


def save_grid(images: Sequence[Image.Image], path: str | Path, **kwargs) -> Path:
    import io

    buf = io.BytesIO()
    make_grid(images, **kwargs).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def draw_boxes(img: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               scale: int = 4, colour: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """``img`` enlarged ``scale`` times (nearest) with pixel boxes ``(x0, y0, x1, y1)`` and optional labels. A box
    whose corners come in the wrong order (a model's guess) is drawn between them all the same."""
    big = img.convert("RGB").resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for i, box in enumerate(boxes):
        (x0, x1), (y0, y1) = sorted((box[0] * scale, box[2] * scale)), sorted((box[1] * scale, box[3] * scale))
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=max(1, scale // 2))
        if labels:
            draw_text(draw, (x0 + 2, max(0, y0 - 14)), labels[i], 12, fill=colour)
    return big


def show(img: Image.Image, scale: int = 4) -> Image.Image:
    """An enlarged copy (nearest neighbour) so 32/64 px scenes are visible in a notebook."""
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


# --------------------------------------------------------------------------------------------------------------
# Attention masks and token rows (matplotlib; imported lazily so the CLI does not pay for it)
# --------------------------------------------------------------------------------------------------------------
# Segment ids as in mmkit.m6.masking (SEG_PAD, SEG_VISUAL, SEG_ENCODER, SEG_DECODER); repeated here so the viz
# module needs no torch.
SEGMENT_NAMES: dict[int, str] = {0: "visual", 1: "encoder text", 2: "decoder text", -1: "pad"}
SEGMENT_SHORT: dict[int, str] = {0: "vis", 1: "enc", 2: "dec", -1: "pad"}
# Strong colours for the cells a query may attend to, coloured by the query's segment.
SEGMENT_COLOURS: dict[int, str] = {0: "#59a14f", 1: "#4e79a7", 2: "#f28e2b", -1: "#9d9d9d"}
BLOCKED_COLOUR = "#f3f3f3"  # cells a query may not attend to
# Light fills for token boxes, so black text stays readable. Segment kinds reuse the segment hues.
TOKEN_COLOURS: dict[str, str] = {
    "visual": "#b6dfa9", "encoder text": "#b3cde8", "decoder text": "#f9cc9f", "pad": "#dddddd",
    "text": "#f7f7f7",           # an ordinary token, nothing happens to it
    "noised": "#f4a3a5",         # a text token hidden in a span [MASK] (M6 text denoising)
    "[MASK]": "#e8767a",         # BERT MLM: chosen, replaced by [MASK] (80%)
    "random": "#c9a0dc",         # BERT MLM: chosen, replaced by a random token (10%)
    "kept": "#ffe08a",           # BERT MLM: chosen, left unchanged but still predicted (10%)
    "ignored": "#eeeeee",        # a label the loss skips (IGNORE_INDEX)
    "target": "#e6d3ad",         # a label the loss predicts
    "empty": "#ffffff",          # a placeholder for a segment with nothing in it
}


def _to_numpy(x):
    import numpy as np

    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def segment_runs(segment_ids) -> list[tuple[int, int, int]]:
    """Contiguous runs of equal segment ids as ``(segment, start, end)`` (end exclusive).

    ``[0, 0, 1, 2, 2, -1]`` -> ``[(0, 0, 2), (1, 2, 3), (2, 3, 5), (-1, 5, 6)]``. Boundaries of a mask plot
    are drawn at every ``start`` but the first.
    """
    seg = _to_numpy(segment_ids).reshape(-1).tolist()
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(seg):
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1], i + 1)
        else:
            runs.append((int(s), i, i + 1))
    return runs


def _allowed(mask):
    """A (L, L) bool 'may attend' matrix from a bool / 0-1 mask or an additive float mask (0 or -inf)."""
    import numpy as np

    m = _to_numpy(mask)
    while m.ndim > 2 and m.shape[0] == 1:  # (1, 1, L, L) -> (L, L)
        m = m[0]
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"plot_attention_mask draws ONE square (L, L) mask, got shape {tuple(m.shape)}; for a "
                         "batch pick an example: mask[b] (and segment_ids[b])")
    if m.dtype == bool:
        return m
    if np.issubdtype(m.dtype, np.floating) and (m < 0).any():  # additive: 0 = attend, -inf (or very negative) = not
        return m > np.finfo(m.dtype).min / 2
    return m != 0


def plot_attention_mask(mask, segment_ids=None, tokens: Sequence[str] | None = None, ax=None,
                        title: str | None = None, fontsize: float = 7, segment_names: dict | None = None):
    """Draw an (L, L) attention mask: row = query position, column = key position (M6 §3.2's picture).

    A cell is filled when the query may attend to the key (True, the ``scaled_dot_product_attention``
    convention), in the colour of the *query's* segment (visual green, encoder text blue, decoder text orange,
    pad grey), and left pale otherwise. With ``segment_ids`` ((L,), as ``UnifiedMask.segment_ids``) black lines
    mark where the segment changes and the segment names are written along the top (keys) and the right
    (queries); ``tokens`` (L strings) label every row and column. Returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_rgb

    allowed = _allowed(mask)
    L = allowed.shape[0]
    seg = None if segment_ids is None else _to_numpy(segment_ids).reshape(-1)
    if seg is not None and len(seg) != L:
        raise ValueError(f"segment_ids has {len(seg)} entries but the mask is {L} x {L}; pass the segment ids of "
                         "the same example (UnifiedMask.segment_ids, TaskBatch.segment_ids[b])")
    if tokens is not None and len(tokens) != L:
        raise ValueError(f"tokens has {len(tokens)} labels but the mask is {L} x {L}: give one label per position")
    names = {**SEGMENT_NAMES, **(segment_names or {})}
    if ax is None:
        side = min(9.0, max(3.0, 0.2 * L + 1.5))
        _, ax = plt.subplots(figsize=(side + 1.2, side))

    rows = np.array([to_rgb(SEGMENT_COLOURS.get(int(s), "#333333")) for s in
                     (seg if seg is not None else np.full(L, 1))])          # (L, 3) colour of each query
    img = np.where(allowed[:, :, None], rows[:, None, :], np.array(to_rgb(BLOCKED_COLOUR)))  # (L, L, 3)
    ax.imshow(img, interpolation="nearest", aspect="equal")
    # thin white cell grid, so single cells can be counted
    ax.set_xticks(np.arange(-0.5, L, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6 if L <= 40 else 0.2)
    ax.tick_params(which="minor", length=0)

    if tokens is not None:
        ax.set_xticks(range(L), [str(t) for t in tokens], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(L), [str(t) for t in tokens], fontsize=fontsize)
    else:
        step = max(1, L // 16)
        ax.set_xticks(range(0, L, step))
        ax.set_yticks(range(0, L, step))
        ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("key (attended to)", fontsize=fontsize + 1)
    ax.set_ylabel("query (attending)", fontsize=fontsize + 1)

    if seg is not None:
        runs = segment_runs(seg)
        for _, start, _ in runs[1:]:
            ax.axhline(start - 0.5, color="black", linewidth=1.3)
            ax.axvline(start - 0.5, color="black", linewidth=1.3)
        centres = [(start + end - 1) / 2 for _, start, end in runs]
        # keys (top): two-line names where the run is wide enough, short names where it is not
        top = [names[s].replace(" ", "\n") if end - start >= 3 else SEGMENT_SHORT.get(s, names[s])
               for s, start, end in runs]
        sec_x = ax.secondary_xaxis("top")
        sec_x.set_xticks(centres, top, fontsize=fontsize)
        sec_x.tick_params(length=0)
        for lab, (s, _, _) in zip(sec_x.get_xticklabels(), runs):
            lab.set_color(SEGMENT_COLOURS.get(s, "black"))
            lab.set_fontweight("bold")
        sec_y = ax.secondary_yaxis("right")
        sec_y.set_yticks(centres, [names[s] for s, _, _ in runs], fontsize=fontsize)
        sec_y.tick_params(length=0)
        for lab, (s, _, _) in zip(sec_y.get_yticklabels(), runs):
            lab.set_color(SEGMENT_COLOURS.get(s, "black"))
            lab.set_fontweight("bold")
    if title:
        ax.set_title(title, fontsize=fontsize + 2, pad=22 if seg is not None else 6)
    return ax


def _text_width_pt(s: str, fontsize: float) -> float:
    """Width of ``s`` in points when drawn at ``fontsize`` with matplotlib's default font."""
    from matplotlib.textpath import TextPath

    return TextPath((0, 0), s, size=fontsize).get_extents().width if s.strip() else 0.3 * fontsize * len(s)


def plot_token_rows(rows: Sequence[Sequence[str | None]], kinds: Sequence[Sequence[str | None]] | None = None,
                    row_labels: Sequence[str] | None = None, ax=None, title: str | None = None,
                    palette: dict[str, str] | None = None, legend: bool = True, fontsize: float = 8,
                    show_positions: bool = True):
    """Draw rows of tokens as coloured boxes on a shared position grid (one column per position, as wide as its
    longest token).

    ``rows``: one list of token strings per row; ``None`` leaves a cell empty (to line up a decoder input under
    its target, or an encoder text after the visual slots). ``kinds``: same shape, the category of each token
    (a key of ``TOKEN_COLOURS`` such as "visual", "[MASK]", "random", "kept", or any name: unknown names get
    colours of their own); the legend lists the kinds shown. If the tokens do not fit the axes' width, the font
    shrinks until they do. Returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rows = [list(r) for r in rows]
    if not rows:
        raise ValueError("plot_token_rows needs at least one row of tokens")
    if kinds is None:
        kinds = [["text"] * len(r) for r in rows]
    kinds = [list(k) for k in kinds]
    if len(kinds) != len(rows) or any(len(k) != len(r) for k, r in zip(kinds, rows)):
        raise ValueError("kinds must have the shape of rows: one kind per token (None where the token is None)")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row_labels for {len(rows)} rows")
    colours = {**TOKEN_COLOURS, **(palette or {})}
    spare = iter(plt.get_cmap("Pastel2").colors)
    for k in (k for ks in kinds for k in ks):
        if k is not None and k not in colours:
            colours[k] = next(spare, "#cccccc")

    n_cols = max(len(r) for r in rows)
    # Column widths in points at the requested font size: each column as wide as its longest token plus a
    # margin (measured with TextPath, so "[MASK]" and "##o" get the room they really take).
    col_pts = [max([_text_width_pt(str(r[c]), fontsize) for r in rows if c < len(r) and r[c] is not None]
                   + [1.5 * fontsize]) + 0.9 * fontsize for c in range(n_cols)]
    total = sum(col_pts)
    if ax is None:
        width = min(24.0, total / 72 / 0.92 + 1.8)                          # inches: tokens + row labels
        fig, ax = plt.subplots(figsize=(width, 0.42 * len(rows) + 0.9))
        fig.subplots_adjust(left=1.55 / width, right=1 - 0.15 / width)
    # If the axes is narrower than the tokens need (a given ax, or a very long row), shrink the font to fit.
    fig = ax.get_figure()
    ax_pts = ax.get_position().width * fig.get_figwidth() * 72              # the axes' width in points
    avail = 0.92 * ax_pts
    if total > avail:
        shrink = avail / total
        fontsize, col_pts, total = max(4.0, fontsize * shrink), [w * shrink for w in col_pts], avail
    lefts = [sum(col_pts[:c]) for c in range(n_cols)]
    centres = [lo + w / 2 for lo, w in zip(lefts, col_pts)]
    gap = 0.15 * fontsize                                                 # white space between boxes, points
    used: list[str] = []
    for y, (row, ks) in enumerate(zip(rows, kinds)):
        for x, (tok, kind) in enumerate(zip(row, ks)):
            if tok is None:
                continue
            kind = kind or "text"
            if kind not in used:
                used.append(kind)
            ax.add_patch(Rectangle((lefts[x] + gap, y - 0.36), col_pts[x] - 2 * gap, 0.72,
                                   facecolor=colours[kind], edgecolor="#888888", linewidth=0.5))
            ax.text(centres[x], y, str(tok), ha="center", va="center", fontsize=fontsize, clip_on=True)
    ax.set_xlim(0, max(total, ax_pts, 1))        # one data unit ~ one point: boxes keep their natural width
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), row_labels if row_labels is not None else [""] * len(rows),
                  fontsize=fontsize)
    if show_positions:
        ax.set_xticks(centres, [str(i) for i in range(n_cols)], fontsize=max(5, fontsize - 2), color="#777777")
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    used = [k for k in used if k != "empty"]                                # placeholders need no legend entry
    if legend and used:
        ax.legend(handles=[Patch(facecolor=colours[k], edgecolor="#888888", label=k) for k in used],
                  loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(len(used), 8), fontsize=fontsize - 1,
                  frameon=False, borderaxespad=0.2, handlelength=1.2, columnspacing=1.0)
    if title:
        ax.set_title(title, fontsize=fontsize + 1, loc="left", pad=2.6 * fontsize if legend and used else 6)
    return ax


# --------------------------------------------------------------------------------------------------------------
# VQA against its blind baseline (notebooks 04, 07, 08: one chart, one table, whatever the system)
# --------------------------------------------------------------------------------------------------------------
def plot_vqa_vs_prior(ev, blind, model_name: str, ax=None):
    """Bars of exact-match accuracy per question type: the model's (``ev``) beside the answer prior's on the SAME
    questions (``blind``, :func:`mmkit.evaluation.vqa.prior_eval`). Both are ``VQAEval``s. Returns the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    types = list(ev.per_type)
    x = np.arange(len(types))
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3))
    ax.bar(x - 0.2, [ev.per_type[t] for t in types], 0.4, label=model_name)
    ax.bar(x + 0.2, [blind.per_type.get(t, float("nan")) for t in types], 0.4, label="answer prior (blind)")
    ax.set_xticks(x, types); ax.set_ylim(0, 1.05); ax.set_xlabel("question type"); ax.set_ylabel("exact-match accuracy")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{ev.n_questions} test questions: {model_name} {ev.accuracy:.3f}, answer prior {blind.accuracy:.3f}")
    return ax


def vqa_gain_table(ev, blind, model_name: str) -> str:
    """The same comparison as a markdown table (per type, per language, all), gains signed."""
    rows = [f"| question type | {model_name} | answer prior | gain |", "| --- | --- | --- | --- |"]
    for key, part, prior in [(t, ev.per_type[t], blind.per_type.get(t)) for t in ev.per_type] + \
                            [(f"language {lg}", ev.per_lang[lg], blind.per_lang.get(lg)) for lg in ev.per_lang]:
        rows.append(f"| {key} | {part:.3f} | {prior:.3f} | {part - prior:+.3f} |" if prior is not None else
                    f"| {key} | {part:.3f} | - | - |")
    rows.append(f"| **all** | **{ev.accuracy:.3f}** | **{blind.accuracy:.3f}** | **{ev.accuracy - blind.accuracy:+.3f}** |")
    return "\n".join(rows)
