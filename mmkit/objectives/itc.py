"""Image-text contrastive learning (ITC): InfoNCE over L2-normalised features with a learned temperature.

VLMo §3.3 "Image-Text Contrast": with normalised image and text vectors ĥ^v_i, ĥ^w_j of a batch of N pairs,

    s^{i2t}_{ij} = ĥ^v_i · ĥ^w_j,     s^{t2i}_{ij} = ĥ^w_i · ĥ^v_j                              VLMo eq. (3)
    p^{i2t}_i = exp(s^{i2t}_{ii}/σ) / Σ_j exp(s^{i2t}_{ij}/σ)   (and p^{t2i}_i alike)             VLMo eq. (4)
    L_itc = ½ (CE_i2t + CE_t2i),   CE_i2t = -1/N Σ_i log p^{i2t}_i                         (CLIP's symmetric loss)

The N pairs are the GLOBAL batch: every process contributes its features as negatives for everyone (VLMo
gathers them from all GPUs, like open_clip's ``gather_features``).

mPLUG §3.3 "ITC" follows ALBEF instead: two queues of the last K momentum-encoder features (image, text) add K
negatives to every row (mPLUG §5.1: K = 65,536, momentum m = 0.995), and with momentum distillation the one-hot
targets are blended with the momentum model's own softmax (ALBEF §3.3, α = 0.4).

Public names
------------
``Temperature`` / ``TemperatureConfig``   the learned σ, stored as log(1/σ) like CLIP's ``logit_scale``
``itc_loss``                              in-batch ITC over the gathered global batch (CLIP, VLMo)
``FeatureQueue`` / ``QueueConfig``        the FIFO of K image and K text features (+ ids) (MoCo, ALBEF, mPLUG)
``itc_loss_with_queue``                   ITC over [global batch + queue], optional momentum distillation
``momentum_update`` / ``momentum_copy``   θ_m ← m θ_m + (1 - m) θ, and the frozen copy it starts from
``all_gather_with_grad`` / ``all_gather_no_grad`` / ``world_info``   the distributed plumbing

Several processes
-----------------
``itc_loss`` gathers every process's features and EVERY process computes the loss of the whole global batch
(N = W·B rows, global row r·B + i is row i of rank r), as VLMo's ``compute_itc`` does. So every rank reports the
same loss, the same accuracies and holds the same (N, N) similarity matrices, which is what global hard-negative
mining (``mmkit.objectives.itm``) samples from. The gather's backward sums the gradients of all ranks and returns
this rank's slice, so a local feature's ``.grad`` is W × ∂L/∂x; DDP then AVERAGES parameter gradients over the W
ranks, and the update is exactly the single-process update on the global batch. The temperature is not gathered:
each rank's ∂L/∂σ is already the global one, and DDP's average leaves it unchanged.
Every rank must bring the same batch size (DataLoader ``drop_last=True``); a mismatch raises a clear error.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --- distributed plumbing ------------------------------------------------------------------------------------
def world_info() -> tuple[int, int]:
    """(world_size, rank) of the default process group, (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _check_same_batch(x: torch.Tensor, world: int) -> None:
    """all_gather needs equal shapes on every rank: check first, with a message instead of a hang or garbage."""
    mine = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) > 1:
        raise ValueError(f"the processes hold different batch sizes {sizes}; gathering negatives across processes "
                         "needs the same batch size on every rank: use drop_last=True in the DataLoader/sampler")


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward is its adjoint: sum the gathered gradient over ranks, keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:                   # (B, ...) -> (W*B, ...)
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:              # (W*B, ...) -> (B, ...)
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                     # rank r's loss may use every rank's rows: Σ_r ∂L_r/∂(gathered)
        B = grad.shape[0] // world
        return grad[rank * B:(rank + 1) * B]      # the slice that came from this rank's x


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) of every process in rank order -> (W*B, ...), differentiably; identity on 1 process.

    The gradient reaching this rank's x is the sum over ranks of the gradient at its rows (see the module doc).
    """
    world, _ = world_info()
    if world == 1:
        return x
    _check_same_batch(x, world)
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) of every process in rank order -> (W*B, ...), without gradient (ids, momentum
    features, or the token ids / pixels a model needs to build hard-negative pairs); identity on 1 process."""
    world, _ = world_info()
    if world == 1:
        return x
    _check_same_batch(x, world)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


