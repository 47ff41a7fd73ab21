"""The MoE layer (M6 §3.4): hand-computed routing and dropping, equality with Hugging Face's Mixtral and Switch
Transformers MoE blocks (copied weights) and their auxiliary losses, gradients, jitter, and expert parallelism
on 2 gloo processes equal to the single-process layer."""
from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mmkit.nn import TransformerBlock
from mmkit.nn.moe import (MoEConfig, MoEFeedForward, dispatch_plan, expert_capacity, is_expert_param,
                       load_balancing_loss, moe_aux_loss, route, router_z_loss)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_moe_worker.py")
HF_VERSION = "5.23.0"   # the reference modules below were read in this version (pyproject allows >=5.23,<6)

_spec = importlib.util.spec_from_file_location("_moe_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
sys.modules["_moe_worker"] = W
_spec.loader.exec_module(W)


pytestmark = pytest.mark.usefixtures("one_thread")


# What the adapters below read from the reference modules. The oracles run on whatever transformers is installed
# (any version pyproject allows); they are skipped only when one of these is really gone (an API difference), and
# a changed layout that is still there fails the equality asserts, which is what they are for.
HF_API = {
    "transformers.models.mixtral.modeling_mixtral": ("MixtralSparseMoeBlock", "load_balancing_loss_func"),
    "transformers.models.switch_transformers.modeling_switch_transformers": (
        "SwitchTransformersSparseMLP", "load_balancing_loss_func", "router_z_loss_func"),
}


def hf():
    """transformers as installed, if the reference modules the adapters need exist in it."""
    transformers = pytest.importorskip("transformers")
    missing = []
    for module, names in HF_API.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        missing += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} lacks {missing} (read in {HF_VERSION}): re-read its "
                    "Mixtral / Switch MoE code and update the adapters")
    return transformers


def test_hf_oracles_run_on_any_version_pyproject_allows(monkeypatch):
    """The oracles were skipped unless transformers was exactly 5.23.0, while pyproject allows >=5.23,<6: a newer
    install silently lost them. They now skip only when a module or function they read is gone."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers, "__version__", "5.99.0")          # another allowed version, same API
    try:
        assert hf() is transformers
    except pytest.skip.Exception as e:
        pytest.fail(f"the HF oracles were skipped on a version pyproject allows: {e}")
    monkeypatch.setitem(HF_API, "transformers.models.mixtral.modeling_mixtral", ("NoSuchMoeBlock",))
    with pytest.raises(pytest.skip.Exception, match="lacks.*NoSuchMoeBlock"):
        hf()                                                              # a real API difference: skipped, named


def per_token_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """M6 eq. (2) one token and one expert at a time, with the plan's kept assignments: the obvious slow loop."""
    r, plan = moe.last_routing, moe.last_plan
    ex = moe.experts
    y = torch.zeros_like(x)
    for t, j, e in zip(plan.token.tolist(), plan.choice.tolist(), plan.expert.tolist()):
        h = x[t] @ ex.w_in[e] + (ex.b_in[e] if ex.b_in is not None else 0)
        if ex.gated:
            g, u = h.chunk(2)
            h = ex.act(g) * u
        else:
            h = ex.act(h)
        out = h @ ex.w_out[e] + (ex.b_out[e] if ex.b_out is not None else 0)
        y[t] += r.top_w[t, j] * out
    return y


# --- hand-computed dispatch ------------------------------------------------------------------------------
# 6 tokens, 3 experts. With d_model = 3 and the gate weight = identity, the gate logits ARE the inputs.
HAND_LOGITS = torch.tensor([[3., 2., 0.],    # t0: first e0, second e1
                            [3., 0., 2.],    # t1: e0, e2
                            [3., 2., 0.],    # t2: e0, e1
                            [0., 3., 2.],    # t3: e1, e2
                            [2., 0., 3.],    # t4: e2, e0
                            [0., 3., 2.]])   # t5: e1, e2


def hand_layer(top_k: int, capacity_factor: float) -> MoEFeedForward:
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model=3, d_ff=4, n_experts=3, top_k=top_k, capacity_factor=capacity_factor,
                         activation="relu", backend="loop")
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(3))
        moe.experts.w_in.normal_()
        moe.experts.w_out.normal_()
    return moe


def per_expert(plan) -> list[list[int]]:
    return [t.tolist() for t in plan.token.split(plan.counts.tolist())]


