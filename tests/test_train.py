"""The training loop: it learns, follows the LR schedule, accumulates gradients exactly, resumes exactly, writes
checkpoints atomically, gives the same parameters on 2 gloo processes as on 1, and rejects bad input clearly."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mmkit import train as T
from mmkit.registry import register_model
from mmkit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_ddp_worker.py")

# The toy model and data live in the multi-process worker so that both sides of the 2-process test share them.
_spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
sys.modules["_ddp_worker"] = W                                      # dataclasses look their module up
_spec.loader.exec_module(W)
register_model("train-test-copynet", W.CopyNetConfig, W.CopyNet)   # so hub.load_model_dir can rebuild it


pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(**kw) -> TrainConfig:
    base = dict(mixed_precision="no", progress_bar=False, log_every=0, warmup_steps=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"parameters differ by up to {worst:.3g} (> {atol})"


def copy_batch_fn(g: torch.Generator, batch_size: int):
    """Fresh copy-task examples for every step, drawn from the step's generator."""
    x = torch.randint(0, 16, (batch_size, 6), generator=g)
    return x, x[:, 0].clone()


# --- learning, schedule, accumulation -------------------------------------------------------------------
def test_loss_falls_and_held_out_accuracy_rises():
    model = W.make_model()
    held_x, held_y = W.make_dataset(512, seed=123).tensors

    def eval_fn(m):
        assert not m.training and not torch.is_grad_enabled()        # eval mode, no autograd
        return {"acc": (m(held_x).argmax(-1) == held_y).float().mean().item()}

    cfg = quiet(steps=60, batch_size=32, lr=3e-2, warmup_steps=5, eval_every=20)
    res = train(model, W.loss_fn, copy_batch_fn, cfg, eval_fn=eval_fn)
    first = res.history[0]["loss"]
    last = sum(h["loss"] for h in res.history[-5:]) / 5
    # cross-entropy starts above ln(16) = 2.77; copying the first token is learnable to near zero loss
    assert first > 2.0 and last < 0.1 * first, (first, last)
    assert [e["step"] for e in res.evals] == [20, 40, 60]
    assert res.evals[-1]["acc"] >= 0.9                               # chance is 1/16 = 0.0625
    assert {"step", "loss", "lr", "grad_norm", "acc"} <= set(res.history[-1])
    assert res.step == 60 and len(res.history) == 60 and res.mixed_precision == "no"
    assert model.training                                            # left as it was found


def test_lr_schedule_matches_hand_computed_values():
    cfg = quiet(steps=10, warmup_steps=2, lr=0.1, min_lr_ratio=0.1, batch_size=8)
    # warmup: step s uses lr*(s+1)/2 -> 0.05, 0.1. Cosine over the 8 steps after warmup:
    # lr * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 2) / 8)))
    #   s=2: 0.1 (progress 0)   s=4: 0.1*(0.1+0.45*(1+cos(pi/4)))  = 0.0868198
    #   s=6: 0.1*(0.1+0.45*1) = 0.055 (half-way)   s=9: 0.1*(0.1+0.45*(1+cos(7pi/8))) = 0.0134254
    hand = {0: 0.05, 1: 0.1, 2: 0.1, 4: 0.0868198, 6: 0.055, 9: 0.0134254}
    for s, lr in hand.items():
        assert T.lr_factor(s, cfg) * cfg.lr == pytest.approx(lr, abs=1e-7)
    res = train(W.make_model(), W.loss_fn, W.make_dataset(), cfg)     # and the loop really uses them
    used = [h["lr"] for h in res.history]
    for s, lr in hand.items():
        assert used[s] == pytest.approx(lr, abs=1e-7), (s, used[s])
    assert T.lr_factor(10, cfg) == pytest.approx(0.1)                 # reaches min_lr_ratio one past the end


