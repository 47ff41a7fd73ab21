"""M6 §4.1 text-to-image: the code LM, restricted / cached sampling, reranking, and the pixel faithfulness check."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LogitsProcessorList

from mmkit.data.world import make_scene, scene_to_tensor
from mmkit.evaluation.faithfulness import Wanted, detect_objects, faithfulness, faithfulness_score, parse_prompt
from mmkit.generation import HFGenerationAdapter
from mmkit.m6.model import M6T2I, M6T2IConfig
from mmkit.m6.tasks.t2i import (HELDOUT_PAIRS, CodeOnlyProcessor, SamplingConfig, T2IDataConfig, eval_prompts,
                                generate_codes, rerank, t2i_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> M6T2IConfig:
    base = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=400 + 16, code_offset=400, n_codes=16,
                code_grid=4, feature_channels=(8, 16, 32), max_text_len=32)
    base.update(kw)
    return M6T2IConfig(**base)


def drawn(shape: str, rgb, box, size: int = 32) -> torch.Tensor:
    """A test-drawn image: one shape on white, drawn at 8x and downsampled (anti-aliased like the world)."""
    s = 8
    img = Image.new("RGB", (size * s, size * s), (250, 250, 250))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * size * s for v in box)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    img = img.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


# --- faithfulness: a model-free pixel check ----------------------------------------------------------------

def test_faithfulness_on_hand_drawn_images():
    prompt = "a small red circle at the top left"
    red_circle = drawn("circle", (220, 40, 40), (0.09, 0.09, 0.25, 0.25))          # top-left cell, ~5 px wide
    r = faithfulness(red_circle, prompt)
    assert r.ok, r
    d = r.detected[0]
    assert (d.colour, d.shape, d.size, d.position) == ("red", "circle", "small", "top left")
    blue_square = drawn("square", (40, 90, 220), (0.09, 0.09, 0.25, 0.25))
    r = faithfulness(blue_square, prompt)
    assert not r.ok and r.attributes["colour"] == (0, 1) and r.attributes["shape"] == (0, 1)
    assert r.attributes["position"] == (1, 1) and r.attributes["size"] == (1, 1)
    big_triangle = drawn("triangle", (245, 130, 20), (0.55, 0.6, 0.82, 0.87))     # bottom right, ~9 px
    r = faithfulness(big_triangle, "一个大的橙色三角形位于右下方")
    assert r.ok, r
    blank = torch.full((3, 32, 32), 0.97)
    r = faithfulness(blank, prompt)
    assert not r.ok and not r.count_ok and r.detected == []


def test_faithfulness_on_rendered_world_scenes():
    # every attribute of every jitter-free world object is read back from 32 px pixels
    specs = [(s, c, z, p) for s, c, z, p in [("circle", "red", "small", "top left"), ("square", "blue", "large", "center"),
                                             ("triangle", "yellow", "large", "bottom right"),
                                             ("triangle", "purple", "small", "top"), ("square", "green", "small", "left"),
                                             ("circle", "orange", "large", "bottom left")]]
    images = [scene_to_tensor(make_scene([s]), 32) for s in specs]
    wanted = [[Wanted(*s)] for s in specs]
    assert faithfulness_score(images, wanted)["all_right"] == 1.0
    two = scene_to_tensor(make_scene(specs[:2]), 32)
    assert faithfulness(two, "a small red circle at the top left and a large blue square in the center").ok
    assert not faithfulness(two, "a small red circle at the top left").ok        # one object too many


def test_parse_prompt_english_and_chinese():
    assert parse_prompt("a small red circle at the top left") == [Wanted("circle", "red", "small", "top left")]
    assert parse_prompt("at the bottom right there is a large yellow triangle") == [
        Wanted("triangle", "yellow", "large", "bottom right")]
    assert parse_prompt("左上方有一个小的红色圆形") == [Wanted("circle", "red", "small", "top left")]
    assert parse_prompt("一个大的蓝色正方形位于正下方") == [Wanted("square", "blue", "large", "bottom")]
    assert parse_prompt("a red circle and a large green square on the right") == [
        Wanted("circle", "red", None, None), Wanted("square", "green", "large", "right")]
    assert parse_prompt("hello world") == []


# --- the code LM ------------------------------------------------------------------------------------------

def test_from_pretrained_m6_adds_code_rows_and_keeps_words():
    from mmkit.m6.model import M6Config, M6Model

    torch.manual_seed(0)
    m6 = M6Model(M6Config(vocab_size=400, d_model=32, n_layers=2, n_heads=2, d_ff=64, feature_channels=(8, 16, 32),
                          max_text_len=32)).eval()
    t2i = M6T2I.from_pretrained_m6(m6, n_codes=16, code_grid=4).eval()
    assert t2i.config.vocab_size == 416 and t2i.config.code_offset == 400
    assert torch.equal(t2i.wte.weight[:400], m6.wte.weight)
    assert t2i.lm_head.weight is t2i.wte.weight                                   # M6 §3.2: tied output layer
    enc = torch.tensor([[7, 8, 9]])
    dec = torch.tensor([[5, 10, 11]])
    # word logits of the fine-tuning start = the pretrained model's
    torch.testing.assert_close(t2i(None, enc, dec).logits[..., :400], m6(None, enc, dec).logits)


def test_restricted_sampling_only_emits_codes():
    torch.manual_seed(0)
    model = M6T2I(tiny_config()).eval()
    enc = torch.randint(7, 400, (6, 5))
    for s in (SamplingConfig(top_k=None, temperature=5.0, seed=1), SamplingConfig(top_k=3, top_p=0.9, seed=2)):
        codes = generate_codes(model, enc, s)
        assert codes.shape == (6, 4, 4) and int(codes.min()) >= 0 and int(codes.max()) < 16
    # unrestricted sampling at a high temperature does draw word ids: the processor is what prevents them
    free = model.generate(None, enc, 16, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert bool((free.sequences < 400).any())
    # the same processor inside transformers' generate()
    hf = HFGenerationAdapter(model)
    out = hf.generate(encoder_ids=enc, max_new_tokens=16, do_sample=True, top_k=0, temperature=5.0,
                      logits_processor=LogitsProcessorList([CodeOnlyProcessor.for_model(model)]))
    assert out.shape == (6, 17) and bool((out[:, 1:] >= 400).all())


def test_cached_sampling_equals_uncached_for_a_fixed_seed():
    torch.manual_seed(1)
    model = M6T2I(tiny_config()).eval()
    enc = torch.randint(7, 400, (3, 6))
    enc[1, 4:] = 0                                                                # encoder padding
    for s in (SamplingConfig(top_k=8, seed=5), SamplingConfig(top_k=None, top_p=0.8, temperature=0.7, seed=6)):
        cached = generate_codes(model, enc, s)
        uncached = generate_codes(model, enc, SamplingConfig(**{**s.__dict__, "use_cache": False}))
        assert torch.equal(cached, uncached)
    a = generate_codes(model, enc, SamplingConfig(seed=5))
    b = generate_codes(model, enc, SamplingConfig(seed=7))
    assert not torch.equal(a, b)                                                  # the seed matters


def test_code_lm_learns_prompt_to_codes():
    # four prompts, four fixed code images: the LM must read the prompt to get the codes right
    from mmkit.train import TrainConfig, train

    torch.manual_seed(0)
    model = M6T2I(tiny_config())
    prompts = torch.tensor([[10, 20, 30], [10, 21, 30], [11, 20, 31], [11, 21, 31]])
    codes = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(0))

    def batch_fn(g, B):
        rows = torch.randint(4, (B,), generator=g)
        ids = codes[rows] + 400
        return {"encoder_ids": prompts[rows], "labels": ids,
                "decoder_input_ids": torch.cat([torch.full((B, 1), 5), ids[:, :-1]], 1)}

    res = train(model, t2i_loss, batch_fn, TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=10,
                                                       progress_bar=False, log_every=0, mixed_precision="no"))
    first, last = res.history[0]["loss"], sum(h["loss"] for h in res.history[-5:]) / 5
    assert last < first - 2.0, (first, last)                                      # ln(416) = 6.0 at the start
    model.eval()
    got = generate_codes(model, prompts, SamplingConfig(top_k=1, seed=0)).flatten(1)
    assert (got == codes).float().mean() > 0.9


def test_rerank_orders_samples_by_the_scorer():
    images = torch.rand(2, 3, 3, 8, 8)
    images[0, 2] = 1.0                                                            # brightest = best for this scorer
    images[1, 0] = 1.0
    ranked = rerank(images, ["a", "b"], scorer=lambda im, texts: im.mean(dim=(1, 2, 3)))
    assert ranked.order[:, 0].tolist() == [2, 0]
    assert torch.equal(ranked.best[0], images[0, 2]) and ranked.scores.shape == (2, 3)
    with pytest.raises(ValueError, match="rerank expects"):
        rerank(images[0], ["a"], scorer=lambda im, t: im.mean((1, 2, 3)))


def test_heldout_pairs_are_kept_out_of_training_and_form_the_unseen_set():
    from mmkit.data.world import sample_scene, split_seeds
    from mmkit.m6.tasks.t2i import scene_ok

    train_cfg = T2IDataConfig()
    kept = [s for s in (sample_scene(i, 1, 1) for i in split_seeds("train", 300)) if scene_ok(s, train_cfg)]
    assert 200 < len(kept) < 300
    assert not any((o.colour, o.shape) in HELDOUT_PAIRS for s in kept for o in s.objects)
    unseen = eval_prompts(12, "unseen_pairs")
    assert all((s.objects[0].colour, s.objects[0].shape) in HELDOUT_PAIRS for s in unseen.scenes)
    assert any("红色" in p or "绿色" in p or "蓝色" in p for p in unseen.prompts)   # Chinese prompts too
    seen = eval_prompts(12, "heldout")
    assert all(s.seed >= 20_000_000 for s in seen.scenes)                          # test split


def test_scenes_are_drawn_on_the_one_studio_backdrop():
    """T2IDataConfig.studio_backdrop: the training images and the evaluation scenes share world.STUDIO, whatever
    backdrop each scene sampled; the objects stay the scene's own."""
    from mmkit.data.scenes import SceneBank, on_backdrop, sample_scenes
    from mmkit.data.world import STUDIO

    own = sample_scenes("test", 6, min_objects=1, max_objects=1)
    assert len({s.background for s in own}) > 1                                   # sampled shades differ
    bank = SceneBank.build("test", 6, image_size=32, min_objects=1, max_objects=1, backdrop=STUDIO)
    assert [s.objects for s in bank.scenes] == [s.objects for s in own]
    assert all(s.background == STUDIO for s in bank.scenes)
    top_left = bank.images_u8[:, :, 0, 0]                                        # (N, 3): the first row's colour
    assert bool((top_left == torch.tensor(STUDIO.top, dtype=torch.uint8)).all()), top_left
    assert on_backdrop(own, None) == own
    assert all(s.background == STUDIO for s in eval_prompts(6, "two_objects").scenes)


