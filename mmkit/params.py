"""Parameter counts broken down by component (what `mmkit params CONFIG` prints).

Works on meta-device models, so full-size configs (M6-10B, M6-100B) are counted without allocating them.
Tied weights (e.g. M6's output layer tied to the word embedding) are counted once, where first met.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

# (component, keywords in the parameter's qualified name), checked in order: the first match wins.
_COMPONENT_RULES = [
    ("router", ("router", "gate.", "gating")),
    ("experts", ("experts", "expert")),
    ("attention", ("attn", "attention")),
    ("ffn", ("ffn", "mlp", "feed_forward", "intermediate", "fc1", "fc2")),
    ("vision stem", ("patch", "feature_extractor", "conv", "backbone")),
    ("embeddings", ("embed", "wte", "wpe", "pos_", "position", "type_emb", "token_type", "segment")),
    ("norms", ("norm", "ln_", "layernorm")),
    ("heads", ("head", "classifier", "pooler", "itm", "itc", "proj", "logit")),
]


def component_of(name: str, module: nn.Module | None = None) -> str:
    """The component a parameter belongs to, from its qualified name (and owning module's type)."""
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        return "norms"
    low = name.lower()
    for component, keys in _COMPONENT_RULES:
        if any(k in low for k in keys):
            return component
    return "other"


def count_parameters(model: nn.Module) -> "OrderedDict[str, int]":
    """{component: number of parameters}, plus 'total'. Shared (tied) tensors count once."""
    seen: set[int] = set()
    counts: "OrderedDict[str, int]" = OrderedDict()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            comp = component_of(f"{mod_name}.{p_name}" if mod_name else p_name, module)
            counts[comp] = counts.get(comp, 0) + p.numel()
    ordered = OrderedDict(sorted(counts.items(), key=lambda kv: -kv[1]))
    ordered["total"] = sum(counts.values())
    return ordered


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_counts(counts: "OrderedDict[str, int]", title: str = "") -> str:
    total = counts["total"]
    lines = [title] if title else []
    lines.append(f"{'component':<14}{'parameters':>16}{'':>10}{'share':>8}")
    for comp, n in counts.items():
        if comp == "total":
            continue
        lines.append(f"{comp:<14}{n:>16,}{human(n):>10}{100 * n / max(total, 1):>7.1f}%")
    lines.append(f"{'total':<14}{total:>16,}{human(total):>10}{100.0:>7.1f}%")
    return "\n".join(lines)
