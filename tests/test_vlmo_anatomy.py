"""mmkit.vlmo.tasks.anatomy (notebook 07, "Inside VLMo"): the step-by-step walk lands on the kit's stage-3 loss, records
the routing the config asks for and attention that respects the padding; the patch-token probe reads colour above
the majority baseline of the same cells."""
import pytest
import torch

import mmkit
from mmkit.data.scenes import SceneBank
from mmkit.data.world import object_labels
from mmkit.tokenizer import world_tokenizer
from mmkit.vlmo.model import VLMo, VLMoConfig
from mmkit.vlmo.tasks import anatomy as A
from mmkit.vlmo.tasks import pretrain as P


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmkit.load("vlmo-tiny-retrieval").eval()


@pytest.fixture(scope="module")
def batch(tok, model):
    data = P.PairData.build(P.PretrainConfig(n_pairs=8), tok, model.config.max_text_len, split="test")
    return data.batch(range(8), torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def walk(model, batch, tok):
    return A.forward_walk(model, batch, tok)


@pytest.mark.parametrize("cfg", [P.PretrainConfig(), P.PretrainConfig(negative_pool="local", local_groups=2,
                                                                      itc_weight=0.5, mlm_weight=2.0)])
def test_walk_losses_equal_the_kits_stage3_loss(model, batch, tok, cfg):
    w = A.forward_walk(model, batch, tok, config=cfg)
    with torch.no_grad():
        ref = P.vl_losses(model, batch, cfg)                   # the training loss, called here on the same batch
    for k in ("itc", "itm", "mlm", "loss"):
        assert abs(float(getattr(w, k)) - float(getattr(ref, k))) < 1e-5, (k, float(getattr(w, k)))
    assert torch.equal(w.text_for_image, ref.text_for_image) and torch.equal(w.image_for_text, ref.image_for_text)
    B = len(batch["images"])
    assert w.itm_logits.shape == (3 * B, 2) and w.sim_i2t.shape == (B, B)
    assert float(w.negative_weights.diagonal().abs().max()) == 0.0          # a positive is never a hard negative


def test_routing_follows_the_config(model, walk, batch):
    c = model.config
    T, n = walk.text_len, len(walk.tokens)
    assert n == T + 1 + c.num_patches
    for layer, row in enumerate(walk.routing):
        if layer >= c.n_layers - c.n_vl_layers:
            assert row == ["VL-FFN"] * n
        else:
            assert row == ["L-FFN"] * T + ["V-FFN"] * (n - T)
    assert walk.routing == model.routing_table("fusion", T, n - T)
    # another F: a freshly built VLMo with the VL expert in its top 2 layers
    other = VLMo(VLMoConfig(n_vl_layers=2)).eval()
    w2 = A.forward_walk(other, batch)
    assert [row[0] for row in w2.routing] == ["L-FFN", "L-FFN", "VL-FFN", "VL-FFN"]
    assert [row[-1] for row in w2.routing] == ["V-FFN", "V-FFN", "VL-FFN", "VL-FFN"]


def test_attention_sums_to_one_over_real_keys_and_ignores_padding(walk):
    keys = walk.key_mask                                                     # (B, L)
    assert bool((~keys).any()), "the batch should contain padded texts"
    p = walk.attention                                                       # (B, H, L, L)
    assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
    assert torch.allclose((p * keys[:, None, None, :]).sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
    assert float(p.masked_select(~keys[:, None, None, :].expand_as(p)).abs().max()) == 0.0


def test_a_wrong_batch_is_refused(model, batch):
    with pytest.raises(ValueError, match="lacks"):
        A.forward_walk(model, {k: v for k, v in batch.items() if k != "mlm_labels"})
    with pytest.raises(ValueError, match="2 different pairs"):
        A.forward_walk(model, dict(batch, pair_ids=torch.zeros(len(batch["images"]), dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        A.forward_walk(model, dict(batch, mlm_labels=batch["mlm_labels"][:, :-1]))


def test_patch_probe_reads_colour_above_the_majority_baseline(model):
    bank = SceneBank.build("test", 160, image_size=model.config.image_size)
    res = A.patch_probe(model, bank.images(range(160)), bank.scenes, attribute=0, layers=[0, model.config.n_layers],
                        steps=100)
    labels = object_labels(bank.scenes)[..., 0]                              # majority computed here, independently
    tr, te = labels[:120][labels[:120] > 0], labels[120:][labels[120:] > 0]
    majority = float((te == torch.bincount(tr).argmax()).float().mean())
    for r in res:
        assert r.n_test == len(te) and abs(r.majority - majority) < 1e-6
        assert r.test_acc > majority + 0.4, r
