"""M6 §2.3 corpus cleaning (mmkit.cleaning): every rule on hand-written inputs, then the pipeline on a crawl.

Quality floors (``test_pipeline_quality_on_a_crawl``) were measured on ``crawl(400, split="test",
noise=0.5)`` and are asserted with a margin below the measured values:

    rule                    precision  recall   (measured)   floor asserted
    unreadable, html, duplicate_punctuation, non_zh_en_chars, short_title, short_body,
    min_pixels, image_quality   1.000     1.000                 0.95 / 0.95
    spam (given half the terms) 1.000     1.000 on its terms, 0.000 on the others (a word list)
    perplexity                  0.966     1.000  (1 fp: a spam body)   0.90 / 0.95
    image_text_relevance        1.000     0.971  (35 mismatches)       0.90 / 0.85
    overall (item dropped)      1.000     1.000                 0.97 / 0.97

(On 3,000 items of the train split: relevance 1.000 / 0.910, perplexity 0.974 / 1.000, overall 1.000 / 1.000.)
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmkit.data import cleaning as K
from mmkit.data import text as T
from mmkit.data.crawl import (
    GIBBERISH, HTML, MISMATCH, SPAM, SPAM_TERMS, crawl, crawl_item, decode_text,
)
from mmkit.data.world import make_scene, render, sample_scene, split_seeds


# --- helpers -----------------------------------------------------------------------------------------
def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


CLEAN_SCENE = make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right")])
CLEAN_IMAGE = png(render(CLEAN_SCENE, 96))


def page(title: str | bytes = "A red circle and a blue square",
         body: str | bytes = "A large red circle sits at the top left. A small blue square is placed at the bottom right.",
         image: bytes | None = None, id: str = "hand"):
    """A hand-made crawl page: a real CrawlItem with its fields replaced."""
    base = crawl_item(split_seeds("test", 1)[0], split="test", noise=0.0)
    enc = lambda v: v.encode("utf-8") if isinstance(v, str) else v  # noqa: E731
    return dataclasses.replace(base, id=id, title=enc(title), body=enc(body),
                               image=CLEAN_IMAGE if image is None else image, defects=())


def run_rule(rule: K.Rule, item) -> tuple[K.Outcome, K.CleanItem | None]:
    outcome, cleaned, _ = K.Cleaner([rule]).process(item)
    return outcome, cleaned


@pytest.fixture(scope="module")
def rules() -> list[K.Rule]:
    return K.default_rules()          # trains the LM and calibrates the threshold once (~1.5 s)


# --- transforms ----------------------------------------------------------------------------------------
def test_strip_html_fixes_the_text_and_records_it():
    o, c = run_rule(K.StripHTML(), page(
        title="<h1>A red circle</h1>",
        body='<div class="desc"><p>A red circle sits on the left.</p><p>Nice &amp; simple.</p></div><br/>Done&quot;'))
    assert o.kept and c.title == "A red circle"
    assert c.body == 'A red circle sits on the left. Nice & simple. Done"'
    assert [f.reason for f in o.findings] == ["html", "html"] and not any(f.drop for f in o.findings)
    assert c.transforms == ("html",)
    o, c = run_rule(K.StripHTML(), page(body="一个红色圆形。<br/>所有物体都是红色的。<img src=\"/p.jpg\">"))
    assert c.body == "一个红色圆形。所有物体都是红色的。"          # no stray spaces between Chinese sentences
    o, c = run_rule(K.StripHTML(), page(body="Red & blue shapes, 3 < 4 and 5 > 2, nothing to strip here."))
    assert o.findings == () and c.body == "Red & blue shapes, 3 < 4 and 5 > 2, nothing to strip here."


def test_duplicate_punctuation_is_collapsed():
    rule = K.CollapsePunctuation()
    cases = {"Wow!!! Really??": "Wow! Really?", "Wait... ok": "Wait. ok", "a ----- b": "a - b", "nice**": "nice*",
             "好！！！": "好！", "见图。。。": "见图。", "等等……": "等等…", "对，，": "对，"}
    for before, after in cases.items():
        o, c = run_rule(rule, page(body=before))
        assert c.body == after, before
        assert o.findings[0].reason == "repeated_punctuation" and not o.findings[0].drop
    for untouched in ("One! Two? Three.", "A, b; c: d.", "★★ stars are symbols, not punctuation", "你好，世界。"):
        o, c = run_rule(rule, page(body=untouched))
        assert o.findings == () and c.body == untouched


def test_only_chinese_and_english_characters_are_kept():
    rule = K.KeepZhEn()
    o, c = run_rule(rule, page(title="A red circle 🔥", body="Great price! скидка Everything is red ✨ now. セール 할인 ★ © ™ → €"))
    assert c.title == "A red circle"
    assert c.body == "Great price! Everything is red now."
    assert o.findings[0].reason == "foreign_chars"
    o, c = run_rule(rule, page(title="✨右侧有一个红色圆形", body="一个红色圆形位于右侧。😍所有物体都是红色的！（新品）《说明》"))
    assert c.title == "右侧有一个红色圆形" and c.body == "一个红色圆形位于右侧。所有物体都是红色的！（新品）《说明》"
    o, c = run_rule(rule, page(title="Plain ASCII: [x] {y} ~z~ 100%", body="中文，英文 English；标点：“引号”。"))
    assert o.findings == ()


# --- length, spam --------------------------------------------------------------------------------------
@pytest.mark.parametrize("title,dropped", [("Abcd", True), ("Abcde", False), ("  Abcd \n", True), ("一二三四", True),
                                           ("一二三四五", False), ("", True)])
def test_title_length_boundary_is_5(title, dropped):
    o, _ = run_rule(K.ShortTitle(), page(title=title))
    assert (not o.kept) == dropped
    if dropped:
        assert o.findings[0].reason == "short_title"


@pytest.mark.parametrize("body,dropped", [("a" * 14, True), ("a" * 15, False), ("See photo.", True), ("见图。", True),
                                          ("一" * 14, True), ("一" * 15, False), (" " * 20 + "abc", True)])
def test_body_length_boundary_is_15(body, dropped):
    o, _ = run_rule(K.ShortBody(), page(body=body))
    assert (not o.kept) == dropped


def test_length_is_measured_after_the_transforms():
    cl = K.Cleaner([K.StripHTML(), K.ShortTitle()])
    assert not cl.process(page(title="<b>Abcd</b>"))[0].kept            # 11 raw characters, 4 after stripping
    assert cl.process(page(title="<b>Abcde</b>"))[0].kept


def test_spam_word_list():
    rule = K.Spam()
    for text in ("Click here for the best deals.", "CASINO night", "Visit our porn site", "加微信，优惠多多。", "欢迎访问赌博网站"):
        o, _ = run_rule(rule, page(body=text + " A red circle sits on the left."))
        assert not o.kept and o.findings[0].reason == "spam", text
    o, _ = run_rule(rule, page(title="【刷单】一个红色圆形"))
    assert not o.kept and "title" in o.findings[0].detail
    for text in ("Scrap metal and a red circle.", "Pornography-free zone, a scrapbook and crapulence.",
                 "A simple, modern look for any desk or shelf.", "颜色鲜艳，造型简单大方。"):
        assert run_rule(rule, page(body=text))[0].kept, text         # word boundaries, no false alarms
    assert run_rule(K.Spam(terms_en=["shelf"], terms_zh=[]), page(body="For any desk or shelf, really."))[0].findings


# --- perplexity ----------------------------------------------------------------------------------------
def test_char_lm_is_a_distribution():
    lm = K.CharNGramLM(order=3).fit(["abcabc", "abd", "红色圆形"])
    alphabet = ([chr(i) for i in range(0x20, 0x7F)] + list("\n\t\r") + [chr(i) for i in range(0x4E00, 0xA000)]
                + list(K.C.ZH_PUNCT))
    assert len(alphabet) == K.ALPHABET_SIZE
    for ctx in ("", "ab", "红色", "zz"):                  # seen, partly seen and unseen contexts
        total = sum(np.exp(-lm.char_nll(ctx + c)[-1]) for c in alphabet)
        assert total == pytest.approx(1.0, abs=1e-9)
    assert lm.perplexity("abcab") < lm.perplexity("zyxzy")
    assert lm.nll("") == 0.0
    with pytest.raises(ValueError, match="order"):
        K.CharNGramLM(order=0)


def test_perplexity_separates_gibberish_from_clean_text(rules):
    rule = next(r for r in rules if r.name == "perplexity")
    rng = random.Random(0)
    clean = [T.product_description(sample_scene(s), lang) for s in split_seeds("test", 20) for lang in ("en", "zh")]
    gib_en = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
                       for _ in range(12)) for _ in range(20)]
    gib_zh = ["".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(40)) for _ in range(20)]
    pool = sorted(set("".join(clean[1::2])) - set("，。、：；！？"))
    gib_zh_pool = ["".join(rng.choice(pool) for _ in range(40)) for _ in range(20)]   # known characters, random order
    thr = rule.thresholds["body"]
    clean_scores = [rule.score(t) for t in clean]
    assert max(clean_scores) < thr / 5                     # clean held-out text: far below the threshold
    for gib in (gib_en, gib_zh, gib_zh_pool):
        assert min(rule.score(t) for t in gib) > thr       # character soup: above it
    # the threshold comes from the clean held-out distribution, as documented
    cal = rule.calibration
    assert thr == pytest.approx(cal.factor * np.quantile(cal.heldout["body"], cal.quantile))
    o, _ = run_rule(rule, page(body=gib_en[0]))
    assert not o.kept and o.findings[0].reason == "high_perplexity" and "perplexity_body" in o.scores
    o, _ = run_rule(rule, page(body="Tiny."))               # too short to judge: the length rule's job
    assert o.kept and "perplexity_body" not in o.scores


# --- images --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,dropped", [((70, 70), True), ((50, 99), True), ((50, 100), False), ((71, 71), False)])
def test_min_pixels_boundary_is_5000(size, dropped):
    img = render(CLEAN_SCENE, 128).resize(size)
    o, _ = run_rule(K.MinPixels(), page(image=png(img)))
    assert (not o.kept) == dropped
    assert o.scores["pixels"] == size[0] * size[1]


def test_image_quality_catches_blank_and_blurred_images():
    sharp = render(CLEAN_SCENE, 96)
    blank = Image.new("RGB", (96, 96), (230, 230, 230))
    faded = Image.blend(sharp, Image.new("RGB", sharp.size, (255, 255, 255)), 0.97)
    blurred = sharp.filter(ImageFilter.GaussianBlur(4))
    q = {name: K.image_quality(img) for name, img in
         (("sharp", sharp), ("blank", blank), ("faded", faded), ("blurred", blurred))}
    assert q["sharp"].std > 15 and q["sharp"].sharpness > 100 and q["sharp"].score > 1
    assert q["blank"].std == 0 and q["blank"].sharpness == 0
    assert q["faded"].std < K.BLANK_STD
    assert q["blurred"].std > K.BLANK_STD and q["blurred"].sharpness < K.MIN_SHARPNESS
    rule = K.ImageQuality()
    assert run_rule(rule, page(image=png(sharp)))[0].kept
    for img, reason in ((blank, "near_blank"), (faded, "near_blank"), (blurred, "blurred")):
        o, _ = run_rule(rule, page(image=png(img)))
        assert not o.kept and o.findings[0].reason == reason


# --- relevance -----------------------------------------------------------------------------------------
def test_detect_objects_reads_colour_and_shape_from_pixels():
    scene = make_scene([("circle", "red", "large", "top left"), ("triangle", "yellow", "large", "center"),
                        ("square", "purple", "small", "bottom right")])
    found = {d.position: d for d in K.detect_objects(render(scene, 96))}
    assert set(found) == {"top left", "center", "bottom right"}
    assert [(found[p].colour, found[p].shapes) for p in ("top left", "center", "bottom right")] == [
        ("red", ("circle",)), ("yellow", ("triangle",)), ("purple", ("square",))]
    assert K.detect_objects(Image.new("RGB", (96, 96), (250, 250, 250))) == []


def test_image_text_relevance():
    rule = K.ImageTextRelevance()           # the photo shows a red circle and a blue square
    assert run_rule(rule, page())[0].kept
    assert run_rule(rule, page(title="一个红色圆形", body="左上方有一个大的红色圆形。所有物体都是红色的哦。"))[0].kept
    assert run_rule(rule, page(title="Two shapes", body="Nice shapes photographed on a white background."))[0].kept
    o, _ = run_rule(rule, page(title="A green triangle", body="A large green triangle sits in the center of it."))
    assert not o.kept and o.findings[0].reason == "no_shared_colour"
    o, _ = run_rule(rule, page(title="A red square", body="A large red square sits at the top left of the set."))
    assert not o.kept and o.findings[0].reason == "no_shared_object"      # same colour, other shape


def test_title_body_consistency_uses_text_only():
    rule = K.TitleBodyConsistency()
    assert run_rule(rule, page())[0].kept
    o, _ = run_rule(rule, page(title="A green triangle"))
    assert not o.kept and "green" in o.findings[0].detail
    assert K.text_attributes("一个小的红色圆形和两个蓝色正方形 and a Yellow triangle") == K.Attributes(
        frozenset({"red", "blue", "yellow"}), frozenset({"circle", "square", "triangle"}),
        frozenset({("red", "circle"), ("blue", "square"), ("yellow", "triangle")}))


# --- unreadable input ----------------------------------------------------------------------------------
def test_bad_inputs_are_counted_never_crash(rules):
    bad = [
        page(title=b"\xff\xfeA red circle", id="bad-utf8-title"),
        page(body="一个红色圆形。".encode("gbk") + b" and more", id="bad-utf8-gbk"),
        page(title="", body="", id="empty-both"),
        page(body="   \n\t", id="empty-body"),
        page(body="A red circle sits at the top left. " * 40_000, id="long-line"),      # 1.4 MB, one line
        page(image=CLEAN_IMAGE[: len(CLEAN_IMAGE) // 2], id="truncated-png"),
        page(image=b"not an image at all", id="garbage-image"),
        page(image=b"", id="empty-image"),
    ]
    run = K.clean(iter(bad), rules=rules)
    assert run.collect() == []
    by_id = {o.id: o for o in run.outcomes}
    reasons = {i: {f.reason for f in o.findings if f.rule == "unreadable"} for i, o in by_id.items()}
    assert reasons["bad-utf8-title"] == {"invalid_utf8"} and reasons["bad-utf8-gbk"] == {"invalid_utf8"}
    assert reasons["empty-both"] == {"empty_text"} and reasons["empty-body"] == {"empty_text"}
    assert reasons["long-line"] == {"long_line"}
    assert reasons["truncated-png"] == reasons["garbage-image"] == reasons["empty-image"] == {"truncated_image"}
    assert run.report.unreadable == Counter(invalid_utf8=2, empty_text=3, long_line=1, truncated_image=3)
    assert run.report.rules["unreadable"].removed == len(bad)
    # rules that can still read the other fields keep working: the long line is also scored by the LM
    assert "perplexity_body" in by_id["long-line"].scores


def test_a_broken_rule_drops_the_item_instead_of_crashing():
    class Broken(K.Rule):
        name = "broken"

        def apply(self, doc):
            raise RuntimeError("boom")

    o, _, _ = K.Cleaner([Broken()]).process(page())
    assert not o.kept and o.findings[0].reason == "error" and "boom" in o.findings[0].detail


# --- the pipeline --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crawl_run(rules):
    items = list(crawl(400, split="test", noise=0.5))
    run = K.clean(items, rules=rules)
    kept = run.collect()
    return items, run, kept


FLOORS = {  # rule -> (precision, recall): measured values in the module docstring. "spam" is not here: the crawl
    # injects the very terms the rule lists, so its 1.00 / 1.00 on the crawl is circular; it is scored on spam terms it
    # was not given in test_spam_rule_scored_on_terms_it_was_not_given.
    **{name: (0.95, 0.95) for name in ("unreadable", "html", "duplicate_punctuation", "non_zh_en_chars", "short_title",
                                       "short_body", "min_pixels", "image_quality")},
    "perplexity": (0.90, 0.95),
    "image_text_relevance": (0.90, 0.85),
}


def test_pipeline_quality_on_a_crawl(crawl_run):
    items, run, kept = crawl_run
    scores = run.score()
    for name, (p, r) in FLOORS.items():
        s = scores.rule(name)
        assert s.support >= 10, (name, s)                  # enough cases for the floor to mean something
        assert s.precision >= p and s.recall >= r, (name, s)
    assert scores.overall.precision >= 0.97 and scores.overall.recall >= 0.97, scores.overall
    # the text-only relevance check cannot see MISMATCH (title and body both describe the other scene),
    # and it must not misfire either
    assert scores.rule("title_body_consistency").fp <= 2
    # kept items carry no dropping defect left untouched; their text is clean of transform defects
    assert run.report.total == len(items) and run.report.kept == len(kept)
    for c in kept:
        assert "<" not in c.body and "!!" not in c.body and "🔥" not in c.title
        if not c.source.defects:                            # clean pages pass through byte-identical
            assert (c.title, c.body, c.transforms) == (decode_text(c.source.title), decode_text(c.source.body), ())
    # transforms repair and keep: some pages with HTML survive, cleaned
    assert any(HTML in c.source.defects for c in kept)
    print("\n" + scores.table())


def _spam_terms(item) -> set:
    """Every listed spam term in a crawl page's title and body (the crawl's own list, EN on word boundaries)."""
    found = set()
    for text in (decode_text(item.title), decode_text(item.body)):
        if text is None:
            continue
        found |= {t for t in SPAM_TERMS["en"] if K.Spam(terms_en=[t], terms_zh=[]).find(text)}
        found |= {t for t in SPAM_TERMS["zh"] if t in text}
    return found


def test_spam_rule_scored_on_terms_it_was_not_given(crawl_run):
    """The crawl injects spam terms from crawl.SPAM_TERMS and Spam() lists the same terms, so its 1.00 / 1.00 on the
    crawl measured nothing. Here the rule gets half of the terms (every other one, both languages) and is scored on
    the pages whose spam uses only the other half.

    Measured on crawl(400, "test", noise=0.5): precision 1.00 (0 of 377 clean-of-spam pages flagged), recall 1.00 on
    spam with the terms it was given (11 pages), recall 0.00 on spam with terms it was not given (12 pages): a word
    list finds only the words it lists. M6's "in-house spam detection" is a detector we do not have; spam with
    unlisted words passes this rule (the other rules happen to drop 7 of those 12 pages, for other reasons)."""
    items = crawl_run[0]
    given = {lang: SPAM_TERMS[lang][0::2] for lang in ("en", "zh")}
    held = {lang: SPAM_TERMS[lang][1::2] for lang in ("en", "zh")}
    cleaner = K.Cleaner([K.Spam(terms_en=given["en"], terms_zh=given["zh"])])
    flagged = {it.id: not cleaner.process(it)[0].kept for it in items}
    spam = [it for it in items if SPAM in it.defects]
    terms = {it.id: _spam_terms(it) for it in spam}
    assert all(terms.values()), "every spam page carries a listed term"
    seen = [it for it in spam if terms[it.id] <= set(given["en"] + given["zh"])]
    unseen = [it for it in spam if terms[it.id] <= set(held["en"] + held["zh"])]
    assert len(seen) >= 8 and len(unseen) >= 8, (len(seen), len(unseen))
    recall_seen = sum(flagged[it.id] for it in seen) / len(seen)
    recall_unseen = sum(flagged[it.id] for it in unseen) / len(unseen)
    false_alarms = sum(flagged[it.id] for it in items if SPAM not in it.defects)
    print(f"spam rule with half the terms: recall {recall_seen:.2f} on its terms ({len(seen)} pages), "
          f"{recall_unseen:.2f} on the others ({len(unseen)}); {false_alarms} false alarms")
    assert false_alarms == 0 and recall_seen == 1.0
    assert recall_unseen == 0.0        # the limit of a word list, stated (raise it if the rule ever learns)
    # ... and the unseen terms are real spam: the full list catches every one of those pages
    full = K.Cleaner([K.Spam()])
    assert all(not full.process(it)[0].kept for it in unseen)


def test_report_counts_and_examples(crawl_run):
    _, run, _ = crawl_run
    rep = run.report
    html = rep.rules["html"]
    assert html.kind == "transform" and html.removed == 0 and html.transformed > 0
    assert rep.rules["spam"].removed == sum(o.fired("spam") for o in run.outcomes)
    ex = rep.examples("image_quality", "blurred")
    assert 0 < len(ex) <= rep.max_examples and all(i.startswith("crawl-test-") for i, _ in ex)
    assert "spam" in rep.table() and rep.to_dict()["total"] == 400
    with pytest.raises(KeyError, match="no rule named"):
        rep.examples("nope")


def test_streaming_is_lazy_and_ordered(rules):
    pulled = []

    def source():
        for item in crawl(10_000, split="val", noise=0.5):
            pulled.append(item.id)
            yield item

    run = K.clean(source(), rules=rules)
    assert pulled == []                                   # nothing happens before iteration
    first = list(itertools.islice(run, 5))
    assert len(pulled) < 40                               # only what was needed for 5 kept items
    ids = [c.id for c in first]
    assert ids == sorted(ids, key=pulled.index)           # input order
    run2 = K.clean(source(), rules=rules, processes=2, chunksize=8)
    n_before = len(pulled)
    list(itertools.islice(run2, 5))
    assert len(pulled) - n_before <= 8 * (2 * 2 + 1) + 40  # bounded read-ahead with a pool, too
    with pytest.raises(RuntimeError, match="iterated once"):
        list(run)


def test_two_processes_give_the_same_result(rules):
    items = list(crawl(150, split="test", start=1000, noise=0.6))
    one = K.clean(items, rules=rules, processes=1)
    two = K.clean(iter(items), rules=rules, processes=2, chunksize=16)
    kept1, kept2 = one.collect(), two.collect()
    assert [(c.id, c.title, c.body, c.transforms) for c in kept1] == [(c.id, c.title, c.body, c.transforms) for c in kept2]
    assert one.outcomes == two.outcomes
    assert one.report.to_dict() == two.report.to_dict()


def test_rules_can_be_switched_off(crawl_run, rules):
    items, run, _ = crawl_run
    spam_only = [it for it in items if it.defects == (SPAM,)]
    assert spam_only
    off = K.clean(spam_only, rules=rules, disable=["spam", "perplexity"])
    assert len(off.collect()) == len(spam_only)           # nothing else is wrong with them
    assert "spam" not in off.report.rules
    with pytest.raises(ValueError, match="unknown rule"):
        K.Cleaner(rules, disable=["spelling"])
    only = K.Cleaner([K.ShortTitle(), K.ShortBody()])
    assert [r.name for r in only.rules] == ["short_title", "short_body"]
    gib = [it for it in items if GIBBERISH in it.defects and len(it.defects) == 1]
    assert gib and all(only.process(it)[0].kept for it in gib)    # no LM in this cleaner


def test_short_circuit_keeps_the_same_items(crawl_run, rules):
    items, run, kept = crawl_run
    fast = K.clean(items[:200], rules=rules, short_circuit=True)
    fast_kept = fast.collect()
    assert [c.id for c in fast_kept] == [c.id for c in kept if int(c.id.rsplit("-", 1)[1]) < items[200].seed]
    assert all(len(o.dropped_by) <= 1 for o in fast.outcomes)
    assert sum(len(o.findings) for o in fast.outcomes) < sum(len(o.findings) for o in run.outcomes[:200])


def test_score_counts_by_hand():
    rule = K.Spam()
    f = K.Finding("spam", "spam", "", True)
    outcomes = [
        K.Outcome("a", (SPAM,), False, (f,), {}),     # tp
        K.Outcome("b", (), False, (f,), {}),          # fp
        K.Outcome("c", (SPAM,), True, (), {}),        # fn
        K.Outcome("d", (), True, (), {}),             # tn
        K.Outcome("e", (HTML,), True, (), {}),        # a transform defect only: should be kept (tn overall)
        K.Outcome("f", (MISMATCH,), True, (), {}),    # a dropping defect missed (fn overall)
    ]
    s = K.score(outcomes, [rule])
    assert s.rule("spam")[2:] == (2, 1, 1, 1)         # flagged, tp, fp, fn
    assert s.rule("spam").precision == 0.5 and s.rule("spam").recall == 0.5
    assert s.overall[2:] == (2, 1, 1, 2) and s.overall.recall == pytest.approx(1 / 3)
    assert np.isnan(K.score([], [rule]).rule("spam").precision)