def test_capacity_is_N_c_over_m_rounded_up():
    assert expert_capacity(6, 3, 1.0) == 2           # M6: C = N * c / m
    assert expert_capacity(10, 4, 1.25) == 4         # 3.125 -> 4
    assert expert_capacity(6, 3, 1.5) == 3
    assert expert_capacity(6, 3, None) is None       # no capacity: nothing dropped


def test_hand_computed_top1_dispatch_and_drop():
    moe = hand_layer(top_k=1, capacity_factor=1.0)                   # C = ceil(6 * 1 / 3) = 2
    x = HAND_LOGITS.clone()
    y = moe(x)
    plan, stats = moe.last_plan, moe.last_stats
    assert plan.capacity == 2
    # e0 is the first choice of t0, t1, t2: t2 comes third and is dropped; e1 gets t3, t5; e2 gets t4
    assert per_expert(plan) == [[0, 1], [3, 5], [4]]
    assert stats.tokens_per_expert.tolist() == [2, 2, 1]
    assert stats.routed_per_expert.tolist() == [3, 2, 1]
    assert stats.dropped_fraction == pytest.approx(1 / 6) and stats.tokens_dropped == pytest.approx(1 / 6)
    assert torch.equal(y[2], torch.zeros(3))                        # dropped: the MoE adds nothing, the residual carries it
    p = HAND_LOGITS.softmax(-1)
    e = moe.experts
    for t, ex in [(0, 0), (1, 0), (3, 1), (5, 1), (4, 2)]:          # y = p(x)_i E_i(x) for the kept ones
        ref = p[t, ex] * (torch.relu(x[t] @ e.w_in[ex]) @ e.w_out[ex])
        torch.testing.assert_close(y[t], ref)


def test_hand_computed_top2_dispatch_first_choices_have_priority():
    moe = hand_layer(top_k=2, capacity_factor=1.0)                   # C = 2: 12 assignments, 6 places
    moe(HAND_LOGITS.clone())
    plan = moe.last_plan
    # first choices fill the places first (token order): e0 <- t0, t1 (t2 dropped); e1 <- t3, t5; e2 <- t4.
    # then second choices, in token order: t0->e1 full; t1->e2 takes the last place of e2; t2->e1, t3->e2,
    # t4->e0, t5->e2 full. Inside an expert: first choices, then second choices.
    assert per_expert(plan) == [[0, 1], [3, 5], [4, 1]]
    assert plan.choice.tolist() == [0, 0, 0, 0, 0, 1]
    assert moe.last_stats.dropped_fraction == pytest.approx(6 / 12)
    assert moe.last_stats.tokens_dropped == pytest.approx(1 / 6)    # t2 lost both of its choices

    moe = hand_layer(top_k=2, capacity_factor=1.5)                   # C = 3
    y = moe(HAND_LOGITS.clone())
    plan = moe.last_plan
    # e0: t0 t1 t2 (first) - t4's second choice dropped; e1: t3 t5 (first) + t0 (second) - t2 dropped;
    # e2: t4 (first) + t1 t3 (second) - t5 dropped
    assert per_expert(plan) == [[0, 1, 2], [3, 5, 0], [4, 1, 3]]
    assert moe.last_stats.dropped_fraction == pytest.approx(3 / 12)
    assert moe.last_stats.tokens_dropped == 0.0
    torch.testing.assert_close(y, per_token_reference(moe, HAND_LOGITS))


def test_dispatch_plan_without_capacity_keeps_everything_sorted_by_expert():
    top_idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = dispatch_plan(top_idx, 3, None)
    assert plan.expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.token.tolist() == [1, 0, 1, 2, 0, 2]                 # e0: t1 (first choice) before t0 (second)
    assert plan.counts.tolist() == [2, 2, 2] and plan.routed.tolist() == [[1, 0, 2], [1, 2, 0]]