def test_logged_lr_is_the_schedule_not_a_scaled_first_group():
    """With an image side at 0.1x in the FIRST param group (as the VQA recipes build them), the history still logs
    cfg.lr x the schedule, and each group really uses its own scaled LR (the log used to show group 0's 0.1x)."""
    cfg = quiet(steps=4, warmup_steps=2, lr=0.1, min_lr_ratio=0.1, batch_size=8)
    model = W.make_model()
    seen = []

    def groups(m):
        return T.scaled_param_groups(m, 0.01, cfg.lr, {"fc.": 0.1, "norm.": 0.1})   # group 0 is scaled

    def loss_fn(m, batch):
        opt_lrs = [g["lr"] for g in seen_opt[0].param_groups] if seen_opt else []
        seen.append(opt_lrs)
        return W.loss_fn(m, batch)

    seen_opt = []
    real_adamw = torch.optim.AdamW

    class Spy(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen_opt.append(self)

    torch.optim.AdamW = Spy
    try:
        res = train(model, loss_fn, W.make_dataset(), cfg, param_groups_fn=groups)
    finally:
        torch.optim.AdamW = real_adamw
    lrs = [cfg.lr * T.lr_factor(s, cfg) for s in range(4)]
    assert [h["lr"] for h in res.history] == pytest.approx(lrs, abs=1e-9)
    scales = sorted({round(lr_g / lrs[s], 6) for s, row in enumerate(seen) for lr_g in row})
    assert scales == [0.1, 1.0]                                         # the groups keep their own LRs


def test_gradient_accumulation_gives_the_same_parameters():
    ds = W.make_dataset(64)
    results, norms = {}, {}
    for accum in (1, 2, 4):
        model = W.make_model()
        workers = 1 if accum == 2 else 0                               # a DataLoader worker delivers the same batches
        res = train(model, W.loss_fn, ds, quiet(steps=6, batch_size=16, grad_accum_steps=accum, num_workers=workers))
        results[accum], norms[accum] = params(model), [h["grad_norm"] for h in res.history]
    # AdamW hardly notices a gradient scaled by a constant, so also compare the gradient norms themselves
    assert norms[2] == pytest.approx(norms[1], rel=1e-5) and norms[4] == pytest.approx(norms[1], rel=1e-5)
    assert not torch.equal(results[1]["fc.weight"], W.make_model().fc.weight)   # training moved them
    assert_params_close(results[2], results[1], atol=1e-5)
    assert_params_close(results[4], results[1], atol=1e-5)


def test_weight_decay_skips_biases_norms_and_tied_embeddings():
    model = W.make_model()
    decay, no_decay = T.default_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}          # the tied head.weight is embed.weight
    assert {names[id(p)] for p in decay["params"]} == {"fc.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "fc.bias", "norm.weight", "norm.bias"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


# --- data: deterministic per step, equal slices per process ---------------------------------------------
def test_step_sampler_is_a_function_of_seed_and_step():
    full = T.StepSampler(10, batch_size=8, seed=3, start_step=0, end_step=5)
    batches = list(full)
    stream = [i for b in batches for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs = permutations
    assert list(T.StepSampler(10, 8, seed=3, start_step=3, end_step=5)) == batches[3:]        # skip to any step
    assert list(T.StepSampler(10, 8, seed=4, start_step=0, end_step=5)) != batches            # the seed matters
    # 2 processes x 2 micro-batches: the four slices of step s tile step s's global batch
    slices = [list(T.StepSampler(10, 8, 2, 2, r, seed=3, start_step=0, end_step=5)) for r in range(2)]
    for s in range(5):
        tiles = [slices[0][2 * s], slices[1][2 * s], slices[0][2 * s + 1], slices[1][2 * s + 1]]
        assert [i for t in tiles for i in t] == batches[s] and all(len(t) == 2 for t in tiles)


# --- checkpoints and exact resume -----------------------------------------------------------------------
def test_exact_resume_equals_the_straight_run(tmp_path):
    from mmkit.hub import load_model_dir

    # dropout on, accumulation on, 40 examples with batch 16 (batches straddle epochs): all must replay exactly
    ds = W.make_dataset(40)
    kw = dict(steps=10, batch_size=16, grad_accum_steps=2, warmup_steps=3, lr=2e-2)
    straight = W.make_model(dropout=0.1)
    res_a = train(straight, W.loss_fn, ds, quiet(**kw))

    out = tmp_path / "run"
    first = W.make_model(dropout=0.1)
    res_b1 = train(first, W.loss_fn, ds, quiet(**kw, out_dir=str(out)), stop_at=5)
    ckpt = out / "checkpoint-5"
    assert res_b1.checkpoint == str(ckpt) and res_b1.step == 5
    resumed = W.make_model(seed=7, dropout=0.1)                     # different init: everything must come from disk
    res_b2 = train(resumed, W.loss_fn, ds, quiet(**kw, out_dir=str(out)), resume_from="auto")

    assert_params_close(params(resumed), params(straight), atol=1e-6)
    assert [h["step"] for h in res_b2.history] == list(range(1, 11))  # history carried over from the checkpoint
    for a, b in zip(res_a.history, res_b2.history):
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-12) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)

    # the checkpoint: safetensors weights (tied weight stored once), weights_only state, JSON trainer state
    weights = load_file(ckpt / "model.safetensors")
    assert "fc.weight" in weights and ("embed.weight" in weights) != ("head.weight" in weights)
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["step"] == 5 and {"optimizer", "scheduler", "rng"} <= set(state)
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer["step"] == 5 and trainer["train_config"]["batch_size"] == 16 and len(trainer["history"]) == 5
    rebuilt = load_model_dir(out / "checkpoint-10")                   # config.json + weights rebuild the model
    assert isinstance(rebuilt, W.CopyNet)
    assert_params_close(params(rebuilt), params(straight), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-5"]   # keep_checkpoints=2


def test_interrupted_save_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    model = W.make_model()
    opt = torch.optim.AdamW(model.parameters())
    good = T.save_checkpoint(tmp_path / "ckpt", model, opt, step=1)

    def crash(obj, f, *a, **k):                                      # dies half-way through writing the state
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(T.torch, "save", crash)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(tmp_path / "ckpt", model, opt, step=2)     # over an existing checkpoint
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(tmp_path / "fresh", model, opt, step=2)    # into a new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]    # no temp folders, no "fresh"
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 1   # the old one is intact
    assert torch.load(good / "training_state.pt", weights_only=True)["step"] == 1
    assert not torch.equal(load_file(good / "model.safetensors")["fc.weight"], model.fc.weight.detach())


def test_weights_of_another_model_are_a_clear_error_naming_the_file(tmp_path):
    """Issue 17: safetensors returns *sets* of missing / unexpected keys; load_checkpoint sliced them and crashed with
    "TypeError: 'set' object is not subscriptable" instead of saying what is wrong."""
    from mmkit.hub import CheckpointError

    small = W.make_model()
    T.save_checkpoint(tmp_path / "small", small, step=1)
    wider = W.make_model(d_model=24)                                    # same names, other shapes
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit CopyNet: size mismatch"):
        T.load_checkpoint(tmp_path / "small", wider)

    class Extra(W.CopyNet):                                              # one extra layer
        def __init__(self, cfg):
            super().__init__(cfg)
            self.extra = nn.Linear(4, 4)

    with pytest.raises(CheckpointError, match=r"missing \['extra.bias', 'extra.weight'\].*unexpected \[\]"):
        T.load_checkpoint(tmp_path / "small", Extra(W.CopyNetConfig()))
    T.save_checkpoint(tmp_path / "extra", Extra(W.CopyNetConfig()), step=1)
    with pytest.raises(CheckpointError, match=r"missing \[\].*unexpected \['extra.bias', 'extra.weight'\]"):
        T.load_checkpoint(tmp_path / "extra", W.make_model())

    other = nn.Sequential(nn.Linear(3, 3))                               # another model's folder altogether
    T.save_checkpoint(tmp_path / "other", other, step=1)
    with pytest.raises(CheckpointError, match=r"other/model\.safetensors does not match CopyNet: missing "
                                              r"\['embed.weight', 'fc.bias', .*unexpected \['0.bias', '0.weight'\]"):
        T.load_checkpoint(tmp_path / "other", W.make_model())


def test_damaged_checkpoint_files_name_the_file_and_the_fix(tmp_path):
    """First line of defence: the sha256s save_checkpoint records; second (a folder without them, e.g. written by an
    older kit): the readers' own errors, each naming the file and the fix."""
    from mmkit.hub import CheckpointError

    def unrecorded(ck):                                                  # as an older kit wrote it: no hashes
        state = json.loads((ck / "trainer_state.json").read_text())
        del state["sha256"]
        (ck / "trainer_state.json").write_text(json.dumps(state))
        return ck

    model = W.make_model()
    opt = torch.optim.AdamW(model.parameters())
    for record in (True, False):
        ck = T.save_checkpoint(tmp_path / "checkpoint-3", model, opt, step=3)
        ck = ck if record else unrecorded(ck)
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])   # truncated
        match = (r"checkpoint-3/model\.safetensors is corrupt: .*trainer_state.json records.*Save the checkpoint again"
                 if record else r"checkpoint-3/model\.safetensors cannot be read as safetensors.*truncated or damaged.*Delete")
        with pytest.raises(CheckpointError, match=match):
            T.load_checkpoint(ck, W.make_model())
        ck = T.save_checkpoint(tmp_path / "checkpoint-3", model, opt, step=3)
        ck = ck if record else unrecorded(ck)
        (ck / "training_state.pt").write_bytes(b"not a torch file")
        with pytest.raises(CheckpointError, match=r"training_state\.pt (is corrupt|cannot be read)"):
            T.load_checkpoint(ck, W.make_model(), torch.optim.AdamW(W.make_model().parameters()))
    ck = T.save_checkpoint(tmp_path / "checkpoint-3", model, opt, step=3)
    (ck / "trainer_state.json").write_text('{"step": 3,')                # a damaged JSON
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: this trainer state is not valid JSON \(line 1"):
        T.load_checkpoint(ck, W.make_model())


_KILL_BETWEEN_RENAMES = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
import _ddp_worker as W
from mmkit import train as T

out = Path({out!r})
cfg = T.TrainConfig(steps=6, batch_size=8, mixed_precision="no", progress_bar=False, log_every=0, warmup_steps=2,
                    lr=1e-2, out_dir=str(out))
T.train(W.make_model(), W.loss_fn, W.make_dataset(), cfg, stop_at=4)      # writes checkpoint-4
real = Path.rename
def rename(self, target):
    real(self, target)
    if self.name == "checkpoint-4":                                 # the first rename: the old copy moved aside
        os._exit(9)                                                 # killed before the second one
    return target
Path.rename = rename
T.train(W.make_model(seed=5), W.loss_fn, W.make_dataset(), cfg, stop_at=4)   # replaces checkpoint-4: killed
"""


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path):
    """Issue 17: a process killed between the renames of save_checkpoint (replacing checkpoint-N) left only hidden
    .tmp / .old folders; latest_checkpoint returned None and resume_from="auto" silently restarted at step 0."""
    out = tmp_path / "run"
    code = _KILL_BETWEEN_RENAMES.format(tests=str(Path(__file__).parent), out=str(out))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 9, r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-4" not in names and any(n.endswith(".tmp") for n in names) \
        and any(n.endswith(".old") for n in names), names                # the state the kill left
    newer = load_file(next(out.glob(".checkpoint-4.*.tmp")) / "model.safetensors")["fc.weight"]
    older = load_file(next(out.glob(".checkpoint-4.*.old")) / "model.safetensors")["fc.weight"]
    assert not torch.equal(newer, older)
    latest = T.latest_checkpoint(out)
    assert latest == out / "checkpoint-4"                                # put back, not None
    assert torch.equal(load_file(latest / "model.safetensors")["fc.weight"], newer)   # the newer, complete copy
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]     # hidden copies cleaned up
    # and a run resuming "auto" continues at step 4 instead of starting again at 0
    res = train(W.make_model(seed=3), W.loss_fn, W.make_dataset(), quiet(steps=6, batch_size=8, out_dir=str(out)),
                resume_from="auto")
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6] and res.step == 6   # 4 carried over, 2 new
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def test_stale_hidden_copies_are_cleaned_and_a_failed_swap_is_rolled_back(tmp_path, monkeypatch):
    from mmkit import io as mio

    out = tmp_path / "run"
    model = W.make_model()
    T.save_checkpoint(out / "checkpoint-2", model, step=2)
    # what killed writers leave: an incomplete .tmp (no trainer_state.json) of a process that no longer runs, and
    # an .old copy of a finished swap; old-style names (mkdtemp, no pid) count as stale too
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (out / f".checkpoint-2.{dead}-abc123.tmp").mkdir()
    (out / f".checkpoint-2.{dead}-abc123.tmp" / "model.safetensors").write_bytes(b"half")
    (out / ".checkpoint-2.k2j4_x9a.old").mkdir()
    (out / f".checkpoint-9.{os.getpid()}-ffff.tmp").mkdir()              # this process is writing it: left alone
    assert T.latest_checkpoint(out) == out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == [f".checkpoint-9.{os.getpid()}-ffff.tmp", "checkpoint-2"]

    # the second rename fails: the previous checkpoint is put back, the parent folder fsynced after each rename
    synced = []
    monkeypatch.setattr(mio, "fsync_dir", lambda p: synced.append(Path(p)))
    real = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp") and Path(target).name == "checkpoint-2":
            raise OSError("rename failed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with torch.no_grad():
        model.fc.weight.fill_(0.5)
    with pytest.raises(OSError, match="rename failed"):
        T.save_checkpoint(out / "checkpoint-2", model, step=2)
    monkeypatch.setattr(Path, "rename", real)
    assert not torch.all(load_file(out / "checkpoint-2" / "model.safetensors")["fc.weight"] == 0.5)  # old one back
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".checkpoint-9")) == ["checkpoint-2"]
    assert synced.count(out) >= 2, synced                                # moved aside, put back: both made durable
    synced.clear()
    T.save_checkpoint(out / "checkpoint-2", model, step=2)
    assert torch.all(load_file(out / "checkpoint-2" / "model.safetensors")["fc.weight"] == 0.5)
    assert synced.count(out) >= 2, synced                                # old aside + new in, each fsynced


def test_checkpoint_files_are_readable_by_others(tmp_path):
    """Issue 17: files written by atomic_write_* (trainer_state.json, config.json) were 0600 (mkstemp's mode)."""
    old = os.umask(0o022)
    try:
        ck = T.save_checkpoint(tmp_path / "ck", W.make_model(), torch.optim.AdamW(W.make_model().parameters()), step=1)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in ck.iterdir()}
    assert modes == {n: 0o644 for n in ("config.json", "model.safetensors", "trainer_state.json",
                                        "training_state.pt")}, modes
    assert ck.stat().st_mode & 0o777 == 0o755


# --- precision and hooks ----------------------------------------------------------------------------------
def test_auto_precision_threshold_and_bf16_training():
    narrow = nn.Sequential(nn.Linear(128, 512), nn.Linear(512, 128))   # a 128-wide FFN: width 128
    wide = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 1024))
    assert T.model_width(narrow) == 128 and T.model_width(wide) == 1024
    assert T.resolve_mixed_precision(narrow, "auto") == "no"
    assert T.resolve_mixed_precision(wide, "auto") == ("bf16" if T.cpu_supports_fast_bf16() else "no")
    assert T.resolve_mixed_precision(narrow, "bf16") == "bf16"

    model = W.make_model()
    res = train(model, W.loss_fn, W.make_dataset(), quiet(steps=4, batch_size=8, mixed_precision="bf16"))
    assert res.mixed_precision == "bf16" and all(math.isfinite(h["loss"]) for h in res.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())           # autocast, fp32 master weights
    res = train(model, W.loss_fn, W.make_dataset(), quiet(steps=2, batch_size=8))  # switching back works
    assert res.mixed_precision == "no"


