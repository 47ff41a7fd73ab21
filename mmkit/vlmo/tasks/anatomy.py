"""Opening the box: VLMo's forward pass and its stage-3 loss step by step on a real batch (notebook 07, "Inside VLMo").

    data = P.PairData.build(P.PretrainConfig(n_pairs=8), tok, model.config.max_text_len, split="test")
    batch = data.batch(range(8), torch.Generator().manual_seed(0))   # images, ids, MLM masks, the negatives' seed
    walk = forward_walk(model, batch, tok)
    for s in walk.steps: print(s.name, s.shape, s.equation)
    walk.routing                        # [layer][position] the expert each position of the fused pair met
    walk.attention                      # (B, heads, L, L) attention probabilities of one block (0 on padding keys)
    walk.itc, walk.itm, walk.mlm, walk.loss, walk.reference   # the walk's losses and vl_losses' (equal)

The walk calls the model's own pieces in the order ``VLMo.forward`` does (``embed_image``'s patch projection,
[I_CLS], positions and type; ``embed_text``; then every block's shared attention and the expert the Multiway-FFN
routes to) and computes the stage-3 losses of :func:`mmkit.vlmo.tasks.pretrain.vl_losses` by hand: ITC from the
two unimodal passes, MLM from the fusion pass of the masked text, ITM on B positives and 2B hard negatives drawn
with the batch's own seed. It raises if any step differs from the model's own forward or the losses from
``vl_losses`` on the same batch, so what a learner reads is what trains. Also here: :func:`patch_probe`, a linear
probe of one patch token per grid cell (can its vector name the colour of the object in that cell?) at any depth of
the vision path.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkit.data.world import CELL, object_labels
from mmkit.nn import padding_mask
from mmkit.objectives import IGNORE_INDEX, itm_labels, positive_targets, sample_hard_negatives
from mmkit.train import evaluating, unwrap
from mmkit.vlmo.model import IMAGE_TYPE, TEXT_TYPE
from mmkit.vlmo.tasks.pretrain import PretrainConfig, same_slice, vl_losses
from mmkit.viz import WalkStep as Step   # one step of the walk (shared by the three systems)

__all__ = ["Step", "ForwardWalk", "BATCH_KEYS", "forward_walk", "cell_patches", "patch_states", "ProbeResult",
           "patch_probe"]

# What a stage-3 batch (mmkit.vlmo.tasks.pretrain.PairData.batch) carries and the walk reads.
BATCH_KEYS: tuple[str, ...] = ("images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "pair_ids",
                               "negative_seed")
TOL = 1e-5                 # how close every recomputed tensor / loss must be to the model's own


class ForwardWalk(NamedTuple):
    steps: list                    # [Step] in the order the forward pass runs them
    tokens: list                   # (L,) labels of row 0's fused positions: its (masked) text, then [I_CLS], p0..
    text_len: int                  # T: the text positions at the start of the fused sequence [text; image]
    key_mask: torch.Tensor         # (B, L) bool: True = a real key (text padding is False; image never padding)
    routing: list                  # [layer][position] the expert each fused position of row 0 met ("L-FFN", ...)
    attention_layer: int           # which block's attention ``attention`` holds
    attention: torch.Tensor        # (B, heads, L, L) that block's attention probabilities in the MLM fusion pass
    sim_i2t: torch.Tensor          # (B, B) s_ij / σ: image i against text j (ITC logits)
    itc_targets: torch.Tensor      # (B, B) the ITC target distribution (one-hot unless pair ids repeat)
    negative_weights: torch.Tensor  # (B, B) P(text j | image i) hard negatives are drawn from (0 on positives)
    text_for_image: torch.Tensor   # (B,) the hard negative text drawn for each image
    image_for_text: torch.Tensor   # (B,) the hard negative image drawn for each text
    itm_logits: torch.Tensor       # (3B, 2) [not matched, matched]: B positives, B hard texts, B hard images
    itm_labels: torch.Tensor       # (3B,) 1, .., 1, 0, .., 0
    mlm_logits: torch.Tensor       # (B, T, V) at the text positions of the fusion pass
    mlm_labels: torch.Tensor       # (B, T) the masked words' ids, IGNORE_INDEX elsewhere
    itc: torch.Tensor              # () the walk's ITC loss
    itm: torch.Tensor              # () ITM
    mlm: torch.Tensor              # () MLM
    loss: torch.Tensor             # () weighted sum (stage 3's objective)
    reference: dict                # vl_losses on the same batch: {"itc", "itm", "mlm", "loss"} floats (equal)


def _check_batch(raw, batch) -> None:
    if not isinstance(batch, dict):
        raise TypeError(f"forward_walk takes a stage-3 batch dict (PairData.batch(indices, generator)), got "
                        f"{type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}: forward_walk takes a stage-3 batch with keys {list(BATCH_KEYS)}, "
                         "as mmkit.vlmo.tasks.pretrain.PairData.batch(indices, generator) returns it")
    B = len(batch["images"])
    shapes = {k: tuple(batch[k].shape) for k in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")}
    if len(set(shapes.values())) != 1 or shapes["input_ids"][0] != B:
        raise ValueError(f"the batch's text tensors must all be (B, T) with B = {B} images, got {shapes}")
    if tuple(batch["pair_ids"].shape) != (B,):
        raise ValueError(f"pair_ids must be ({B},), got {tuple(batch['pair_ids'].shape)}")
    if batch["pair_ids"].unique().numel() < 2:
        raise ValueError("ITM hard negatives need at least 2 different pairs in the batch (distinct pair_ids): give "
                         "forward_walk a batch of 2 or more scenes")
    if not hasattr(raw, "routing_table"):
        raise TypeError(f"forward_walk walks a VLMo, got {type(raw).__name__}")


def _expert_of(ffn, route: str, text_len: int, n: int) -> list[str]:
    """The expert each of ``n`` positions meets in a Multiway-FFN, read from the module (as ``MultiwayFFN.forward``)."""
    if route == "vision" or ffn.shared:
        return ["V-FFN" if not ffn.shared else "FFN"] * n
    if route == "language":
        return ["L-FFN"] * n
    if ffn.vl is not None:
        return ["VL-FFN"] * n
    return ["L-FFN"] * text_len + ["V-FFN"] * (n - text_len)


def _run_expert(ffn, h: torch.Tensor, route: str, text_len: int) -> torch.Tensor:
    """Call the expert(s) the route picks, piece by piece (VLMo §3.2 hard routing)."""
    if route == "vision" or ffn.shared:
        return ffn.vision(h)                                                    # V-FFN
    if route == "language":
        return ffn.language(h)                                                  # L-FFN
    if ffn.vl is not None:
        return ffn.vl(h)                                                        # VL-FFN (top F layers)
    return torch.cat([ffn.language(h[:, :text_len]), ffn.vision(h[:, text_len:])], dim=1)


def _blocks(raw, x: torch.Tensor, route: str, keys: torch.Tensor | None, text_len: int, record: int | None = None):
    """Run the L blocks piece by piece: x = x + γ1 ⊙ MSA(LN(x)); x = x + γ2 ⊙ Expert(x). Returns the final-normed
    states, the routing of row 0 per layer, and block ``record``'s attention probabilities."""
    mask = None if keys is None else padding_mask(keys)
    routing, probs = [], None
    for i, block in enumerate(raw.blocks):
        ref = block(x, mask=mask, ffn_kwargs={"route": route, "text_len": text_len})
        h = block.self_attn_norm(x)
        p, a = block.self_attn.attention_probs(h, mask=mask)                                 # (B, H, L, L), (B, L, D)
        if i == record:
            probs = p
        x1 = x + (a if block.self_attn_scale is None else block.self_attn_scale * a)          # VLMo eq. (1)
        e = _run_expert(block.ffn, x1, route, text_len)
        x = x1 + (e if block.ffn_scale is None else block.ffn_scale * e)                      # VLMo eq. (2)
        routing.append(_expert_of(block.ffn, route, text_len, x.shape[1]))
        if not torch.allclose(x, ref, atol=1e-4):
            raise RuntimeError(f"block {i} recomputed piece by piece differs from the block's own forward "
                               f"(max {float((x - ref).abs().max()):.2e})")
        x = ref                                                                  # continue on the model's own states
    return raw.final_norm(x), routing, probs


