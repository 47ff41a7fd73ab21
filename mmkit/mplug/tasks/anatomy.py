"""Opening the box: mPLUG's forward pass and VQA loss step by step on a real batch (notebook 08, "Inside mPLUG").

    batch = VQASampler(vqa_bank(VQAConfig(), "val", 64)).batch_fn(torch.Generator().manual_seed(0), 4)
    walk = forward_walk(model, batch)              # a VQA batch {"images", "questions", "answers"}
    for s in walk.steps: print(s.name, s.shape, s.equation)
    walk.plan                                      # the fusion layers run, e.g. ("asym", "asym", "asym", "connected")
    walk.cross_attention                           # (B, H, L, Nv) text -> image attention of one co-attention layer
    walk.connected_attention                       # (B, H, Nv + L, Nv + L) of the connected-attention layer
    walk.loss, walk.reference_loss                 # the walk's loss and mmkit.mplug.tasks.vqa.vqa_loss' (equal)
    probe = patch_probe(model, images, object_labels(scenes))      # what one grid cell's patch tokens tell

The walk calls the model's own pieces in the order ``MPLUG.forward`` does (``vision`` on the patches with [CLS],
``text``, the fusion layers of ``fusion.plan`` sublayer by sublayer, the decoder cross-attending to [v^L; l^L], its
LM head) and checks each stage against the model's own call and the loss against the kit's training loss, so what a
learner reads is what trains. :func:`patch_probe` reuses stage 0's :class:`mmkit.mplug.tasks.pretrain.GridProbe`
(the same pooled grid cells and heads) as a linear probe of frozen patch tokens, beside the majority baseline.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkit.data.vqa import normalise_question
from mmkit.mplug.model import MPLUG
from mmkit.mplug.tasks.inputs import encoder_inputs, teacher_forced
from mmkit.mplug.tasks.pretrain import GridProbe
from mmkit.mplug.tasks.vqa import vqa_loss
from mmkit.nn import padding_mask
from mmkit.objectives.lm import IGNORE_INDEX
from mmkit.tokenizer import world_tokenizer
from mmkit.train import evaluating, unwrap
from mmkit.viz import WalkStep as Step   # one step of the walk (shared by the three systems)

__all__ = ["Step", "ForwardWalk", "forward_walk", "ProbeResult", "FrozenFeatures",
           "majority_baseline", "patch_probe"]


class ForwardWalk(NamedTuple):
    steps: list                   # [Step]
    plan: tuple                   # kind of every fusion layer run, bottom to top ("asym", "connected", "co")
    question_tokens: list         # (L,) tokens of row 0's text-encoder input ([CLS] question [SEP] [PAD] ..)
    answer_tokens: list           # (T,) row 0's decoder targets (answer + [EOS], "-" at padding)
    n_image_tokens: int           # Nv = 1 + patches ([CLS] first)
    text_mask: torch.Tensor       # (B, L) bool, True = real question token
    cross_layer: int | None       # index (in plan) of the co-attention layer whose attention is recorded
    cross_attention: torch.Tensor | None   # (B, H, L, Nv) text-to-image attention (rows of padding queries 0)
    connected_layer: int | None   # index of the first connected-attention layer (None: the plan has none)
    connected_attention: torch.Tensor | None   # (B, H, Nv + L, Nv + L) over [v; l] (0 on padding keys and queries)
    logits: torch.Tensor          # (B, T, V) decoder logits
    labels: torch.Tensor          # (B, T) targets, IGNORE_INDEX at padding
    token_loss: torch.Tensor      # (B, T) -log p(label) (0 at padding)
    loss: torch.Tensor            # scalar: mean over the batch's answer tokens
    reference_loss: float         # the same batch through vqa_loss (the VQA training loss): equal to ``loss``


def _check_batch(batch) -> int:
    if not isinstance(batch, dict) or not {"images", "questions", "answers"} <= set(batch):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError("forward_walk takes a VQA batch {'images': (B, 3, S, S), 'questions': [str], 'answers': "
                         f"[str]}} (what mmkit.data.vqa.VQASampler.batch_fn builds); got {got}")
    images, qs, ans = batch["images"], batch["questions"], batch["answers"]
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"batch['images'] must be a (B, 3, S, S) tensor, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if isinstance(qs, str) or isinstance(ans, str) or not (len(images) == len(qs) == len(ans)):
        raise ValueError(f"one question and one answer per image: {len(images)} images, "
                         f"{'a str' if isinstance(qs, str) else len(qs)} questions, "
                         f"{'a str' if isinstance(ans, str) else len(ans)} answers")
    if len(images) == 0:
        raise ValueError("the batch is empty")
    return len(images)


def _same(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, atol=atol):
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
        raise RuntimeError(f"the walk's {what} differs from the model's own call (max |diff| {diff:.2e})")


@torch.no_grad()
def forward_walk(model, batch: dict, tokenizer=None, max_len: int = 48, cross_layer: int | None = None) -> ForwardWalk:
    """Run a VQA batch through an mPLUG with a decoder piece by piece, recording every step's shape, the attention of
    one text-to-image cross-attention layer (``cross_layer``, default the first co-attention layer) and of the first
    connected-attention layer, the token losses and the loss. Raises ValueError for a batch that is not a VQA batch or
    a model without a decoder, RuntimeError if a stage or the loss differs from the model's own computation."""
    raw = unwrap(model)
    if not isinstance(raw, MPLUG) or raw.decoder is None:
        raise ValueError(f"forward_walk needs an mPLUG with its text decoder (e.g. mmkit.load('mplug-tiny-vqa')); got "
                         f"{type(raw).__name__}")
    c = raw.config
    if c.bf16:
        raise ValueError("forward_walk runs in fp32: build the model with bf16=False to walk through it")
    B = _check_batch(batch)
    tok = tokenizer if tokenizer is not None else world_tokenizer()
    dev = raw.device
    images = batch["images"].to(dev)
    ids, mask = encoder_inputs(tok, [normalise_question(q) for q in batch["questions"]], max_len)
    dec, labels = teacher_forced(tok, list(batch["answers"]), c)
    ids, mask, dec, labels = ids.to(dev), mask.to(dev), dec.to(dev), labels.to(dev)
    steps: list[Step] = []
    with evaluating(raw):
        # -- §3.1 visual encoder: a ViT on the P x P patches with an extra [CLS] --------------------------
        vis = raw.vision
        pixels = (images.float() - raw.image_mean) / raw.image_std
        x = vis.embeddings(pixels)                                                 # (B, 1 + N, W)
        g = c.grid_size
        what = (f"{g}x{g} = {g * g} cell tokens (a code of the object each world cell holds, named by a small CNN)"
                if c.vision_stem == "cells" else
                f"{g}x{g} = {g * g} patches of {c.patch_size}x{c.patch_size} px ({c.vision_stem} stem)")
        name = "cell codes + [CLS] (the kit's image tokens)" if c.vision_stem == "cells" else \
            "patches + [CLS] (ViT, mPLUG §3.1)"
        steps.append(Step(name, "z^0 = [x_cls; E x_1; ..; E x_N] + E_pos",
                          tuple(x.shape), f"{what} and a learned [CLS], each with its position"))
        for block in vis.blocks:
            x = block(x)
        x = vis.post_norm(x)
        v0 = x if vis.bridge is None else vis.bridge(x)                            # (B, Nv, D)
        steps.append(Step(f"{len(vis.blocks)} ViT blocks -> v^0", "z = z + MSA(LN(z)); z = z + MLP(LN(z)); "
                          "v^0 = LN(z)", tuple(v0.shape), "pre-norm; every image token attends to every other "
                          "one; no text yet"))
        _same(v0, raw.embed_image(images), "v^0")
        Nv = v0.shape[1]
        # -- §3.1 text encoder: BERT layers on [CLS] question [SEP] ---------------------------------------
        t_keys = padding_mask(mask)                                                # (B, 1, 1, L)
        l = raw.text.embeddings(ids)
        steps.append(Step("question tokens", "e_j = W_e[w_j] + pos(j) + type_0", tuple(l.shape),
                          f"[CLS] question [SEP], right-padded; {int(mask.sum())} of {mask.numel()} positions "
                          "are real (padding is never a key)"))
        for block in raw.text.blocks:
            l = block(l, mask=t_keys)
        steps.append(Step(f"{len(raw.text.blocks)} text-encoder layers -> l^0", "l = LN(l + SA(l)); "
                          "l = LN(l + FFN(l))", tuple(l.shape), "post-norm BERT layers over the question alone"))
        _same(l, raw.text(ids, mask), "l^0")
        l0 = l
        # -- §3.2 the cross-modal skip-connected network ----------------------------------------------------
        plan = tuple(raw.fusion.plan)
        v_mask = torch.ones(B, Nv, dtype=torch.bool, device=dev)
        v_keys = padding_mask(v_mask)
        both = torch.cat([v_mask, mask], 1)                                        # (B, Nv + L)
        both_keys = padding_mask(both)
        asym = [k for k, kind in enumerate(plan) if kind == "asym"]
        conn = [k for k, kind in enumerate(plan) if kind == "connected"]
        if cross_layer is None:
            cross_layer = asym[0] if asym else None
        elif cross_layer not in asym:
            raise ValueError(f"cross_layer={cross_layer} is not an asymmetric co-attention layer of the plan {plan} "
                             f"(those are {asym})")
        cross_probs = conn_probs = None
        v = v0
        for k, (kind, layer) in enumerate(zip(plan, raw.fusion.layers)):
            if kind != "co" and layer.norm_first:
                raise RuntimeError("mPLUG's fusion layers are post-norm (BERT); this one is pre-norm")
            if kind == "asym":
                before = l
                l_sa = layer.self_attn_norm(l + layer.self_attn(l, mask=t_keys))
                steps.append(Step(f"fusion {k}: text self-attention (eq. 1)", "l_SA = LN(SA(l^{n}_{i-1}) + "
                                  "l^{n}_{i-1})", tuple(l_sa.shape), "the question tokens attend to each other"))
                ca = layer.cross_attn(l_sa, v, mask=v_keys)
                if k == cross_layer:
                    cross_probs, out = layer.cross_attn.attention_probs(l_sa, v, mask=v_keys)
                    _same(out, ca, f"cross-attention of fusion layer {k}")
                l_ca = layer.cross_attn_norm(l_sa + ca)
                steps.append(Step(f"fusion {k}: text-to-image cross-attention (eq. 2)", "l_CA = LN(CA(l_SA, "
                                  "v^{n-1}) + l_SA)", tuple(l_ca.shape), f"queries: {l.shape[1]} text tokens; "
                                  f"keys / values: the {Nv} image tokens"))
                l = layer.ffn_norm(l_ca + layer.ffn(l_ca))
                steps.append(Step(f"fusion {k}: FFN on the text (eq. 3); the image skips", "l^{n}_i = "
                                  "LN(FFN(l_CA) + l_CA); v unchanged", tuple(l.shape), f"the {Nv} image tokens "
                                  "pass this layer untouched: the cost is the text's"))
                _same(l, layer(before, mask=t_keys, context=v, context_mask=v_keys), f"fusion layer {k}")
            elif kind == "connected":
                vl = torch.cat([v, l], 1)                                          # (B, Nv + L, D)
                sa = layer.self_attn(vl, mask=both_keys)
                if conn_probs is None:
                    conn_probs, out = layer.self_attn.attention_probs(vl, mask=both_keys)
                    _same(out, sa, f"connected attention of fusion layer {k}")
                h = layer.self_attn_norm(vl + sa)
                steps.append(Step(f"fusion {k}: connected attention over [v; l] (eq. 4)", "[v_SA; l_SA] = "
                                  "LN(SA([v^{n-1}; l^{n}_S]) + [v^{n-1}; l^{n}_S])", tuple(h.shape),
                                  f"one self-attention over {Nv} image + {l.shape[1]} text tokens: the image side "
                                  "is updated here, and only here"))
                out_vl = layer.ffn_norm(h + layer.ffn(h))
                _same(out_vl, layer(vl, mask=both_keys), f"fusion layer {k}")
                v_new, l = out_vl.split([Nv, l.shape[1]], dim=1)
                v = v + v_new if raw.fusion.image_skip_residual else v_new
                steps.append(Step(f"fusion {k}: FFN on [v; l], split (eq. 5)", "[v^n; l^n] = LN(FFN([v_SA; "
                                  "l_SA]) + [v_SA; l_SA])", tuple(out_vl.shape), "-> v^n " f"{tuple(v.shape)} and "
                                  f"l^n {tuple(l.shape)}"))
            else:                                                                  # Figure 1b co-attention
                v, l = (layer.image(v, mask=v_keys, context=l, context_mask=t_keys),
                        layer.text(l, mask=t_keys, context=v, context_mask=v_keys))
                steps.append(Step(f"fusion {k}: co-attention (Figure 1b)", "v' = CA(v, l); l' = CA(l, v)",
                                  tuple(l.shape), "both sides cross-attend to the other"))
        fused = raw.fuse(v0, l0, mask, v_mask)
        _same(v, fused.image, "v^L")
        _same(l, fused.text, "l^L")
        states = torch.cat([v, l], 1)                                              # (B, Nv + L, D)
        steps.append(Step("decoder context [v^L; l^L]", "C = [v^L; l^L]", tuple(states.shape),
                          f"{Nv} fused image + {l.shape[1]} fused text tokens (question padding masked)"))
        # -- §3.1 / §3.3 the decoder: causal self-attention, cross-attention to C, FFN; tied LM head ----------
        d = raw.decoder.embeddings(dec)
        steps.append(Step("decoder input [BOS] answer (teacher forcing)", "e_t = W_d[y_{t-1}] + pos(t)",
                          tuple(d.shape), "the answer shifted right by one; targets: answer + [EOS]"))
        for block in raw.decoder.blocks:
            d = block(d, context=states, context_mask=both_keys, is_causal=True)
        steps.append(Step(f"{len(raw.decoder.blocks)} decoder layers", "h = LN(h + CausalSA(h)); h = LN(h + "
                          "CA(h, C)); h = LN(h + FFN(h))", tuple(d.shape), "position t sees answer tokens <= t "
                          "and the whole fused context"))
        logits = raw.decoder.head(d)                                               # (B, T, V)
        steps.append(Step("next-token logits (LM head tied to W_d)", "p(y_t | y_<t, C) = softmax(head(h_t))",
                          tuple(logits.shape), "open vocabulary: every token of the tokenizer is a candidate"))
        _same(logits, raw.decode(dec, raw.context(images, ids, mask)), "logits", atol=1e-4)
        logp = F.log_softmax(logits.float(), dim=-1)
        valid = labels != IGNORE_INDEX
        token_loss = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid
        loss = token_loss.sum() / valid.sum()
        steps.append(Step("answer loss (prefix LM, mPLUG §3.3 / §5.2.1)", "L = -1/N sum_t log p(y_t | y_<t, "
                          "image, question)", tuple(loss.shape), f"mean over the {int(valid.sum())} answer + [EOS] "
                          "tokens; padding (-100) is ignored"))
        ref = float(vqa_loss(raw, batch, tok, max_len)[0])
    if abs(float(loss) - ref) > 1e-5:
        raise RuntimeError(f"the walk's loss {float(loss):.6f} differs from vqa_loss' {ref:.6f}")
    # rows of padding queries attend to nothing that matters: zero them so the pictures show real tokens only
    if cross_probs is not None:
        cross_probs = cross_probs * mask[:, None, :, None]
    if conn_probs is not None:
        conn_probs = conn_probs * both[:, None, :, None]
    q_tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    a_tokens = [t if y != IGNORE_INDEX else "-" for t, y in
                zip(tok.convert_ids_to_tokens(labels[0].clamp(min=0).tolist()), labels[0].tolist())]
    return ForwardWalk(steps, plan, q_tokens, a_tokens, Nv, mask.cpu(), cross_layer,
                       None if cross_probs is None else cross_probs.cpu(),
                       conn[0] if conn else None, None if conn_probs is None else conn_probs.cpu(), logits.cpu(),
                       labels.cpu(), token_loss.cpu(), loss.cpu(), ref)


