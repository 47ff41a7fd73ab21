"""A simulated web crawl: the raw, noisy product pages that M6's cleaning rules (M6 §2.3) exist for.

M6 built its corpus from crawled web pages (product descriptions, encyclopedia, forums, ...) and cleaned
it with a list of rules (M6 §2.3, "Dataset Construction"). Here every crawled page is a Shapes World
product page: a ``title`` (a short caption), a ``body`` (the product description) and a product photo,
all derived from one scene. A fraction ``noise`` of the pages is damaged the way real crawls are, and
every item says exactly which damage it carries, so a cleaning pipeline can be scored rule by rule
(precision and recall per defect)::

    from mmkit.data.crawl import crawl, decode_text, decode_image, defect_counts

    items = list(crawl(1000, split="train", noise=0.5))
    item = items[0]
    item.title, item.body         # bytes, UTF-8 as crawled (a few items are not valid UTF-8)
    item.image                    # bytes, PNG or JPEG as crawled (a few files are truncated)
    item.scene                    # the scene the photo was rendered from (None for blank placeholders)
    item.defects                  # e.g. ("html", "small_image"); () for a clean item
    decode_text(item.title)       # str, or None if the bytes are not UTF-8
    decode_image(item.image)      # PIL RGB image, or None if the file cannot be decoded
    defect_counts(items)          # {"html": 52, ..., "clean": 503, "total": 1000}
    crawl_item(seed)              # the page of one scene seed, identical to its item in crawl(...)
    image_stats(img)              # ImageStats(pixels, std, edge): the numbers the image defects are defined by

``crawl(n, split, start, noise, langs=("en", "zh"), weights=None, multi=0.3)``: ``weights`` sets the
relative frequency of each defect among noisy items (``DEFAULT_WEIGHTS``; 0 disables one) and ``multi``
the chance of adding a further compatible defect to a noisy item (at most three per item).

Clean items: ``title`` is a caption of the scene (``text.caption``, first letter capitalised in English)
and ``body`` is ``text.product_description(scene)``, in English or Chinese; the image is ``render(scene)``
at a side of 72-128 px (always >= ``MIN_PIXELS``), saved as PNG or JPEG.

Defects (module constants; the M6 §2.3 rule that removes each one, and how it is injected)
==========================  ==========================================================================
``HTML`` "html"             "we first remove HTML markups": tags (``<p>``, ``<br/>``, ``<a href=..>``)
                            and entities (``&amp;``, ``&quot;``) around the body (and sometimes title).
``REPEATED_PUNCT``          "... and duplicate punctuation marks": a run of 2+ identical punctuation
"repeated_punctuation"      characters (Unicode category P*): ``!!!``, ``...``, ``。。。``, ``……``, ``-----``.
``FOREIGN_CHARS``           "we only reserve characters and punctuation marks that are in Chinese and
"foreign_chars"             English": emoji, Cyrillic, Arabic, Japanese kana, Korean, symbols (★ © ™ →).
                            Allowed = ASCII printable + whitespace + CJK ideographs U+4E00-U+9FFF +
                            ``ZH_PUNCT`` (see ``is_allowed_char``).
``SHORT_TITLE``             "We remove the topics that are shorter than 5 characters": the title has
"short_title"               fewer than ``MIN_TITLE_CHARS`` characters (``len(title.strip()) < 5``).
``SHORT_BODY``              "... and contents shorter than 15 characters": ``len(body.strip()) < 15``
"short_body"                (a truncated description or a stub such as "See photo." / "见图。").
``SPAM`` "spam"             "spam detection to remove sentences that contain words related to certain
                            political issues, pornography, or words in the list of dirty, naughty, and
                            other bad words": a sentence with a term of ``SPAM_TERMS`` (matching rule:
                            case-insensitive; English terms on word boundaries, Chinese as substrings).
``GIBBERISH`` "gibberish"   "a language model to evaluate their perplexities, and sentences with high
                            perplexities are discarded": the body is replaced by random character soup
                            (random letters / random Chinese characters), which a character LM trained
                            on clean text scores with a far higher perplexity than any clean body.
``SMALL_IMAGE``             "Only images with at least 5000 pixels are reserved": width * height <
"small_image"               ``MIN_PIXELS`` (thumbnails of 16-70 px a side).
``NEAR_BLANK`` "near_blank" "a pretrained image scorer to evaluate the qualities of images": an almost
                            uniform image (an over-exposed photo, the empty backdrop, a flat placeholder);
                            every channel's pixel standard deviation is below ``NEAR_BLANK_STD``
                            (``image_stats(img).std``; clean photos are far above it).
``BLURRED`` "blurred"       the same image-quality rule: a Gaussian blur of 3.5-6 % of the image side
                            (at least ``MIN_BLUR_PX`` pixels) that leaves no sharp edge: no two adjacent
                            pixels differ by ``SHARP_EDGE`` or more (``image_stats(img).edge``), while
                            the image is not near-blank (blank images have no edges either).
``MISMATCH`` "mismatch"     "we only consider images and their surrounding text as relevant image-text
                            pairs" (M6 §2.3; property (4) "the images and texts should be semantically
                            relevant"): title and body describe another scene of the same split that
                            shares no (colour, shape) with the pictured one (``item.text_scene``).
``INVALID_UTF8``            corruption the cleaner must survive before any rule can run (property (1),
"invalid_utf8"              "fluent natural language"): the title or body bytes are not UTF-8 (GBK
                            encoded Chinese, stray bytes, cut multi-byte sequences, surrogates).
``EMPTY_TEXT`` "empty_text" the title or body is empty or whitespace only. An empty field is also shorter
                            than the length limits, so it always carries ``SHORT_TITLE`` / ``SHORT_BODY``
                            as well (labels stay exact: every predicate that holds is named).
``LONG_LINE`` "long_line"   property (1) "fluent natural language within a normal length": the body is
                            a single line of at least ``LONG_LINE_BYTES`` (1 MiB) bytes (the page text
                            concatenated over and over without a newline).
``TRUNCATED_IMAGE``         corruption: the image file is cut off (20-90 % of its bytes kept) and
"truncated_image"           ``decode_image`` returns None (the PNG lacks IEND / the JPEG lacks EOI).
==========================  ==========================================================================

Exactness (what a scorer may rely on): a defect is named in ``item.defects`` if and only if it is
present, under the definitions above. To keep that true, defects that would mask each other are never
combined (``CONFLICTS``): text-level defects are never put on a field that was replaced (a short title
gets no HTML, a gibberish body no spam), undecodable text (invalid UTF-8) and empty text carry no other
text defect (except the short labels an empty field implies), a truncated image no other image defect,
near-blank images are not also blurred, and a mismatch is only injected where the picture and the text
can both be seen. Clean texts never contain markup, repeated punctuation, characters outside
Chinese/English, or spam terms (``tests/test_crawl.py`` checks every one of these both ways).

Determinism: everything is drawn from generators seeded by the scene seed (and nothing else), so the same
arguments give byte-identical items on every machine. Whether an item is noisy is a single uniform draw
compared with ``noise``: raising ``noise`` only turns more items noisy, and clean items are identical at
every noise level. The fraction of noisy items is Binomial(n, noise).
"""
from __future__ import annotations

