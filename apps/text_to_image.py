"""Text-to-image as M6 does it (M6 §4.1): a prompt -> image codes sampled by the code LM -> VQGAN decoder.

    python apps/text_to_image.py                 # http://127.0.0.1:7860
    python apps/text_to_image.py --port 7861 --host 0.0.0.0 --share

    from gradio_client import Client
    gallery, status = Client("http://127.0.0.1:7860/").predict("a small red circle at the top left",
                                                               api_name="/generate")

The generator comes from the one registry (:func:`mmkit.zoo.t2i_models`; M6 registers its code LM in
``mmkit/m6/apps.py``), loaded from the shipped checkpoints (vqgan-world, m6-tiny-t2i and, for reranking,
m6-tiny-itm): nothing is trained on start. Images are shown at 128 px (nearest neighbour, so every generated
pixel stays visible). Each image's caption gives its rank, its image-text matching score and what a pixel check
(mmkit.evaluation.faithfulness) reads in it.
"""
from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a fresh clone without installing

import gradio as gr  # noqa: E402
import torch  # noqa: E402

import _common  # noqa: E402
from mmkit.m6.tasks.t2i import SamplingConfig  # noqa: E402  (the code LM's default sampling settings)

EXAMPLES = [
    "a small red circle at the top left",
    "a large blue square in the center",
    "at the bottom right there is a large yellow triangle",
    "右上方有一个小的绿色三角形",
    "一个大的紫色圆形位于正下方",
    "a large red triangle on the left",          # a colour + shape pair the code LM never saw in training
    "a small red circle at the top left and a large blue square at the bottom",      # two objects
]
EXAMPLE = EXAMPLES[0]
DISPLAY_SIDE = 128                                # images are shown this large (an integer zoom, nearest)
MAX_SAMPLES = 8
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 5.0
MAX_SEED = 2**63 - 1                              # torch.Generator seeds are 64-bit