def test_clip_fn_hook_and_local_clipping():
    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    m = Moe()
    for p in m.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip = T.local_clip_fn(lambda name, p: name.startswith("experts."), local_max_norm=0.5)
    norm = clip(m, 1.0)
    shared = torch.cat([p.grad.flatten() for p in m.shared.parameters()]).norm()
    experts = torch.cat([p.grad.flatten() for p in m.experts.parameters()]).norm()
    assert float(norm) == pytest.approx(10.0 * math.sqrt(20), rel=1e-5)   # norm before clipping, shared only
    assert float(shared) == pytest.approx(1.0, rel=1e-4) and float(experts) == pytest.approx(0.5, rel=1e-4)

    calls = []

    def counting_clip(model, max_norm):
        calls.append(max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    res = train(W.make_model(), W.loss_fn, W.make_dataset(), quiet(steps=3, batch_size=8, clip_grad_norm=0.25),
                clip_fn=counting_clip)
    assert calls == [0.25] * 3 and all("grad_norm" in h for h in res.history)


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors():
    ds, m = W.make_dataset(), W.make_model()
    with pytest.raises(ValueError, match=r"batch_size 10 is not divisible by .* grad_accum_steps \(4\) = 4"):
        train(m, W.loss_fn, ds, quiet(steps=1, batch_size=10, grad_accum_steps=4))
    with pytest.raises(ValueError, match="scalar"):
        train(m, lambda model, b: nn.functional.cross_entropy(model(b[0]), b[1], reduction="none"), ds,
              quiet(steps=1, batch_size=8))
    with pytest.raises(TypeError, match="IterableDataset"):
        train(m, W.loss_fn, torch.utils.data.IterableDataset(), quiet(steps=1, batch_size=8))
    with pytest.raises(ValueError, match="mixed_precision"):
        train(m, W.loss_fn, ds, quiet(steps=1, batch_size=8, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="returned a batch of 4 examples"):
        train(m, W.loss_fn, lambda g, n: copy_batch_fn(g, 4), quiet(steps=1, batch_size=8))
    before = params(m)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train(m, lambda model, b: W.loss_fn(model, b)[0] * float("nan"), ds, quiet(steps=1, batch_size=8))
    assert all(torch.equal(v, before[k]) for k, v in params(m).items())      # caught before the update
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        train(m, W.loss_fn, ds, quiet(steps=1, batch_size=8), resume_from="/nonexistent/run")


def test_precision_benchmark_runs(capsys):
    from mmkit.cli import main

    assert main(["bench", "precision", "--widths", "32", "--kinds", "mlp", "--repeats", "1", "--warmup", "0",
                 "--seq", "4"]) == 0
    out = capsys.readouterr().out
    assert "fp32/bf16" in out and "mlp" in out


# --- two gloo processes --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           str(WORKER), "--out", str(out), "--steps", "8", "--batch", "16", "--accum", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("worker done: world 2, step 8") == 2, proc.stdout

    # one process, no accumulation, same global batch of 16 (each worker saw 2 micro-batches of 4)
    model = W.make_model()
    cfg = quiet(steps=8, batch_size=16, grad_accum_steps=1, out_dir=None)
    res = train(model, W.loss_fn, W.make_dataset(), cfg)
    ckpt = out / "checkpoint-8"
    ddp = load_file(ckpt / "model.safetensors")
    assert_params_close({k: ddp[k] for k in ddp}, {k: v for k, v in params(model).items() if k in ddp}, atol=1e-5)
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer["num_processes"] == 2
    for a, b in zip(trainer["history"], res.history):                 # losses averaged over the 2 processes
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)   # DDP-averaged = full-batch gradient


# --- issue 17 sweep (second round): typed TrainConfig, hashes in every saved checkpoint -------------------------
@pytest.mark.parametrize("field,value,words", [
    ("lr", "abc", "lr must be a number > 0"), ("lr", "3e-4", "lr must be a number > 0"),
    ("keep_checkpoints", -1, "keep_checkpoints must be a whole number >= 0"),   # [:-(-1)] deleted every checkpoint
    ("betas", (0.9,), "betas must be two numbers"), ("clip_grad_norm", -1.0, "clip_grad_norm must be None, 0"),
    ("save_every", 1.5, "save_every must be a whole number"), ("progress_bar", "no", "progress_bar must be true or false"),
    ("weight_decay", float("nan"), "weight_decay must be a number >= 0"), ("out_dir", 5, "out_dir must be a folder"),
])
def test_every_train_config_value_is_checked_before_anything_runs(tmp_path, field, value, words):
    cfg = quiet(**{"steps": 2, "batch_size": 4, "save_every": 1, "out_dir": str(tmp_path / "run"), field: value})
    with pytest.raises(ValueError, match=words):
        train(W.make_model(), W.loss_fn, W.make_dataset(), cfg)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())     # nothing ran or was deleted