# --- the learned temperature -----------------------------------------------------------------------------------
@dataclass
class TemperatureConfig:
    init: float = 0.07          # σ at the start (CLIP, ALBEF, mPLUG: 0.07, i.e. logit scale 14.3)
    min: float = 0.01           # clamp σ >= min: logit scale <= 100 (CLIP); ALBEF/mPLUG clamp at 0.001
    max: float = 1.0            # clamp σ <= max: logit scale >= 1 (CLIP clamps log-scale at 0); ALBEF: 0.5
    learnable: bool = True      # False: a fixed σ (a buffer, no gradient)

    def __post_init__(self):
        if not 0 < self.min <= self.init <= self.max:
            raise ValueError(f"need 0 < min <= init <= max for the temperature, got min={self.min}, "
                             f"init={self.init}, max={self.max}")


class Temperature(nn.Module):
    """The learned σ of VLMo eq. (4), parametrised as CLIP does: ``log_scale`` = log(1/σ).

    ``forward()`` returns the logit scale 1/σ (a scalar tensor) that multiplies the cosine similarities. Learning
    log(1/σ) keeps σ positive and makes equal steps multiplicative. Before use, the stored value is clamped in
    place (without gradient) to [log(1/max), log(1/min)], as ALBEF clamps ``temp`` in its forward; CLIP clamps
    after each optimizer step, which gives the same values. The gradient is never cut by the clamp.
    """

    def __init__(self, cfg: TemperatureConfig = TemperatureConfig()):
        super().__init__()
        self.config = cfg
        init = torch.tensor(math.log(1.0 / cfg.init))
        if cfg.learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.lo, self.hi = math.log(1.0 / cfg.max), math.log(1.0 / cfg.min)

    def forward(self) -> torch.Tensor:                                   # () the logit scale 1/σ
        with torch.no_grad():
            self.log_scale.clamp_(self.lo, self.hi)                      # CLIP: scale <= 100; ALBEF: temp.clamp_
        return self.log_scale.exp()

    @property
    def temperature(self) -> float:
        """σ as a Python float (for logging)."""
        return math.exp(-float(self.log_scale.detach().clamp(self.lo, self.hi)))


# --- shared pieces of the loss -----------------------------------------------------------------------------------
class ITCOutput(NamedTuple):
    """What the ITC losses return. ``loss, metrics = out[:2]`` or use the names."""
    loss: torch.Tensor                 # () ½ (CE_i2t + CE_t2i) of the global batch
    metrics: dict                      # i2t_acc, t2i_acc (in-batch top-1 hits a positive), logit_scale[, queue_size]
    sim_i2t: torch.Tensor              # (N, N) detached s^{i2t}/σ of the global batch: image rows, text columns
    sim_t2i: torch.Tensor              # (N, N) detached s^{t2i}/σ: text rows, image columns
    ids: torch.Tensor                  # (N,) the global pair ids (0..N-1 when none were given)
    local_rows: slice                  # this process's rows of the global batch: rank*B .. (rank+1)*B


def _check_features(image_feat: torch.Tensor, text_feat: torch.Tensor, ids: torch.Tensor | None) -> None:
    if image_feat.dim() != 2 or image_feat.shape != text_feat.shape:
        raise ValueError(f"image_feat {tuple(image_feat.shape)} and text_feat {tuple(text_feat.shape)} must both "
                         "be (B, D): one projected [CLS] vector per pair, the same width for both modalities")
    if ids is not None:
        if ids.shape != image_feat.shape[:1] or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integer (B,) = ({image_feat.shape[0]},), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("ids must be >= 0 (the queue marks entries without an id with -1)")


def _global_ids(ids: torch.Tensor | None, B: int, device) -> torch.Tensor:
    """(N,) ids of the global batch: the gathered ids, or the global row numbers 0..N-1 (each pair is unique)."""
    world, _ = world_info()
    if ids is None:
        return torch.arange(world * B, device=device)
    return all_gather_no_grad(ids.long())


