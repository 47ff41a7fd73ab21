"""The user's own folder of images + captions.jsonl: round trip, clear errors, colour modes, skipping."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.data import text_corpus
from mmkit.data.datasets import make_collate
from mmkit.data.text import caption
from mmkit.data.userdata import (
    ImageTextFolder,
    UserDataError,
    fit_square,
    load_image,
    load_image_text_folder,
    save_world_as_folder,
    to_rgb,
)
from mmkit.data.world import render, sample_scene, scene_to_tensor, split_seeds
from mmkit.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(list(text_corpus(20, langs=("en", "zh"))), vocab_size=300)


def _png(path: Path, img: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.name


def _write_rows(folder: Path, rows: list) -> Path:
    """rows: dicts (written as JSON) or raw strings (written as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "captions.jsonl"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                 encoding="utf-8")
    return f


def _rgb(x: torch.Tensor, y: int, xcol: int) -> tuple[int, ...]:
    """Pixel (y, x) of a float (3, H, W) item image as 0-255 ints."""
    return tuple(int(round(v)) for v in (x[:, y, xcol] * 255).tolist())


# --- round trip ---------------------------------------------------------------------------------------
def test_round_trip_with_save_world_as_folder(tmp_path, tok):
    f = save_world_as_folder(tmp_path / "world", 4, split="val", image_size=32, lang="both",
                             styles=("full", "shape_count"))
    assert f == tmp_path / "world" / "captions.jsonl"
    assert len(list((tmp_path / "world" / "images").glob("*.png"))) == 4
    ds = ImageTextFolder(tmp_path / "world", image_size=32)
    assert len(ds) == 4 * 2 * 2 and ds.report.ok and ds.report.n_loaded == 16
    for i, seed in enumerate(split_seeds("val", 4)):
        scene = sample_scene(seed)
        rows = [r for r in ds.rows if r.extra["seed"] == seed]
        assert {(r.extra["lang"], r.extra["style"]) for r in rows} == {(lg, st) for lg in ("en", "zh") for st in ("full", "shape_count")}
        for r in rows:
            assert r.caption == caption(scene, r.extra["style"], r.extra["lang"])
            item = ds[ds.rows.index(r)]
            assert torch.equal(item["image"], scene_to_tensor(scene, 32))   # PNG is lossless, no resize
            assert item["text"] == r.caption and item["line"] == r.line and item["image_path"] == f"images/{i:06d}.png"
    # compatible with the image-text collate
    b = make_collate(tok, max_length=32)([ds[i] for i in range(5)])
    assert b["image"].shape == (5, 3, 32, 32) and b["input_ids"].shape[0] == 5 and b["attention_mask"].dtype == torch.bool
    assert b["text"] == [ds.rows[i].caption for i in range(5)]
    # resized to the model's size, cached or not
    small = load_image_text_folder(tmp_path / "world", image_size=16, cache_images=True)
    plain = load_image_text_folder(tmp_path / "world", image_size=16)
    first = small[0]["image"]                                            # loaded, then kept in the cache
    first.mul_(0.0)                                                      # a caller scribbling on its copy ...
    again = small[0]["image"]                                            # ... does not reach the cache
    ref = render(sample_scene(small.rows[0].extra["seed"]), 32).resize((16, 16), Image.Resampling.LANCZOS)
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255   # the 32 px PNG shrunk by PIL
    assert again.shape == (3, 16, 16) and torch.equal(again, plain[0]["image"]) and torch.equal(again, ref)
    other = next(i for i, r in enumerate(small.rows) if r.extra["seed"] != small.rows[0].extra["seed"])
    assert not torch.equal(small[other]["image"], again)                  # another scene, another picture
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_world_as_folder(tmp_path / "world", 2)
    save_world_as_folder(tmp_path / "world", 2, overwrite=True)
    assert len(ImageTextFolder(tmp_path / "world", 32)) == 2


def test_text_key_and_extras_blank_lines_and_bom(tmp_path):
    _png(tmp_path / "a.png", Image.new("RGB", (8, 8), (255, 0, 0)))
    f = tmp_path / "captions.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "text": "  a red square  ", "who": "me"}).encode()
                  + b"\n\n   \n" + json.dumps({"image": str(tmp_path / "a.png"), "caption": "红色"}, ensure_ascii=False).encode("utf-8"))
    ds = ImageTextFolder(tmp_path, image_size=8)
    assert [r.caption for r in ds.rows] == ["a red square", "红色"] and [r.line for r in ds.rows] == [1, 4]
    assert ds.rows[0].extra == {"who": "me"}
    assert _rgb(ds[1]["image"], 3, 3) == (255, 0, 0)