import io
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

from PIL import Image, ImageFilter

from mmkit.data import text as T
from mmkit.data.world import (COLOURS_ZH, POSITIONS_ZH, SHAPES_ZH, SIZES_ZH, SPLITS, render, render_background, Rng,
                              sample_scene, Scene, split_seeds)

# --------------------------------------------------------------------------------------------------
# Defect names
# --------------------------------------------------------------------------------------------------
HTML = "html"
REPEATED_PUNCT = "repeated_punctuation"
FOREIGN_CHARS = "foreign_chars"
SHORT_TITLE = "short_title"
SHORT_BODY = "short_body"
SPAM = "spam"
GIBBERISH = "gibberish"
SMALL_IMAGE = "small_image"
NEAR_BLANK = "near_blank"
BLURRED = "blurred"
MISMATCH = "mismatch"
INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
LONG_LINE = "long_line"
TRUNCATED_IMAGE = "truncated_image"

DEFECTS: tuple[str, ...] = (
    HTML, REPEATED_PUNCT, FOREIGN_CHARS, SHORT_TITLE, SHORT_BODY, SPAM, GIBBERISH,      # text rules
    SMALL_IMAGE, NEAR_BLANK, BLURRED,                                                   # image rules
    MISMATCH,                                                                           # pair rule
    INVALID_UTF8, EMPTY_TEXT, LONG_LINE, TRUNCATED_IMAGE,                               # corruption
)
TEXT_DEFECTS = (HTML, REPEATED_PUNCT, FOREIGN_CHARS, SHORT_TITLE, SHORT_BODY, SPAM, GIBBERISH,
                INVALID_UTF8, EMPTY_TEXT, LONG_LINE)
IMAGE_DEFECTS = (SMALL_IMAGE, NEAR_BLANK, BLURRED, TRUNCATED_IMAGE)