def test_a_flipped_byte_in_any_saved_checkpoint_is_caught(tmp_path):
    """save_checkpoint records the sha256 of every file it wrote in trainer_state.json and loading checks them (before
    this, only run_recipe's folders had hashes: a checkpoint-N with a flipped byte resumed silently)."""
    out = tmp_path / "run"
    train(W.make_model(), W.loss_fn, W.make_dataset(), quiet(steps=2, batch_size=4, out_dir=str(out)))
    ckpt = T.latest_checkpoint(out)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert set(state["sha256"]) >= {"model.safetensors", "config.json"}
    T.load_checkpoint(ckpt, W.make_model())                                  # intact: loads
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40                                                         # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(T.CheckpointError, match=r"model.safetensors is corrupt: .* trainer_state.json records"):
        T.load_checkpoint(ckpt, W.make_model())


def test_a_delta_checkpoint_stores_only_what_changed_and_loads_over_its_named_base(tmp_path, monkeypatch):
    """A fine-tune that froze part of a shipped model is saved as the tensors it changed plus base.json (the base's
    name and weights hash); loading fills the rest from the base, found by name, and refuses a different base."""
    from mmkit import hub
    from mmkit.hub import CheckpointError
    from mmkit.io import sha256_file

    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    def ship(model, **kw):               # a shipped folder is complete once its recipe.json exists
        T.save_checkpoint(tmp_path / "shipped" / "copynet-base", model, step=1, **kw)
        (tmp_path / "shipped" / "copynet-base" / "recipe.json").write_text('{"kind": "model"}')

    base = W.make_model(seed=0)
    ship(base, weights_dtype=torch.float16)
    base = hub.load_model_dir(tmp_path / "shipped" / "copynet-base")          # as shipped (float16-rounded)
    tuned = W.make_model(seed=0)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():                                                     # "fine-tune" fc and the norm only
        tuned.fc.weight.add_(0.5)
        tuned.norm.bias.add_(0.25)
    same = T.unchanged_weights(tuned, base, torch.float16)
    assert sorted(same) == ["embed.weight", "fc.bias", "head.weight", "norm.weight"]
    record = {"checkpoint": "copynet-base", "sha256": sha256_file(tmp_path / "shipped" / "copynet-base" /
                                                                  "model.safetensors")}
    out = T.save_checkpoint(tmp_path / "tuned", tuned, step=2, exclude=same, base=record,
                            weights_dtype=torch.float16)
    assert sorted(load_file(out / "model.safetensors")) == ["fc.weight", "norm.bias"]
    assert json.loads((out / "base.json").read_text()) == record
    loaded = hub.load_path(out)
    for k, v in T.rounded_to_half(tuned).state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "tied weights stay tied"

    # the base retrained (other weights under the same name): refused, naming both and the fix
    ship(W.make_model(seed=3))
    with pytest.raises(CheckpointError, match=r"stores only what it changed over 'copynet-base'.*not the "
                                              r"copynet-base it was trained from.*put the shipped copynet-base back"):
        hub.load_path(out)
    # a delta without its base's share of the tensors is a clear error too
    ship(nn.Sequential(nn.Linear(2, 2)))
    (out / "base.json").write_text(json.dumps(dict(record, sha256=sha256_file(
        tmp_path / "shipped" / "copynet-base" / "model.safetensors"))))
    with pytest.raises(CheckpointError, match=r"missing \['embed.weight', 'fc.bias', 'norm.weight'\]"):
        hub.load_model_dir(out, verify=False)
    with pytest.raises(ValueError, match=r"base must be \{'checkpoint': name, 'sha256'"):
        T.save_checkpoint(tmp_path / "bad", tuned, base={"checkpoint": "copynet-base"})


