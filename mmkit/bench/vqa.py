"""VQA accuracy beside the app's speed: every served model's held-out accuracy (world renderings and augmented,
drawn-style views, against the blind answer prior of the same questions), then answer latency (median, 95th
percentile) and answers per second with concurrent clients.

    mmkit bench vqa                                # accuracy on 20 test scenes, then apps/vqa.py on a free port
    mmkit bench vqa --accuracy-scenes 400          # the recipes' test set (2665 questions per view)
    mmkit bench vqa --accuracy-scenes 0            # speed only
    mmkit bench vqa --url http://127.0.0.1:7862/   # against an app that is already running
    mmkit bench vqa --requests 60 --clients 8 --per-client 10

What a user waits for: one ``/answer`` call through ``gradio_client`` (upload of a 96 px world scene, queueing,
preprocessing, greedy answer, scoring of the 35 answer candidates, the Grad-CAM heat map, the response). First the
latency of ``--requests`` sequential calls from one client (after 3 warm-up calls), then ``--clients`` clients
each sending ``--per-client`` calls at once: answers per second = all calls / wall time (the app queues them and
answers one at a time: one model, 2 cores). In-process ``answer()`` + heat map latency is measured too, so the
gradio overhead shows. Accuracy asks each model exactly what the app asks it (its zoo entry's ``answer``, one
question at a time), so it is the accuracy a visitor meets. No asserts: a benchmark only measures, on a shared,
noisy machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from gradio_client import Client, handle_file

from mmkit.bench import nonnegative_int, positive_int
from mmkit.launch import running_app
from mmkit.data.preprocess import preprocess_image
from mmkit.data.scenes import SceneBank
from mmkit.data.vqa import eval_questions, question_language
from mmkit.evaluation.vqa import prior_eval, score_answers, world_answer_prior
from mmkit.data.world import make_scene, render
from mmkit.zoo import vqa_models

QUESTIONS = ["what colour is the circle?", "where is the square?", "how many objects are there?",
             "三角形是什么颜色的？", "is there a blue square?", "what shape is the yellow object?"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkit bench vqa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running app (default: start apps/vqa.py on a free port)")
    p.add_argument("--requests", type=positive_int, default=40, help="sequential calls for the latency (default 40)")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--per-client", type=positive_int, default=10, help="calls per concurrent client (default 10)")
    p.add_argument("--accuracy-scenes", type=nonnegative_int, default=20,
                   help="held-out test scenes each model answers about (one question per type each; 0: skip)")
    return p


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _scene_file(folder: Path) -> Path:
    scene = make_scene([("circle", "red", "large", "top left"), ("square", "blue", "small", "bottom right"),
                        ("triangle", "yellow", "large", "center")])
    path = folder / "scene.png"
    render(scene, 96).save(path)
    return path


def _in_process_ms(path: Path, n: int = 30) -> tuple[float, float]:
    torch.set_num_threads(2)
    entry = vqa_models()[0]
    model = entry.model()
    times = []
    for k in range(n + 3):
        t0 = time.perf_counter()
        x = preprocess_image(path).tensor
        a = entry.answer(model, x, QUESTIONS[k % len(QUESTIONS)])
        entry.heatmap(model, x, a.question, a.answer)
        if k >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, _percentile(times, 0.95) * 1000


def accuracy(n_scenes: int) -> list[dict]:
    """Held-out accuracy of every available zoo VQA model on ``n_scenes`` test scenes, clean and augmented views."""
    torch.set_num_threads(2)
    prior, rows = world_answer_prior(), []
    for entry in vqa_models():
        model = entry.model()
        bank = SceneBank.build("test", n_scenes, image_size=entry.image_size, n_augmented=n_scenes)
        row = {"model": entry.name}
        for view, aug in (("test", False), ("augmented", True)):
            t0 = time.perf_counter()
            records = []
            for i, qa in eval_questions(bank.scenes):
                got = entry.answer(model, bank.image(i, aug), qa.question)
                records.append((qa.question, qa.answer, got.answer, qa.qtype, question_language(qa.question)))
            ev = score_answers(records)
            row.update({view: ev.accuracy, f"{view}_min_type": min(ev.per_type.items(), key=lambda kv: kv[1]),
                        f"{view}_ms_per_answer": (time.perf_counter() - t0) * 1000 / len(records)})
        # both views ask the same questions: one blind baseline
        row["blind"], row["n_questions"] = prior_eval(prior, ev).accuracy, ev.n_questions
        rows.append(row)
        lo, lo_aug = row["test_min_type"], row["augmented_min_type"]
        print(f"{entry.name:<14} held-out {row['test']:.3f} (lowest type {lo[0]} {lo[1]:.2f})   augmented views "
              f"{row['augmented']:.3f} (lowest {lo_aug[0]} {lo_aug[1]:.2f})   blind prior {row['blind']:.3f}   "
              f"{row['n_questions']} questions, {row['test_ms_per_answer']:.0f} ms an answer")
    return rows


def measure(url: str, path: Path, requests: int, clients: int, per_client: int) -> dict:
    client = Client(url, verbose=False)
    for q in QUESTIONS[:3]:
        client.predict(handle_file(str(path)), q, api_name="/answer")                    # warm-up
    lat = []
    for k in range(requests):
        t0 = time.perf_counter()
        client.predict(handle_file(str(path)), QUESTIONS[k % len(QUESTIONS)], api_name="/answer")
        lat.append(time.perf_counter() - t0)

    def user(i: int) -> list[float]:
        c = Client(url, verbose=False)
        out = []
        for k in range(per_client):
            t0 = time.perf_counter()
            c.predict(handle_file(str(path)), QUESTIONS[(i + k) % len(QUESTIONS)], api_name="/answer")
            out.append(time.perf_counter() - t0)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        waits = [w for ws in pool.map(user, range(clients)) for w in ws]
    wall = time.perf_counter() - t0
    return {"latency_median_ms": statistics.median(lat) * 1000, "latency_p95_ms": _percentile(lat, 0.95) * 1000,
            "requests": requests, "clients": clients, "answers": len(waits),
            "answers_per_second": len(waits) / wall, "concurrent_wait_median_ms": statistics.median(waits) * 1000,
            "concurrent_wait_p95_ms": _percentile(waits, 0.95) * 1000}


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv or [])
    folder = Path(tempfile.mkdtemp(prefix="mmkit-bench-vqa-"))
    path = _scene_file(folder)
    print(f"mmkit bench vqa: {os.cpu_count()} CPUs visible; load average {os.getloadavg()[0]:.1f}")
    acc = accuracy(args.accuracy_scenes) if args.accuracy_scenes else []
    if args.url:
        res = measure(args.url, path, args.requests, args.clients, args.per_client)
    else:
        with running_app("apps/vqa.py") as app:
            res = measure(app.url, path, args.requests, args.clients, args.per_client)
    med, p95 = _in_process_ms(path)
    res.update(in_process_median_ms=med, in_process_p95_ms=p95, accuracy=acc)
    print(f"latency, one client, {res['requests']} calls:   median {res['latency_median_ms']:.0f} ms, "
          f"p95 {res['latency_p95_ms']:.0f} ms")
    print(f"{res['clients']} concurrent clients, {res['answers']} calls: {res['answers_per_second']:.1f} answers/s "
          f"(each waited median {res['concurrent_wait_median_ms']:.0f} ms, p95 {res['concurrent_wait_p95_ms']:.0f} ms)")
    print(f"in-process answer() + heat map (no gradio): median {med:.0f} ms, p95 {p95:.0f} ms")
    return res