def test_fit_square_pad_crop_stretch():
    img = Image.new("RGB", (40, 20), (255, 0, 0))                 # wide red picture
    pad = np.asarray(fit_square(img, 20, "pad"))
    assert pad.shape == (20, 20, 3)
    assert (pad[0] == 255).all() and (pad[-1] == 255).all()       # white bands above and below
    assert tuple(pad[10, 10]) == (255, 0, 0)
    for fit in ("crop", "stretch"):
        arr = np.asarray(fit_square(img, 20, fit))
        assert arr.shape == (20, 20, 3) and (arr == (255, 0, 0)).all()
    with pytest.raises(ValueError, match="unknown fit"):
        fit_square(img, 20, "zoom")


# --- colour modes -------------------------------------------------------------------------------------
def test_colour_modes_become_rgb_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))                 # transparent black -> white
    rgba.putpixel((1, 0), (255, 0, 0, 255))                        # opaque red stays red
    rgba.putpixel((2, 0), (255, 0, 0, 128))                        # half-transparent red -> pink
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 0), (60, 255))
    gray = Image.new("L", (4, 4), 100)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)             # index 0 blue, index 1 transparent
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1
    pal_opaque = Image.new("P", (4, 4), 0)
    pal_opaque.putpalette([0, 200, 0] + [0] * 765)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))                 # no ink -> white
    cmyk.putpixel((1, 0), (0, 255, 255, 0))                        # magenta + yellow -> red
    i16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    files = {"rgba.png": rgba, "la.png": la, "gray.png": gray, "pal.png": pal, "pal_opaque.gif": pal_opaque,
             "cmyk.tif": cmyk, "i16.png": i16}
    for name, img in files.items():
        img.save(tmp_path / name)
    _write_rows(tmp_path, [{"image": name, "caption": name} for name in files])
    ds = ImageTextFolder(tmp_path, image_size=4)
    got = {ds.rows[i].image: ds[i]["image"] for i in range(len(ds))}
    for name, x in got.items():
        assert x.shape == (3, 4, 4) and x.dtype == torch.float32, name
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA" and Image.open(tmp_path / "cmyk.tif").mode == "CMYK"
    assert _rgb(got["rgba.png"], 0, 0) == (255, 255, 255)
    assert _rgb(got["rgba.png"], 0, 1) == (255, 0, 0)
    pink = _rgb(got["rgba.png"], 0, 2)
    assert pink[0] == 255 and 120 <= pink[1] <= 135 and pink[1] == pink[2]
    assert _rgb(got["la.png"], 0, 0) == (255, 255, 255) and _rgb(got["la.png"], 0, 1) == (60, 60, 60)
    assert _rgb(got["gray.png"], 2, 2) == (100, 100, 100)
    assert _rgb(got["pal.png"], 0, 0) == (0, 0, 255) and _rgb(got["pal.png"], 0, 1) == (255, 255, 255)
    assert _rgb(got["pal_opaque.gif"], 3, 3) == (0, 200, 0)
    assert _rgb(got["cmyk.tif"], 0, 0) == (255, 255, 255) and _rgb(got["cmyk.tif"], 0, 1) == (255, 0, 0)
    assert _rgb(got["i16.png"], 0, 0) == (255, 255, 255)
    # the same conversions directly
    assert to_rgb(rgba).mode == "RGB" and to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                               # "rotate 90 degrees clockwise to view"
    img.save(tmp_path / "phone.png", exif=exif)
    assert load_image(tmp_path / "phone.png").size == (20, 40)


# --- clear errors ---------------------------------------------------------------------------------------
def _good(folder: Path) -> dict:
    _png(folder / "images" / "ok.png", Image.new("RGB", (8, 8), (0, 0, 255)))
    return {"image": "images/ok.png", "caption": "a blue square"}


def _truncated_png(folder: Path) -> str:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return "cut.png"


