"""Write the Shapes World in the sharded format of a real corpus (webdataset-style tar shards), and clean raw crawled
pages into shards with the M6 §2.3 rules as a filter pass, so every data path of a full-size run runs here.

    python scaled/make_shards.py data/world --n 4000                     # clean image-caption pairs
    python scaled/make_shards.py data/crawl --n 4000 --kind crawl --clean data/clean   # raw pages, then cleaned
    python scaled/make_shards.py data/crawl --clean data/clean --only-clean             # clean existing shards

A run config then reads them: ``data: {source: shards, path: data/clean}`` (M6 pretraining; see scaled/README.md).
"""
from __future__ import annotations

import argparse
import sys

from mmkit.data.shards import ImageTextShards, clean_shards, write_world_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder the shards go to (shard-000000.tar, ...)")
    p.add_argument("--n", type=int, default=4000, help="samples (default 4000)")
    p.add_argument("--kind", choices=["pairs", "crawl"], default="pairs", help="clean pairs or raw crawled pages")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=64, help="pairs: image side in px (default 64)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--clean", help="also run the M6 cleaning rules over the shards in OUT, writing to this folder")
    p.add_argument("--disable", nargs="*", default=[], help="cleaning rules to leave out (e.g. perplexity)")
    p.add_argument("--only-clean", action="store_true", help="do not write OUT, only clean the shards already there")
    a = p.parse_args(argv)
    if a.n < 1 or a.shard_size < 1:
        p.error("--n and --shard-size must be >= 1")
    if not a.only_clean:
        paths = write_world_shards(a.out, n=a.n, kind=a.kind, shard_size=a.shard_size, split=a.split,
                                   image_size=a.image_size)
        print(f"wrote {len(paths)} shard(s) of {a.kind} to {a.out}")
    if a.clean:
        report = clean_shards(a.out, a.clean, disable=a.disable, shard_size=a.shard_size)
        print(report.table)
        print(report.scores)
        print(f"kept {report.kept} of {report.seen} samples in {len(report.shards)} shard(s) in {a.clean}")
        if report.kept:
            print(ImageTextShards(a.clean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