def test_shipped_code_lm_meets_the_faithfulness_targets():
    """Issue 12 on prompts the recipe never evaluated (test split, from seed offset 2000): the first sample is fully
    right (count, colour, shape, size, position of every object) for >= 0.70 of held-out prompts and of unseen
    colour + shape pairs, and for >= 0.5 of two-object prompts; each far above the blind baseline of the same prompts
    (another scene's real image)."""
    import mmkit
    from mmkit.data.scenes import render_uint8
    from mmkit.evaluation.faithfulness import faithfulness_score, wanted_from_scene
    from mmkit.m6.tasks.t2i import evaluate_t2i

    tok = mmkit.load("tokenizer-world")             # mmkit.load: the zoo registers the VQGAN (mmkit.hub alone did not)
    model, vqgan = mmkit.load("m6-tiny-t2i"), mmkit.load("vqgan-world")
    # measured on these prompts (default sampling: top-k 8, T 0.5): held-out 0.919, unseen pairs 0.719 (shape 0.78:
    # the colour's usual shapes win), two objects 0.698; blind 0.00-0.02
    for kind, n, target in (("heldout", 160, 0.70), ("unseen_pairs", 160, 0.70), ("two_objects", 96, 0.5)):
        ep = eval_prompts(n, kind, start=2000)
        res = evaluate_t2i(model, vqgan, tok, ep, SamplingConfig(n_samples=1, seed=0))
        real = torch.stack([render_uint8(s, vqgan.config.resolution) for s in ep.scenes]).float() / 255
        blind = faithfulness_score(real.roll(1, 0), [wanted_from_scene(s) for s in ep.scenes])["all_right"]
        print(kind, {k: round(v, 3) for k, v in res.items() if k.startswith("first_")}, "blind", blind)
        assert res["first_all_right"] >= target and res["first_all_right"] >= blind + 0.4, (kind, res, blind)


