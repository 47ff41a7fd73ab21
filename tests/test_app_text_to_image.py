"""apps/text_to_image.py end to end: a subprocess on a free port, called with gradio_client, seen by headless Chromium."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from apps_harness import ARTIFACTS, dump_dom, running_app, screenshot, not_blank

# Pixel check (mmkit.faithfulness) of 8 samples each of two prompts at the app's defaults (seed 0, top-k 8).
# Measured: attributes right 0.875, images fully right 8 of 16; the floors leave room for other CPUs' rounding.
ATTRIBUTE_FLOOR = 0.6          # colour, shape, size and position right, over all 16 images
FULLY_RIGHT_FLOOR = 1          # images with every attribute right


@pytest.fixture(scope="module")
def app():
    pytest.importorskip("gradio_client")
    t0 = time.monotonic()
    with running_app("apps/text_to_image.py", timeout=120) as a:
        a_start = time.monotonic() - t0
        assert a_start < 60, f"the app took {a_start:.0f} s to serve (the issue asks for < 1 minute)"
        yield a


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def _image(item) -> torch.Tensor:
    """A gallery item (a dict or a (path, caption) pair from gradio_client) -> (3, 32, 32) in [0, 1]."""
    path = item["image"] if isinstance(item, dict) else item[0]
    if isinstance(path, dict):
        path = path.get("path") or path.get("url")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (128, 128, 3), arr.shape                       # 32 px shown 4x (nearest)
    return torch.from_numpy(arr[::4, ::4].copy()).permute(2, 0, 1).float() / 255.0


def test_generate_returns_faithful_images(client):
    from mmkit.evaluation.faithfulness import faithfulness

    gallery, status = client.predict("a large blue square in the center", api_name="/generate")  # defaults
    assert len(gallery) == 4 and "samples in" in status, status
    right = checked = fully = 0
    for prompt in ("a large blue square in the center", "a large yellow circle at the bottom right"):
        gallery, status = client.predict(prompt, 8, 1.0, 8, 0, True, api_name="/generate")
        assert len(gallery) == 8, status
        for item in gallery:
            img = _image(item)
            assert float(img.std()) > 0.02                             # not blank
            r = faithfulness(img, prompt)
            right += sum(a[0] for a in r.attributes.values())
            checked += sum(a[1] for a in r.attributes.values())
            fully += r.ok
    print("attributes right", right / checked, "fully right", fully)
    assert right / checked >= ATTRIBUTE_FLOOR and fully >= FULLY_RIGHT_FLOOR, (right / checked, fully)
    # Chinese, and the knobs: 2 samples, top-k 8, a seed, no rerank
    gallery, status = client.predict("左上方有一个小的红色圆形", 8, 0.8, 2, 3, False, api_name="/generate")
    assert len(gallery) == 2 and "samples in" in status


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ("a red circle " * 800, "limit is 300"),
    ("a red giraffe at the top", "Unknown word"),
    ("😀🎉", "no words left"),
    ("\x00\x07\x1b", "no words left"),
    ("the left", "names no shape"),
])
def test_bad_input_gives_a_clear_message(client, prompt, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(prompt, api_name="/generate")


def test_emoji_inside_a_prompt_are_removed_not_fatal(client):
    gallery, status = client.predict("a small red circle 🎈 at the top left\x07", 32, 1.0, 1, 0, False,
                                     api_name="/generate")
    assert len(gallery) == 1 and "removed" in status


def test_page_renders_in_headless_chromium(app):
    png = screenshot(app.url, ARTIFACTS / "text_to_image.png")
    assert png.exists() and not_blank(png)
    dom = dump_dom(app.url)
    assert "Text-to-image as M6 does it" in dom and "Generate" in dom and "temperature" in dom