# The M6 §2.3 rule (quoted) that removes each defect.
DEFECT_RULES: dict[str, str] = {
    HTML: "we first remove HTML markups",
    REPEATED_PUNCT: "[we first remove] duplicate punctuation marks",
    FOREIGN_CHARS: "we only reserve characters and punctuation marks that are in Chinese and English",
    SHORT_TITLE: "We remove the topics that are shorter than 5 characters",
    SHORT_BODY: "[we remove] contents shorter than 15 characters",
    SPAM: "spam detection to remove sentences that contain words related to certain political issues, "
          "pornography, or words in the list of dirty, naughty, and other bad words",
    GIBBERISH: "a language model to evaluate their perplexities, and sentences with high perplexities are discarded",
    SMALL_IMAGE: "Only images with at least 5000 pixels are reserved for pretraining",
    NEAR_BLANK: "We also use a pretrained image scorer to evaluate the qualities of images",
    BLURRED: "We also use a pretrained image scorer to evaluate the qualities of images",
    MISMATCH: "we only consider images and their surrounding text as relevant image-text pairs "
              "(property (4): the images and texts should be semantically relevant)",
    INVALID_UTF8: "property (1): the sentences should be fluent natural language (undecodable bytes are not text)",
    EMPTY_TEXT: "We remove the topics that are shorter than 5 characters and contents shorter than 15 characters",
    LONG_LINE: "property (1): the sentences should be fluent natural language within a normal length",
    TRUNCATED_IMAGE: "property (2): the resolutions of the images need to be identifiable by humans "
                     "(a file that does not decode shows nothing)",
}

# Relative frequency of each defect among noisy items (the primary defect is drawn with these weights;
# extra defects too). Corruption is rare ("a few items"), long lines rarest (each is a megabyte).
DEFAULT_WEIGHTS: dict[str, float] = {
    HTML: 1.0, REPEATED_PUNCT: 1.0, FOREIGN_CHARS: 1.0, SHORT_TITLE: 0.7, SHORT_BODY: 0.7, SPAM: 1.0,
    GIBBERISH: 0.8, SMALL_IMAGE: 1.0, NEAR_BLANK: 0.7, BLURRED: 0.8, MISMATCH: 1.0,
    INVALID_UTF8: 0.3, EMPTY_TEXT: 0.3, LONG_LINE: 0.1, TRUNCATED_IMAGE: 0.3,
}

# Pairs that are never combined on one item (they would hide each other and make labels inexact).
_ADDITIVE = (HTML, REPEATED_PUNCT, FOREIGN_CHARS, SPAM)
CONFLICTS: dict[str, frozenset[str]] = {d: frozenset() for d in DEFECTS}


def _conflict(a: str, *others: str) -> None:
    for b in others:
        CONFLICTS[a] = CONFLICTS[a] | {b}
        CONFLICTS[b] = CONFLICTS[b] | {a}


_conflict(EMPTY_TEXT, *(d for d in TEXT_DEFECTS if d not in (EMPTY_TEXT, SHORT_TITLE, SHORT_BODY)), MISMATCH)
_conflict(INVALID_UTF8, *_ADDITIVE, SHORT_TITLE, SHORT_BODY, GIBBERISH, LONG_LINE)
_conflict(SHORT_BODY, GIBBERISH, LONG_LINE)
_conflict(GIBBERISH, LONG_LINE)
_conflict(NEAR_BLANK, BLURRED)
_conflict(TRUNCATED_IMAGE, SMALL_IMAGE, NEAR_BLANK, BLURRED)
_conflict(MISMATCH, NEAR_BLANK, TRUNCATED_IMAGE)

# --------------------------------------------------------------------------------------------------
# Thresholds (the numbers in M6 §2.3, plus the definitions of the defects that M6 leaves to a model)
# --------------------------------------------------------------------------------------------------
MIN_TITLE_CHARS = 5            # M6 §2.3: topics shorter than 5 characters are removed
MIN_BODY_CHARS = 15            # M6 §2.3: contents shorter than 15 characters are removed
MIN_PIXELS = 5000              # M6 §2.3: only images with at least 5000 pixels are kept
NEAR_BLANK_STD = 5.0           # near_blank: every RGB channel's pixel std is below this
                               #   (measured: blank <= 4 by construction, blurred >= 6.5, clean >= 15)
SHARP_EDGE = 48.0              # blurred: no two adjacent pixels differ by this much in any channel
                               #   (measured: blurred <= 38 by construction, clean >= 65)
MIN_BLUR_PX = 2.0              # blurred: Gaussian radius at least this many pixels (and 3.5-6 % of the side)
LONG_LINE_BYTES = 1 << 20      # long_line: one line of at least a mebibyte
CLEAN_SIDES = (72, 80, 96, 112, 128)   # image sides of clean photos (72 * 72 = 5184 >= MIN_PIXELS)
SMALL_SIDES = (16, 70)         # side range of small images (70 * 70 = 4900 < MIN_PIXELS)

# Punctuation that counts as Chinese (besides ASCII); anything else outside ASCII / CJK is foreign.
ZH_PUNCT = "，。、；：？！“”‘’（）《》【】「」…—·"


def is_allowed_char(c: str) -> bool:
    """True for characters M6 §2.3 keeps: ASCII printable, whitespace, CJK ideographs, ``ZH_PUNCT``."""
    o = ord(c)
    return 0x20 <= o <= 0x7E or c in "\n\t\r" or 0x4E00 <= o <= 0x9FFF or c in ZH_PUNCT