def positive_targets(query_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """(Nq, Nk) target distribution y: uniform over the keys sharing the query's id (one-hot when ids are unique).

    With duplicates (several captions of one image in the batch) they are all positives, as ALBEF's retrieval
    fine-tuning does with ``idx``: y_ij = [id_i = id_j] / Σ_k [id_i = id_k].
    """
    pos = (query_ids[:, None] == key_ids[None, :]).float()              # (Nq, Nk)
    return pos / pos.sum(1, keepdim=True)                               # every query matches at least itself


def _as_scale(logit_scale: torch.Tensor | float, device) -> torch.Tensor:
    """() fp32 logit scale 1/σ from a tensor (keeps its gradient) or a number."""
    if not torch.is_tensor(logit_scale):
        return torch.tensor(float(logit_scale), device=device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (1/σ), got shape {tuple(logit_scale.shape)}")
    return logit_scale.float().reshape(())


def _in_batch_accuracy(sim: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of rows whose most similar in-batch column is a positive (same id). sim (N, N), ids (N,)."""
    hit = ids[sim.argmax(1)] == ids                                      # (N,)
    return hit.float().mean().item()


def _symmetric_ce(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                  y_i2t: torch.Tensor, y_t2i: torch.Tensor) -> torch.Tensor:
    """½ (CE_i2t + CE_t2i) with target distributions: -1/N Σ_i Σ_j y_ij log softmax_j(s_ij)."""
    return 0.5 * (F.cross_entropy(sim_i2t, y_i2t) + F.cross_entropy(sim_t2i, y_t2i))


# --- in-batch ITC (CLIP, VLMo) ---------------------------------------------------------------------------------------
def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor | float, *,
             ids: torch.Tensor | None = None) -> ITCOutput:
    """In-batch image-text contrastive loss over the global batch (VLMo §3.3, CLIP).

    image_feat, text_feat (B, D): this process's projected [I_CLS] / [T_CLS] vectors (normalised here);
    logit_scale: () 1/σ, e.g. ``Temperature()()``; ids (B,) optional pair ids: pairs with equal ids are positives
    of each other (duplicate images or captions), otherwise only pair i matches pair i.
    """
    _check_features(image_feat, text_feat, ids)
    world, rank = world_info()
    B = image_feat.shape[0]
    img = F.normalize(image_feat.float(), dim=-1)                        # (B, D) ĥ^v, fp32
    txt = F.normalize(text_feat.float(), dim=-1)                         # (B, D) ĥ^w
    img_all = all_gather_with_grad(img)                                  # (N, D) negatives from every process
    txt_all = all_gather_with_grad(txt)                                  # (N, D)
    ids_all = _global_ids(ids, B, img.device)                            # (N,)

    scale = _as_scale(logit_scale, img.device)
    sim_i2t = scale * img_all @ txt_all.T                                # (N, N) s^{i2t}_{ij}/σ   VLMo eq. (3)
    sim_t2i = sim_i2t.T                                                  # (N, N) s^{t2i} = (s^{i2t})ᵀ
    y = positive_targets(ids_all, ids_all)                               # (N, N) one-hot rows without duplicates
    loss = _symmetric_ce(sim_i2t, sim_t2i, y, y)                         # VLMo eq. (4) + cross-entropy, CLIP

    with torch.no_grad():
        s_i2t, s_t2i = sim_i2t.detach(), sim_t2i.detach()
        metrics = {"i2t_acc": _in_batch_accuracy(s_i2t, ids_all), "t2i_acc": _in_batch_accuracy(s_t2i, ids_all),
                   "logit_scale": float(scale.detach())}
    return ITCOutput(loss, metrics, s_i2t, s_t2i, ids_all, slice(rank * B, (rank + 1) * B))


# --- the momentum feature queue (MoCo, ALBEF, mPLUG) ---------------------------------------------------------------
@dataclass
class QueueConfig:
    size: int = 1024            # K entries per modality; mPLUG §5.1 and ALBEF: 65,536 (laptop batches: ~1k)
    dim: int = 256              # D, the projected feature width (ALBEF / mPLUG embed_dim: 256)
    momentum: float = 0.995     # m of momentum_update: θ_m ← m θ_m + (1 - m) θ (mPLUG §5.1, ALBEF: 0.995)
    alpha: float = 0.4          # momentum-distillation weight α of the soft targets (ALBEF: 0.4); 0 = one-hot only

    def __post_init__(self):
        if self.size < 1 or self.dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got size={self.size}, dim={self.dim}")
        if not 0.0 <= self.momentum <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"momentum and alpha must lie in [0, 1], got {self.momentum}, {self.alpha}")


class FeatureQueue(nn.Module):
    """A FIFO of the last K image and K text features (L2-normalised) and their pair ids (-1 = no id).

    Starts EMPTY (ALBEF fills it with random unit vectors instead; starting empty adds no fake negatives and makes
    an empty queue exactly in-batch ITC). ``ptr`` is the slot the next entry goes to; ``count`` the filled slots.
    ``enqueue_dequeue`` takes this process's batch, gathers the global batch and writes it, so the queues of all
    ranks stay identical. The buffers are saved with the model's state dict.
    """

    def __init__(self, cfg: QueueConfig = QueueConfig()):
        super().__init__()
        self.config = cfg
        K, D = cfg.size, cfg.dim
        self.register_buffer("image", torch.zeros(K, D))                 # (K, D)
        self.register_buffer("text", torch.zeros(K, D))                  # (K, D)
        self.register_buffer("ids", torch.full((K,), -1, dtype=torch.long))   # (K,) -1: no id
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))   # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots, <= K

    def __len__(self) -> int:
        return int(self.count)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled entries in slot order: image (n, D), text (n, D), ids (n,), n = len(self)."""
        n = len(self)
        return self.image[:n], self.text[:n], self.ids[:n]

    @torch.no_grad()
    def enqueue_dequeue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                        ids: torch.Tensor | None = None) -> None:
        """Write the global batch (gathered from this process's (B, D) features) at ``ptr``, overwriting the oldest
        entries once full, exactly as writing the N rows one by one would (a batch larger than K keeps its last K)."""
        _check_features(image_feat, text_feat, ids)
        K, D = self.config.size, self.config.dim
        if image_feat.shape[1] != D:
            raise ValueError(f"features are {image_feat.shape[1]} wide but the queue holds {D}: set QueueConfig.dim")
        img = all_gather_no_grad(F.normalize(image_feat.detach().float(), dim=-1))    # (N, D)
        txt = all_gather_no_grad(F.normalize(text_feat.detach().float(), dim=-1))     # (N, D)
        idx = all_gather_no_grad(ids.long()) if ids is not None else torch.full((img.shape[0],), -1, dtype=torch.long,
                                                                                 device=img.device)
        N, p = img.shape[0], int(self.ptr)
        keep = min(N, K)                                                 # rows written before these are overwritten
        slots = (p + N - keep + torch.arange(keep, device=img.device)) % K   # (keep,) wrap around the ring
        self.image[slots] = img[N - keep:].to(self.image.dtype)
        self.text[slots] = txt[N - keep:].to(self.text.dtype)
        self.ids[slots] = idx[N - keep:]
        self.ptr.fill_((p + N) % K)
        self.count.fill_(min(int(self.count) + N, K))


@torch.no_grad()
def momentum_update(model: nn.Module, momentum_model: nn.Module, m: float) -> None:
    """θ_m ← m θ_m + (1 - m) θ for every parameter (MoCo, ALBEF ``_momentum_update``, mPLUG m = 0.995).

    Parameters are matched by name; buffers (e.g. norm statistics) are left alone, as ALBEF does.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must lie in [0, 1], got {m}")
    online = dict(model.named_parameters())
    target = dict(momentum_model.named_parameters())
    if online.keys() != target.keys():
        diff = sorted(online.keys() ^ target.keys())[:5]
        raise ValueError(f"model and momentum_model have different parameters (e.g. {diff}); build the momentum "
                         "model with momentum_copy(model)")
    for name, p_m in target.items():
        p = online[name]
        if p.shape != p_m.shape:
            raise ValueError(f"parameter {name}: model {tuple(p.shape)} vs momentum model {tuple(p_m.shape)}")
        p_m.mul_(m).add_(p.detach().to(p_m.dtype), alpha=1.0 - m)        # θ_m ← m θ_m + (1 - m) θ


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to serve as the momentum encoder (ALBEF ``copy_params``)."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# --- ITC with the queue and momentum distillation (ALBEF, mPLUG) ----------------------------------------------------
def itc_loss_with_queue(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor | float,
                        queue: FeatureQueue, *, ids: torch.Tensor | None = None,
                        image_feat_m: torch.Tensor | None = None, text_feat_m: torch.Tensor | None = None,
                        alpha: float = 0.0) -> ITCOutput:
    """ITC whose keys are [global batch + queue] (mPLUG §3.3 "ITC", following ALBEF §3.2-3.3).

    Queries are this batch's online features (gathered, with gradient). Keys of the batch part are
      * the momentum features ``image_feat_m`` / ``text_feat_m`` (B, D) when given, as ALBEF and mPLUG do (no
        gradient flows into the keys then), or
      * the online features themselves when not (so an empty queue is exactly ``itc_loss``).
    The queue's entries are detached keys; entries whose id equals a query's id are positives too.
    ``alpha`` > 0 blends the targets with the momentum model's softmax (ALBEF momentum distillation):
        y^{i2t} = α softmax(s_m^{i2t}/σ) + (1 - α) y^{i2t}_onehot,  loss = ½ Σ CE(y, p)
    which is ALBEF's (1-α) L_itc + α KL(q ‖ p) up to q's entropy, a constant for the online model.

    One training step (the queue receives the momentum features AFTER the loss, as in ALBEF):

        with torch.no_grad():
            momentum_update(model, model_m, cfg.momentum)
            img_m, txt_m = model_m.features(batch)
        out = itc_loss_with_queue(img, txt, temperature(), queue, ids=ids,
                                  image_feat_m=img_m, text_feat_m=txt_m, alpha=cfg.alpha)
        queue.enqueue_dequeue(img_m, txt_m, ids)

    Returns ITCOutput; its similarities are the (N, N) batch block (queue columns have no inputs to build ITM
    pairs from), metrics add ``queue_size``.
    """
    _check_features(image_feat, text_feat, ids)
    if (image_feat_m is None) != (text_feat_m is None):
        raise ValueError("give both image_feat_m and text_feat_m (momentum keys) or neither")
    if alpha > 0 and image_feat_m is None:
        raise ValueError(f"alpha={alpha} distils from the momentum model: pass image_feat_m and text_feat_m, "
                         "or set alpha=0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    world, rank = world_info()
    B = image_feat.shape[0]
    img = all_gather_with_grad(F.normalize(image_feat.float(), dim=-1))  # (N, D) online queries
    txt = all_gather_with_grad(F.normalize(text_feat.float(), dim=-1))   # (N, D)
    ids_all = _global_ids(ids, B, img.device)                            # (N,)
    if image_feat_m is not None:
        if image_feat_m.shape != image_feat.shape or text_feat_m.shape != text_feat.shape:
            raise ValueError(f"momentum features {tuple(image_feat_m.shape)}, {tuple(text_feat_m.shape)} must match "
                             f"the online ones {tuple(image_feat.shape)}: the momentum model encodes the same batch")
        with torch.no_grad():                                            # ALBEF: batch keys from the momentum model
            img_k = all_gather_no_grad(F.normalize(image_feat_m.float(), dim=-1))   # (N, D)
            txt_k = all_gather_no_grad(F.normalize(text_feat_m.float(), dim=-1))    # (N, D)
    else:
        img_k, txt_k = img, txt                                          # keys = queries (with gradient)

    q_img, q_txt, q_ids = queue.contents()                               # (n, D), (n, D), (n,)
    if q_img.shape[1] != img.shape[1]:
        raise ValueError(f"features are {img.shape[1]} wide but the queue holds {q_img.shape[1]}")
    img_keys = torch.cat([img_k, q_img.to(img.dtype)])                   # (N + n, D)
    txt_keys = torch.cat([txt_k, q_txt.to(txt.dtype)])                   # (N + n, D)
    if ids is None:                                                      # no ids: the queue holds negatives only
        q_ids = torch.full_like(q_ids, -1)
    key_ids = torch.cat([ids_all, q_ids.to(ids_all.device)])             # (N + n,)

    scale = _as_scale(logit_scale, img.device)
    sim_i2t = scale * img @ txt_keys.T                                   # (N, N + n) s^{i2t}/σ over batch + queue
    sim_t2i = scale * txt @ img_keys.T                                   # (N, N + n) s^{t2i}/σ
    y = positive_targets(ids_all, key_ids)                               # (N, N + n)
    y_i2t, y_t2i = y, y
    if alpha > 0:
        with torch.no_grad():                                            # ALBEF §3.3 momentum distillation
            s = scale.detach()
            q_i2t = (s * img_k @ txt_keys.T).softmax(1)                  # (N, N + n) the momentum model's i2t
            q_t2i = (s * txt_k @ img_keys.T).softmax(1)
            y_i2t = alpha * q_i2t + (1 - alpha) * y
            y_t2i = alpha * q_t2i + (1 - alpha) * y
    loss = _symmetric_ce(sim_i2t, sim_t2i, y_i2t, y_t2i)

    N = img.shape[0]
    with torch.no_grad():
        s_i2t, s_t2i = sim_i2t[:, :N].detach(), sim_t2i[:, :N].detach()  # (N, N) the batch block
        metrics = {"i2t_acc": _in_batch_accuracy(s_i2t, ids_all), "t2i_acc": _in_batch_accuracy(s_t2i, ids_all),
                   "logit_scale": float(scale.detach()), "queue_size": len(queue)}
    return ITCOutput(loss, metrics, s_i2t, s_t2i, ids_all, slice(rank * B, (rank + 1) * B))
