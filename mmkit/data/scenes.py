"""The one render cache of the kit's task data: scenes of a split with their images rendered once.

    bank = SceneBank.build("train", 4000, image_size=32)                 # scenes + uint8 images (~2,500 /s)
    bank = SceneBank.build("train", 10_000, image_size=32, n_augmented=6000, augment_seed=0)   # + drawn views
    bank.image(3)                    # float32 (3, S, S) in [0, 1], bit-identical to scene_to_tensor(scene, S)
    bank.images([0, 5], augmented=True)                                  # (2, 3, S, S), the augmented views

Every task sampler of :mod:`mmkit.data` (ITM negatives, VQA questions, captions, text-to-image prompts) indexes
into a bank, so an image is rendered once however many tasks read it. Scene ``i`` of a bank is
``sample_scene(split_seeds(split, n, start)[i], min_objects, max_objects)``: the same arguments give the same
scenes on every machine, and the splits never share a scene.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from mmkit.data.augment import augmented_batch_u8
from mmkit.data.world import Background, Scene, object_labels, render, sample_scene, split_seeds

__all__ = ["SceneBank", "CellData", "render_uint8", "sample_scenes", "on_backdrop"]


def render_uint8(scene: Scene, size: int) -> torch.Tensor:
    """``render(scene, size)`` as a uint8 tensor (3, size, size): the form the image caches store."""
    arr = np.asarray(render(scene, size), dtype=np.uint8)               # (S, S, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()   # (3, S, S)


def sample_scenes(split: str, n: int, *, start: int = 0, min_objects: int = 1, max_objects: int = 3,
                  keep: Callable[[Scene], bool] | None = None) -> list[Scene]:
    """``n`` scenes of ``split`` from seed offset ``start``; with ``keep``, seeds are read on in order until ``n``
    scenes pass it (e.g. leaving out colour + shape pairs held out of a training set)."""
    if keep is None:
        return [sample_scene(s, min_objects, max_objects) for s in split_seeds(split, n, start=start)]
    scenes, offset = [], start
    while len(scenes) < n:
        batch = split_seeds(split, max(64, 2 * (n - len(scenes))), start=offset)
        offset += len(batch)
        scenes += [sc for sc in (sample_scene(s, min_objects, max_objects) for s in batch) if keep(sc)]
    return scenes[:n]


def on_backdrop(scenes: Sequence[Scene], backdrop: Background | None) -> list[Scene]:
    """The same ``scenes`` drawn on ``backdrop`` (e.g. ``world.STUDIO``, the one text-to-image draws on); None: each
    keeps its own sampled backdrop."""
    return list(scenes) if backdrop is None else [replace(s, background=backdrop) for s in scenes]


class SceneBank:
    """Scenes of one split, their rendered images as uint8 and (optionally) an augmented view of the first ones.

    Attributes: ``scenes`` (list of :class:`Scene`), ``images_u8`` (N, 3, S, S) uint8, ``augmented_u8``
    (N_aug, 3, S, S) uint8 or None, ``split``, ``image_size``.
    """

    def __init__(self, scenes: Sequence[Scene], images_u8: torch.Tensor, augmented_u8: torch.Tensor | None = None,
                 split: str = "train"):
        if len(scenes) != len(images_u8):
            raise ValueError(f"{len(scenes)} scenes but {len(images_u8)} images: give one image per scene")
        self.scenes, self.images_u8, self.augmented_u8, self.split = list(scenes), images_u8, augmented_u8, split
        self.image_size = int(images_u8.shape[-1]) if images_u8.dim() == 4 else 0

    @classmethod
    def build(cls, split: str, n: int, *, image_size: int, start: int = 0, min_objects: int = 1,
              max_objects: int = 3, n_augmented: int = 0, augment_seed: int = 0,
              keep: Callable[[Scene], bool] | None = None, backdrop: Background | None = None) -> "SceneBank":
        """Render ``n`` scenes of ``split`` (seeds from offset ``start``) at ``image_size`` px, and augmented views
        (:mod:`mmkit.data.augment`, seeded by ``augment_seed``) of the first ``n_augmented``.

        ``keep(scene) -> bool`` filters scenes: seeds are then read on until ``n`` scenes are kept (e.g. leaving out
        colour + shape pairs held out of a training set). ``backdrop``: draw every scene on this one instead of its
        own sampled shade (the scenes returned carry it).
        """
        scenes = sample_scenes(split, n, start=start, min_objects=min_objects, max_objects=max_objects, keep=keep)
        scenes = on_backdrop(scenes, backdrop)
        images = torch.stack([render_uint8(s, image_size) for s in scenes]) if scenes else \
            torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        n_aug = min(n_augmented, len(scenes))
        aug = augmented_batch_u8(scenes[:n_aug], seed=augment_seed, size=image_size) if n_aug else None
        return cls(scenes, images, aug, split)

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def n_augmented(self) -> int:
        return 0 if self.augmented_u8 is None else len(self.augmented_u8)

    def image(self, index: int, augmented: bool = False) -> torch.Tensor:
        """float32 (3, S, S) in [0, 1]: the world rendering of scene ``index``, or its augmented view."""
        src = self.augmented_u8 if augmented else self.images_u8
        if src is None:
            raise ValueError("this SceneBank has no augmented views; build it with n_augmented > 0")
        return src[index].float().div_(255.0)

    def images(self, indices, augmented: bool = False) -> torch.Tensor:
        """float32 (b, 3, S, S) in [0, 1]."""
        src = self.augmented_u8 if augmented else self.images_u8
        if src is None:
            raise ValueError("this SceneBank has no augmented views; build it with n_augmented > 0")
        return src[list(indices)].float().div_(255.0)

    def with_augmented(self, seed: int) -> "SceneBank":
        """The same scenes with a (new) augmented view of every one (evaluation on drawn-style pictures)."""
        return SceneBank(self.scenes, self.images_u8, augmented_batch_u8(self.scenes, seed=seed, size=self.image_size),
                         self.split)


class CellData:
    """Images of a :class:`SceneBank` and which object each grid cell holds (``labels`` (N, 9, 3): colour, shape,
    size, each + 1; 0 = empty, as :func:`mmkit.data.world.object_labels`); ``batch_fn`` for :func:`mmkit.train.train`
    gives {"images" (B, 3, S, S) in [0, 1], "labels" (B, 9, 3)}. With ``aug_fraction`` > 0 that share of every batch
    is drawn from the bank's augmented views (scenes that have one)."""

    def __init__(self, bank: SceneBank, aug_fraction: float = 0.0):
        if not 0.0 <= aug_fraction <= 1.0:
            raise ValueError(f"aug_fraction must be in [0, 1], got {aug_fraction}")
        if aug_fraction and not bank.n_augmented:
            raise ValueError("aug_fraction > 0 needs augmented views: build the bank with n_augmented > 0")
        self.bank, self.aug_fraction = bank, aug_fraction
        self.labels = object_labels(bank.scenes)                                  # (N, 9, 3)

    def batch_fn(self, generator: torch.Generator, batch_size: int) -> dict:
        n_aug = round(batch_size * self.aug_fraction)
        idx = torch.randint(len(self.bank), (batch_size - n_aug,), generator=generator).tolist()
        aug = torch.randint(max(self.bank.n_augmented, 1), (n_aug,), generator=generator).tolist()
        images = torch.cat([self.bank.images(idx), self.bank.images(aug, True)]) if n_aug else self.bank.images(idx)
        return {"images": images, "labels": self.labels[idx + aug]}
