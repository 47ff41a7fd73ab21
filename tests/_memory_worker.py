"""Worker for tests/test_scaled_memory.py (not collected: no test_ prefix): trains a small M6 for 2 steps
in a fresh process and prints its peak live tensor bytes and its peak resident memory above the baseline taken just
before the model is built.

    python tests/_memory_worker.py --checkpointing 0|1
"""
from __future__ import annotations

import argparse
import json
import resource
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of every tensor storage alive, and their high-water mark: what a GPU allocator's
    max_memory_allocated reports, counted at the operator level, so neither malloc's caching nor how the host
    reports RSS (ru_maxrss differs between sandboxes) enters the number."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)                    # the storage's Python object lives exactly as long as it does
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._release, key)
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpointing", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)
    import mmkit.m6  # noqa: F401  (registers the M6 configs)
    from mmkit.config import build_model, load_config, replace_config
    from mmkit.m6.masking import SEG_DECODER, SEG_ENCODER, SEG_VISUAL, unified_mask
    from mmkit.runs import enable_activation_checkpointing
    from mmkit.train import default_param_groups

    cfg = replace_config(load_config("m6-tiny"), d_model=512, n_layers=4, n_heads=8, d_ff=2048)
    B, We, Wd = a.batch, 48, 48
    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, 32, 32, generator=g)
    enc = torch.randint(7, 380, (B, We), generator=g)
    dec = torch.randint(7, 380, (B, Wd + 1), generator=g)
    nv = (cfg.image_size // 8) ** 2
    seg = torch.cat([torch.full((B, nv), SEG_VISUAL), torch.full((B, We), SEG_ENCODER), torch.full((B, Wd), SEG_DECODER)], 1)
    mask = unified_mask(segment_ids=seg).mask
    # one step of a tiny copy first: the runtime's one-time allocations (autograd engine, oneDNN / BLAS buffers,
    # allocator arenas) belong to the baseline, not to the model's training step
    tiny = build_model(replace_config(cfg, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    topt = torch.optim.AdamW(tiny.parameters(), lr=1e-4)
    tiny(images[:2], enc[:2], dec[:2, :-1], dec[:2, 1:], mask=mask[:2]).loss.backward()
    topt.step()
    del tiny, topt
    base = rss_now()
    torch.manual_seed(0)
    with LiveTensorBytes() as tensors:
        model = build_model(cfg)
        if a.checkpointing:
            enable_activation_checkpointing(model)
        opt = torch.optim.AdamW(default_param_groups(model, 0.01), lr=1e-4)
        model.train()
        for _ in range(2):                         # step 2 holds the optimizer states with the activations
            out = model(images, enc, dec[:, :-1], dec[:, 1:], mask=mask)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak_delta": peak - base, "tensor_peak": tensors.peak, "params": n, "batch": B, "tokens": nv + We + Wd, "predicted": Wd,
                      "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_ff": cfg.d_ff,
                      "vocab": cfg.vocab_size}))


if __name__ == "__main__":
    main()