# --------------------------------------------------------------------------------------------------
# Spam and bad words (a small, documented list a cleaner can use)
# --------------------------------------------------------------------------------------------------
# Deliberately mild and short: enough to exercise a word-list filter, nothing more. M6 also filters
# political terms; we include none. Matching rule: case-insensitive, English terms on word boundaries
# (``\bterm\b``), Chinese terms as substrings. No clean world text contains any of these terms.
BAD_WORDS_EN: tuple[str, ...] = ("porn", "xxx", "nude", "casino", "gambling", "viagra", "damn", "crap")
SPAM_PHRASES_EN: tuple[str, ...] = (
    "click here", "buy now", "free gift", "limited offer", "act now", "earn money fast",
    "add me on wechat", "cheap replicas",
)
BAD_WORDS_ZH: tuple[str, ...] = ("色情", "赌博", "博彩", "裸聊", "成人视频", "他妈的")
SPAM_PHRASES_ZH: tuple[str, ...] = ("加微信", "点击链接", "免费领取", "限时秒杀", "刷单", "日赚千元", "代开发票", "高仿")
SPAM_TERMS: dict[str, tuple[str, ...]] = {
    "en": BAD_WORDS_EN + SPAM_PHRASES_EN,
    "zh": BAD_WORDS_ZH + SPAM_PHRASES_ZH,
}

_SPAM_SENTENCES_EN = (   # {P}: a spam phrase (capitalised), {w}: a bad word
    "{P} for the best deals.", "{P}, stock is running out.", "Special price today, {p} before it ends.",
    "Visit our {w} site for more.", "Best {w} deals online.", "Join the {w} club for members.",
)
_SPAM_SENTENCES_ZH = (
    "{p}，优惠多多。", "想要更多优惠请{p}。", "今天特价，{p}。", "欢迎访问{w}网站。", "最新{w}资源在这里。",
)
_SPAM_TITLES_EN = ("{P}: {t}", "{t} | {P}")
_SPAM_TITLES_ZH = ("【{p}】{t}", "{t}（{p}）")

_FOREIGN_TOKENS = (
    "🔥", "✨", "👍", "😍", "💯", "🎁",                   # emoji
    "скидка", "новинка", "Привет",                         # Cyrillic
    "جديد", "تخفيض",                                       # Arabic
    "セール", "할인",                                       # Japanese kana, Korean
    "★", "©", "™", "→", "♥", "€", "✓",                     # symbols
)
_RUNS_EN = ("!!!", "!!!!!", "...", "??", "**", "-----")
_RUNS_ZH = ("！！！", "。。。", "……", "？？", "，，", "-----")
_SHORT_BODIES_EN = ("See photo.", "In stock.", "New!", "Nice set.", "Sold.")
_SHORT_BODIES_ZH = ("见图。", "现货。", "如图所示。", "新品。", "已售。")
_INVALID_BYTES = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe4\xb8", b"\x80\x80", b"\xed\xa0\x80", b"\xc0\xaf")


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class CrawlItem:
    """One crawled product page, raw. ``defects`` names exactly the injected defects (() = clean)."""

    id: str                         # "crawl-train-123" (split and scene seed)
    title: bytes                    # raw title bytes (UTF-8 unless INVALID_UTF8)
    body: bytes                     # raw body bytes
    image: bytes                    # encoded image file (PNG or JPEG; cut off if TRUNCATED_IMAGE)
    scene: Scene | None             # the scene the image was rendered from (None: a blank placeholder)
    defects: tuple[str, ...]        # injected defects, in DEFECTS order
    lang: str                       # "en" or "zh": language of the page text
    image_format: str               # "PNG" or "JPEG"
    text_scene: Scene               # the scene the text describes (== scene unless MISMATCH)
    seed: int                       # the scene seed the item was derived from

    @property
    def is_clean(self) -> bool:
        return not self.defects

    def __repr__(self) -> str:  # the raw fields can be a megabyte long
        return (f"CrawlItem(id={self.id!r}, lang={self.lang!r}, defects={self.defects}, "
                f"title={self.title[:40]!r}{'...' if len(self.title) > 40 else ''}, body={len(self.body)} bytes, "
                f"image={self.image_format} {len(self.image)} bytes)")


def decode_text(data: bytes) -> str | None:
    """Strict UTF-8 decoding: the text, or None if ``data`` is not valid UTF-8 (``b""`` gives ``""``)."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return None


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


def decode_image(data: bytes) -> Image.Image | None:
    """Decode an image file to a PIL RGB image, or None if it is not a complete, readable image.

    Strict: a PNG must end with its IEND chunk and a JPEG with its EOI marker, so truncated files are
    refused even if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on elsewhere."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "PNG" and not data.endswith(_PNG_END):
                return None
            if im.format == "JPEG" and not data.endswith(_JPEG_END):
                return None
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


