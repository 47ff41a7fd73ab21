"""VLMo stagewise pretraining pieces (mmkit/vlmo/masking.py, mmkit/vlmo/tasks/pretrain.py): BEiT block masks by hand,
MIM codes lined up with the patch grid, whole-word MLM inputs, which parameters each stage moves (frozen ones stay
bit-identical), and the stage-3 loss rebuilt by hand from its parts. The 2-process test is in
test_vlmo_distributed.py, the learning run in test_vlmo_learning.py."""
from __future__ import annotations

import pytest
import torch

from mmkit.objectives import IGNORE_INDEX, itc_loss, itm_labels, itm_loss, mlm_loss
from mmkit.train import TrainConfig
from mmkit.vlmo.masking import block_mask, block_masks, n_masked_patches
from mmkit.vlmo.model import IMAGE_TYPE, SECOND_IMAGE_TYPE, TEXT_TYPE, VLMo, VLMoConfig, VLMoForVQA
from mmkit.vlmo.tasks.pretrain import (STAGE_TRAINS, ImageData, PairData, PretrainConfig, TextData, copy_expert,
                                       mim_codes, mlm_inputs, prepare_stage, run_stage, same_slice, vl_losses)
from mmkit.vqgan.model import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = VLMoConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, n_vl_layers=1, image_size=16, patch_size=4,
                 max_text_len=48, n_image_codes=32)
DATA = PretrainConfig(image_size=16, n_images=24, n_texts=24, n_pairs=24, lang="both")


def tiny_vqgan(seed: int = 0) -> VQGAN:
    """A randomly initialised VQGAN reading 16 px images: downsampling 4 -> a 4x4 code grid (= CFG's patch grid)."""
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(resolution=16, ch=32, ch_mult=(1, 1, 2), z_channels=32, n_embed=32, embed_dim=8,
                             num_res_blocks=1)).eval()


def components(mask: torch.Tensor) -> int:
    """Number of 4-connected components of True cells in an (h, w) bool grid."""
    seen, n = set(), 0
    cells = {(int(i), int(j)) for i, j in mask.nonzero()}
    for c in cells:
        if c in seen:
            continue
        n += 1
        stack = [c]
        while stack:
            i, j = stack.pop()
            if (i, j) in seen or (i, j) not in cells:
                continue
            seen.add((i, j))
            stack += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]
    return n


# --- BEiT block masks ----------------------------------------------------------------------------------------

def test_block_mask_hand_case_and_exact_counts():
    # area 4, aspect 1 -> a 2 x 2 block, the whole mask
    m = block_mask((4, 4), 4, min_block=4, max_aspect=1.0, generator=torch.Generator().manual_seed(0))
    rows, cols = m.nonzero()[:, 0], m.nonzero()[:, 1]
    assert int(m.sum()) == 4 and rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1
    assert n_masked_patches((8, 8), 0.4) == 26 and n_masked_patches((14, 14), 0.4) == 78
    g = torch.Generator().manual_seed(1)
    masks = block_masks(64, (8, 8), 0.4, generator=g)
    assert masks.shape == (64, 64) and (masks.sum(1) == 26).all()          # exactly 40% of every image
    again = block_masks(64, (8, 8), 0.4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)                                        # a function of the generator
    # blocks, not scattered patches: far fewer connected pieces than a uniformly random 40% mask
    blocky = sum(components(r.view(8, 8)) for r in masks) / 64
    rand = torch.rand(64, 64, generator=g).argsort(1) < 26
    scattered = sum(components(r.view(8, 8)) for r in rand) / 64
    assert blocky < 0.5 * scattered, (blocky, scattered)
    with pytest.raises(ValueError, match="mask ratio"):
        n_masked_patches((8, 8), 1.2)


# --- MIM targets: one code per patch, same raster order ------------------------------------------------------

class CellTokenizer:
    """A stand-in image tokenizer with a hand-computable code: 16 x the red value inside each f x f cell (read at
    the cell's pixel (1, 1), which resizing leaves unmixed)."""
    downsample_factor = 4

    def encode(self, x: torch.Tensor) -> torch.Tensor:                     # (B, 3, H, W) -> (B, H/4, W/4)
        return (x[:, 0, 1::4, 1::4] * 16).round().long()