@torch.no_grad()
def forward_walk(model, batch: dict, tokenizer=None, config: PretrainConfig | None = None,
                 attention_layer: int = 0) -> ForwardWalk:
    """Walk a stage-3 batch (:meth:`mmkit.vlmo.tasks.pretrain.PairData.batch`) through ``model`` piece by piece and
    compute ITC, ITM and MLM by hand; checked equal (to 1e-5) to :func:`vl_losses` on the same batch. ``config``
    gives the loss weights and the negative pool (default: ``PretrainConfig()``); ``attention_layer`` the block
    whose attention probabilities are kept. Raises ValueError for a batch that is not a stage-3 batch."""
    raw = unwrap(model)
    _check_batch(raw, batch)
    cfg = config or PretrainConfig()
    c = raw.config
    if not 0 <= attention_layer < c.n_layers:
        raise ValueError(f"attention_layer must be in 0..{c.n_layers - 1}, got {attention_layer}")
    dev = raw.type_embed.weight.device
    images = batch["images"].to(dev)
    ids, am = batch["input_ids"].to(dev), batch["attention_mask"].to(dev).bool()
    mlm_ids, mlm_labels = batch["mlm_input_ids"].to(dev), batch["mlm_labels"].to(dev)
    B, T = ids.shape
    steps = []
    with evaluating(raw):
        ref = vl_losses(raw, batch, cfg)
        # -- VLMo §3.1 input representations -----------------------------------------------------------------
        x = (images - raw.image_mean) / raw.image_std                                   # [0, 1] -> [-1, 1]
        patches = raw.image_embed.patch(x)                                              # (B, N, D)
        N = patches.shape[1]
        steps.append(Step("patch embeddings (§3.1)", "v^p_i = V x^p_i  (x^p_i: the i-th P x P patch, flattened)",
                          tuple(patches.shape), f"{c.image_size} px cut into {c.grid_size}x{c.grid_size} = {N} patches "
                          f"of {c.patch_size} px, each projected linearly to D = {c.d_model}"))
        hv = torch.cat([raw.image_embed.cls_token.expand(B, -1, -1), patches], dim=1)
        hv = hv + raw.image_embed.pos_embed(hv.shape[1]) + raw.type_embed(IMAGE_TYPE)
        if not torch.allclose(hv, raw.embed_image(images), atol=TOL):
            raise RuntimeError("the image embedding recomputed by hand differs from VLMo.embed_image")
        steps.append(Step("image input (§3.1)", "H^v_0 = [v_[I_CLS], V x^p_1, .., V x^p_N] + V_pos + V_type",
                          tuple(hv.shape), "a learned [I_CLS] in front; learned 1-D positions (raster order); the "
                          "vision type vector added to every position"))
        hw_raw = raw.text_embed(ids)
        hw = hw_raw + raw.type_embed(TEXT_TYPE)
        if not torch.allclose(hw, raw.embed_text(ids), atol=TOL):
            raise RuntimeError("the text embedding recomputed by hand differs from VLMo.embed_text")
        steps.append(Step("text input (§3.1)", "H^w_0 = LN([w_[T_CLS], W w_1, .., W w_M, w_[T_SEP]] + T_pos) + T_type",
                          tuple(hw.shape), f"[T_CLS] .. [T_SEP] then [PAD] to the batch's longest text ({T}); row 0 "
                          f"has {int(am[0].sum())} real tokens"))

        # -- ITC (§3.3): two unimodal passes, V-FFN / L-FFN in every layer -------------------------------------
        hi, route_v, _ = _blocks(raw, hv, "vision", None, 0)
        ht, route_l, _ = _blocks(raw, hw, "language", am, T)
        steps.append(Step("image-only pass (§3.2)", "H^v_l = MoME-FFN_V(H^v_l' ), H^v_l' = H^v_{l-1} + MSA(LN(H^v_{l-1}))",
                          tuple(hi.shape), f"vision route: V-FFN in all {c.n_layers} layers ({route_v[0][0]} .. "
                          f"{route_v[-1][0]})"))
        steps.append(Step("text-only pass (§3.2)", "H^w_l = MoME-FFN_L(H^w_l'), same shared MSA",
                          tuple(ht.shape), f"language route: L-FFN in all {c.n_layers} layers; padding keys masked"))
        fi = raw.itc_image_proj(hi[:, 0])
        ft = raw.itc_text_proj(ht[:, 0])
        fi, ft = F.normalize(fi.float(), dim=-1), F.normalize(ft.float(), dim=-1)
        scale = raw.temperature()
        sim_i2t = scale.float() * fi @ ft.T                                              # (B, B)
        steps.append(Step("ITC similarities (§3.3, eq. 3)", "s^{i2t}_{i,j} = ĥ^v_i · ĥ^w_j / σ  (ĥ = normalised "
                          "projection of the final [I_CLS] / [T_CLS])", tuple(sim_i2t.shape),
                          f"learned temperature σ = {1 / float(scale):.4f}; row i = image i against every text"))
        pid = batch["pair_ids"].to(dev).long()
        y = positive_targets(pid, pid)                                                   # (B, B)
        ce_i2t = -(y * sim_i2t.log_softmax(1)).sum(1).mean()
        ce_t2i = -(y * sim_i2t.T.log_softmax(1)).sum(1).mean()
        itc = 0.5 * (ce_i2t + ce_t2i)
        steps.append(Step("ITC loss (§3.3, eq. 4)", "p^{i2t}_i = softmax_j(s^{i2t}_{i,j}); L_itc = ½ (CE(y, p^{i2t}) + "
                          "CE(y, p^{t2i}))", tuple(itc.shape), f"B = {B} pairs: {B - 1} in-batch negatives per "
                          f"image and per text; chance = ln {B} = {math.log(B):.3f}"))

        # -- MLM (§3.3): the fusion pass of the masked text and its image ---------------------------------------
        he = raw.text_embed(mlm_ids) + raw.type_embed(TEXT_TYPE)
        xf = torch.cat([he, hv], dim=1)                                                  # [H^w_0; H^v_0]
        keys = torch.cat([am, am.new_ones(B, hv.shape[1])], dim=1)                       # (B, T + 1 + N)
        steps.append(Step("fused input (§3.2)", "H^vl_0 = [H^w_0; H^v_0]", tuple(xf.shape),
                          f"text first (so position 0 is [T_CLS]), then the {hv.shape[1]} image positions; the key mask "
                          f"hides {int((~keys[0]).sum())} padding positions of row 0"))
        hf, routing, probs = _blocks(raw, xf, "fusion", keys, T, record=attention_layer)
        bottom = c.n_layers - len(c.vl_layers)
        steps.append(Step(f"{c.n_layers} Multiway blocks (§3.2, eq. 1-2)",
                          "H'_l = MSA(LN(H_{l-1})) + H_{l-1};  H_l = MoME-FFN(LN(H'_l)) + H'_l", tuple(hf.shape),
                          f"bottom {bottom}: L-FFN on the text, V-FFN on the image; top {len(c.vl_layers)}: VL-FFN on "
                          "every position; the attention is shared by all"))
        mlm_logits = raw.mlm_head(hf[:, :T])                                             # (B, T, V)
        valid = mlm_labels != IGNORE_INDEX
        logp = F.log_softmax(mlm_logits.float(), dim=-1)
        tok_loss = -logp.gather(-1, mlm_labels.clamp(min=0)[..., None])[..., 0]
        mlm = tok_loss[valid].mean()
        steps.append(Step("MLM loss (§3.3)", "L_mlm = -1/|M| Σ_{j in M} log softmax(W h_j)[w_j]", tuple(mlm.shape),
                          f"{int(valid.sum())} masked words in the batch (whole words, 15%, 80/10/10), predicted from "
                          "the other words AND the image"))

        # -- ITM (§3.3): hard negatives from the ITC similarities, fusion [T_CLS] -------------------------------
        s_i2t, s_t2i = sim_i2t, sim_i2t.T
        if cfg.negative_pool == "local":
            outside = ~same_slice(B, cfg.local_groups, dev)
            s_i2t, s_t2i = s_i2t.masked_fill(outside, float("-inf")), s_t2i.masked_fill(outside, float("-inf"))
        same = pid[:, None] == pid[None, :]
        weights = s_i2t.masked_fill(same, float("-inf")).softmax(1)
        neg = sample_hard_negatives(s_i2t, s_t2i, pid,
                                    generator=torch.Generator().manual_seed(int(batch["negative_seed"])))
        steps.append(Step("hard negatives (§3.3, Table 6)", "P(text j | image i) = softmax_{j: j≠i}(s^{i2t}_{i,j})",
                          tuple(weights.shape), f"one negative text per image and one negative image per text, drawn "
                          f"with the batch's seed from the {cfg.negative_pool} pool"))
        pair_images = torch.cat([images, images[neg.image_for_text], images])
        pair_ids = torch.cat([ids, ids, ids[neg.text_for_image]])
        pair_am = torch.cat([am, am, am[neg.text_for_image]])
        hp = torch.cat([raw.embed_text(pair_ids), raw.embed_image(pair_images)], dim=1)
        pkeys = torch.cat([pair_am, pair_am.new_ones(3 * B, hv.shape[1])], dim=1)
        hpf, _, _ = _blocks(raw, hp, "fusion", pkeys, T)
        pooled = raw.pooler(hpf[:, 0])                                                   # tanh(W h_[T_CLS] + b)
        itm_logits = raw.itm_head(pooled)                                                # (3B, 2)
        labels = itm_labels(B, 2 * B, device=dev)
        itm = -itm_logits.float().log_softmax(-1).gather(-1, labels[:, None])[:, 0].mean()
        steps.append(Step("ITM loss (§3.3)", "p^itm = softmax(W_itm tanh(W_p h^L_[T_CLS])); L_itm = CE(y^itm, p^itm)",
                          tuple(itm_logits.shape), f"{B} matched pairs + {B} (image, hard text) + {B} (hard image, "
                          "text); the fused [T_CLS] decides; 'always no' scores 2/3"))
        loss = cfg.itc_weight * itc + cfg.itm_weight * itm + cfg.mlm_weight * mlm
        steps.append(Step("stage-3 loss (§3.3-3.4)", "L = L_itc + L_itm + L_mlm", tuple(loss.shape),
                          f"weights {cfg.itc_weight:g} / {cfg.itm_weight:g} / {cfg.mlm_weight:g}"))

    reference = {"itc": float(ref.itc), "itm": float(ref.itm), "mlm": float(ref.mlm), "loss": float(ref.loss)}
    mine = {"itc": float(itc), "itm": float(itm), "mlm": float(mlm), "loss": float(loss)}
    for k in mine:
        if abs(mine[k] - reference[k]) > TOL:
            raise RuntimeError(f"the walk's {k} loss {mine[k]:.7f} differs from vl_losses' {reference[k]:.7f}")
    if not (torch.equal(neg.text_for_image, ref.text_for_image) and torch.equal(neg.image_for_text,
                                                                                ref.image_for_text)):
        raise RuntimeError("the walk drew other hard negatives than vl_losses on the same batch")
    words = (tokenizer.convert_ids_to_tokens(mlm_ids[0].tolist()) if tokenizer is not None
             else [str(i) for i in mlm_ids[0].tolist()])
    names = words + ["[I_CLS]"] + [f"p{i}" for i in range(N)]
    return ForwardWalk(steps, names, T, keys.cpu(), [r[:len(names)] for r in routing], attention_layer, probs.cpu(),
                       sim_i2t.cpu(), y.cpu(), weights.cpu(), neg.text_for_image.cpu(), neg.image_for_text.cpu(),
                       itm_logits.cpu(), labels.cpu(), mlm_logits.cpu(), mlm_labels.cpu(), itc.cpu(), itm.cpu(),
                       mlm.cpu(), loss.cpu(), reference)


