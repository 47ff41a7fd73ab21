"""The simulated web crawl: every defect kind occurs, labels are exact (checked both ways with the test's
own detectors), clean items are clean, corruption really is corrupt, and everything is deterministic."""
from __future__ import annotations

import io
import math
import re
import unicodedata
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmkit.data import crawl as C
from mmkit.data import text as T
from mmkit.data import text_corpus
from mmkit.data.crawl import DEFECTS, crawl, crawl_item, decode_image, decode_text, defect_counts
from mmkit.data.world import COLOURS_ZH, SHAPES_ZH, split_of

N = 800  # a moderate crawl: ~4 s, and every defect kind (even the rare ones) occurs in it


@pytest.fixture(scope="module")
def items() -> list[C.CrawlItem]:
    return list(crawl(N, split="train", noise=0.5))


# --------------------------------------------------------------------------------------------------
# The test's own detectors (written from the documented definitions, not from crawl.py's code)
# --------------------------------------------------------------------------------------------------
HTML_RE = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]*>|&(?:[a-zA-Z]+|#\d+);")


def has_html(t: str) -> bool:
    return bool(HTML_RE.search(t))


def has_repeated_punct(t: str) -> bool:
    return any(a == b and unicodedata.category(a).startswith("P") for a, b in zip(t, t[1:]))


def has_foreign(t: str) -> bool:
    def ok(c: str) -> bool:
        return (" " <= c <= "~") or c in "\n\t\r" or "\u4e00" <= c <= "\u9fff" or c in C.ZH_PUNCT
    return not all(ok(c) for c in t)


SPAM_RES = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in C.SPAM_TERMS["en"]]


def has_spam(t: str) -> bool:
    return any(r.search(t) for r in SPAM_RES) or any(w in t for w in C.SPAM_TERMS["zh"])


def longest_line(b: bytes) -> int:
    return max(len(line) for line in b.split(b"\n"))


def img_std_edge(img) -> tuple[float, float]:
    a = np.asarray(img, dtype=np.int32)
    std = max(float(a[..., ch].std()) for ch in range(3))
    edge = max(int(np.abs(a[:, 1:] - a[:, :-1]).max()), int(np.abs(a[1:] - a[:-1]).max()))
    return std, edge


# --------------------------------------------------------------------------------------------------
# Coverage and clean items
# --------------------------------------------------------------------------------------------------
def test_every_defect_kind_appears_in_a_moderate_crawl(items, capsys):
    counts = defect_counts(items)
    with capsys.disabled():
        print(f"\n[crawl] {N} items, noise 0.5: {counts}")
    assert counts["total"] == N
    assert counts["clean"] == sum(1 for it in items if not it.defects)
    missing = [d for d in DEFECTS if counts[d] == 0]
    assert not missing, f"defects never injected: {missing}"
    assert sum(counts[d] for d in DEFECTS) == sum(len(it.defects) for it in items)
    assert any(len(it.defects) >= 2 for it in items)            # multi-defect items exist
    assert {it.lang for it in items} == {"en", "zh"} and {it.image_format for it in items} == {"PNG", "JPEG"}


def test_clean_items_decode_and_are_clean(items):
    clean = [it for it in items if it.is_clean]
    assert len(clean) > N / 3
    for it in clean:
        title, body = decode_text(it.title), decode_text(it.body)
        assert it.scene is not None and it.text_scene == it.scene
        captions = T.captions(it.scene, it.lang)
        assert title in captions or title in [c[:1].upper() + c[1:] for c in captions], title
        assert body == T.product_description(it.scene, it.lang)
        for t in (title, body):
            assert not (has_html(t) or has_repeated_punct(t) or has_foreign(t) or has_spam(t)), t
        assert len(title.strip()) >= C.MIN_TITLE_CHARS and len(body.strip()) >= C.MIN_BODY_CHARS
        img = decode_image(it.image)
        assert img is not None and img.mode == "RGB"
        std, edge = img_std_edge(img)
        assert img.width * img.height >= C.MIN_PIXELS
        assert std >= 2 * C.NEAR_BLANK_STD and edge >= 1.2 * C.SHARP_EDGE, (it.id, std, edge)  # with margin
        assert it.image[:4] == (b"\x89PNG" if it.image_format == "PNG" else b"\xff\xd8\xff\xe0")[:4]


