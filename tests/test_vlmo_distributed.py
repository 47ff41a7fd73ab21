"""VLMo stage 3 on two gloo processes equals one process on the global batch (VLMo §3.3, Table 6): the ITC loss
(features gathered across processes), the ITM hard negatives (drawn from the GLOBAL similarities), the ITM and MLM
losses (DDP's average = the global mean) and every parameter's gradient after DDP."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkit.vlmo.tasks.pretrain import prepare_stage

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_vlmo_pretrain_worker.py")

# The tiny model, batch and case live in the worker so that both sides of the comparison share them.
_spec = importlib.util.spec_from_file_location("_vlmo_pretrain_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
sys.modules["_vlmo_pretrain_worker"] = W
_spec.loader.exec_module(W)

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b, msg: str, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{msg}: {m}")


@pytest.mark.slow
def test_stage3_loss_and_gradients_on_two_gloo_processes_equal_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W.WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["stage3"] for r in range(W.WORLD)]

    model = W.make_model()
    prepare_stage(model, 3)
    ref = W.stage3_case(model, 0, 1)                                   # one process, the whole global batch
    assert ref["frozen"] == ["image_embed.mask_token", "mim_head.bias", "mim_head.weight"]
    assert ref["grads"]["temperature.log_scale"].abs() > 0 and ref["grads"]["blocks.1.ffn.vl.mlp.fc1.weight"].abs().sum() > 0
    world = W.WORLD
    for r, got in enumerate(ranks):
        sl = W.rows(r, world)
        close(got["itc"], ref["itc"], f"rank {r} ITC (the global batch's, on every process)")
        # global hard negatives: this rank's rows of the global draw, indices into the gathered batch
        assert torch.equal(got["text_for_image"], ref["text_for_image"][sl])
        assert torch.equal(got["image_for_text"], ref["image_for_text"][sl])
        assert got["frozen"] == ref["frozen"]
    assert any(int(i) not in range(W.rows(r, world).start, W.rows(r, world).stop)
               for r, got in enumerate(ranks) for i in got["text_for_image"]), "some negatives come from the other rank"
    # ITM (each rank: its B positives + 2B negatives) and MLM (re-weighted by the global masked-token count) average
    # over the processes to the one-process numbers, and so does the total
    for key in ("itm", "mlm", "loss"):
        close(sum(got[key] for got in ranks) / world, ref[key], f"mean over ranks of {key}")
    # after DDP's gradient average every trainable parameter holds the one-process gradient
    assert set(ranks[0]["grads"]) == set(ref["grads"])
    for r, got in enumerate(ranks):
        for k, g in got["grads"].items():
            close(g, ref["grads"][k], f"rank {r} DDP grad of {k}")
