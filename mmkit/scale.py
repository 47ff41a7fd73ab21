"""Planning full-size runs: memory per device, FLOPs per example and expected throughput, from the configs alone.

    w = workload_of(run_cfg)                             # the transformer stacks one example runs through
    est = estimate_memory(n_params, w, batch_per_device=8, precision="bf16", strategy="zero3", world=8,
                          checkpointing=True)
    est.total / 2**30, est.table()                       # GiB per device: parameters, gradients, optimizer, activations
    flops_per_example(w, n_params)                       # forward + backward FLOPs of one example
    throughput(w, n_active_params, world=8)              # samples/s and tokens/s at an assumed utilisation

Memory per device (bytes), for AdamW (two fp32 moments):

==============  =========================================  ==================================================
part            no sharding (DDP; EP: experts / W)         ZeRO-2 / ZeRO-3 / FSDP full shard over W devices
==============  =========================================  ==================================================
parameters      4 P (fp32; autocast keeps fp32 weights)    ZeRO-3 / FSDP: 4 P / W + the gathered layers
gradients       4 P                                        4 P / W (ZeRO-2, ZeRO-3, FSDP)
optimizer       8 P (exp_avg, exp_avg_sq)                  8 P / W
activations     per layer and token, as counted below     the same (data parallel: each device its examples)
==============  =========================================  ==================================================

DeepSpeed with bf16 keeps bf16 weights and gradients plus an fp32 master copy: 2 + 2 + 12 bytes per parameter (the
ZeRO paper's 16), sharded as above. Activations per transformer layer and token, counted from the tensors
:class:`mmkit.nn.blocks.TransformerBlock` saves for backward (``torch.autograd.graph.saved_tensors_hooks``;
tests/test_scaled_memory.py checks the count): fp32 ``8 D + 2 F + h + 4`` values (LayerNorm inputs and statistics, q, k, v,
the attention output and its log-sum-exp, the FFN's two hidden tensors) plus the float attention mask the layer builds
(``L`` values per token) and, with dropout on a CPU, the attention probabilities (the math kernel): ``h L`` values.
Under bf16 autocast the matmul operands are 2 bytes and each layer keeps a bf16 copy of its weights. With activation
checkpointing a layer keeps only its input (``D`` values) and one layer is recomputed at a time. Outside the stacks:
the output layer's logits and their log-softmax (2 V values per predicted token, fp32).

The peak of a step is not the plain sum: backward frees a layer's activations as it writes that layer's gradients,
so the peak is ``parameters + optimizer + max(activations, gradients) + one layer's backward workspace`` (the sum is
also reported as ``upper``). The estimate is compared with the measured peak of live tensor storage of a CPU
training run in tests/test_scaled_memory.py (within 15%).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Stack", "Workload", "MemoryEstimate", "estimate_memory", "flops_per_example", "throughput",
           "Throughput", "GPU_PEAK_TFLOPS", "ASSUMED_MFU", "PAPER_PARAMS", "layer_activation_values"]

# bf16 dense peak of the GPUs the README's table assumes (NVIDIA data sheets), and the model FLOPs utilisation
# assumed for the throughput column (40%: what well-tuned data-parallel transformer training reaches on A100s;
# lower with small per-device batches). Measure yours: `accelerate launch ... scaled/train.py` logs seconds per step.
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}
ASSUMED_MFU = 0.4

# Parameter counts the papers (and the official READMEs) give, and what the kit counts to compare with them.
PAPER_PARAMS = {
    "m6-base": (327e6, "M6 Table 4", "all parameters"),
    "m6-10b": (10e9, "M6 Table 4", "all parameters"),
    "m6-100b": (100e9, "M6 Table 4", "all parameters"),
    "vlmo-base": (175e6, "VLMo §4.1", "backbone (VLMo.num_backbone_parameters)"),
    "vlmo-large": (562e6, "VLMo §4.1", "backbone (VLMo.num_backbone_parameters)"),
    "mplug-base": (350e6, "mPLUG README", "online model (MPLUG.parameter_counts()['online'])"),
    "mplug-large": (600e6, "mPLUG README", "online model (MPLUG.parameter_counts()['online'])"),
}


@dataclass
class Stack:
    """A transformer stack as one example runs it."""
    name: str
    layers: int                 # transformer blocks
    tokens: int                 # sequence length L of one pass
    d_model: int                # D
    n_heads: int                # h
    d_ff: int                   # F (of the FFN that runs: one expert's under MoE)
    passes: int = 1             # passes per example with gradients (e.g. ITM positives + 2 negatives = 3)
    context: int = 0            # cross-attention keys per pass (0: no cross-attention)
    dropout: bool = False       # attention dropout on (CPU: the math kernel keeps the probabilities)


@dataclass
class Workload:
    """What one training example costs: its stacks, and the output-layer positions."""
    stacks: list[Stack]
    predicted: int = 0          # tokens whose logits over the vocabulary are computed (decoder / MLM positions)
    vocab: int = 0              # V
    note: str = ""              # what was assumed (typical lengths)

    @property
    def tokens(self) -> int:
        return sum(s.tokens * s.passes for s in self.stacks)


def layer_activation_values(s: Stack, cpu: bool = True) -> tuple[float, float]:
    """(values kept per token by one layer in the matmul precision, values kept in fp32), see the module doc."""
    D, F, h, L = s.d_model, s.d_ff, s.n_heads, s.tokens
    mm = 8 * D + 2 * F + h
    if s.context:
        mm += 4 * D                                           # cross-attention: its norm, q, output, log-sum-exp
    fp32 = 4 + L + (s.context or 0)                           # norm statistics, the float masks
    if s.dropout and cpu:
        fp32 += h * (L + s.context) * 2                       # attention probabilities + dropout result (math kernel)
    return mm, fp32


class MemoryEstimate(NamedTuple):
    parameters: float           # bytes per device
    gradients: float
    optimizer: float
    activations: float
    workspace: float            # one layer's backward scratch (+ gathered layers under ZeRO-3 / FSDP)
    peak: float                 # parameters + optimizer + max(activations, gradients) + workspace
    upper: float                # the plain sum of every part

    @property
    def total(self) -> float:
        return self.peak

    def table(self) -> str:
        gib = 2 ** 30
        rows = [(k, getattr(self, k)) for k in ("parameters", "gradients", "optimizer", "activations", "workspace",
                                                  "peak", "upper")]
        return "\n".join(f"{k:<12}{v / gib:>10.2f} GiB" for k, v in rows)


def estimate_memory(n_params: int, workload: Workload, batch_per_device: int, precision: str = "bf16",
                    strategy: str = "ddp", world: int = 1, checkpointing: bool = False, expert_params: int = 0,
                    expert_parallel: bool = False, cpu: bool = False) -> MemoryEstimate:
    """Bytes per device of a training step (see the module doc). ``strategy``: "ddp", "zero2", "zero3" or "fsdp"
    (full shard); ``precision`` "no" (fp32) or "bf16" (autocast under DDP / FSDP, bf16 weights under DeepSpeed);
    ``expert_params`` of ``n_params`` are MoE experts, divided over the ``world`` devices with ``expert_parallel``."""
    if strategy not in ("ddp", "zero2", "zero3", "fsdp"):
        raise ValueError(f"strategy must be ddp, zero2, zero3 or fsdp, got {strategy!r}")
    W = max(1, world)
    P = float(n_params)
    if expert_parallel and expert_params:
        P = (n_params - expert_params) + expert_params / W
    deepspeed = strategy in ("zero2", "zero3")
    if deepspeed and precision == "bf16":
        w_b, g_b, o_b = 2.0, 2.0, 12.0                         # bf16 weights + grads, fp32 master + 2 moments
    else:
        w_b, g_b, o_b = 4.0, 4.0, 8.0
    shard_p = strategy in ("zero3", "fsdp")
    shard_g = strategy in ("zero2", "zero3", "fsdp")
    params = w_b * P / (W if shard_p else 1)
    grads = g_b * P / (W if shard_g else 1)
    optim = o_b * P / (W if strategy != "ddp" else 1)

    e_mm = 2.0 if precision == "bf16" else 4.0
    B = batch_per_device
    act, work = 0.0, 0.0
    biggest_layer = 0.0
    for s in workload.stacks:
        mm, f32 = layer_activation_values(s, cpu=cpu)
        per_layer = B * s.passes * s.tokens * (e_mm * mm + 4.0 * f32)
        if precision == "bf16" and not deepspeed:
            layer_params = 4 * s.d_model ** 2 + 2 * s.d_model * s.d_ff + (4 * s.d_model ** 2 if s.context else 0)
            per_layer += 2.0 * layer_params * s.passes            # autocast's bf16 weight copies, kept for backward
        if checkpointing:
            act += s.layers * B * s.passes * s.tokens * s.d_model * e_mm
            biggest_layer = max(biggest_layer, per_layer)
        else:
            act += s.layers * per_layer
        biggest_layer = max(biggest_layer, per_layer / max(1, s.passes))
    act += B * workload.predicted * workload.vocab * 4.0 * 2     # logits + log-softmax (fp32)
    if checkpointing:
        act += biggest_layer                                       # the layer being recomputed
    work = biggest_layer                                           # a layer's gradient scratch in backward
    if shard_p:
        widest = max((4 * s.d_model ** 2 + 2 * s.d_model * s.d_ff for s in workload.stacks), default=0)
        work += 2 * widest * (2.0 if precision == "bf16" else 4.0)  # two gathered layers (prefetch)
    peak = params + optim + max(act, grads) + work
    return MemoryEstimate(params, grads, optim, act, work, peak, params + grads + optim + act + work)


def flops_per_example(workload: Workload, matmul_params_per_token: float | None = None,
                      checkpointing: bool = False) -> float:
    """Forward + backward FLOPs of one example: 6 x (multiply-adds of the linear layers) per token (2 forward, 4
    backward), the attention score and mix products (4 L D per token and layer forward, x3), and the output layer
    (2 D V per predicted token, x3). With checkpointing the forward of the stacks runs twice (x4/3 of them)."""
    total = 0.0
    for s in workload.stacks:
        D, F, L = s.d_model, s.d_ff, s.tokens
        lin = 4 * D * D + 2 * D * F + (4 * D * D if s.context else 0)      # q, k, v, o (+ cross) + the FFN
        attn = 2 * L * D + (2 * s.context * D if s.context else 0)          # QK^T and AV per token (multiply-adds)
        per = s.layers * s.passes * L * 2 * (lin + attn)                     # forward FLOPs
        total += per * (4 if checkpointing else 3)
    if workload.stacks:
        D0 = workload.stacks[-1].d_model
        total += 3 * 2 * D0 * workload.vocab * workload.predicted
    return total


class Throughput(NamedTuple):
    flops_per_example: float
    samples_per_s: float
    tokens_per_s: float
    gpu: str
    mfu: float


def throughput(workload: Workload, world: int = 8, gpu: str = "A100", mfu: float = ASSUMED_MFU,
               checkpointing: bool = False) -> Throughput:
    """Expected samples/s and tokens/s of ``world`` GPUs at utilisation ``mfu`` (an assumption; see the constants)."""
    f = flops_per_example(workload, checkpointing=checkpointing)
    rate = world * GPU_PEAK_TFLOPS[gpu] * 1e12 * mfu
    sps = rate / f if f else 0.0
    return Throughput(f, sps, sps * workload.tokens, gpu, mfu)
