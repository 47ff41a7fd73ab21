"""The Shapes World scenes and renderer: determinism, geometry of the pixels, splits, argument errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkit.data import world as W
from mmkit.data.world import (
    BASE_RGB,
    CELL,
    CELL_MARGIN,
    COLOURS,
    MAX_CENTRE_JITTER,
    POSITIONS,
    SHAPES,
    SIZE_RADIUS,
    SPLITS,
    Scene,
    make_object,
    make_scene,
    object_box,
    render,
    sample_scene,
    scene_to_tensor,
    scenes_per_second,
    split_of,
    split_seeds,
)

SEEDS = range(200)


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)  # (H, W, 3), signed so differences do not wrap


# --- determinism ---------------------------------------------------------------------------------------
def test_same_seed_same_scene_and_identical_pixels():
    for seed in (0, 1, 17, 12345, 10_000_003, 20_000_042):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b and a.seed == seed
        assert render(a, 64).tobytes() == render(b, 64).tobytes()
        assert render(a, 32).tobytes() == render(sample_scene(seed), 32).tobytes()


def test_pinned_scene_values_do_not_drift():
    # Only Random.random() is used, whose stream Python guarantees: these values must never change.
    # If this fails, every dataset, checkpoint and note built on the world has silently changed.
    s = sample_scene(0)
    assert [o.attributes for o in s.objects] == [
        ("square", "orange", "large", "bottom right"),
        ("triangle", "orange", "small", "center"),
        ("square", "orange", "large", "top left"),
    ]
    assert s.objects[0].rgb == (255, 120, 13) and s.objects[0].cx == pytest.approx(0.8474643262138314)
    assert s.background == W.Background(top=(255, 253, 251), bottom=(245, 243, 241))
    assert [o.attributes for o in sample_scene(10_000_000).objects] == [
        ("circle", "orange", "large", "right"), ("square", "green", "small", "bottom right"),
        ("square", "red", "large", "top"),
    ]
    r = W.Rng(0)
    assert [r.randint(0, 9) for _ in range(8)] == [8, 7, 4, 2, 5, 4, 7, 3]


def test_different_seeds_give_different_scenes_and_pixels():
    renders = {render(sample_scene(s), 32).tobytes() for s in SEEDS}
    assert len(renders) == len(SEEDS)
    attrs = {tuple(o.attributes for o in sample_scene(s).objects) for s in SEEDS}
    assert len(attrs) > 0.9 * len(SEEDS)  # attribute-level repeats are possible but rare


def test_render_has_no_randomness():
    scene = sample_scene(5)
    assert render(scene, 48).tobytes() == render(scene, 48).tobytes()
    hand = make_scene([("circle", "red", "small", "top left")])
    assert render(hand, 40).tobytes() == render(make_scene([("circle", "red", "small", "top left")]), 40).tobytes()


# --- sampling distribution ----------------------------------------------------------------------------
def test_object_counts_positions_and_attributes_cover_the_vocabulary():
    counts, shapes, colours, sizes, positions = set(), set(), set(), set(), set()
    for s in SEEDS:
        scene = sample_scene(s, min_objects=2, max_objects=4)
        assert 2 <= len(scene) <= 4
        assert len({o.position for o in scene.objects}) == len(scene)
        counts.add(len(scene))
        for o in scene.objects:
            shapes.add(o.shape), colours.add(o.colour), sizes.add(o.size), positions.add(o.position)
    assert counts == {2, 3, 4}
    assert shapes == set(SHAPES) and colours == set(COLOURS) and sizes == {"small", "large"}
    assert positions == set(POSITIONS)
    assert {len(sample_scene(s, min_objects=9, max_objects=9)) for s in range(5)} == {9}


def test_jittered_colour_is_nearest_to_its_named_base_colour():
    for s in SEEDS:
        for o in sample_scene(s).objects:
            dists = {c: sum((a - b) ** 2 for a, b in zip(o.rgb, rgb)) for c, rgb in BASE_RGB.items()}
            assert min(dists, key=dists.get) == o.colour, (s, o)
            assert max(abs(a - b) for a, b in zip(o.rgb, BASE_RGB[o.colour])) <= 40


# --- geometry ------------------------------------------------------------------------------------------
def test_jitter_stays_inside_cells_with_margin_and_sizes_in_range():
    eps = 1e-9
    for s in range(500):
        for o in sample_scene(s, max_objects=5).objects:
            row, col = POSITIONS.index(o.position) // 3, POSITIONS.index(o.position) % 3
            assert (o.row, o.col) == (row, col)
            lo, hi = SIZE_RADIUS[o.size]
            assert lo - eps <= o.radius <= hi + eps
            assert abs(o.cx - (col + 0.5) * CELL) <= MAX_CENTRE_JITTER + eps
            assert abs(o.cy - (row + 0.5) * CELL) <= MAX_CENTRE_JITTER + eps
            assert o.cx - o.radius >= col * CELL + CELL_MARGIN - eps
            assert o.cx + o.radius <= (col + 1) * CELL - CELL_MARGIN + eps
            assert o.cy - o.radius >= row * CELL + CELL_MARGIN - eps
            assert o.cy + o.radius <= (row + 1) * CELL - CELL_MARGIN + eps
    # the size ranges are separated by a factor of 1.4
    assert SIZE_RADIUS["small"][1] * 1.4 <= SIZE_RADIUS["large"][0] + 1e-12


def test_object_box_is_centre_plus_minus_radius_in_pixels():
    o = make_object("square", "blue", "large", "center")
    r = (SIZE_RADIUS["large"][0] + SIZE_RADIUS["large"][1]) / 2
    box = object_box(o, 90)
    assert box == pytest.approx((45 - 90 * r, 45 - 90 * r, 45 + 90 * r, 45 + 90 * r))
    assert box.centre == pytest.approx((45, 45))
    assert box.normalised(90) == pytest.approx((0.5 - r, 0.5 - r, 0.5 + r, 0.5 + r))


def test_pixel_at_each_box_centre_has_the_object_colour():
    size = 64  # at 64 px even a small triangle covers the whole pixel under its box centre
    for s in SEEDS:
        scene = sample_scene(s, max_objects=4)
        px = pixels(render(scene, size))
        for o in scene.objects:
            x, y = int(o.cx * size), int(o.cy * size)
            assert np.abs(px[y, x] - np.array(o.rgb)).max() <= 2, (s, o, px[y, x])


def test_background_corners_are_near_white_and_grey():
    for s in SEEDS:
        scene = sample_scene(s, min_objects=9, max_objects=9) if s % 4 == 0 else sample_scene(s)
        px = pixels(render(scene, 64))
        for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
            c = px[y, x]
            assert c.min() >= 190, (s, (y, x), c)              # bottom corners may sit in a soft shadow
            assert c.max() - c.min() <= 14, (s, (y, x), c)     # warm/cool tint of +-3 per side, no object colour
        assert px[0, 0].min() >= 240 and px[0, 63].min() >= 240  # top rows are the brightest


def _object_pixel_count(px: np.ndarray, o, size: int) -> int:
    b = object_box(o, size)
    x0, y0 = max(0, int(b.x0) - 1), max(0, int(b.y0) - 1)
    crop = px[y0: int(b.y1) + 2, x0: int(b.x1) + 2]
    return int((np.abs(crop - np.array(o.rgb)).max(axis=-1) <= 40).sum())


def test_small_and_large_objects_are_separable_by_pixel_area():
    size = 64
    areas: dict[tuple[str, str], list[int]] = {}
    for s in range(300):
        scene = sample_scene(s)
        px = pixels(render(scene, size))
        for o in scene.objects:
            areas.setdefault((o.shape, o.size), []).append(_object_pixel_count(px, o, size))
    for shape in SHAPES:
        small, large = areas[(shape, "small")], areas[(shape, "large")]
        assert max(small) < min(large), (shape, max(small), min(large))


def test_objects_do_not_overlap_and_relations_hold_for_pixels():
    # left-of between cells holds for the pixels: every object box lies inside its own cell
    for s in range(100):
        boxes = W.scene_boxes(sample_scene(s, min_objects=3, max_objects=9), 64)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


def test_hand_made_scene_sits_at_cell_centres_with_base_colours():
    scene = make_scene([("circle", "red", "small", "top left"), ("triangle", "yellow", "large", "bottom right")])
    a, b = scene.objects
    assert (a.cx, a.cy) == pytest.approx((CELL / 2, CELL / 2))
    assert (b.cx, b.cy) == pytest.approx((2.5 * CELL, 2.5 * CELL))
    assert a.rgb == BASE_RGB["red"] and b.rgb == BASE_RGB["yellow"]
    assert scene.object_at("top left") is a and scene.object_at("center") is None
    assert split_of(scene.seed) is None


# --- tensors -------------------------------------------------------------------------------------------
def test_tensor_roundtrip_and_range():
    scene = sample_scene(3)
    x = scene_to_tensor(scene, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    img = render(scene, 32)
    assert W.tensor_to_image(W.image_to_tensor(img)).tobytes() == img.tobytes()
    assert W.image_to_tensor(img.convert("L")).shape == (3, 32, 32)


# --- splits --------------------------------------------------------------------------------------------
def test_split_ranges_are_disjoint_and_split_seeds_stay_inside():
    ranges = sorted(SPLITS.values())
    for (lo1, hi1), (lo2, hi2) in zip(ranges, ranges[1:]):
        assert lo1 < hi1 <= lo2 < hi2
    for name, (lo, hi) in SPLITS.items():
        seeds = split_seeds(name, 5, start=3)
        assert list(seeds) == [lo + 3 + i for i in range(5)]
        assert all(split_of(s) == name for s in seeds)
        assert split_of(hi - 1) == name and split_of(hi) != name
        assert list(split_seeds(name, 2, start=hi - lo - 2)) == [hi - 2, hi - 1]
        assert len(split_seeds(name, 0)) == 0
    assert split_of(-1) is None and split_of(15_000_000) is None


def test_split_seeds_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown split 'dev'.*train"):
        split_seeds("dev", 3)
    lo, hi = SPLITS["val"]
    with pytest.raises(ValueError, match="does not fit"):
        split_seeds("val", hi - lo + 1)
    with pytest.raises(ValueError, match="does not fit"):
        split_seeds("val", 10, start=hi - lo - 5)
    with pytest.raises(ValueError, match="start"):
        split_seeds("train", 3, start=-1)
    with pytest.raises(ValueError):
        split_seeds("train", -1)


# --- bad arguments -------------------------------------------------------------------------------------
def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="min_objects"):
        sample_scene(0, min_objects=0)
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(0, max_objects=10)
    with pytest.raises(ValueError, match="min_objects"):
        sample_scene(0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        make_object("hexagon", "red", "small", "center")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        make_object("circle", "pink", "small", "center")
    with pytest.raises(ValueError, match="unknown size 'medium'"):
        make_object("circle", "red", "medium", "center")
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        make_object("circle", "red", "small", "middle")
    with pytest.raises(ValueError, match="distinct grid cells"):
        make_scene([("circle", "red", "small", "top"), ("square", "blue", "large", "top")])
    with pytest.raises(ValueError, match="at least one object"):
        Scene(objects=())
    with pytest.raises(ValueError, match="size >= 8"):
        render(sample_scene(0), 4)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        W.tensor_to_image(torch.zeros(1, 8, 8))


# --- speed (measured and printed, never asserted) ------------------------------------------------------
def test_render_speed_is_reported(capsys):
    speed = scenes_per_second(size=64, n=50)
    with capsys.disabled():
        print(f"\n[world] sample_scene + render at {speed.size}px: {speed.scenes_per_second:.0f} scenes/s")
    assert speed.n == 50 and speed.scenes_per_second > 0
