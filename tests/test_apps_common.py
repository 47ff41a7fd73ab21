"""apps/_common.py: the flags every app takes and the cleaning of text people type."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))
import _common  # noqa: E402
from _common import InputError, clean_text, parse_args, unknown_words  # noqa: E402


def test_flags_default_to_this_machine_only():
    a = parse_args("x", 7860, [])
    assert (a.host, a.port, a.share) == ("127.0.0.1", 7860, False)
    a = parse_args("x", 7860, ["--host", "0.0.0.0", "--port", "7999", "--share"])
    assert (a.host, a.port, a.share) == ("0.0.0.0", 7999, True)
    with pytest.raises(SystemExit):
        parse_args("x", 7860, ["--port", "70000"])


def test_clean_text_keeps_words_and_says_what_it_removed():
    t = clean_text("  a red\tcircle \x07 at the top 😀\u200d left ", example="a red circle")
    assert t.text == "a red circle at the top left"
    assert t.notes == ["removed 1 control character", "removed 2 emoji / symbols (the model knows only words)"]
    assert clean_text("红色的圆").text == "红色的圆" and clean_text("a circle").notes == []


def test_invisible_characters_are_word_breaks():
    """Issue 17: "red\x00circle" / "red\u200bcircle" must read as two words (the tokenizer used to merge them)."""
    for sep in ("\x00", "\u200b", "\ufeff", "\u2028", "\x1b"):
        t = clean_text(f"a red{sep}circle", example="a red circle")
        assert t.text == "a red circle" and t.notes == ["removed 1 control character"], repr(sep)


@pytest.mark.parametrize("text, words", [(None, "empty"), ("   \n ", "empty"), ("😀🎨", "no words left"),
                                         ("\x00\x01", "no words left"), ("\u200b\u200b", "no words left"),
                                         ("?!? ...", "no words left"), ("x" * 10_000, "10,000 characters")])
def test_bad_text_gets_a_message_with_the_fix(text, words):
    with pytest.raises(InputError, match=words) as e:
        clean_text(text, field="prompt", max_chars=300, example="a red circle")
    assert "a red circle" in str(e.value) or "Type words" in str(e.value)


def test_unknown_words_against_a_vocabulary():
    class Vocab:
        def get_vocab(self):
            return {"a": 0, "red": 1, "circle": 2, "红": 3}
    assert unknown_words(Vocab(), "A red Giraffe circle 红 绿 42") == ["42", "Giraffe", "绿"]


def test_output_pictures_get_files_of_their_own_even_when_identical_and_concurrent():
    """Why the apps return paths: gradio caches a returned PIL image under a content-derived name and rewrites that
    file per request, so identical outputs of concurrent requests share one file (CI saw a client download it while
    it was rewritten). OutputPictures gives every picture its own complete file, even 64 identical ones at once,
    and keeps about the newest `keep`."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio.processing_utils import save_pil_to_cache
    from PIL import Image

    img = Image.new("RGB", (64, 64), (220, 40, 40))
    with __import__("tempfile").TemporaryDirectory() as cache:
        assert save_pil_to_cache(img, cache) == save_pil_to_cache(img, cache)      # the shared file of the race
    out = _common.OutputPictures("test", keep=16)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: out.save(img, "heat"), range(64)))
    assert len(set(paths)) == 64
    left = sorted(out.folder.iterdir())
    names = {p.name for p in left}
    # the newest 16 stay; a save that finished after its successor's clean-up may linger (at most one per thread)
    assert names >= {f"heat-{n}.png" for n in range(48, 64)} and len(left) <= 16 + 8, names
    for p in left:
        with Image.open(p) as im:
            assert im.size == (64, 64) and im.getpixel((5, 5)) == (220, 40, 40)


def test_a_busy_port_is_said_before_the_models_load():
    """Issue 17 sweep: `apps/vqa.py --port P` with P in use ended in gradio's traceback after the models loaded."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"cannot listen on 127.0.0.1:{port} .*--port {port + 1}"):
            _common.check_port(parse_args("x", 7860, ["--port", str(port)]))
    _common.check_port(parse_args("x", 7860, ["--port", str(port)]))          # free again: no error