# --- the layer against slow references ---------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(top_k=1, capacity_factor=1.0),
    dict(top_k=2, capacity_factor=1.0, bias=True),
    dict(top_k=2, capacity_factor=None, gated=True, activation="silu", renormalize=True),
    dict(top_k=1, capacity_factor=2.0, bias=True, gated=True),
])
def test_backends_match_the_per_token_loop_and_each_other(kw):
    results = {}
    for backend in ("grouped_mm", "loop", "bmm"):
        torch.manual_seed(0)
        moe = MoEFeedForward(d_model=16, d_ff=32, n_experts=6, backend=backend, z_loss_coef=0.1, **kw)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.3)
        x = torch.randn(3, 10, 16, requires_grad=True)
        y = moe(x)
        ((y * torch.linspace(-1, 1, 16)).sum() + moe.aux_loss).backward()
        results[backend] = (y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()})
        if backend == "loop":
            torch.testing.assert_close(y.detach().view(-1, 16), per_token_reference(moe, x.detach().view(-1, 16)))
    ref = results["loop"]
    for backend in ("grouped_mm", "bmm"):
        y, xg, grads = results[backend]
        torch.testing.assert_close(y, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xg, ref[1], rtol=1e-5, atol=1e-6)
        for n in grads:
            torch.testing.assert_close(grads[n], ref[2][n], rtol=1e-5, atol=1e-6, msg=f"{backend}: {n}")


def test_expert_loop_backward_passes_gradcheck():
    from mmkit.nn.moe import _ExpertMM

    torch.manual_seed(0)
    a = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _ExpertMM.apply(a, w, [2, 0, 4, 1]), (a, w))   # expert 1 empty


def test_gradients_reach_the_gate_and_only_the_used_experts():
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model=8, d_ff=16, n_experts=4, top_k=1, capacity_factor=None, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[1].fill_(1.0)           # positive inputs -> every token picks expert 1
    x = torch.rand(5, 8) + 0.1
    moe(x).pow(2).sum().backward()
    assert moe.last_stats.tokens_per_expert.tolist() == [0, 5, 0, 0]
    assert moe.gate.weight.grad.abs().sum() > 0                 # through p(x)_i in y = p(x)_i E_i(x)
    g = moe.experts.w_in.grad
    assert g[1].abs().sum() > 0 and g[[0, 2, 3]].abs().sum() == 0


def test_aux_and_z_losses_follow_their_formulas():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0], [0.3, 0.2, 3.0, 0.0]])
    r = route(logits, top_k=1)
    routed = torch.bincount(r.top_idx[:, 0], minlength=4)                   # [1, 1, 1, 0]
    p = logits.softmax(-1)
    f = routed.float() / 3
    assert load_balancing_loss(r.probs, routed) == pytest.approx(float(4 * (f * p.mean(0)).sum()))
    assert router_z_loss(logits) == pytest.approx(float(torch.logsumexp(logits, -1).pow(2).mean()))
    uniform = torch.zeros(8, 4)                                            # p = 1/m everywhere, f sums to 1 -> 1
    assert load_balancing_loss(uniform.softmax(-1), torch.tensor([2, 2, 2, 2])) == pytest.approx(1.0)

    moe = MoEFeedForward(d_model=8, d_ff=16, n_experts=4, aux_loss_coef=0.3, z_loss_coef=0.02)
    moe(torch.randn(10, 8))
    s = moe.last_stats
    assert float(moe.aux_loss.detach()) == pytest.approx(0.3 * s.aux_loss + 0.02 * s.z_loss, rel=1e-6)
    assert 0.0 <= s.gate_entropy <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_jitter_only_in_training():
    torch.manual_seed(0)
    noisy = MoEFeedForward(d_model=8, d_ff=16, n_experts=4, jitter_noise=0.1)
    clean = MoEFeedForward(d_model=8, d_ff=16, n_experts=4, jitter_noise=0.0)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(20, 8)
    x0 = x.clone()                                                         # a copy taken BEFORE the calls
    noisy.eval()
    clean.eval()
    torch.testing.assert_close(noisy(x), clean(x), rtol=0, atol=0)        # eval: no noise
    noisy.train()
    a, la = noisy(x), noisy.last_routing.logits
    b, lb = noisy(x), noisy.last_routing.logits
    assert not torch.equal(la, lb) and not torch.equal(a, b)              # training: fresh noise each call
    assert torch.equal(x, x0)                                              # the input is not modified in place


