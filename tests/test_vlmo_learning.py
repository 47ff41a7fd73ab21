"""A few hundred steps of VLMo's three pretraining stages on a small model and the Shapes World (VLMo §3.4): each stage's
loss falls below the baseline that ignores the input (the code / token prior, chance for ITC). Stages run in order on
one model, as the paper chains them; the image tokenizer is a small randomly initialised VQGAN.

Measured (first 10 -> last 20 steps, 1 thread, ~35 CPU-s): stage 1 MIM 3.66 -> 2.28 (code prior 2.80); stage 2 MLM
5.92 -> 2.62 (token prior 3.29); stage 3 MLM 2.41 -> 1.12 (prior 2.96), ITC 2.77 (= log 16, chance) -> 2.36 with
in-batch i2t accuracy 0.16 (chance 0.06). ITC sits at chance for its first ~100 steps (the [CLS] vectors of different
inputs start almost equal) and ITM at the prior of its 1:2 mix (0.637): the fusion needs longer runs (phase B)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmkit.train import TrainConfig
from mmkit.vlmo.model import VLMo, VLMoConfig
from mmkit.vlmo.tasks.pretrain import ImageData, PairData, PretrainConfig, TextData, run_stage
from mmkit.vqgan.model import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 px images in 4x4 patches (a 4x4 grid), width 48, 2 layers (the VL expert in the top one). init_std 0.05: at this
# width BERT's 0.02 leaves the [CLS] vectors of different inputs almost equal at the start (ITC then sits at chance
# for longer); see the phase-B notes in the report.
CFG = VLMoConfig(d_model=48, n_layers=2, n_heads=4, d_ff=96, n_vl_layers=1, image_size=16, patch_size=4,
                 max_text_len=32, n_image_codes=64, init_std=0.05)
DATA = PretrainConfig(image_size=16, n_images=1000, n_texts=1000, n_pairs=1000, lang="en", text_sources=("caption",),
                      caption_styles=("full", "colour_shape"))


def entropy(values: torch.Tensor, n: int) -> float:
    """Entropy (nats) of the empirical distribution of ``values``: the loss of always predicting that prior."""
    c = torch.bincount(values.flatten(), minlength=n).float()
    p = c[c > 0] / c.sum()
    return float(-(p * p.log()).sum())


def mean(history: list, key: str, part: slice) -> float:
    return statistics.mean(h[key] for h in history[part])


def tc(steps: int, batch: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch, lr=3e-3, warmup_steps=10, progress_bar=False, log_every=0,
                       mixed_precision="no")


@pytest.mark.slow
def test_each_pretraining_stage_learns_above_its_baseline(tok):
    torch.manual_seed(0)
    model = VLMo(CFG)
    vqgan = VQGAN(VQGANConfig(resolution=16, ch=32, ch_mult=(1, 1, 2), z_channels=32, n_embed=64, embed_dim=16,
                              num_res_blocks=1))
    first, last = slice(0, 10), slice(-20, None)

    # stage 1: BEiT masked image modelling (attention + V-FFN)
    images = ImageData.build(DATA, vqgan, CFG.grid_size)
    b = images.batch_fn(torch.Generator().manual_seed(9), 1000)
    prior = entropy(b["codes"][b["bool_masked_pos"]], 64)                   # codes of masked patches, no image read
    h = run_stage(model, 1, images, tc(100, 32), DATA).result.history
    assert mean(h, "loss", last) < prior - 0.25 and mean(h, "loss", last) < mean(h, "loss", first) - 1.0, \
        (mean(h, "loss", first), mean(h, "loss", last), prior)

    # stage 2: text-only MLM (L-FFN; attention and V-FFN frozen)
    texts = TextData.build(DATA, tok, CFG.max_text_len)
    b = texts.batch_fn(torch.Generator().manual_seed(9), 1000)
    prior = entropy(b["mlm_labels"][b["mlm_labels"] >= 0], CFG.vocab_size)
    h = run_stage(model, 2, texts, tc(100, 32), DATA).result.history
    assert mean(h, "loss", last) < prior - 0.4, (mean(h, "loss", first), mean(h, "loss", last), prior)

    # stage 3: ITC + ITM (global hard negatives) + fusion MLM on pairs
    pairs = PairData.build(DATA, tok, CFG.max_text_len)
    b = pairs.batch_fn(torch.Generator().manual_seed(9), 1000)
    prior = entropy(b["mlm_labels"][b["mlm_labels"] >= 0], CFG.vocab_size)
    h = run_stage(model, 3, pairs, tc(250, 16), DATA).result.history
    chance = math.log(16)                                                    # ITC over a batch of 16 pairs
    itm_prior = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))        # 1 positive : 2 negatives
    assert mean(h, "loss", last) < mean(h, "loss", first) - 0.5
    assert mean(h, "itc", first) == pytest.approx(chance, abs=0.05)
    assert mean(h, "itc", last) < chance - 0.2 and mean(h, "i2t_acc", last) > 0.1, mean(h, "itc", last)
    assert mean(h, "mlm", last) < prior - 0.5, (mean(h, "mlm", last), prior)
    assert mean(h, "itm", last) < itm_prior + 0.02                           # at the prior, not diverging
