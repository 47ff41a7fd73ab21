"""The README's scenario table, computed from the configs: memory per GPU (mmkit.scale.estimate_memory) and expected
throughput from the FLOPs per example (mmkit.scale.flops_per_example, within 3.4% of torch's FlopCounterMode on M6,
tests/test_scaled_memory.py) at an ASSUMED 40% model-FLOPs utilisation of A100s (312 bf16 TFLOP/s).

    python scaled/plan.py            # prints the markdown table of scaled/README.md
"""
from __future__ import annotations

import mmkit.zoo as zoo
from mmkit.scale import ASSUMED_MFU, Stack, Workload, estimate_memory, throughput

GIB = 2 ** 30


def _m6(name: str) -> Workload:
    c = zoo.load_config(name)
    d_ff = getattr(c, "expert_d_ff", None) or c.d_ff
    # 224 px -> 7x7 = 49 visual tokens, 128 encoder + 128 decoder text tokens (one stack over all of them, M6 §3.2)
    return Workload([Stack("m6", c.n_layers, 49 + 128 + 128, c.d_model, c.n_heads, d_ff)], predicted=128,
                    vocab=c.vocab_size, note="49 + 128 + 128 tokens")


def _vlmo(name: str) -> Workload:
    c = zoo.load_config(name)
    n_img, n_txt = (c.image_size // c.patch_size) ** 2 + 1, 40
    # stage 3: image-only + text-only passes (ITC), fusion passes for ITM (1 positive + 2 negatives) and MLM
    return Workload([Stack("image", c.n_layers, n_img, c.d_model, c.n_heads, c.d_ff),
                     Stack("text", c.n_layers, n_txt, c.d_model, c.n_heads, c.d_ff),
                     Stack("fusion", c.n_layers, n_img + n_txt, c.d_model, c.n_heads, c.d_ff, passes=4)],
                    predicted=6, vocab=c.vocab_size, note=f"{n_img} image + {n_txt} text tokens")


def _mplug(name: str) -> Workload:
    c = zoo.load_config(name)
    n_img, n_txt = (c.image_size // c.patch_size) ** 2 + 1, 40
    return Workload([Stack("vision", c.vision_layers, n_img, c.vision_width, c.vision_heads, c.vision_d_ff),
                     Stack("text", c.text_layers, n_txt, c.d_model, c.n_heads, c.d_ff, passes=2),
                     Stack("fusion", c.fusion_layers, n_txt + n_img, c.d_model, c.n_heads, c.d_ff, passes=4),
                     Stack("decoder", c.decoder_layers, n_txt, c.d_model, c.n_heads, c.d_ff, context=n_img + n_txt)],
                    predicted=40, vocab=c.vocab_size, note=f"{n_img} image + {n_txt} text tokens")


# (run config, launcher command, GPUs, strategy, batch per GPU, checkpointing, expert parallel)
SCENARIOS = [
    ("m6_base_pretrain.yaml", "accelerate launch --config_file scaled/launch/accelerate/ddp.yaml", "m6-base", 8, "ddp", 32, True),
    ("m6_10b_pretrain.yaml", "accelerate launch --config_file scaled/launch/accelerate/ds_zero3.yaml", "m6-10b", 8, "zero3", 8, True),
    ("m6_10b_pretrain.yaml", "sbatch --nodes 4 scaled/launch/slurm_accelerate.sbatch .../fsdp.yaml", "m6-10b", 32, "fsdp", 8, True),
    ("m6_100b_pretrain.yaml", "sbatch --nodes 16 scaled/launch/slurm_torchrun.sbatch", "m6-100b", 128, "ddp", 8, True),
    ("vlmo_base_stage3.yaml", "accelerate launch --config_file scaled/launch/accelerate/ddp.yaml", "vlmo-base", 8, "ddp", 64, True),
    ("vlmo_large_stage3.yaml", "accelerate launch --config_file scaled/launch/accelerate/ds_zero2.yaml", "vlmo-large", 8, "zero2", 32, True),
    ("mplug_base_pretrain.yaml", "accelerate launch --config_file scaled/launch/accelerate/ddp.yaml", "mplug-base", 8, "ddp", 32, True),
    ("mplug_large_pretrain.yaml", "accelerate launch --config_file scaled/launch/accelerate/fsdp.yaml", "mplug-large", 8, "fsdp", 32, True),
]


def rows() -> list[str]:
    out = ["| run config | command | hardware | model | params | memory / GPU (est.) | without checkpointing | "
           "samples/s (tokens/s) at 40% MFU |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run, cmd, model_name, gpus, strategy, b, ckpt in SCENARIOS:
        model = zoo.build_model(model_name, device="meta")
        n = sum(p.numel() for p in model.parameters())
        w = (_m6 if model_name.startswith("m6") else _vlmo if model_name.startswith("vlmo") else _mplug)(model_name)
        ep = model_name == "m6-100b"
        experts = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k) if ep else 0
        kw = dict(precision="bf16", strategy=strategy, world=gpus, expert_params=experts, expert_parallel=ep)
        with_ck = estimate_memory(n, w, b, checkpointing=True, **kw)
        without = estimate_memory(n, w, b, checkpointing=False, **kw)
        active = n - experts + (experts // zoo.load_config(model_name).n_experts if ep else 0)
        t = throughput(w, world=gpus, gpu="A100", mfu=ASSUMED_MFU, checkpointing=ckpt)
        out.append(f"| `{run}` | `{cmd} scaled/train.py ...` | {gpus} x A100 80GB ({strategy}) | {model_name} | "
                   f"{n / 1e9:.2f}B ({active / 1e9:.2f}B active) | {with_ck.peak / GIB:.1f} GiB (batch {b}) | "
                   f"{without.peak / GIB:.1f} GiB | {t.samples_per_s:,.0f} ({t.tokens_per_s:,.0f}) |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