class ImageStats(NamedTuple):
    pixels: int      # width * height
    std: float       # largest per-channel standard deviation of the pixel values (0-255 scale)
    edge: float      # largest difference between horizontally or vertically adjacent pixels, any channel


def image_stats(img: Image.Image) -> ImageStats:
    """The three numbers the image defects are defined by (``SMALL_IMAGE``: pixels < ``MIN_PIXELS``;
    ``NEAR_BLANK``: std < ``NEAR_BLANK_STD``; ``BLURRED``: not near-blank and edge < ``SHARP_EDGE``)."""
    import numpy as np

    a = np.asarray(img.convert("RGB"), dtype=np.float64)                  # (H, W, 3)
    std = float(a.reshape(-1, 3).std(axis=0).max())
    dx = np.abs(np.diff(a, axis=1)).max() if a.shape[1] > 1 else 0.0
    dy = np.abs(np.diff(a, axis=0)).max() if a.shape[0] > 1 else 0.0
    return ImageStats(img.width * img.height, std, float(max(dx, dy)))


def defect_counts(items: Iterable[CrawlItem]) -> dict[str, int]:
    """How many items carry each defect (every name in ``DEFECTS``), plus ``"clean"`` and ``"total"``.
    An item with two defects counts once for each."""
    counts = {d: 0 for d in DEFECTS}
    clean = total = 0
    for item in items:
        total += 1
        clean += not item.defects
        for d in item.defects:
            counts[d] += 1
    counts["clean"] = clean
    counts["total"] = total
    return counts


# --------------------------------------------------------------------------------------------------
# Choosing defects
# --------------------------------------------------------------------------------------------------
def _natural_fields(defects: set[str]) -> list[str]:
    """Fields still holding (possibly decorated) natural text about a scene."""
    fields = []
    if not defects & {SHORT_TITLE, EMPTY_TEXT, INVALID_UTF8}:
        fields.append("title")
    if not defects & {SHORT_BODY, GIBBERISH, EMPTY_TEXT, INVALID_UTF8}:
        fields.append("body")
    return fields


def _valid(defects: set[str]) -> bool:
    if any(CONFLICTS[d] & defects for d in defects):
        return False
    if defects & {*_ADDITIVE, MISMATCH} and not _natural_fields(defects):
        return False
    return True


def _weighted(rng: Rng, names: Sequence[str], weights: Mapping[str, float]) -> str:
    total = sum(weights[d] for d in names)
    u = rng.random() * total
    for d in names:
        u -= weights[d]
        if u < 0:
            return d
    return names[-1]


def _choose_defects(rng: Rng, weights: Mapping[str, float], multi: float) -> set[str]:
    names = [d for d in DEFECTS if weights[d] > 0]
    chosen = {_weighted(rng, names, weights)}
    while len(chosen) < 3 and rng.random() < multi:
        options = [d for d in names if d not in chosen and _valid(chosen | {d})]
        if not options:
            break
        chosen.add(_weighted(rng, options, weights))
    return chosen


# --------------------------------------------------------------------------------------------------
# Text injection
# --------------------------------------------------------------------------------------------------
def _sentences(body: str, lang: str) -> list[str]:
    """Split a product description into sentences (each keeps its final punctuation)."""
    ends = ".!?" if lang == "en" else "。！？"
    out, cur = [], ""
    for ch in body:
        cur += ch
        if ch in ends:
            out.append(cur.strip())
            cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def _join(sentences: Sequence[str], lang: str) -> str:
    return (" " if lang == "en" else "").join(sentences)


def _has_spam(text: str) -> bool:
    low = text.lower()
    for term in SPAM_TERMS["en"]:
        if re.search(rf"\b{re.escape(term)}\b", low):
            return True
    return any(term in text for term in SPAM_TERMS["zh"])


def _gibberish(rng: Rng, lang: str) -> str:
    """Random character soup (M6 §2.3 'random combinations of characters'), 20-120 characters."""
    while True:
        if lang == "en":
            letters = "abcdefghijklmnopqrstuvwxyz"
            words = []
            target = rng.randint(20, 120)
            while sum(len(w) + 1 for w in words) < target:
                words.append("".join(rng.choice(letters) for _ in range(rng.randint(1, 9))))
            text = " ".join(words)
        else:
            pool = _zh_pool()
            n = rng.randint(20, 100)
            if rng.random() < 0.5:   # in-vocabulary characters in random order
                text = "".join(rng.choice(pool) for _ in range(n))
            else:                    # any CJK ideograph
                text = "".join(chr(0x4E00 + rng.randint(0, 0x9FA5 - 0x4E00)) for _ in range(n))
        if not _has_spam(text) and len(text.strip()) >= MIN_BODY_CHARS:
            return text


_ZH_POOL: list[str] = []