# --- int8 weight storage -------------------------------------------------------------------------------
def test_int8_rows_of_a_hand_computed_matrix():
    """One float16 scale per row, max |row| / 127; q = round(w / scale) in [-127, 127]; an all-zero row gets scale 1.
    Row 0: 2 / 127 = 0.0157480... is stored as the float16 0.0157470703125 (= 2**-6 + 8 * 2**-16), so
    1 / s = 63.50 -> 64, -2 / s = -127.008 -> -127, 0.5 / s = 31.75 -> 32."""
    from mmkit.hub import from_int8_rows, int8_rows

    q, scale = int8_rows(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32], [0, 0, 0]]
    assert scale.dtype == torch.float16 and scale.tolist() == [0.0157470703125, 1.0]
    s = 0.0157470703125
    assert from_int8_rows(q, scale).tolist() == [[64 * s, -127 * s, 32 * s], [0.0, 0.0, 0.0]]
    q, scale = int8_rows(torch.tensor([[1e-6, -3e-4]]))    # 3e-4 / 127 is below float16's normal range: 2**-14
    assert scale.tolist() == [2.0 ** -14] and q.tolist() == [[0, -5]]           # 3e-4 * 2**14 = 4.92


def test_an_int8_checkpoint_loads_back_within_half_a_step_with_ties_and_errors_kept(tmp_path):
    """save_checkpoint(weights_dtype=torch.int8): matrices as int8 rows + float16 scales (marked in the metadata),
    norms / biases in float16, the tied weight once; loading gives float32 weights within scale / 2 of the model's
    (exactly rounded_to_int8's), still tied, outputs close to the float32 model's; a damaged file is the usual error."""
    from safetensors import safe_open

    from mmkit.hub import CheckpointError, load_model_dir

    model = W.make_model(seed=0)
    with torch.no_grad():
        model.fc.weight[3].mul_(50)                                   # rows of very different ranges
        model.fc.weight[5].zero_()                                    # and an all-zero row
    ck = T.save_checkpoint(tmp_path / "int8", model, step=1, weights_dtype=torch.int8)
    with safe_open(str(ck / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"mmkit_weights": "int8-rowwise"}
        dtypes = {k: fh.get_tensor(k).dtype for k in fh.keys()}
        scale = fh.get_tensor("fc.weight.int8_scale")
    assert dtypes == {"embed.weight": torch.int8, "embed.weight.int8_scale": torch.float16, "fc.weight": torch.int8,
                      "fc.weight.int8_scale": torch.float16, "fc.bias": torch.float16,
                      "norm.weight": torch.float16, "norm.bias": torch.float16}     # head.weight: tied to embed
    assert scale.shape == (16,) and scale[5] == 1.0

    loaded = W.make_model(seed=7)
    T.load_checkpoint(ck, loaded)
    err = (loaded.fc.weight - model.fc.weight).abs().detach()
    assert (err <= scale.float()[:, None] / 2 + 1e-7).all() and (loaded.fc.weight[5] == 0).all()
    assert (loaded.fc.bias - model.fc.bias.half().float()).abs().max() == 0
    for k, v in T.rounded_to_int8(model).state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "tied weights stay tied"
    rebuilt = load_model_dir(ck)
    assert rebuilt.head.weight.data_ptr() == rebuilt.embed.weight.data_ptr()
    from mmkit.runs import load_init                                  # a next stage's init_from reads int8 too

    staged = W.make_model(seed=9)
    report = load_init(staged, ck)
    assert report.dropped == [] and report.new == []                  # the scales are not weights of their own
    assert all(torch.equal(staged.state_dict()[k], v) for k, v in loaded.state_dict().items())
    x = W.make_dataset(64).tensors[0]
    with torch.no_grad():
        ref, out = model.eval()(x), rebuilt(x)
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()                 # measured: 0.015
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95

    # the existing checks hold for int8 files: another model size, another model, a truncated file
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit CopyNet: size mismatch"):
        T.load_checkpoint(ck, W.make_model(d_model=24))
    other = nn.Sequential(nn.Linear(3, 3))
    T.save_checkpoint(tmp_path / "other", other, step=1, weights_dtype=torch.int8)
    with pytest.raises(CheckpointError, match=r"does not match CopyNet: missing \['embed.weight', 'fc.bias', .*"
                                              r"unexpected \['0.bias', '0.weight'\]"):
        T.load_checkpoint(tmp_path / "other", W.make_model())
    state = json.loads((ck / "trainer_state.json").read_text())
    del state["sha256"]                                               # unrecorded: the reader itself must object
    (ck / "trainer_state.json").write_text(json.dumps(state))
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read as safetensors.*truncated"):
        T.load_checkpoint(ck, W.make_model())


def test_int8_stores_whole_models_and_a_float16_delta_loads_over_an_int8_base(tmp_path, monkeypatch):
    """A delta is refused in int8 (its left-out weights are compared in float16), with the fix in the message; a
    float16 delta over an int8 base loads its unchanged weights from the base's int8 rows, bit for bit."""
    from mmkit import hub
    from mmkit.io import sha256_file

    monkeypatch.setattr(hub, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "shipped" / "copynet-base"
    T.save_checkpoint(d, W.make_model(seed=0), step=1, weights_dtype=torch.int8)
    (d / "recipe.json").write_text('{"kind": "model"}')
    base = hub.load_model_dir(d)                                             # as shipped (int8 rows)
    tuned = W.make_model(seed=0)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.fc.weight.add_(0.5)
    record = {"checkpoint": "copynet-base", "sha256": sha256_file(d / "model.safetensors")}
    same = T.unchanged_weights(tuned, base, torch.float16)
    for kw in (dict(exclude=same, base=record), dict(exclude=same)):
        with pytest.raises(ValueError, match=r"weights_dtype=torch\.int8 stores whole models only.*"
                                             r"Save the delta with weights_dtype=torch\.float16"):
            T.save_checkpoint(tmp_path / "tuned", tuned, step=2, weights_dtype=torch.int8, **kw)
    with pytest.raises(ValueError, match=r"cannot be stored in int8"):
        T.unchanged_weights(tuned, base, torch.int8)
    with pytest.raises(ValueError, match=r"is not a weight storage"):
        T.save_checkpoint(tmp_path / "tuned", tuned, weights_dtype=torch.uint8)
    assert not (tmp_path / "tuned").exists()

    out = T.save_checkpoint(tmp_path / "tuned", tuned, step=2, exclude=same, base=record, weights_dtype=torch.float16)
    assert sorted(load_file(out / "model.safetensors")) == ["fc.weight"]
    loaded = hub.load_path(out)
    assert torch.equal(loaded.fc.weight, tuned.fc.weight.half().float())      # the delta's own tensor
    for k, v in base.state_dict().items():                                     # the rest: the int8 base, dequantized
        if k != "fc.weight":
            assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "tied weights stay tied"
