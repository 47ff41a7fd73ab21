"""VQGAN tokenizer speed: encode (images -> codes) and decode (codes -> images) in images per second.

    mmkit bench vqgan                                   # the vqgan-world-tiny preset, batch sizes 1 and 32
    mmkit bench vqgan --config vqgan-world-tiny --batch-sizes 1 8 32 --threads 1 --repeats 9

Random weights (speed does not depend on them) and random images at the config's resolution. Encode and decode
are timed in alternation at each batch size (median of ``--repeats`` calls each, after warm-up), so that noise
from other processes on the shared cores hits both alike; the table shows images/s and ms per call. No asserts:
a benchmark only measures. What it means for text-to-image: decoding N samples' codes costs one decode
call of batch N; encoding the training set for the code LM is a one-off pass.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmkit.zoo import build_model, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkit bench vqgan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vqgan-world-tiny", help="preset name or YAML path (default: vqgan-world-tiny)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default: 1 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per (operation, batch size); median reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return p


def run(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("loss."))
    print(f"VQGAN {args.config}: {cfg.resolution} px -> {cfg.grid_size}x{cfg.grid_size} codes of {cfg.n_embed}, "
          f"{n_params / 1e6:.2f}M autoencoder parameters, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'encode img/s':>13} {'ms/call':>9} {'decode img/s':>13} {'ms/call':>9}")
    rows = []
    for bs in args.batch_sizes:
        g = torch.Generator().manual_seed(bs)
        images = torch.rand(bs, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
        codes = torch.randint(0, cfg.n_embed, (bs, cfg.grid_size, cfg.grid_size), generator=g)
        ops = {"encode": lambda: model.encode(images), "decode": lambda: model.decode(codes)}
        with torch.inference_mode():
            for fn in ops.values():                     # warm-up
                fn()
            times = {k: [] for k in ops}
            for _ in range(max(1, args.repeats)):
                for k, fn in ops.items():               # alternate, so both see the same background load
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch_size": bs, **{f"{k}_images_per_s": bs / med[k] for k in ops}, **{f"{k}_ms": 1e3 * med[k] for k in ops}}
        rows.append(row)
        print(f"{bs:>6} {row['encode_images_per_s']:>13.1f} {row['encode_ms']:>9.1f} "
              f"{row['decode_images_per_s']:>13.1f} {row['decode_ms']:>9.1f}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    run(sys.argv[1:])