def test_bad_sampling_settings_fail_when_made_not_inside_the_sampler(tok):
    """Issue 17: seed=10**30 raised ValueError from torch.Generator.manual_seed inside the lazy sample generator, where
    the app's error handling no longer reached; now SamplingConfig refuses it (and the other bad settings) up front."""
    for kw, message in ((dict(seed=10**30), r"seed must be a whole number from 0 to 9223372036854775807"),
                        (dict(seed=-1), "seed must be"), (dict(seed=1.5), "seed must be"),
                        (dict(n_samples=0), "n_samples"), (dict(n_samples=10**6), "n_samples"),
                        (dict(temperature=float("nan")), "temperature"), (dict(temperature=0), "temperature"),
                        (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**kw)
    assert SamplingConfig(seed=2**63 - 1).seed == 2**63 - 1 and SamplingConfig(seed=np.int64(3)).seed == 3
    from mmkit.m6.tasks.t2i import encode_prompts
    with pytest.raises(ValueError, match=r"the prompt is too long: \d+ tokens, the model reads at most 48"):
        encode_prompts(tok, ["a small red circle at the top left " * 10])      # was silently cut to 48 tokens
    assert encode_prompts(tok, ["a small red circle"]).shape == (1, 4)
    for bad, message in (([], "no prompts given"), ([""], "has no words"), (["\x00\x07"], "has no words"),
                         (["?!"], "has no words")):                            # were drawn from a lone [UNK]
        with pytest.raises(ValueError, match=message):
            encode_prompts(tok, bad)