def _zh_pool() -> list[str]:
    """The Chinese characters of the world's own texts (names and description templates)."""
    if not _ZH_POOL:
        src = "".join((*COLOURS_ZH.values(), *SHAPES_ZH.values(), *SIZES_ZH.values(), *POSITIONS_ZH.values(),
                       *T._OPEN_ZH, *T._OBJ_ZH, *T._CLOSE_ZH))
        _ZH_POOL.extend(sorted({c for c in src if 0x4E00 <= ord(c) <= 0x9FFF}))
    return _ZH_POOL


def _spam_sentence(rng: Rng, lang: str) -> str:
    if lang == "en":
        p, w = rng.choice(SPAM_PHRASES_EN), rng.choice(BAD_WORDS_EN)
        return rng.choice(_SPAM_SENTENCES_EN).format(P=T._cap(p), p=p, w=w)
    return rng.choice(_SPAM_SENTENCES_ZH).format(p=rng.choice(SPAM_PHRASES_ZH), w=rng.choice(BAD_WORDS_ZH))


def _spam_title(rng: Rng, title: str, lang: str) -> str:
    if lang == "en":
        p = rng.choice(SPAM_PHRASES_EN + BAD_WORDS_EN)
        return rng.choice(_SPAM_TITLES_EN).format(P=T._cap(p), t=title)
    return rng.choice(_SPAM_TITLES_ZH).format(p=rng.choice(SPAM_PHRASES_ZH + BAD_WORDS_ZH), t=title)


def _add_run(s: str, run: str) -> str:
    """Replace a final punctuation mark by a run of repeated punctuation (or append the run)."""
    if s and unicodedata.category(s[-1]).startswith("P"):
        s = s[:-1]
    return s + run


def _html_body(rng: Rng, sentences: list[str]) -> str:
    style = rng.randint(0, 3)
    if style == 0:
        return '<div class="desc">' + "".join(f"<p>{s}</p>" for s in sentences) + "</div>"
    if style == 1:
        return rng.choice(("<br/>", "<br>", "<br />")).join(sentences)
    out = list(sentences)
    k = rng.randint(0, len(out) - 1)
    if style == 2:
        tag = rng.choice(('<span style="color:red">', "<b>", '<a href="/shop/item' + str(rng.randint(1, 999)) + '">'))
        close = "</span>" if tag.startswith("<span") else "</b>" if tag == "<b>" else "</a>"
        out[k] = f"{tag}{out[k]}{close}"
    else:
        out.insert(k, f'<img src="/img/p{rng.randint(1, 99)}.jpg">')
        out[-1] = out[-1] + " &amp; more" if rng.random() < 0.5 else out[-1] + "&quot;"
    return " ".join(out)


def _html_title(rng: Rng, title: str) -> str:
    tag = rng.choice(("h1", "b", "title", "strong"))
    return f"<{tag}>{title}</{tag}>"


def _invalid_utf8(rng: Rng, text: str, lang: str) -> bytes:
    if lang == "zh" and rng.random() < 0.5:
        data = text.encode("gbk", errors="replace")   # a Chinese page served as GBK
    else:
        raw = text.encode("utf-8")
        cuts = [i for i in range(len(raw) + 1) if i == len(raw) or (raw[i] & 0xC0) != 0x80]  # char boundaries
        i = cuts[rng.randint(0, len(cuts) - 1)]
        data = raw[:i] + rng.choice(_INVALID_BYTES) + raw[i:]
    if decode_text(data) is not None:   # never happens for GBK Chinese, but make sure
        data += b"\xff"
    return data


def _make_text(scene: Scene, lang: str, rng: Rng) -> tuple[str, str]:
    """The clean (title, body) of a scene: a short caption and the product description."""
    titles = [T.caption(scene, style, lang) for style in ("colour_shape", "full", "count_intro", "shape_count")]
    titles = [t for t in titles if len(t) >= MIN_TITLE_CHARS]   # "两个圆形" would be a too-short title
    title = rng.choice(titles)
    if lang == "en":
        title = T._cap(title)
    return title, T.product_description(scene, lang)


# --------------------------------------------------------------------------------------------------
# Image injection
# --------------------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _mismatch_scene(scene: Scene, split: str, rng: Rng, max_objects: int) -> Scene:
    """Another scene of the same split that shares no (colour, shape) with ``scene``."""
    lo, hi = SPLITS[split]
    pairs = {(o.colour, o.shape) for o in scene.objects}
    for _ in range(1000):
        other_seed = lo + (scene.seed - lo + 1 + rng.randint(0, hi - lo - 2)) % (hi - lo)
        other = sample_scene(other_seed, max_objects=max_objects)
        if not pairs & {(o.colour, o.shape) for o in other.objects}:
            return other
    raise RuntimeError(f"no mismatching scene found for seed {scene.seed}")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# The crawl
