"""Ask a picture a question: VQA with the kit's models (M6 §4.2, VLMo §4.3, mPLUG §5.2.1), in English or Chinese.

    python apps/vqa.py --port 7862             # http://127.0.0.1:7862 ; --host 0.0.0.0 / --share to open it up

Upload, paste or draw a picture (or pick a Shapes World scene), ask about it, and see the answer, how sure the
model is, what else it considered, and a heat map of where the answer came from, plus the image the model actually
saw (at the side the chosen model reads: 32 px for M6, 64 px for VLMo and mPLUG; the page's title and labels follow
the chosen model). The API endpoint ``/answer`` takes (image, question[, model, heat map method]) and returns the
answer first::

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7862/").predict(handle_file("scene.png"), "what color is the circle?", api_name="/answer")

Models come from the one registry (:func:`mmkit.zoo.vqa_models`: every system registers its VQA models in its
``apps.py``); checkpoints load through :mod:`mmkit.hub` (shipped in the repository, no training at start-up).
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # run from a fresh clone without install

from _common import InputError, OutputPictures, check_port, clean_text, launch, parse_args, unknown_words  # noqa: E402

MAX_QUESTION_CHARS = 200
HEATMAP_METHODS = ("gradcam", "saliency")
DISPLAY = 256                         # side of the shown images (the model's 32 / 64 px, enlarged without smoothing)
EXAMPLE_QUESTIONS = [                 # every question type, English and Chinese
    ("what colour is the circle?", "colour"), ("what shape is the red object?", "shape"),
    ("is the square small or large?", "size"), ("how many objects are there?", "count"),
    ("is there a blue triangle?", "existence"), ("where is the circle?", "position"),
    ("is the circle left of the square?", "relation"),
    ("圆形是什么颜色的？", "colour"), ("红色的物体是什么形状的？", "shape"), ("正方形是大的还是小的？", "size"),
    ("图中一共有几个物体？", "count"), ("图中有蓝色三角形吗？", "existence"), ("圆形在哪里？", "position"),
    ("圆形在正方形的左边吗？", "relation"),
]
BRUSH_COLOURS = ["#dc2626", "#22a046", "#285adc", "#f0c814", "#8c3cbe", "#f58214", "#000000"]   # world colours + black


GALLERY = (3, 10, 21, 42, 57, 64)     # test-split scenes (indices) of the example gallery; the first opens the page


def world_example(index: int, folder: Path) -> tuple[str, str, str]:
    """Render the ``index``-th test-split scene (32 px, enlarged exactly) to a PNG in ``folder``; return (path, a
    question about it, the world's answer)."""
    from PIL import Image

    from mmkit.data.text import sample_question
    from mmkit.data.world import render, sample_scene, split_seeds

    seed = split_seeds("test", index + 1)[index]
    scene = sample_scene(seed)
    path = folder / f"scene_{seed}.png"
    if not path.exists():
        render(scene, 32).resize((DISPLAY, DISPLAY), Image.Resampling.NEAREST).save(path)
    qa = sample_question(scene, "en" if seed % 3 else "zh", seed=seed)
    return str(path), qa.question, qa.answer


def _overlay(image, heat):
    """The seen image enlarged, with the heat map (S, S) in [0, 1] blended on top (inferno colours)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    base = np.asarray(image.resize((DISPLAY, DISPLAY), Image.Resampling.NEAREST), dtype=np.float32) / 255
    h = Image.fromarray((heat.numpy() * 255).astype("uint8"), "L").resize((DISPLAY, DISPLAY), Image.Resampling.BILINEAR)
    h = np.asarray(h, dtype=np.float32)[..., None] / 255
    colour = colormaps["inferno"](h[..., 0])[..., :3]
    out = base * (1 - 0.6 * h) + colour * 0.6 * h
    return Image.fromarray((out.clip(0, 1) * 255).astype("uint8"), "RGB")


def _pass_path_through(image) -> None:
    """Make a gr.Image(type="filepath") hand the uploaded file's path to the app unopened: an unreadable or non-image
    file then gets the app's own clear message (gr.Image would fail first, with a generic one), and a huge picture
    is decoded once, at reduced scale, by mmkit.data.preprocess. (An instance attribute, not a subclass: gradio
    writes a .pyi file next to any module that subclasses a component.)"""
    image.preprocess = lambda payload: None if payload is None else payload.path


def build_demo():
    import gradio as gr
    from PIL import Image

    from mmkit.data.preprocess import ImageInputError, preprocess_image
    from mmkit.tokenizer import world_tokenizer
    from mmkit.zoo import vqa_models

    models = {e.name: e for e in vqa_models()}
    if not models:
        raise SystemExit("no VQA model checkpoint is available; run `mmkit train m6-tiny-vqa` first")
    default_model = next(iter(models))
    models[default_model].model()                      # load now: the first user does not wait for it
    tok = world_tokenizer()
    folder = Path(tempfile.mkdtemp(prefix="mmkit-vqa-"))
    pictures = OutputPictures("vqa")
    examples = [list(world_example(i, folder)[:2]) for i in GALLERY]

    def run(image, question, model_name, method):
        """Preprocess, answer, heat map; every problem becomes a gr.Error with a message (never a traceback), and
        the server stays up for the next request."""
        t0 = time.perf_counter()
        try:
            q = clean_text(question, field="question", max_chars=MAX_QUESTION_CHARS,
                           example="what colour is the circle?")
            if not isinstance(model_name, str) or model_name not in models:
                raise InputError(f"Unknown model {model_name!r}; choose one of {list(models)}.")
            if method not in HEATMAP_METHODS:
                raise InputError(f"Unknown heat map method {method!r}; choose one of {list(HEATMAP_METHODS)}.")
            entry = models[model_name]
            pre = preprocess_image(image, size=entry.image_size)
        except (InputError, ImageInputError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except (OSError, ValueError, TypeError, MemoryError) as e:      # anything else a picture can do
            raise gr.Error(f"This picture cannot be used ({type(e).__name__}: {str(e)[:120]}). Save it as a PNG "
                           "or JPEG and try again.", print_exception=False) from None
        t1 = time.perf_counter()
        try:
            model = entry.model()
            a = entry.answer(model, pre.tensor, q.text)
            t2 = time.perf_counter()
            heat = entry.heatmap(model, pre.tensor, a.question, a.answer, method=method)
        except ValueError as e:                      # the question (too long, no words) or a setting
            raise gr.Error(f"{str(e)[:1].upper()}{str(e)[1:]}", print_exception=False) from None
        except Exception as e:                       # a bug: say so briefly; the log has the traceback
            traceback.print_exc()
            raise gr.Error(f"The model failed on this request ({type(e).__name__}); try another picture or "
                           "question.", print_exception=False) from None
        t3 = time.perf_counter()
        # one log line per answered request (no user content): when the model was busy, so the queue's one-at-a-time
        # promise can be checked from the log (tests/test_app_vqa.py)
        print(f"[vqa] answered by {model_name} in {(t3 - t0) * 1000:.0f} ms (busy {t0:.6f}-{t3:.6f})", flush=True)
        notes = q.notes + pre.notes
        unknown = unknown_words(tok, a.question)
        if unknown:
            notes.append("words the model never saw: " + ", ".join(unknown[:8]))
        if not a.in_vocabulary:
            notes.append("the answer is free text outside the world's answer list")
        label = dict(a.alternatives)
        label.setdefault(a.answer, a.confidence)
        details = (f"**{a.answer}** with probability **{a.confidence:.1%}** · question read as: `{a.question}`  \n"
                   f"answered in **{(t3 - t0) * 1000:.0f} ms** (preprocessing {(t1 - t0) * 1000:.0f} ms, answer "
                   f"{(t2 - t1) * 1000:.0f} ms, heat map {(t3 - t2) * 1000:.0f} ms) by {model_name}"
                   + ("  \n" + "; ".join(notes) if notes else ""))
        seen = pre.image.resize((DISPLAY, DISPLAY), Image.Resampling.NEAREST)
        return (a.answer, label, pictures.save(_overlay(pre.image, heat), "heat"), pictures.save(seen, "seen"),
                details)

    def answer(image, question, model=default_model, heatmap="gradcam"):
        """Answer ``question`` about ``image`` (a file path or URL). Returns the answer text first, then the
        confidence and alternatives, the heat map, the image the model saw, and details (timing, notes)."""
        return run(image, question, model, heatmap)

    def answer_drawing(sketch, question, model=default_model, heatmap="gradcam"):
        comp = sketch.get("composite") if isinstance(sketch, dict) else None
        if comp is None or comp.getbbox() is None or (comp.mode == "RGBA" and comp.getchannel("A").getbbox() is None):
            raise gr.Error("The sketch pad is empty: draw some shapes with the coloured brushes first.",
                           print_exception=False)
        return run(comp, question, model, heatmap)

    def new_scene():
        return world_example(random.randrange(10_000), folder)[:2]

    # The page opens on a world scene, already answered: every output is visible before the first click.
    first = run(*examples[0], default_model, "gradcam")

    def header(name: str) -> str:                    # the page's title line follows the chosen model
        return (f"## Ask a picture a question — {name}\n{models[name].description}.  \n"
                "Shapes (circle, square, triangle) in six colours on a light background, up to 9 per picture. "
                "Ask in English or 中文 about colour, shape, size, count, existence, position or relations.")

    def seen_label(name: str) -> str:
        s = models[name].image_size
        return f"What the model saw ({s}x{s})"

    with gr.Blocks(title="mmkit · VQA") as demo:
        title = gr.Markdown(header(default_model))
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Picture"):
                        image = gr.Image(examples[0][0], type="filepath", sources=["upload", "clipboard"], label="Picture",
                                         height=300)
                        _pass_path_through(image)
                        with gr.Row():
                            random_btn = gr.Button("New random scene")
                            ask_btn = gr.Button("Ask", variant="primary")
                    with gr.Tab("Draw"):
                        sketch = gr.Sketchpad(type="pil", label="Draw shapes (white canvas)", canvas_size=(384, 384),
                                              brush=gr.Brush(colors=BRUSH_COLOURS, default_color=BRUSH_COLOURS[0],
                                                             default_size=8, color_mode="defaults"), height=420)
                        draw_btn = gr.Button("Ask about the drawing", variant="primary")
                question = gr.Textbox(label="Question (English or 中文)", value=examples[0][1],
                                      max_lines=2)
                with gr.Row():
                    model = gr.Dropdown(list(models), value=default_model, label="Model")
                    method = gr.Radio(list(HEATMAP_METHODS), value="gradcam", label="Heat map")
                gr.Examples([[q] for q, _ in EXAMPLE_QUESTIONS], inputs=[question],
                            label="Example questions (every type)")
                gr.Examples(examples, inputs=[image, question], label="Shapes World scenes (held-out test split)")
            with gr.Column(scale=1):
                answer_box = gr.Textbox(first[0], label="Answer", interactive=False)
                confidence = gr.Label(first[1], label="Confidence and top alternatives", num_top_classes=5)
                with gr.Row():
                    heat = gr.Image(first[2], label="Where the answer came from", type="pil", height=260, interactive=False)
                    seen = gr.Image(first[3], label=seen_label(default_model), type="pil", height=260,
                                    interactive=False)
                details = gr.Markdown(first[4])
        outputs = [answer_box, confidence, heat, seen, details]
        ask_btn.click(answer, [image, question, model, method], outputs, api_name="answer")
        question.submit(answer, [image, question, model, method], outputs, api_visibility="private")
        draw_btn.click(answer_drawing, [sketch, question, model, method], outputs, api_name="answer_drawing")
        random_btn.click(new_scene, None, [image, question], api_name="new_scene")
        model.change(lambda name: (header(name), gr.Image(label=seen_label(name))), model, [title, seen],
                     api_visibility="private")
    return demo


def main(argv=None) -> None:
    import torch

    args = parse_args("VQA with the kit's models (M6, VLMo, mPLUG): ask a picture a question.", 7862, argv)
    check_port(args)
    torch.set_num_threads(2)
    demo = build_demo()
    launch(demo, args)


if __name__ == "__main__":
    main()
