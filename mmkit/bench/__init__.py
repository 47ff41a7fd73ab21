"""Benchmarks behind ``mmkit bench NAME``: each module here exposes ``run(argv: list[str])``.

Benchmarks measure alternatives *side by side in one run* and print ratios; they never assert (this CPU is
shared and noisy, so only ratios measured together mean anything). Tests prove behaviour, benchmarks measure
speed. List them with ``mmkit bench --list``; every benchmark takes ``--help``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable


def int_at_least(minimum: int, what: str):
    """argparse type: a whole number >= ``minimum``, with a message naming the value."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be {what}")
        return v
    return parse


positive_int = int_at_least(1, "at least 1")           # sizes, counts, repeats
nonnegative_int = int_at_least(0, "0 or more")         # threads (0 = torch's choice), warm-up steps


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The median (not the mean) shrugs off the odd slow call caused by another process on the shared cores.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