# ---------------------------------------------------------------------------------------------------------
# A probe of the vision path's patch tokens (§3.1 / §4.5)
# ---------------------------------------------------------------------------------------------------------

def cell_patches(grid: int) -> list[int]:
    """For each of the world's 3x3 cells (row-major), the index of the patch under the cell's centre on a
    ``grid`` x ``grid`` patch grid (raster order): the one token a probe reads for that cell."""
    centres = [int((r + 0.5) * CELL * grid) for r in range(3)]
    return [rr * grid + cc for rr in centres for cc in centres]


@torch.no_grad()
def patch_states(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(L + 1, B, 1 + N, D) the vision path's states of every depth: 0 = the input H^v_0 (patch projection +
    position + type), l = after block l (the last one final-normed, as every head reads it). Image-only route."""
    raw = unwrap(model)
    dev, out = raw.type_embed.weight.device, []
    with evaluating(raw):
        for i in range(0, len(images), batch_size):
            x = raw.embed_image(images[i:i + batch_size].to(dev))
            states = [x]
            for block in raw.blocks:
                x = block(x, ffn_kwargs={"route": "vision", "text_len": 0})
                states.append(x)
            states[-1] = raw.final_norm(x)
            out.append(torch.stack(states).float().cpu())
    return torch.cat(out, dim=1)


class ProbeResult(NamedTuple):
    layer: int            # depth probed (0 = input embeddings)
    train_acc: float      # probe accuracy on the training cells
    test_acc: float       # on held-out images' occupied cells
    majority: float       # the blind baseline: the most frequent training value, scored on the same held-out cells
    n_train: int          # occupied cells used
    n_test: int


def patch_probe(model, images: torch.Tensor, scenes, attribute: int = 0, layers=None, n_train: int | None = None,
                steps: int = 200, lr: float = 0.05, seed: int = 0) -> list[ProbeResult]:
    """A linear probe of the patch tokens: for each occupied cell of the 3x3 world grid, can ONE patch token (the
    one under the cell's centre, :func:`cell_patches`) name the object's attribute (0 colour, 1 shape, 2 size)?
    One linear classifier shared by all cells, trained on the first ``n_train`` images (default 3/4), scored on the
    rest against the majority value. ``layers``: the depths to probe (default all, 0..L)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes: give one scene per image")
    raw = unwrap(model)
    states = patch_states(raw, images)                                             # (L+1, n, 1+N, D)
    cells = torch.tensor(cell_patches(raw.config.grid_size)) + 1                   # +1: skip [I_CLS]
    labels = object_labels(scenes)[..., attribute]                                 # (n, 9) 0 = empty
    n = len(images)
    n_train = n_train or (3 * n) // 4
    if not 0 < n_train < n:
        raise ValueError(f"n_train={n_train} must leave images on both sides of the split (of {n})")
    occ = labels > 0
    tr = torch.arange(n)[:, None].expand_as(occ) < n_train
    y_tr, y_te = labels[occ & tr], labels[occ & ~tr]
    n_cls = int(labels.max()) + 1
    out = []
    for layer in (range(len(states)) if layers is None else layers):
        feats = states[layer][:, cells]                                            # (n, 9, D)
        f_tr, f_te = feats[occ & tr], feats[occ & ~tr]
        mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
        f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(f_tr.shape[1], n_cls, generator=g) * 0.01).requires_grad_()
        b = torch.zeros(n_cls, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(f_tr @ w + b, y_tr) + 1e-3 * w.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            acc_tr = float(((f_tr @ w + b).argmax(-1) == y_tr).float().mean())
            acc_te = float(((f_te @ w + b).argmax(-1) == y_te).float().mean())
        maj = torch.bincount(y_tr).argmax()
        out.append(ProbeResult(int(layer), acc_tr, acc_te, float((y_te == maj).float().mean()), len(y_tr), len(y_te)))
    return out