def test_no_clean_world_text_contains_a_spam_term_or_other_defect():
    for t in text_corpus(60, split="val"):
        assert not has_spam(t), t
        assert not has_html(t) and not has_foreign(t) and not has_repeated_punct(t.replace("\n", "")), t
    assert len(set(C.SPAM_TERMS["en"])) == len(C.SPAM_TERMS["en"]) and all(w == w.lower() for w in C.SPAM_TERMS["en"])
    assert all(not w.isascii() for w in C.SPAM_TERMS["zh"])


# --------------------------------------------------------------------------------------------------
# Labels are exact (both directions), per rule
# --------------------------------------------------------------------------------------------------
def test_text_labels_are_exact(items):
    for it in items:
        d = set(it.defects)
        title, body = decode_text(it.title), decode_text(it.body)
        assert (C.INVALID_UTF8 in d) == (title is None or body is None), it
        if title is None or body is None:
            # undecodable text carries no other text defect (nothing else could be checked)
            assert not d & {C.HTML, C.REPEATED_PUNCT, C.FOREIGN_CHARS, C.SPAM, C.GIBBERISH, C.LONG_LINE,
                            C.EMPTY_TEXT, C.SHORT_TITLE, C.SHORT_BODY}, it
            continue
        both = title + "\n" + body
        assert (C.HTML in d) == has_html(both), it
        assert (C.REPEATED_PUNCT in d) == has_repeated_punct(both), it
        assert (C.FOREIGN_CHARS in d) == has_foreign(both), it
        assert (C.SPAM in d) == has_spam(both), it
        assert (C.SHORT_TITLE in d) == (len(title.strip()) < 5), it
        assert (C.SHORT_BODY in d) == (len(body.strip()) < 15), it
        assert (C.EMPTY_TEXT in d) == (not title.strip() or not body.strip()), it
        assert (C.LONG_LINE in d) == (longest_line(it.body) >= 1 << 20), it


def test_image_labels_are_exact(items):
    for it in items:
        d = set(it.defects)
        img = decode_image(it.image)
        assert (C.TRUNCATED_IMAGE in d) == (img is None), it
        if img is None:
            assert not d & {C.SMALL_IMAGE, C.NEAR_BLANK, C.BLURRED}
            continue
        std, edge = img_std_edge(img)
        stats = C.image_stats(img)
        assert stats.pixels == img.width * img.height and stats.std == pytest.approx(std, abs=1e-3)
        assert stats.edge == edge
        assert (C.SMALL_IMAGE in d) == (img.width * img.height < 5000), it
        assert (C.NEAR_BLANK in d) == (std < C.NEAR_BLANK_STD), (it, std)
        assert (C.BLURRED in d) == (std >= C.NEAR_BLANK_STD and edge < C.SHARP_EDGE), (it, std, edge)
        if C.NEAR_BLANK in d:
            assert std < 0.8 * C.NEAR_BLANK_STD          # a margin for a cleaner's threshold
        if C.BLURRED in d:
            assert edge < 0.8 * C.SHARP_EDGE and std > 1.25 * C.NEAR_BLANK_STD


def test_small_image_items_really_have_fewer_than_5000_pixels(items):
    small = [it for it in items if C.SMALL_IMAGE in it.defects]
    assert small
    for it in small:
        # read the size from the header alone (no decoding needed)
        assert math.prod(Image.open(io.BytesIO(it.image)).size) < 5000


def test_corrupt_items_fail_to_decode_and_the_rest_decode(items):
    for it in items:
        bad_text = C.INVALID_UTF8 in it.defects
        assert (decode_text(it.title) is None or decode_text(it.body) is None) == bad_text
        if bad_text:
            with pytest.raises(UnicodeDecodeError):
                (it.title + b"\n" + it.body).decode("utf-8")
        assert (decode_image(it.image) is None) == (C.TRUNCATED_IMAGE in it.defects)


def test_truncated_images_stay_undecodable_when_pil_tolerates_truncation(items):
    truncated = [it for it in items if C.TRUNCATED_IMAGE in it.defects]
    assert truncated
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert all(decode_image(it.image) is None for it in truncated)
        assert all(decode_image(it.image) is not None for it in items[:30] if C.TRUNCATED_IMAGE not in it.defects)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


