"""Opening the box: M6's forward pass and loss step by step on a real batch (notebook 03, "Inside M6").

    walk = forward_walk(model, batch)              # a PretrainData batch of ONE task (fixed_batch(task, rows))
    for s in walk.steps: print(s.name, s.shape, s.equation)
    walk.attention                                 # (B, heads, L, L) attention probabilities of block 0
    walk.loss, walk.reference_loss                 # the walk's loss and mmkit.m6.tasks.pretrain.task_losses' (equal)

The walk calls the model's own pieces in the order ``M6Model.forward`` does (``embed_images``, ``embed_text``,
``embed_norm``, ``blocks``, ``final_norm``, ``lm_head``) and checks that it lands on the same loss as the kit's
loss function, so what a learner reads is what trains. Also here: :func:`patch_probe`, a linear probe of the
§3.1 patch features (can one visual token's vector tell the colour of the object in its grid cell?).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkit.data.world import object_labels
from mmkit.m6.masking import IGNORE_INDEX, SEG_DECODER, SEG_ENCODER, collate
from mmkit.m6.tasks.pretrain import task_losses
from mmkit.train import evaluating, unwrap
from mmkit.viz import WalkStep as Step   # one step of the walk (shared by the three systems)

__all__ = ["Step", "ForwardWalk", "forward_walk", "ProbeResult", "patch_probe"]


class ForwardWalk(NamedTuple):
    steps: list                 # [Step]
    tokens: list                # (L,) labels of the positions of row 0: img0.., encoder words, decoder words
    segment_ids: torch.Tensor   # (B, L) 0 visual, 1 encoder, 2 decoder, -1 pad
    mask: torch.Tensor          # (B, L, L) bool, True = may attend (the unified mask, M6 §3.2)
    attention: torch.Tensor     # (B, heads, L, L) block 0's attention probabilities (0 where masked)
    logits: torch.Tensor        # (B, Wd, V) next-token logits of the decoder positions
    labels: torch.Tensor        # (B, Wd) targets, IGNORE_INDEX at padding
    token_loss: torch.Tensor    # (B, Wd) -log p(label) (0 at padding)
    loss: torch.Tensor          # scalar: mean over the batch's predicted tokens
    reference_loss: float       # the same batch through task_losses (the training loss): equal to ``loss``


@torch.no_grad()
def forward_walk(model, batch: dict, tokenizer=None) -> ForwardWalk:
    """Run one task's ``PretrainData.fixed_batch`` through ``model`` piece by piece, recording shapes, the mask,
    block 0's attention and the loss. Raises if the batch mixes tasks or the walk's loss differs from the kit's."""
    raw = unwrap(model)
    if len(set(batch["tasks"])) != 1:
        raise ValueError(f"forward_walk takes a batch of one task (PretrainData.fixed_batch(task, rows)); got "
                         f"{sorted(set(batch['tasks']))}")
    c = raw.config
    tb = collate(batch["examples"], pad_id=c.pad_token_id)
    has_image = batch["examples"][0].n_visual > 0
    steps, parts = [], []
    captured = {}

    def grab(module, args, kwargs, output):
        captured["x"], captured["mask"], captured["out"] = args[0], kwargs.get("mask"), output

    with evaluating(raw):
        if has_image:
            images = batch["images"]
            v = raw.embed_images(images)
            steps.append(Step("patch features (M6 §3.1)", "e^i_k = W_p CNN(x)_k + pos2d(k) + seg_V", tuple(v.shape),
                              f"{v.shape[1]} visual tokens: the {raw.grid_size[0]}x{raw.grid_size[1]} grid of CNN "
                              "features, each projected to d_model, plus its 2-D position"))
            parts.append(v)
        e = raw.embed_text(tb.encoder_ids, SEG_ENCODER)
        steps.append(Step("encoder text (masked text)", "e^t_j = W_e[w_j] + pos(j) + seg_E", tuple(e.shape),
                          "empty (width 0) for captioning and language modelling: 'leave the masked input blank'"))
        d = raw.embed_text(tb.decoder_input_ids, SEG_DECODER)
        steps.append(Step("decoder text ([BOS] + complete text)", "e^t_j = W_e[y_{j-1}] + pos(j) + seg_D",
                          tuple(d.shape), "teacher forcing: the decoder reads the text shifted right by one"))
        x = raw.drop(raw.embed_norm(torch.cat(parts + [e, d], dim=1)))
        steps.append(Step("one sequence (M6 §3.2)", "e = LayerNorm([e^i ; e^t_E ; e^t_D])", tuple(x.shape),
                          "image and words in ONE stack of transformer blocks"))
        mask = tb.mask[:, None]
        steps.append(Step("unified mask (M6 §3.2)", "M_ij = 1 iff s_j in {V,E} and s_i in {V,E,D}, or s_i = s_j = D "
                          "and j <= i", tuple(tb.mask.shape), f"{int(tb.mask[0].sum())} of {tb.mask.shape[1] ** 2} "
                          "pairs of row 0 may attend"))
        hook = raw.blocks[0].self_attn.register_forward_hook(grab, with_kwargs=True)
        try:
            h = x
            for block in raw.blocks:
                h = block(h, mask=mask)
        finally:
            hook.remove()
        steps.append(Step(f"{len(raw.blocks)} transformer blocks", "h = h + SA(LN(h), M); h = h + FFN(LN(h))",
                          tuple(h.shape), f"{c.n_heads} heads of width {c.d_model // c.n_heads} attend under M"))
        h = raw.final_norm(h)
        Wd = tb.decoder_input_ids.shape[1]
        logits = raw.lm_head(h[:, h.shape[1] - Wd:])
        steps.append(Step("next-word logits (tied output layer)", "p(y_j | y_<j, c) = softmax(h_j W_e^T)",
                          tuple(logits.shape), "only the decoder positions predict; W_e is the word embedding"))
        logp = F.log_softmax(logits.float(), dim=-1)
        valid = tb.labels != IGNORE_INDEX
        token_loss = -logp.gather(-1, tb.labels.clamp(min=0)[..., None])[..., 0] * valid
        loss = token_loss.sum() / valid.sum()
        steps.append(Step("loss (M6 §3.3)", "L = -1/N sum_j log p(y_j | y_<j, c)", tuple(loss.shape),
                          f"mean over the {int(valid.sum())} real target tokens (padding = -100 is ignored)"))
        ref = float(task_losses(raw, batch).loss)

    # block 0's attention probabilities, recomputed from its own projections (and checked against its output)
    with torch.no_grad():
        probs, out = raw.blocks[0].self_attn.attention_probs(captured["x"], mask=captured["mask"])   # padding rows: 0
    real = tb.segment_ids != -1
    if not torch.allclose(out[real], captured["out"][real], atol=1e-4):
        raise RuntimeError("the recomputed attention of block 0 does not reproduce the block's output")
    if abs(float(loss) - ref) > 1e-4:
        raise RuntimeError(f"the walk's loss {float(loss):.6f} differs from task_losses' {ref:.6f}")
    n_vis = tb.mask.shape[1] - tb.encoder_ids.shape[1] - tb.decoder_input_ids.shape[1]
    words = (lambda ids: tokenizer.convert_ids_to_tokens(ids.tolist())) if tokenizer is not None else (
        lambda ids: [str(i) for i in ids.tolist()])
    names = [f"img{i}" for i in range(n_vis)] + words(tb.encoder_ids[0]) + words(tb.decoder_input_ids[0])
    return ForwardWalk(steps, names, tb.segment_ids, tb.mask, probs, logits, tb.labels, token_loss, loss, ref)