BAD_ROWS = {  # name -> (make the bad row given the folder, regex the message must match)
    "malformed_json": (lambda d: '{"image": "images/ok.png", caption: "x"}', r"malformed JSON .*column \d+.*Fix: each line"),
    "not_an_object": (lambda d: '["images/ok.png", "x"]', r"expected a JSON object, got a list.*Fix"),
    "missing_image_key": (lambda d: {"caption": "x"}, r'no "image" key.*Fix: add "image"'),
    "missing_caption": (lambda d: {"image": "images/ok.png"}, r'no caption for images/ok.png.*Fix: add "caption"'),
    "empty_caption": (lambda d: {"image": "images/ok.png", "caption": "   "}, r'empty caption for images/ok.png.*Fix'),
    "caption_not_text": (lambda d: {"image": "images/ok.png", "text": 3}, r'"text" for images/ok.png must be a string'),
    "missing_image_file": (lambda d: {"image": "images/nope.png", "caption": "x"},
                           r"image file .*nope.png not found.*relative to .*Fix: correct the path"),
    "not_an_image": (lambda d: ((d / "notes.png").write_text("hello"), {"image": "notes.png", "caption": "x"})[1],
                     r"cannot read image .*notes.png: not an image PIL can read.*Fix: re-export"),
    "truncated_image": (lambda d: {"image": _truncated_png(d), "caption": "x"},
                        r"cannot read image .*cut.png: the file is truncated.*Fix"),
    "image_is_a_folder": (lambda d: {"image": "images", "caption": "x"}, r"cannot read image .*images.*folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_raise_errors_naming_file_line_and_fix(tmp_path, case):
    make_row, match = BAD_ROWS[case]
    f = _write_rows(tmp_path, [_good(tmp_path), make_row(tmp_path)])
    with pytest.raises(UserDataError, match=match) as err:
        ImageTextFolder(tmp_path, image_size=8)
    assert str(err.value).startswith(f"{f}, line 2: "), str(err.value)
    assert "Fix" in str(err.value)


def test_folder_and_captions_file_errors(tmp_path):
    with pytest.raises(UserDataError, match=r"nowhere does not exist\. Fix: pass the folder"):
        ImageTextFolder(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserDataError, match=r"file.txt is a file, not a folder"):
        ImageTextFolder(tmp_path / "file.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserDataError, match=r"d/captions.jsonl not found\. Fix: write captions.jsonl .*\"image\":"):
        ImageTextFolder(tmp_path / "d")
    (tmp_path / "d" / "labels.jsonl").write_text("")
    with pytest.raises(UserDataError, match=r"has \['labels.jsonl'\]; pass captions_file=\.\.\."):
        ImageTextFolder(tmp_path / "d")
    with pytest.raises(UserDataError, match=r"labels.jsonl: no usable rows"):
        ImageTextFolder(tmp_path / "d", captions_file="labels.jsonl")
    (tmp_path / "d" / "captions.jsonl").write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(UserDataError, match=r"line 1: not UTF-8 text.*Fix: save captions.jsonl as UTF-8"):
        ImageTextFolder(tmp_path / "d")
    with pytest.raises(ValueError, match="unknown on_error 'ignore'"):
        ImageTextFolder(tmp_path / "d", on_error="ignore")


def test_broken_image_without_check_fails_in_getitem_with_file_and_line(tmp_path):
    _write_rows(tmp_path, [_good(tmp_path), {"image": _truncated_png(tmp_path), "caption": "x"}])
    ds = ImageTextFolder(tmp_path, image_size=8, check_images=False)
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(UserDataError, match=r"captions.jsonl, line 2: cannot read image .*truncated"):
        ds[1]


# --- on_error="skip" -------------------------------------------------------------------------------------
def test_skip_bad_rows_with_a_report(tmp_path):
    good = _good(tmp_path)
    rows = [good]
    for case in ("malformed_json", "empty_caption", "missing_image_file", "truncated_image"):
        rows += [BAD_ROWS[case][0](tmp_path), good]
    _write_rows(tmp_path, rows)
    ds = ImageTextFolder(tmp_path, image_size=8, on_error="skip")
    assert len(ds) == 5 and [r.line for r in ds.rows] == [1, 3, 5, 7, 9]
    rep = ds.report
    assert not rep.ok and rep.n_rows == 9 and rep.n_loaded == 5
    assert [s.line for s in rep.skipped] == [2, 4, 6, 8]
    assert [s.image for s in rep.skipped] == [None, "images/ok.png", "images/nope.png", "cut.png"]
    reasons = [s.reason for s in rep.skipped]
    assert reasons[0].startswith("malformed JSON") and reasons[1].startswith("empty caption")
    assert "not found" in reasons[2] and "truncated" in reasons[3]
    text = str(rep)
    assert "loaded 5 of 9 rows" in text and "skipped 4" in text
    for line in (2, 4, 6, 8):
        assert f"line {line}" in text
    assert "skipped" in repr(ds)
    # nothing usable at all: an error that carries the report
    _write_rows(tmp_path, ['{"image": 1}', '{"caption": "x"}'])
    with pytest.raises(UserDataError, match=r"(?s)no usable rows.*skipped 2:\n  line 1: .*\n  line 2: "):
        ImageTextFolder(tmp_path, image_size=8, on_error="skip")