class T2IApp:
    """The loaded models and the generate() generator behind the page and the API."""

    def __init__(self):
        from mmkit.tokenizer import world_tokenizer
        from mmkit.zoo import t2i_models

        entries = t2i_models()
        if not entries:
            raise SystemExit("no text-to-image checkpoint is available; run `mmkit train m6-tiny-t2i` first")
        self.entry = entries[0]
        self.loaded = self.entry.model()               # load now: the first user does not wait for it
        self.tok = world_tokenizer()
        self.can_rerank = self.entry.can_score(self.loaded)
        self.pictures = _common.OutputPictures("t2i")

    def check_prompt(self, prompt: str | None) -> tuple[str, list[str]]:
        from mmkit.evaluation.faithfulness import parse_prompt

        try:
            clean = _common.clean_text(prompt, field="prompt", max_chars=300, example=EXAMPLE)
        except _common.InputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        unknown = _common.unknown_words(self.tok, clean.text)
        if unknown:
            raise gr.Error(f"Unknown word{'s' * (len(unknown) > 1)}: {', '.join(unknown[:8])}. The model knows the "
                           "Shapes World's words: sizes (small, large), colours (red, green, blue, yellow, purple, "
                           "orange), shapes (circle, square, triangle) and positions (top left ... bottom right, "
                           f"center), in English or Chinese. Try: {EXAMPLE}", print_exception=False)
        if not parse_prompt(clean.text):
            raise gr.Error("The prompt names no shape. Name one: circle, square or triangle (圆形, 正方形, 三角形), "
                           f"e.g. {EXAMPLE}", print_exception=False)
        return clean.text, clean.notes

    def check_settings(self, top_k, temperature, n_samples, seed) -> dict:
        """The sampling settings as the generator takes them, or a gr.Error naming the bad one and its range.

        Checked here, before anything runs: the samples come from a lazy generator, so a setting it refused (a seed
        of 10**30) used to fail inside the loop below, outside any error handling."""
        def number(name, v, lo, hi, whole=False):
            kind = "a whole number" if whole else "a number"
            bad = gr.Error(f"{name} must be {kind} from {lo} to {hi}, got {v!r}.", print_exception=False)
            if isinstance(v, bool):
                raise bad
            if isinstance(v, int):                        # exact, even beyond float precision (seeds)
                x = v
            else:
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    raise bad from None
                if not math.isfinite(x) or (whole and x != int(x)):
                    raise bad
                x = int(x) if whole else x
            if not lo <= x <= hi:
                raise bad
            return x

        k = number("top-k", 0 if top_k is None else top_k, 0, self.entry.n_codes, whole=True)   # 0 = all codes
        return dict(n_samples=number("samples", n_samples, 1, MAX_SAMPLES, whole=True), top_k=k or None,
                    temperature=number("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
                    seed=number("seed", seed, 0, MAX_SEED, whole=True))

    def generate(self, prompt: str, top_k: float = 8, temperature: float = SamplingConfig.temperature,
                 n_samples: float = 4, seed: float = 0, rerank: bool = True):
        """Yield (gallery, status) after every sample, then the reranked gallery."""
        from mmkit.evaluation.faithfulness import faithfulness

        text, notes = self.check_prompt(prompt)
        kw = self.check_settings(top_k, temperature, n_samples, seed)
        n = kw["n_samples"]
        t0 = time.perf_counter()
        images, gallery = [], []
        note = (" (" + "; ".join(notes) + ")") if notes else ""
        try:
            for k, img in enumerate(self.entry.samples(self.loaded, text, **kw)):
                images.append(img)
                check = faithfulness(img, text)
                gallery.append((self.pictures.save(_display(img), "sample"), f"sample {k + 1}: {_verdict(check)}"))
                yield gallery, f"Drawing sample {k + 1} of {n}{note} ..."
        except (TypeError, ValueError) as e:              # a prompt or setting the generator refuses
            raise gr.Error(f"Cannot draw this: {e}", print_exception=False) from None
        except Exception as e:                           # a bug: say so briefly; the log has the traceback
            traceback.print_exc()
            raise gr.Error(f"The generator failed ({type(e).__name__}); try another prompt or setting.",
                           print_exception=False) from None
        secs = time.perf_counter() - t0
        status = f"{len(images)} samples in {secs:.1f} s ({secs / len(images):.2f} s per image){note}."
        if rerank and self.can_rerank:
            stack = torch.stack(images)                                                  # (N, 3, S, S)
            scores = self.entry.score(self.loaded, stack, text)
            order = scores.argsort(descending=True, stable=True).tolist()
            gallery = [(gallery[i][0], f"#{r + 1} ITM {float(scores[i]):.2f} · {gallery[i][1]}")
                       for r, i in enumerate(order)]
            status += " Reranked by M6's image-text matching score (best first)."
        elif rerank:
            status += " Reranking is off: the m6-tiny-itm checkpoint is not installed."
        yield gallery, status


def _display(img: torch.Tensor):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr)
    zoom = max(1, DISPLAY_SIDE // pil.width)
    return pil.resize((pil.width * zoom, pil.height * zoom), Image.NEAREST)


def _verdict(check) -> str:
    if not check.detected:
        return "no object found"
    mark = "✓ matches the prompt" if check.ok else "✗ differs from the prompt"
    reads = "; ".join(f"{d.size} {d.colour} {d.shape}, {d.position}" for d in check.detected)
    return f"{mark} (reads: {reads})"


def build_demo(app: T2IApp) -> gr.Blocks:
    with gr.Blocks(title="mmkit · text-to-image (M6 §4.1)") as demo:
        side, grid = app.entry.image_size, app.entry.code_grid
        gr.Markdown("## Text-to-image as M6 does it\nA prompt in English or Chinese → the code "
                    f"LM (pretrained M6 with image-code embeddings) samples {grid}×{grid} VQGAN codes → the VQGAN "
                    f"decoder paints {side} px. Samples appear as they finish; the rerank switch orders them by M6's "
                    "image-text matching.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt (English or Chinese)", value=EXAMPLE, lines=2, max_lines=4)
                gr.Examples(EXAMPLES, inputs=[prompt])
                with gr.Row():
                    top_k = gr.Slider(0, app.entry.n_codes, value=8, step=1, label="top-k (0 = all codes)")
                    temperature = gr.Slider(0.1, 2.0, value=SamplingConfig.temperature, step=0.05,
                                            label="temperature")
                with gr.Row():
                    n_samples = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples")
                    seed = gr.Number(value=0, precision=0, label="seed")
                rerank = gr.Checkbox(value=True, label="rerank with image-text matching",
                                     interactive=app.can_rerank)
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Samples", columns=4, height="auto", object_fit="contain")
                status = gr.Markdown()
        inputs = [prompt, top_k, temperature, n_samples, seed, rerank]
        button.click(app.generate, inputs, [gallery, status], api_name="generate")
        prompt.submit(app.generate, inputs, [gallery, status], api_name=False)
    return demo


def main(argv=None) -> None:
    args = _common.parse_args("mmkit text-to-image (M6 §4.1)", 7860, argv)
    _common.check_port(args)
    t0 = time.perf_counter()
    app = T2IApp()
    print(f"models loaded in {time.perf_counter() - t0:.1f} s (rerank: {'on' if app.can_rerank else 'unavailable'})",
          flush=True)
    _common.launch(build_demo(app), args)


if __name__ == "__main__":
    main()