def test_drop_in_ffn_of_a_transformer_block_and_local_clipping():
    from mmkit.train import local_clip_fn

    torch.manual_seed(0)
    block = TransformerBlock(16, 2, ffn=MoEFeedForward(d_model=16, d_ff=32, n_experts=4, capacity_factor=0.5))
    x = torch.randn(2, 6, 16)
    y = block(x)
    assert y.shape == x.shape and block.ffn.last_stats.dropped_fraction > 0
    assert torch.equal(moe_aux_loss(block).detach(), block.ffn.aux_loss.detach())
    (y.pow(2).mean() + moe_aux_loss(block)).backward()
    names = [n for n, _ in block.named_parameters() if is_expert_param(n)]
    assert names == ["ffn.experts.w_in", "ffn.experts.w_out"]
    for p in block.parameters():
        p.grad.mul_(1e3)
    local_clip_fn(is_expert_param, local_max_norm=0.5)(block, 1.0)         # M6 §3.4: experts clipped on their own
    expert_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for n, p in block.named_parameters() if is_expert_param(n)]))
    assert expert_norm == pytest.approx(0.5, rel=1e-4)


def test_bad_config_gives_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ValueError, match="activation"):
        MoEConfig(activation="tanh")
    with pytest.raises(ValueError, match="d_model=8"):
        MoEFeedForward(d_model=8, d_ff=16, n_experts=2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="16 bytes"):
        MoEFeedForward(d_model=6, d_ff=10, n_experts=2, backend="grouped_mm")(torch.randn(3, 6))
    MoEFeedForward(d_model=6, d_ff=10, n_experts=2)(torch.randn(3, 6))    # auto falls back to the loop


# --- Hugging Face references ---------------------------------------------------------------------------
def copy_from_mixtral(kit: MoEFeedForward, block) -> None:
    """Adapter: Mixtral stores gate_up_proj (E, 2F, D) [gate rows first] and down_proj (E, D, F) in nn.Linear
    (out, in) layout; the kit stores x @ W layouts w_in (E, D, 2F) [gate half first] and w_out (E, F, D)."""
    with torch.no_grad():
        kit.gate.weight.copy_(block.gate.weight)                                  # (E, D) both
        kit.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
        kit.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))


def copy_from_switch(kit: MoEFeedForward, mlp) -> None:
    """Adapter: Switch has a router classifier (E, D) and per-expert nn.Linear wi (F, D), wo (D, F)."""
    with torch.no_grad():
        kit.gate.weight.copy_(mlp.router.classifier.weight)
        for e in range(kit.config.n_experts):
            kit.experts.w_in[e].copy_(mlp.experts[f"expert_{e}"].wi.weight.t())
            kit.experts.w_out[e].copy_(mlp.experts[f"expert_{e}"].wo.weight.t())


def test_equals_hf_mixtral_sparse_moe_block_and_its_balancing_loss():
    transformers = hf()
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    D, Fd, E = 16, 32, 6
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=Fd, num_local_experts=E, num_experts_per_tok=2,
                                     hidden_act="silu", router_jitter_noise=0.0)
    torch.manual_seed(0)
    ref = MixtralSparseMoeBlock(cfg)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.3)                                   # HF leaves these torch.empty
    kit = MoEFeedForward(d_model=D, d_ff=Fd, n_experts=E, top_k=2, capacity_factor=None, renormalize=True,
                         gated=True, activation="silu")
    copy_from_mixtral(kit, ref)
    x = torch.randn(3, 7, D)
    xr, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, yk = ref(xr), kit(xk)
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-6)
    yr.pow(2).sum().backward()
    yk.pow(2).sum().backward()
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kit.gate.weight.grad, ref.gate.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kit.experts.w_in.grad, ref.experts.gate_up_proj.grad.transpose(1, 2), rtol=1e-5, atol=1e-6)
    logits, _, _ = ref.gate(x.view(-1, D))
    assert kit.last_stats.aux_loss == pytest.approx(float(load_balancing_loss_func((logits.detach(),), E, top_k=2)), rel=1e-6)