_CS_EN = re.compile(r"\b(red|green|blue|yellow|purple|orange) (circle|square|triangle)\b", re.IGNORECASE)
_CS_ZH = re.compile("(" + "|".join(COLOURS_ZH.values()) + ")(" + "|".join(SHAPES_ZH.values()) + ")")
_ZH_BACK = {v: k for d in (COLOURS_ZH, SHAPES_ZH) for k, v in d.items()}


def mentioned_pairs(t: str, lang: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a text names, found with the test's own patterns."""
    if lang == "en":
        return {(c.lower(), s.lower()) for c, s in _CS_EN.findall(t)}
    return {(_ZH_BACK[c], _ZH_BACK[s]) for c, s in _CS_ZH.findall(t)}


def test_texts_describe_the_text_scene_and_mismatches_another_scene(items):
    n_mismatch = 0
    for it in items:
        title, body = decode_text(it.title), decode_text(it.body)
        if title is None or body is None:
            continue
        natural = ([title] if C.SHORT_TITLE not in it.defects else []) + \
                  ([body] if not set(it.defects) & {C.SHORT_BODY, C.GIBBERISH} else [])
        named = set().union(*(mentioned_pairs(t, it.lang) for t in natural)) if natural else set()
        described = {(o.colour, o.shape) for o in it.text_scene.objects}
        assert named <= described, it
        if C.MISMATCH in it.defects:
            n_mismatch += 1
            assert it.scene is not None and it.text_scene.seed != it.scene.seed
            assert split_of(it.text_scene.seed) == "train"
            pictured = {(o.colour, o.shape) for o in it.scene.objects}
            assert not pictured & described and not pictured & named, it
            assert named or C.GIBBERISH in it.defects or C.SHORT_BODY in it.defects, it
        else:
            assert it.scene is None or it.text_scene == it.scene
    assert n_mismatch > 10


def test_blank_placeholders_have_no_scene(items):
    for it in items:
        if it.scene is None:
            assert C.NEAR_BLANK in it.defects
    assert any(it.scene is None for it in items)


def _bigram_lm(texts):
    uni, bi = Counter(), Counter()
    for t in texts:
        t = "\x02" + t
        uni.update(t)
        bi.update(zip(t, t[1:]))
    total, vocab = sum(uni.values()), len(uni) + 1

    def ppl(t: str) -> float:
        t = "\x02" + t
        nll = 0.0
        for a, b in zip(t, t[1:]):
            p_uni = (uni[b] + 1) / (total + vocab * 50)        # unseen characters are very unlikely
            p = 0.9 * bi[(a, b)] / uni[a] + 0.1 * p_uni if uni[a] else p_uni
            nll -= math.log(p)
        return math.exp(nll / (len(t) - 1))
    return ppl


def test_gibberish_is_caught_by_a_character_lm_perplexity_filter(items):
    # M6 §2.3: "a language model to evaluate their perplexities, and sentences with high perplexities
    # are discarded". A character bigram LM trained on clean text (other scenes) separates them.
    ppl = _bigram_lm(list(text_corpus(150, split="val")))
    for lang in ("en", "zh"):
        gib = [ppl(decode_text(it.body)) for it in items if C.GIBBERISH in it.defects and it.lang == lang]
        clean = [ppl(decode_text(it.body)) for it in items if it.is_clean and it.lang == lang]
        assert gib and clean
        assert min(gib) > 2 * max(clean), (lang, min(gib), max(clean))


def test_conflicting_defects_never_share_an_item(items):
    for it in items:
        for a in it.defects:
            assert not C.CONFLICTS[a] & set(it.defects), it
        assert list(it.defects) == [d for d in DEFECTS if d in it.defects]   # canonical order
    # an empty field is also a too-short one: both labels, so a length filter is not a false positive
    empty = [it for it in items if C.EMPTY_TEXT in it.defects]
    assert empty and all({C.SHORT_TITLE, C.SHORT_BODY} & set(it.defects) for it in empty)


def test_every_defect_has_a_documented_m6_rule():
    assert set(C.DEFECT_RULES) == set(DEFECTS) == set(C.DEFAULT_WEIGHTS)
    assert len(set(DEFECTS)) == len(DEFECTS)
    for d in DEFECTS:
        assert C.DEFECT_RULES[d] and f'"{d}"' in C.__doc__, d


# --------------------------------------------------------------------------------------------------
# Determinism, noise fraction, arguments
# --------------------------------------------------------------------------------------------------
def _key(it: C.CrawlItem):
    return (it.id, it.title, it.body, it.image, it.scene, it.defects, it.lang, it.image_format, it.text_scene)


def test_crawl_is_deterministic(items):
    again = list(crawl(60, split="train", start=0, noise=0.5))
    assert [_key(a) for a in again] == [_key(b) for b in items[:60]]
    assert _key(crawl_item(items[7].seed, noise=0.5)) == _key(items[7])
    shifted = list(crawl(20, split="train", start=30, noise=0.5))
    assert [_key(a) for a in shifted] == [_key(b) for b in items[30:50]]
    other = list(crawl(20, split="val", noise=0.5))
    assert not {it.image for it in other} & {it.image for it in items[:20]}
    assert all(it.id.startswith("crawl-val-") for it in other)


def test_noise_fraction_is_respected_and_monotone():
    n = 300
    by_noise = {p: list(crawl(n, split="val", start=500, noise=p)) for p in (0.2, 0.7)}
    for p, its in by_noise.items():
        frac = sum(1 for it in its if it.defects) / n
        # Binomial(n, p): standard deviation <= 0.029 at n = 300; margin 0.09 is > 3 sigma
        assert abs(frac - p) <= 0.09, (p, frac)
    low, high = by_noise[0.2], by_noise[0.7]
    for a, b in zip(low, high):
        if a.defects:                       # raising the noise only turns more items noisy ...
            assert _key(a) == _key(b)
        if not b.defects:                   # ... and clean items are identical at every noise level
            assert _key(a) == _key(b)
    assert all(not it.defects for it in crawl(40, noise=0.0))
    assert all(it.defects for it in crawl(40, noise=1.0))


def test_weights_select_defects():
    only_html = {d: 0.0 for d in DEFECTS} | {C.HTML: 1.0}
    its = list(crawl(30, noise=1.0, weights=only_html, multi=0.0))
    assert all(it.defects == (C.HTML,) for it in its)
    no_long = list(crawl(100, noise=1.0, weights={C.LONG_LINE: 0.0}))
    assert not any(C.LONG_LINE in it.defects for it in no_long)
    zh = list(crawl(20, langs=("zh",)))
    assert {it.lang for it in zh} == {"zh"}


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match=r"noise .* \[0, 1\]"):
        next(crawl(3, noise=1.5))
    with pytest.raises(ValueError, match="unknown defect 'typo'"):
        next(crawl(3, weights={"typo": 1.0}))
    with pytest.raises(ValueError, match=">= 0"):
        next(crawl(3, weights={C.HTML: -1.0}))
    with pytest.raises(ValueError, match="unknown split"):
        next(crawl(3, split="dev"))
    with pytest.raises(ValueError, match="langs"):
        next(crawl(3, langs=("fr",)))
    with pytest.raises(ValueError, match="all defect weights are 0"):
        next(crawl(3, weights={d: 0.0 for d in DEFECTS}))
    with pytest.raises(ValueError, match="does not fit"):
        next(crawl(10, split="val", start=100_000))


def test_decode_helpers():
    assert decode_text(b"") == "" and decode_text("红色".encode()) == "红色"
    assert decode_text(b"abc\xff") is None and decode_text("红色".encode()[:-1]) is None
    assert decode_image(b"") is None and decode_image(b"not an image at all") is None
    good = next(it for it in crawl(20) if not it.defects)
    img = decode_image(good.image)
    assert img is not None and img.mode == "RGB"
    assert decode_image(good.image[:-5]) is None


def test_item_repr_is_short(items):
    long_item = next(it for it in items if C.LONG_LINE in it.defects)
    assert len(long_item.body) >= 1 << 20
    assert len(repr(long_item)) < 300 and "long_line" in repr(long_item)