# ---------------------------------------------------------------------------------------------------------
# A probe of the patch tokens (§3.1): stage 0's GridProbe on frozen features
# ---------------------------------------------------------------------------------------------------------

class ProbeResult(NamedTuple):
    accuracy: dict        # {colour_acc, shape_acc, size_acc} on held-out images, over occupied grid cells
    majority: dict        # the same keys: always the most frequent training value (the blind baseline)
    train_accuracy: dict  # on the training images
    n_train: int          # images the heads were fitted on
    n_test: int           # held-out images
    occupied_test: int    # occupied grid cells among the held-out images


class FrozenFeatures:
    """What :class:`GridProbe` reads through ``embed_image``: here precomputed patch tokens, passed through."""

    def __init__(self, config):
        self.config = config

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        return features


def patch_probe(model, images: torch.Tensor, labels: torch.Tensor, heldout: int | None = None, steps: int = 200,
                lr: float = 1e-2, seed: int = 0) -> ProbeResult:
    """A linear probe of mPLUG §3.1's patch tokens v^0[1:] with the model frozen: stage 0's :class:`GridProbe` (the
    tokens of each of the 3 x 3 grid cells average-pooled, one Linear head per attribute) fitted to the first images
    and scored on the last ``heldout`` (default a quarter) over occupied cells, beside the majority baseline.

    ``images`` (N, 3, S, S) float in [0, 1] or uint8; ``labels`` (N, 9, 3) from
    :func:`mmkit.data.world.object_labels`. Full-batch Adam on the heads only; nothing of the model changes."""
    raw = unwrap(model)
    if images.dim() != 4 or labels.shape != (len(images), 9, 3):
        raise ValueError(f"images must be (N, 3, S, S) and labels (N, 9, 3) (object_labels); got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    n = len(images)
    n_test = heldout if heldout is not None else n // 4
    n_train = n - n_test
    if n_train < 1 or n_test < 1:
        raise ValueError(f"{n} images leave {n_train} to fit and {n_test} to score: give more images")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    with torch.no_grad(), evaluating(raw):
        feats = torch.cat([raw.embed_image(x[i:i + 256].to(raw.device)).cpu() for i in range(0, n, 256)])
    torch.manual_seed(seed)
    probe = GridProbe(FrozenFeatures(raw.config))
    opt = torch.optim.Adam(probe.heads.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = probe(feats[:n_train], labels[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, train_acc = probe(feats[:n_train], labels[:n_train])
        _, acc = probe(feats[n_train:], labels[n_train:])
    occupied = int((labels[n_train:, :, 0] > 0).sum())
    return ProbeResult(acc, majority_baseline(labels, n_train), train_acc, n_train, n_test, occupied)


def majority_baseline(labels: torch.Tensor, n_train: int) -> dict:
    """The blind baseline of a grid-cell probe: for each attribute, the most frequent value among the occupied cells
    of the first ``n_train`` images, scored on the occupied cells of the rest. ``labels`` (N, 9, 3) (object_labels)
    -> {colour_acc, shape_acc, size_acc}, the keys :class:`GridProbe` reports."""
    occ_tr, occ_te = labels[:n_train, :, 0] > 0, labels[n_train:, :, 0] > 0
    out = {}
    for k, name in enumerate(GridProbe.ATTRIBUTES):
        top = torch.bincount(labels[:n_train, :, k][occ_tr]).argmax()
        out[f"{name}_acc"] = float((labels[n_train:, :, k][occ_te] == top).float().mean())
    return out
