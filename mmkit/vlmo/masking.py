"""BEiT's block-wise masking of image patches, for VLMo's stage-1 masked image modelling (VLMo §3.4, BEiT §2.5).

    mask = block_mask((8, 8), n_masked=26, generator=g)          # (8, 8) bool: ~40% of an 8x8 patch grid, in blocks
    masks = block_masks(32, (8, 8), ratio=0.4, generator=g)      # (32, 64) bool, one row per image, raster order

BEiT (Bao et al. 2021, Algorithm 1) masks rectangles rather than single patches, so that a masked patch's content
cannot be copied from the patch next to it: repeat

    s ~ U[min_block, n_masked - |M|]                          area of the next block, in patches
    r ~ exp(U[log(1 / max_aspect), log(max_aspect)])          its aspect ratio
    a = round(sqrt(s r)), b = round(sqrt(s / r))              height and width
    top-left uniformly where an a x b block fits;  M = M ∪ block, if that adds 1 .. n_masked - |M| new patches

until |M| = n_masked (BEiT: 40% of 14 x 14 = 75 patches, blocks of at least 16). BEiT gives up after 10 failed
tries and may mask a few patches fewer; here the last ones are then masked one at a time at random, so every
image has exactly ``n_masked`` masked patches (every row of a batch predicts the same number of codes).
"""
from __future__ import annotations

import math

import torch

__all__ = ["block_mask", "block_masks", "n_masked_patches"]


def n_masked_patches(grid: tuple[int, int], ratio: float) -> int:
    """round(ratio * h * w), at least 1: how many patches a ``ratio`` masks."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio} (BEiT masks 0.4 of the patches)")
    return max(1, round(ratio * grid[0] * grid[1]))


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def block_mask(grid: tuple[int, int], n_masked: int, *, min_block: int = 4, max_aspect: float = 3.0,
               generator: torch.Generator | None = None, max_tries: int = 10) -> torch.Tensor:
    """One (h, w) bool mask with exactly ``n_masked`` True patches, grown block by block (BEiT Algorithm 1).

    ``min_block``: the smallest block area in patches (BEiT: 16 of 196; 4 of 64 is the same share); ``max_aspect``:
    blocks are at most this elongated (BEiT: 1 / 0.3).
    """
    h, w = grid
    if not 1 <= n_masked <= h * w:
        raise ValueError(f"n_masked={n_masked} must be in 1..{h * w} (the patches of a {h}x{w} grid)")
    if min_block < 1 or max_aspect < 1:
        raise ValueError(f"need min_block >= 1 and max_aspect >= 1, got {min_block}, {max_aspect}")
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    while count < n_masked:
        left = n_masked - count
        added = 0
        for _ in range(max_tries):
            s = _uniform(min(min_block, left), left, generator)                              # block area
            r = math.exp(_uniform(-math.log(max_aspect), math.log(max_aspect), generator))    # aspect ratio
            a, b = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))                 # height, width
            if not (1 <= a <= h and 1 <= b <= w):
                continue
            top = int(torch.randint(h - a + 1, (), generator=generator))
            lft = int(torch.randint(w - b + 1, (), generator=generator))
            new = int((~mask[top:top + a, lft:lft + b]).sum())
            if 0 < new <= left:
                mask[top:top + a, lft:lft + b] = True
                added = new
                break
        if added == 0:                       # BEiT stops here; the remaining patches are masked one at a time
            free = (~mask).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(len(free), generator=generator)[:left]]
            mask.view(-1)[pick] = True
            added = left
        count += added
    return mask                                                                                # (h, w)


def block_masks(batch_size: int, grid: tuple[int, int], ratio: float = 0.4, *, min_block: int = 4,
                max_aspect: float = 3.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, h * w) bool: an independent :func:`block_mask` per image, flattened in raster (patch) order."""
    n = n_masked_patches(grid, ratio)
    return torch.stack([block_mask(grid, n, min_block=min_block, max_aspect=max_aspect, generator=generator).flatten()
                        for _ in range(batch_size)])
