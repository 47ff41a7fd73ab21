"""scaled/ data path: the world written as webdataset-style tar shards, read back by random access, crawled pages
cleaned by the M6 §2.3 rules as a filter pass over shards, and M6 pretraining run on the cleaned shards."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import mmkit.zoo  # noqa: F401  (registers the run tasks)
from mmkit.data.datasets import ImageTextDataset
from mmkit.data.shards import ImageTextShards, clean_shards, read_samples, write_world_shards
from mmkit.runs import load_run_config, run
from mmkit.train import end_training

ROOT = Path(__file__).resolve().parent.parent


def test_world_pairs_round_trip_through_shards(tmp_path):
    paths = write_world_shards(tmp_path / "w", n=20, shard_size=8, image_size=32, lang="en")
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[0]) as tar:                        # the webdataset convention: KEY.png / .txt / .json
        names = tar.getnames()
    assert len(names) == 24 and names[0].endswith(".png") and names[1].endswith(".txt") and names[2].endswith(".json")
    ds = ImageTextShards(tmp_path / "w", image_size=32)
    ref = ImageTextDataset("train", 20, lang="en", image_size=32)
    assert len(ds) == 20 and ds.skipped == 0
    for i in (0, 9, 19):                                       # random access across shards: the same pairs
        a, b = ds[i], ref[i]
        assert a["text"] == b["text"] and a["seed"] == b["seed"]
        assert torch.allclose(a["image"], b["image"], atol=1 / 255 + 1e-6)   # PNG keeps the uint8 render
    assert sum(1 for _ in read_samples(tmp_path / "w")) == 20      # the streaming read sees every sample once
    with pytest.raises(FileNotFoundError, match="write some"):
        ImageTextShards(tmp_path / "nothing")


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    r = subprocess.run([sys.executable, str(ROOT / "scaled" / "make_shards.py"), str(tmp / "crawl"), "--n", "40",
                        "--kind", "crawl", "--shard-size", "16", "--clean", str(tmp / "clean")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp, r.stdout


def test_m6_cleaning_rules_as_a_filter_pass_over_shards(cleaned):
    tmp, stdout = cleaned
    assert "wrote 3 shard(s) of crawl" in stdout
    kept = ImageTextShards(tmp / "clean", image_size=32)
    assert 0 < len(kept) < 40 and f"kept {len(kept)} of 40 samples" in stdout
    # the pass is a filter: cleaning the cleaned shards again removes nothing
    again = clean_shards(tmp / "clean", tmp / "clean2", shard_size=16)
    assert again.seen == again.kept == len(kept)


def test_m6_pretraining_reads_the_cleaned_shards(cleaned, tmp_path):
    tmp, _ = cleaned
    cfg = load_run_config(ROOT / "scaled" / "configs" / "runs" / "tiny" / "m6_base_pretrain.yaml",
                          [f"out_dir={tmp_path / 'run'}", "init_from=null", "data.source=shards",
                           f"data.path={tmp / 'clean'}", "train.steps=2"])
    try:
        r = run(cfg)
    finally:
        end_training()
    assert r.result.step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in r.result.history)