# --------------------------------------------------------------------------------------------------
def crawl_item(seed: int, split: str = "train", noise: float = 0.5, langs: Sequence[str] = ("en", "zh"),
               weights: Mapping[str, float] | None = None, multi: float = 0.3, max_objects: int = 3) -> CrawlItem:
    """The crawled page of one scene seed (see ``crawl``; ``seed`` should lie inside ``split``)."""
    w = _check_args(noise, langs, weights, multi, split)
    return _item(seed, split, noise, tuple(langs), w, multi, max_objects)


def crawl(n: int, split: str = "train", start: int = 0, noise: float = 0.5, langs: Sequence[str] = ("en", "zh"),
          weights: Mapping[str, float] | None = None, multi: float = 0.3, max_objects: int = 3) -> Iterator[CrawlItem]:
    """Yield ``n`` crawled pages, one per scene seed ``split_seeds(split, n, start)``.

    Args:
        n, split, start: which scenes (the seeds ``split_seeds(split, n, start)``).
        noise:   probability that an item is damaged (0 = all clean, 1 = all noisy).
        langs:   languages to draw each page's language from (uniformly).
        weights: relative frequency of each defect among noisy items (default ``DEFAULT_WEIGHTS``;
                 give a subset to override those, 0 disables a defect).
        multi:   after the first defect, probability of adding another compatible one (at most 3).
        max_objects: passed to ``sample_scene``.
    """
    w = _check_args(noise, langs, weights, multi, split)
    for seed in split_seeds(split, n, start=start):
        yield _item(seed, split, noise, tuple(langs), w, multi, max_objects)