def test_mim_codes_line_up_with_the_patch_grid():
    # patch (i, j) of a 4x4 patch grid is painted red (i*4 + j) / 16: its code must be i*4 + j, at index i*4 + j
    grid, size = 4, 32                                                      # 32 px images -> resized to 4 * 4 = 16 px
    value = (torch.arange(16).float() / 16).view(1, 1, 4, 4)
    images = torch.nn.functional.interpolate(value, scale_factor=size // grid, mode="nearest").expand(2, 3, -1, -1)
    codes = mim_codes(CellTokenizer(), images, grid)
    assert codes.shape == (2, 16)
    torch.testing.assert_close(codes[0], torch.arange(16))                  # raster order = patch order
    patches = torch.nn.Conv2d(3, 1, size // grid, stride=size // grid, bias=False)
    torch.nn.init.constant_(patches.weight, 1.0 / (3 * (size // grid) ** 2))
    with torch.no_grad():                                                   # the model's patch n covers the same cell
        torch.testing.assert_close((patches(images).flatten(1)[0] * 16).round().long(), codes[0])
    # a real (random) VQGAN: 16 px -> a 4x4 grid of codes in [0, n_embed)
    vq = tiny_vqgan()
    real = mim_codes(vq, torch.rand(3, 3, 16, 16), grid)
    assert real.shape == (3, 16) and 0 <= int(real.min()) and int(real.max()) < 32
    assert not vq.training
    with pytest.raises(ValueError, match="one code per patch"):
        mim_codes(type("Odd", (), {"downsample_factor": 4, "encode": lambda self, x: torch.zeros(len(x), 3, 3,
                                                                                                 dtype=torch.long)})(),
                  images, grid)


# --- whole-word MLM inputs ------------------------------------------------------------------------------------

def test_mlm_inputs_mask_whole_words_and_never_special_tokens(tok):
    texts = ["a small purple triangle below the xylophone", "一个小的橙色圆形", "a red circle"]
    enc = tok(texts, padding="longest", return_tensors="pt")
    ids = enc["input_ids"]
    m = mlm_inputs(ids, tok, torch.Generator().manual_seed(0), rate=0.5)
    chosen = m.labels != IGNORE_INDEX
    assert torch.equal(m.labels[chosen], ids[chosen]) and chosen.any(1).all()
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert not (chosen & special).any()                                       # [CLS] [SEP] [PAD] never chosen
    assert (m.input_ids[~chosen] == ids[~chosen]).all()
    pieces = tok.convert_ids_to_tokens(ids[0])
    xylo = [k for k, t in enumerate(pieces) if t == "x" or t.startswith("##")]  # "xylophone": 9 pieces, one word
    assert len(xylo) == 9 and len({bool(chosen[0, k]) for k in xylo}) == 1     # all or none
    assert int(m.input_ids.max()) < len(tok)                                  # random replacements are real tokens


# --- stagewise training: what moves, what stays bit-identical --------------------------------------------------

@pytest.fixture(scope="module")
def stage_data(tok):
    return {1: ImageData.build(DATA, tiny_vqgan(), CFG.grid_size), 2: TextData.build(DATA, tok, CFG.max_text_len),
            3: PairData.build(DATA, tok, CFG.max_text_len)}


def test_each_stage_moves_exactly_its_parameters(stage_data):
    """VLMo §3.4: stage 1 trains attention + V-FFN (+ image embeddings, MIM head); stage 2 only the L-FFN side (text
    embeddings, MLM head), attention and V-FFN frozen; stage 3 everything but BEiT's [MASK] and the MIM head."""
    torch.manual_seed(0)
    model = VLMo(CFG)
    tc = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=1, progress_bar=False, log_every=0,
                     mixed_precision="no")
    parts = model.parts()
    moving_rows = {1: {IMAGE_TYPE}, 2: {TEXT_TYPE}, 3: {TEXT_TYPE, IMAGE_TYPE}}
    images = stage_data[1].bank.images(range(4))
    for stage in (1, 2, 3):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            image_states = model.eval()(images).hidden_states
        run = run_stage(model, stage, stage_data[stage], tc, PretrainConfig(vl_init=None))
        trained = {p for name in STAGE_TRAINS[stage] for p in parts[name]}
        assert run.plan.trained and run.plan.frozen
        assert set(run.plan.trained) == {n for n in before if n.startswith(tuple(trained))}
        for name, p in model.named_parameters():
            if name in run.plan.frozen:
                assert torch.equal(p, before[name]), f"stage {stage}: frozen {name} moved"
            elif name == "type_embed.weight":
                moved = {r for r in range(3) if not torch.equal(p[r], before[name][r])}
                assert moved == moving_rows[stage], f"stage {stage}: type rows {moved} moved"
            else:
                assert not torch.equal(p, before[name]), f"stage {stage}: trained {name} did not move"
        assert all(p.requires_grad for p in model.parameters()), "run_stage leaves the model trainable"
        if stage == 2:   # the image path of stage 1 is untouched by stage 2: same image features, bit for bit
            with torch.no_grad():
                assert torch.equal(model.eval()(images).hidden_states, image_states)
    assert {n for n in run.plan.frozen} == {"image_embed.mask_token", "mim_head.weight", "mim_head.bias"}
    assert torch.equal(model.type_embed.weight[SECOND_IMAGE_TYPE], before["type_embed.weight"][SECOND_IMAGE_TYPE])


def test_expert_initialisation_between_stages_and_bad_stages():
    torch.manual_seed(0)
    model = VLMo(CFG)
    assert copy_expert(model, "vision", "vl") == ["1"]                          # only the top layer has a VL-FFN
    top = model.blocks[1].ffn
    for (k, a), b in zip(top.vision.state_dict().items(), top.vl.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="stage must be one of"):
        prepare_stage(model, 4)
    with pytest.raises(ValueError, match="from_pretrained_vlmo"):
        prepare_stage(VLMoForVQA.from_pretrained_vlmo(model), 3)                # a downstream head has no stage
    with pytest.raises(ValueError, match="vl_init"):
        PretrainConfig(vl_init="audio")


def test_stage3_loss_is_itc_plus_itm_on_the_drawn_pairs_plus_fusion_mlm(stage_data):
    torch.manual_seed(0)
    model = VLMo(CFG).eval()
    prepare_stage(model, 3)
    batch = stage_data[3].batch_fn(torch.Generator().manual_seed(3), 8)
    assert set(batch) >= {"images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "pair_ids",
                          "negative_seed"}
    r = vl_losses(model, batch, PretrainConfig(itc_weight=1.0, itm_weight=0.5, mlm_weight=2.0))
    images, ids, am = batch["images"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        itc = itc_loss(model(images, itc=True).features, model(input_ids=ids, attention_mask=am, itc=True).features,
                       model.temperature(), ids=batch["pair_ids"])
        t, i = r.text_for_image, r.image_for_text
        assert not (batch["pair_ids"][t] == batch["pair_ids"]).any()           # never a positive as a negative
        assert not (batch["pair_ids"][i] == batch["pair_ids"]).any()
        logits = model(torch.cat([images, images[i], images]), torch.cat([ids, ids, ids[t]]),
                       torch.cat([am, am, am[t]]), itm=True).itm_logits
        itm, _ = itm_loss(logits, itm_labels(8, 16))                           # [positives | neg images | neg texts]
        mlm, _ = mlm_loss(model(images, batch["mlm_input_ids"], am, mlm=True).mlm_logits, batch["mlm_labels"])
    torch.testing.assert_close(r.itc, itc.loss)
    torch.testing.assert_close(r.itm, itm)
    torch.testing.assert_close(r.mlm, mlm)
    torch.testing.assert_close(r.loss, itc.loss + 0.5 * itm + 2.0 * mlm)
    assert {"itc", "itm", "mlm", "i2t_acc", "t2i_acc", "itm_acc", "mlm_acc", "logit_scale"} <= set(r.metrics)


def test_local_negative_pool_draws_within_each_slice(stage_data):
    """VLMo Table 6: "local" hard negatives come only from the example's own process (here emulated as 4 slices of a
    batch of 8); with 2 pairs per slice the only candidate is the slice's other pair, so the draw is known exactly."""
    assert same_slice(4, 2).tolist() == [[True, True, False, False], [True, True, False, False],
                                         [False, False, True, True], [False, False, True, True]]
    with pytest.raises(ValueError, match="equal slices"):
        same_slice(6, 4)
    torch.manual_seed(0)
    model = VLMo(CFG).eval()
    batch = stage_data[3].batch(range(8), torch.Generator().manual_seed(3))          # 8 different pairs
    assert len(set(batch["pair_ids"].tolist())) == 8
    partner = [1, 0, 3, 2, 5, 4, 7, 6]
    with torch.no_grad():
        local = vl_losses(model, batch, PretrainConfig(negative_pool="local", local_groups=4))
        assert local.text_for_image.tolist() == partner and local.image_for_text.tolist() == partner
        drawn = set()                                           # the global pool reaches outside the slice
        for seed in range(4):
            r = vl_losses(model, dict(batch, negative_seed=seed), PretrainConfig(negative_pool="global"))
            drawn |= {(b, int(j)) for b, j in enumerate(r.text_for_image)}
    assert any(j // 2 != b // 2 for b, j in drawn)
    for bad in (dict(negative_pool="nearby"), dict(local_groups=0)):
        with pytest.raises(ValueError):
            PretrainConfig(**bad)
