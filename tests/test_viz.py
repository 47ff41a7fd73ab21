"""mmkit.viz plotting helpers for masks and tokens: what is drawn matches what was given."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from mmkit.m6.masking import unified_mask  # noqa: E402
from mmkit.viz import (BLOCKED_COLOUR, SEGMENT_COLOURS, TOKEN_COLOURS, plot_attention_mask,  # noqa: E402
                       plot_token_rows, segment_runs)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_segment_runs_hand_computed():
    assert segment_runs([0, 0, 1, 2, 2, -1]) == [(0, 0, 2), (1, 2, 3), (2, 3, 5), (-1, 5, 6)]
    assert segment_runs(torch.tensor([0, 0, -1, 1, -1, 2])) == [(0, 0, 2), (-1, 2, 3), (1, 3, 4), (-1, 4, 5),
                                                                (2, 5, 6)]
    assert segment_runs([]) == []


def test_mask_cells_boundaries_and_names():
    um = unified_mask(2, 1, 2)                                # segments [0 0 1 2 2]
    tokens = ["v0", "v1", "a", "[BOS]", "a"]
    ax = plot_attention_mask(um.mask, um.segment_ids, tokens=tokens, title="t")
    img = ax.images[0].get_array()                             # (L, L, 3): row = query, column = key
    assert img.shape == (5, 5, 3)
    blocked = np.array(to_rgb(BLOCKED_COLOUR))
    drawn_allowed = ~np.isclose(img, blocked).all(-1)
    assert (drawn_allowed == um.mask.numpy()).all()
    # an allowed cell has the colour of its query's segment: decoder row 4 sees visual key 0 in orange
    assert np.allclose(img[4, 0], to_rgb(SEGMENT_COLOURS[2])) and np.allclose(img[0, 1], to_rgb(SEGMENT_COLOURS[0]))
    # segment boundaries at 1.5 (visual|encoder) and 2.5 (encoder|decoder), horizontal and vertical
    h = sorted(line.get_ydata()[0] for line in ax.lines if line.get_xdata()[0] == 0 and line.get_xdata()[1] == 1)
    v = sorted(line.get_xdata()[0] for line in ax.lines if line.get_ydata()[0] == 0 and line.get_ydata()[1] == 1)
    assert h == [1.5, 2.5] and v == [1.5, 2.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    plt.gcf().canvas.draw()
    texts = {t.get_text() for child in ax.child_axes for t in child.get_xticklabels() + child.get_yticklabels()}
    assert {"visual", "enc", "decoder text"} <= texts        # 1-wide runs get the short name on top


def test_mask_accepts_additive_float_and_4d_single_example():
    um = unified_mask(0, 0, 3)
    additive = torch.zeros(3, 3).masked_fill(~um.mask, float("-inf"))
    ax = plot_attention_mask(additive[None, None])
    assert (~np.isclose(ax.images[0].get_array(), np.array(to_rgb(BLOCKED_COLOUR))).all(-1) == um.mask.numpy()).all()


def test_mask_errors_name_the_fix():
    um = unified_mask([1, 2], [1, 1], [2, 2])                 # a batch (2, L, L)
    with pytest.raises(ValueError, match=r"mask\[b\]"):
        plot_attention_mask(um.mask, um.segment_ids)
    with pytest.raises(ValueError, match="segment_ids has"):
        plot_attention_mask(um.mask[0], um.segment_ids[0, :-1])
    with pytest.raises(ValueError, match="one label per position"):
        plot_attention_mask(um.mask[0], tokens=["x"])


def test_token_rows_draw_every_token_in_its_kind_colour():
    rows = [["a", "[MASK]", "circle"], [None, "red", None]]
    kinds = [["text", "[MASK]", "kept"], [None, "target", None]]
    ax = plot_token_rows(rows, kinds, row_labels=["input", "label"], title="mlm")
    assert [t.get_text() for t in ax.texts] == ["a", "[MASK]", "circle", "red"]
    faces = [p.get_facecolor()[:3] for p in ax.patches]
    assert np.allclose(faces, [to_rgb(TOKEN_COLOURS[k]) for k in ("text", "[MASK]", "kept", "target")])
    # the "red" label sits in the same column as "[MASK]"
    assert ax.texts[3].get_position()[0] == ax.texts[1].get_position()[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text", "[MASK]", "kept", "target"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["input", "label"]


def test_token_rows_unknown_kind_gets_a_colour_and_bad_shapes_fail():
    ax = plot_token_rows([["x", "y"]], [["mine", "mine"]])
    assert ax.patches[0].get_facecolor() == ax.patches[1].get_facecolor()
    with pytest.raises(ValueError, match="shape of rows"):
        plot_token_rows([["x", "y"]], [["text"]])
    with pytest.raises(ValueError, match="at least one row"):
        plot_token_rows([])


def test_grid_text_uses_real_fonts_for_chinese_and_marks_and_cuts_with_an_ellipsis():
    from PIL import Image, ImageDraw

    from mmkit.viz import draw_text, fonts, make_grid, text_width, wrap_text

    latin, cjk = fonts(12)
    assert cjk is not None, "no CJK font: bash setup.sh installs fonts-wqy-zenhei"
    # a drawn Chinese character is not the empty box PIL's bitmap font draws (its ink differs between characters)
    inks = []
    for ch in ("左", "圆", "✓", "✗"):
        im = Image.new("L", (20, 20), 255)
        draw_text(ImageDraw.Draw(im), (2, 2), ch, 14, fill=0)
        inks.append(sum(v < 128 for v in im.getdata()))
    assert min(inks) > 5 and len(set(inks)) == 4, inks
    lines = wrap_text("a small red circle at the top left and a large blue square in the center", 80, 12, 2)
    assert len(lines) == 2 and lines[-1].endswith("…") and all(text_width(l, 12) <= 80 for l in lines)
    assert wrap_text("short", 80, 12, 2) == ["short"]                           # no ellipsis when it fits
    g = make_grid([Image.new("RGB", (32, 32), (255, 0, 0))] * 2, captions=["红色", "red"])
    assert g.size[0] >= 2 * 96                                                   # 32 px tiles enlarged to >= 96
    assert g.getpixel((10, 10)) == (255, 0, 0)                                   # nearest: a pure red tile


def test_vqa_against_the_prior_chart_and_table_hand_computed():
    from mmkit.evaluation.vqa import score_answers
    from mmkit.viz import plot_vqa_vs_prior, vqa_gain_table

    # model: colour right twice, count wrong; prior: colour right once, count right
    ev = score_answers([("q1", "red", "red", "colour", "en"), ("q2", "blue", "blue", "colour", "zh"),
                        ("q3", "1", "2", "count", "en")])
    blind = score_answers([("q1", "red", "red", "colour", "en"), ("q2", "blue", "red", "colour", "zh"),
                           ("q3", "1", "1", "count", "en")])
    table = vqa_gain_table(ev, blind, "m")
    assert "| colour | 1.000 | 0.500 | +0.500 |" in table and "| count | 0.000 | 1.000 | -1.000 |" in table
    assert "| language zh | 1.000 | 0.000 | +1.000 |" in table and "| **all** | **0.667** | **0.667** | **+0.000** |" in table
    ax = plot_vqa_vs_prior(ev, blind, "m")
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [1.0, 0.0, 0.5, 1.0]                        # model bars per type, then the prior's
    assert ax.get_xlabel() and ax.get_ylabel() and [t.get_text() for t in ax.get_xticklabels()] == ["colour", "count"]
    plt.close(ax.figure)


def test_use_cjk_font_draws_chinese_without_missing_glyph_warnings():
    import warnings

    from mmkit.viz import use_cjk_font

    name = use_cjk_font()
    if name is None:
        pytest.skip("no CJK font installed (bash setup.sh installs WenQuanYi Zen Hei)")
    fig, ax = plt.subplots()
    ax.set_title("圆形是什么颜色的？ red ✓")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    assert not [w for w in caught if "missing from" in str(w.message)], [str(w.message) for w in caught]
    plt.rcParams["font.family"] = ["sans-serif"]                  # leave the other tests' figures as they were


def test_draw_boxes_draws_a_box_whose_corners_come_in_any_order():
    """A grounding model's guess may write x1 < x0 or an empty box; the drawing must not crash (notebook 08)."""
    from PIL import Image

    from mmkit.viz import draw_boxes
    img = Image.new("RGB", (16, 16), "white")
    a = draw_boxes(img, [(2, 3, 10, 12)], colour=(255, 0, 0))
    b = draw_boxes(img, [(10, 12, 2, 3)], colour=(255, 0, 0))
    assert a.size == (64, 64) and list(a.getdata()) == list(b.getdata())
    assert draw_boxes(img, [(5, 5, 5, 5)]).size == (64, 64)