def _check_args(noise, langs, weights, multi, split) -> dict[str, float]:
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise is the fraction of damaged items and must lie in [0, 1], got {noise}")
    if not 0.0 <= multi < 1.0:
        raise ValueError(f"multi is a probability and must lie in [0, 1), got {multi}")
    if not langs or any(lang not in T.LANGS for lang in langs):
        raise ValueError(f"langs must be a non-empty subset of {T.LANGS}, got {tuple(langs)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
    w = dict(DEFAULT_WEIGHTS)
    for name, value in (weights or {}).items():
        if name not in DEFECTS:
            raise ValueError(f"unknown defect {name!r} in weights; use names from DEFECTS: {DEFECTS}")
        if value < 0:
            raise ValueError(f"defect weights must be >= 0, got {name}={value}")
        w[name] = float(value)
    if noise > 0 and not any(w.values()):
        raise ValueError("all defect weights are 0 but noise > 0: enable at least one defect")
    return w


def _item(seed: int, split: str, noise: float, langs: tuple[str, ...], weights: dict[str, float],
          multi: float, max_objects: int) -> CrawlItem:
    scene = sample_scene(seed, max_objects=max_objects)
    # Independent streams: being noisy, which defects, the page itself, and how defects are injected.
    noisy = Rng(f"crawl-noisy-{seed}").random() < noise
    defects = _choose_defects(Rng(f"crawl-defects-{seed}"), weights, multi) if noisy else set()
    page = Rng(f"crawl-page-{seed}")
    rng = Rng(f"crawl-inject-{seed}")

    lang = langs[page.randint(0, len(langs) - 1)]
    fmt = "PNG" if page.random() < 0.5 else "JPEG"
    quality = page.randint(75, 95)
    side = page.choice(CLEAN_SIDES)

    # ---- text ----------------------------------------------------------------------------------
    text_scene = _mismatch_scene(scene, split, rng, max_objects) if MISMATCH in defects else scene
    title, body = _make_text(text_scene, lang, page)
    sents = _sentences(body, lang)
    labels = set(defects)

    if SHORT_TITLE in defects:
        k = rng.randint(1, MIN_TITLE_CHARS - 1)
        title = title[:k].strip() or title[0]
    if SHORT_BODY in defects:
        if rng.random() < 0.5:
            body = rng.choice(_SHORT_BODIES_EN if lang == "en" else _SHORT_BODIES_ZH)
        else:
            k = rng.randint(1, MIN_BODY_CHARS - 1)
            body = body[:k].strip() or body[0]
        sents = [body]
    if GIBBERISH in defects:
        body = _gibberish(rng, lang)
        sents = [body]

    natural = _natural_fields(defects)

    def target() -> str:
        return "body" if "body" in natural and (len(natural) == 1 or rng.random() < 0.75) else "title"

    if SPAM in defects:
        if target() == "body":
            sents.insert(rng.randint(0, len(sents)), _spam_sentence(rng, lang))
        else:
            title = _spam_title(rng, title, lang)
    if FOREIGN_CHARS in defects:
        for _ in range(rng.randint(1, 3)):
            tok = rng.choice(_FOREIGN_TOKENS)
            if target() == "body":
                k = rng.randint(0, len(sents) - 1)
                sents[k] = sents[k] + (" " if lang == "en" else "") + tok
            else:
                title = f"{title} {tok}" if lang == "en" else tok + title
    if REPEATED_PUNCT in defects:
        runs = _RUNS_EN if lang == "en" else _RUNS_ZH
        for _ in range(rng.randint(1, 2)):
            if target() == "body":
                k = rng.randint(0, len(sents) - 1)
                sents[k] = _add_run(sents[k], rng.choice(runs))
            else:
                title = _add_run(title, rng.choice(runs))
    if HTML in defects and "body" in natural:
        body = _html_body(rng, sents)
        if "title" in natural and rng.random() < 0.5:
            title = _html_title(rng, title)
    elif HTML in defects:
        title = _html_title(rng, title)
        body = _join(sents, lang)
    else:
        body = _join(sents, lang)
    if LONG_LINE in defects:
        unit = body.encode("utf-8")
        reps = -(-LONG_LINE_BYTES // len(unit))   # ceil: the line reaches LONG_LINE_BYTES
        body = (" " if lang == "en" else "").join([body] * reps)

    if EMPTY_TEXT in defects:
        which = rng.choice(("title", "body", "both"))
        blank = rng.choice(("", "", " ", "\n", "  \t"))
        if which in ("title", "both"):
            title = blank
            labels.add(SHORT_TITLE)
        if which in ("body", "both"):
            body = blank
            labels.add(SHORT_BODY)

    title_b, body_b = title.encode("utf-8"), body.encode("utf-8")
    if INVALID_UTF8 in defects:
        which = rng.choice(("title", "body", "body", "both"))
        if which in ("title", "both"):
            title_b = _invalid_utf8(rng, title, lang)
        if which in ("body", "both"):
            body_b = _invalid_utf8(rng, body, lang)

    # ---- image ---------------------------------------------------------------------------------
    img_scene: Scene | None = scene
    if SMALL_IMAGE in defects:
        side = rng.randint(*SMALL_SIDES)
    img = render(scene, side, supersample=2)
    if NEAR_BLANK in defects:
        kind = rng.randint(0, 2)
        if kind == 0:    # over-exposed: the photo faded almost to white
            img = Image.blend(img, Image.new("RGB", img.size, (255, 255, 255)), rng.uniform(0.95, 0.98))
        elif kind == 1:  # the empty studio backdrop
            img, img_scene = render_background(scene.background, side), None
        else:            # a flat placeholder
            level = int(rng.uniform(200, 255))
            img, img_scene = Image.new("RGB", (side, side), (level, level, level)), None
        data = _encode(img, fmt, quality)
        while image_stats(decode_image(data)).std >= 0.8 * NEAR_BLANK_STD:  # keep a margin to the threshold
            img = Image.blend(img, Image.new("RGB", img.size, (255, 255, 255)), 0.5)
            data = _encode(img, fmt, quality)
    elif BLURRED in defects:
        radius = max(MIN_BLUR_PX, side * rng.uniform(0.035, 0.06))
        for _ in range(8):  # blur harder until no sharp edge is left (decoded, so JPEG ringing counts)
            data = _encode(img.filter(ImageFilter.GaussianBlur(radius)), fmt, quality)
            if image_stats(decode_image(data)).edge < 0.8 * SHARP_EDGE:
                break
            radius *= 1.4
    else:
        data = _encode(img, fmt, quality)
    if TRUNCATED_IMAGE in defects:
        data = data[: int(len(data) * rng.uniform(0.2, 0.9))]
        while decode_image(data) is not None:  # pragma: no cover - defensive
            data = data[: len(data) // 2]

    return CrawlItem(
        id=f"crawl-{split}-{seed}", title=title_b, body=body_b, image=data, scene=img_scene,
        defects=tuple(d for d in DEFECTS if d in labels), lang=lang, image_format=fmt,
        text_scene=text_scene, seed=seed,
    )


__all__ = [
    "CrawlItem", "crawl", "crawl_item", "decode_text", "decode_image", "defect_counts", "is_allowed_char",
    "ImageStats", "image_stats", "SHARP_EDGE",
    "DEFECTS", "DEFECT_RULES", "DEFAULT_WEIGHTS", "CONFLICTS", "SPAM_TERMS", "BAD_WORDS_EN", "BAD_WORDS_ZH",
    "SPAM_PHRASES_EN", "SPAM_PHRASES_ZH", "ZH_PUNCT", "MIN_TITLE_CHARS", "MIN_BODY_CHARS", "MIN_PIXELS",
    "NEAR_BLANK_STD", "LONG_LINE_BYTES",
    "HTML", "REPEATED_PUNCT", "FOREIGN_CHARS", "SHORT_TITLE", "SHORT_BODY", "SPAM", "GIBBERISH", "SMALL_IMAGE",
    "NEAR_BLANK", "BLURRED", "MISMATCH", "INVALID_UTF8", "EMPTY_TEXT", "LONG_LINE", "TRUNCATED_IMAGE",
]
