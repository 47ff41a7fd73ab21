"""The Shapes World: scenes (`world`), their text (`text`), the noisy web crawl (`crawl`), torch datasets
(`datasets`) and loaders for a user's own images (`userdata`). Nothing here downloads anything."""
from __future__ import annotations

from typing import Iterator, Sequence

from mmkit.data.world import SPLITS, sample_scene, split_of, split_seeds  # noqa: F401
from mmkit.data.text import scene_texts


def text_corpus(n_scenes: int, split: str = "train", langs: Sequence[str] = ("en", "zh"),
                start: int = 0, max_objects: int = 3) -> Iterator[str]:
    """Every text the world says about ``n_scenes`` scenes of ``split``, in each language of ``langs``
    (captions, relations, QA lines, referring expressions, product descriptions, poems)."""
    for seed in split_seeds(split, n_scenes, start=start):
        scene = sample_scene(seed, max_objects=max_objects)
        for lang in langs:
            yield from scene_texts(scene, lang)