class ProbeResult(NamedTuple):
    train_acc: float      # probe accuracy on the training cells
    test_acc: float       # on held-out cells
    majority: float       # the blind baseline: always the most frequent training colour (on the held-out cells)
    n_train: int          # occupied cells used
    n_test: int


def patch_probe(model, images: torch.Tensor, scenes, attribute: int = 0, n_train: int | None = None,
                steps: int = 300, lr: float = 0.05, seed: int = 0) -> ProbeResult:
    """A linear probe of M6 §3.1's patch features: for each occupied cell of the 3x3 world grid, can a linear map of
    the visual tokens (all of them, concatenated) name the object's attribute (0 colour, 1 shape, 2 size)? Trained
    on the first ``n_train`` images (default: 3/4), scored on the rest, with the majority class as baseline."""
    raw = unwrap(model)
    with torch.no_grad(), evaluating(raw):
        feats = raw.embed_images(images).flatten(1)                                  # (N, n_vis * D)
    labels = object_labels(scenes)[..., attribute]                                   # (N, 9): 0 = empty
    n = len(images)
    n_train = n_train or (3 * n) // 4
    feats = (feats - feats[:n_train].mean(0)) / (feats[:n_train].std(0) + 1e-6)
    n_cells, n_cls = labels.shape[1], int(labels.max()) + 1
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(feats.shape[1], n_cells * n_cls, generator=g) * 0.01).requires_grad_()
    opt = torch.optim.Adam([w], lr=lr)
    occ = labels > 0
    tr, te = torch.arange(n) < n_train, torch.arange(n) >= n_train
    for _ in range(steps):
        logits = (feats[tr] @ w).view(-1, n_cells, n_cls)
        loss = F.cross_entropy(logits[occ[tr]], labels[tr][occ[tr]]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        pred = (feats @ w).view(n, n_cells, n_cls).argmax(-1)
    hit = pred == labels
    maj = torch.bincount(labels[tr][occ[tr]]).argmax()
    return ProbeResult(float(hit[tr][occ[tr]].float().mean()), float(hit[te][occ[te]].float().mean()),
                       float((labels[te][occ[te]] == maj).float().mean()), int(occ[tr].sum()), int(occ[te].sum()))