def test_equals_hf_switch_sparse_mlp_with_capacity_and_its_losses():
    transformers = hf()
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP, load_balancing_loss_func, router_z_loss_func)

    D, Fd, E, N = 16, 32, 4, 24
    kit = MoEFeedForward(d_model=D, d_ff=Fd, n_experts=E, top_k=1, capacity_factor=1.0, activation="relu")
    C = expert_capacity(N, E, 1.0)                                     # 6
    cfg = transformers.SwitchTransformersConfig(d_model=D, d_ff=Fd, num_experts=E, expert_capacity=C, router_bias=False,
                                                router_jitter_noise=0.0, dense_act_fn="relu", dropout_rate=0.0)
    torch.manual_seed(0)
    ref = SwitchTransformersSparseMLP(cfg).eval()
    for p in ref.parameters():
        nn.init.normal_(p, std=0.3)
    copy_from_switch(kit, ref)
    x = torch.randn(1, N, D)             # ONE group: HF applies the capacity per sequence, the kit per call
    xr, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, yk = ref(xr), kit(xk)
    assert kit.last_stats.capacity == C and kit.last_stats.dropped_fraction > 0   # some tokens really are dropped
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-6)
    yr.pow(2).sum().backward()
    yk.pow(2).sum().backward()
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kit.gate.weight.grad, ref.router.classifier.weight.grad, rtol=1e-5, atol=1e-6)
    logits = ref.router.classifier(x).detach()                         # (1, N, E)
    assert kit.last_stats.aux_loss == pytest.approx(float(load_balancing_loss_func(logits.softmax(-1), logits.argmax(-1))), rel=1e-6)
    assert kit.last_stats.z_loss == pytest.approx(float(router_z_loss_func(logits)), rel=1e-6)


# --- expert parallelism on 2 gloo processes ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{msg}: {m}")


@pytest.mark.slow
def test_expert_parallel_on_two_gloo_processes_equals_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    world = 2
    for name in W.CASES:
        full = W.full_layer(name)
        x_all, w_all = W.global_batch(name)
        x = x_all.clone().requires_grad_(True)
        y = full(x)                                                # the single-process layer on the global batch
        (W.loss_of(y, w_all, len(x_all), 1) + full.aux_loss).backward()
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(world)]
        for r, res in enumerate(ranks):
            sl = W.rank_slice(name, r)
            close(res["y"], y.detach()[sl], f"{name} rank {r} output")
            # each rank's loss is its local mean, i.e. W x its share of the global mean: input grads are W x
            close(res["x_grad"] / world, x.grad[sl], f"{name} rank {r} input grad")
            for n, g in res["gate_grads"].items():                 # averaged over ranks, as DDP would
                close(g, dict(full.gate.named_parameters())[n].grad, f"{name} rank {r} gate {n}")
            a, b = res["local_experts"]
            for n, g in res["expert_grads"].items():               # this rank's experts a..b-1
                close(g, dict(full.experts.named_parameters())[n].grad[a:b], f"{name} rank {r} experts {n}")
            assert torch.equal(res["stats"]["tokens_per_expert"], full.last_stats.tokens_per_expert)
            assert res["stats"]["dropped_fraction"] == pytest.approx(full.last_stats.dropped_fraction)
            assert res["stats"]["capacity"] == full.last_stats.capacity
        mean_aux = sum(res["aux_loss"] for res in ranks) / world
        close(mean_aux, full.aux_loss.detach(), f"{name} aux loss")    # mean over ranks = global-batch value
    s = W.full_layer("skewed_empty_splits")
    s(W.global_batch("skewed_empty_splits")[0])
    assert s.last_stats.tokens_per_expert[2:].sum() == 0              # that case really sent nothing to rank 1

    # inside DistributedDataParallel: the gate averaged by DDP, the (ignored) experts scaled by the layer
    full = W.full_layer("top1_drop_uneven")
    x_all, w_all = W.global_batch("top1_drop_uneven")
    (W.loss_of(full(x_all), w_all, len(x_all), 1) + full.aux_loss).backward()
    for r in range(world):
        res = torch.load(tmp_path / f"ddp-rank{r}.pt", weights_only=True)
        assert res["ignored"] == ["1.experts.w_in", "1.experts.w_out", "1.experts.b_in", "1.experts.b_out"]
        close(res["gate_grads"]["weight"], full.gate.weight.grad, f"DDP rank {r} gate")
        per = W.N_EXPERTS // world
        for n, g in res["expert_grads"].items():
            close(g, dict(full.experts.named_parameters())[n].grad[r * per:(r + 1) * per], f"DDP rank {r} experts {n}")


# --- benchmark smoke test ------------------------------------------------------------------------------------
def test_moe_benchmark_runs(capsys):
    from mmkit.cli import main

    assert main(["bench", "moe", "--experts", "4", "--tokens", "64", "--d-model", "16", "--d-ff", "32",
                 "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "kit" in out
