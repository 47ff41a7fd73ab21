"""VLMo ablation arms (Tables 3, 5, 6; mmkit/vlmo/tasks/ablations.py): each arm differs in exactly what it claims."""
from __future__ import annotations

import pytest
import torch

from mmkit.tokenizer import world_tokenizer
from mmkit.vlmo.model import VLMo, VLMoConfig
from mmkit.vlmo.tasks import ablations as AB
from mmkit.vlmo.tasks import pretrain as P
from mmkit.vlmo.tasks import retrieval as R

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = VLMoConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, n_vl_layers=1, image_size=16, patch_size=4,
                 n_image_codes=16)


@pytest.fixture(scope="module")
def stage2():
    torch.manual_seed(123)
    return VLMo(CFG)                              # stands in for the stage-2 checkpoint


@pytest.fixture(scope="module")
def setup(stage2):
    tok = world_tokenizer()
    pairs = P.PairData.build(P.PretrainConfig(image_size=16, n_pairs=16), tok, CFG.max_text_len)
    rdata = R.retrieval_data("test", 8, image_size=16)
    return tok, pairs, rdata


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_stagewise_starts_from_checkpoint_scratch_from_fresh_weights(stage2):
    st = AB.init_arm(AB.BASELINE, {"stage2": stage2})
    assert all(torch.equal(v, stage2.state_dict()[k]) for k, v in st.state_dict().items())
    sc = AB.init_arm(AB.SCRATCH, {"stage2": stage2}, seed=0)
    assert sc.config == stage2.config                                   # same architecture, other weights
    sd = stage2.state_dict()
    differ = {k for k, v in sc.state_dict().items() if v.numel() > 1 and v.std() > 0 and not torch.equal(v, sd[k])}
    for k in ("blocks.0.self_attn.", "blocks.0.ffn.vision.", "blocks.0.ffn.language.", "text_embed.", "image_embed."):
        assert any(d.startswith(k) for d in differ), k                  # attention, experts, embeddings all fresh
    again = AB.init_arm(AB.SCRATCH, {"stage2": stage2}, seed=0)         # fresh but reproducible
    assert _same(sc.state_dict().values(), again.state_dict().values())


def test_std_trm_has_one_ffn_per_block_and_no_vl_has_no_vl_expert(stage2):
    std = AB.init_arm(AB.STD_TRM, {"stage2": stage2})
    for block in std.blocks:
        assert block.ffn.shared and block.ffn.language is None and block.ffn.vl is None
        assert sum(isinstance(m, type(stage2.blocks[0].ffn.vision)) for m in block.ffn.modules()) == 1
    novl = AB.init_arm(AB.NO_VL, {"stage2": stage2})
    assert all(b.ffn.vl is None and b.ffn.language is not None for b in novl.blocks)
    assert not any(".ffn.vl." in n for n, _ in novl.named_parameters())
    assert any(".ffn.vl." in n for n, _ in stage2.named_parameters())
    # everything the smaller arms keep is the checkpoint's
    for m in (std, novl):
        assert all(torch.equal(v, stage2.state_dict()[k]) for k, v in m.state_dict().items())


def test_local_negatives_stay_in_their_slice(stage2, setup):
    tok, pairs, _ = setup
    batch = pairs.batch(range(16), torch.Generator().manual_seed(0))
    cfg = P.PretrainConfig(image_size=16, **AB.LOCAL_NEG.pretrain)
    r = P.vl_losses(stage2, batch, cfg)
    slice_ = 16 // cfg.local_groups
    rows = torch.arange(16) // slice_
    assert torch.equal(r.text_for_image // slice_, rows) and torch.equal(r.image_for_text // slice_, rows)
    g = P.vl_losses(stage2, batch, P.PretrainConfig(image_size=16))     # global: some negative leaves its slice
    assert not (torch.equal(g.text_for_image // slice_, rows) and torch.equal(g.image_for_text // slice_, rows))


def test_arms_get_equal_budgets_and_report_cpu_and_baselines(stage2, setup):
    tok, pairs, rdata = setup
    budget = AB.StageBudget(steps=2, batch_size=8, warmup_steps=1)
    calls = []
    runs = AB.run_arms(AB.ARMS, budget, {"stage2": stage2}, pairs, tok, rdata, seeds={"stagewise": [0, 1]},
                       n_eval_pairs=8, progress=lambda a, s: calls.append((a, s)))
    assert set(runs) == {a.name for a in AB.ARMS} and len(runs["stagewise"]) == 2 and len(calls) == 6
    for name, rs in runs.items():
        for r in rs:
            assert r.steps == 2 and len(r.history) == 2 and r.batch_size == 8
            assert r.cpu_seconds > 0 and r.eval_cpu_seconds > 0
            assert {"t2i_r10", "i2t_r1", "itc", "itm", "itm_acc", "mlm", "itm_auc"} <= set(r.eval)
    assert runs["stagewise"][0].history[0]["loss"] != runs["stagewise"][1].history[0]["loss"]   # seeds differ
    assert runs["std_trm"][0].n_parameters < runs["no_vl"][0].n_parameters < runs["stagewise"][0].n_parameters
    base = AB.blind_baselines(len(rdata.texts), budget.batch_size, pairs)
    assert base["t2i_r10"] == pytest.approx(10 / 8) and base["itm_auc"] == 0.5
    assert base["itm"] == pytest.approx(P.ITM_PRIOR_LOSS) and base["mlm"] > 0
    assert set(AB.TABLES["Table 3 (initialisation)"]) == {"stagewise", "scratch"}
