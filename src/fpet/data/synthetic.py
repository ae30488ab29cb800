"""The embedded demo task: a generated, seeded, VTAB-1K-shaped classification problem.

Each image is a plain, slightly tinted background with mild noise and one object (a square or a disk, at random)
in one of three colours and one of two sizes; the label is colour x size (6 classes). Large plain regions give token merging redundancy to remove;
the object must survive merging for the label to be recoverable. Images are generated from
`(data_seed, stream, index)` alone, so every run, worker and machine sees the same pixels.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

COLOURS = np.array([[0.85, 0.15, 0.15], [0.15, 0.75, 0.20], [0.15, 0.30, 0.90]])  # red, green, blue
SIZES = ((0.16, 0.28), (0.40, 0.56))  # object extent as a fraction of the image side: small, large
SHAPES = ("square", "disk")
NUM_CLASSES = len(COLOURS) * len(SIZES)

# split -> (stream, first index, length); train800val200 is train800 followed by val200, as in VTAB-1K.
SPLIT_LAYOUT = {"train800": ("train", 0, 800), "val200": ("train", 800, 200), "train800val200": ("train", 0, 1000)}
STREAM_IDS = {"train": 0, "test": 1}


def render_image(rng: np.random.Generator, label: int, img_size: int = 224) -> np.ndarray:
    """One image of class `label` as uint8 `[3, img_size, img_size]`."""
    colour_idx, size_idx = divmod(label, len(SIZES))
    grey = rng.uniform(0.3, 0.7)
    background = np.clip(grey + rng.uniform(-0.06, 0.06, size=3), 0, 1)
    img = np.broadcast_to(background[:, None, None], (3, img_size, img_size)).copy()
    extent = int(rng.uniform(*SIZES[size_idx]) * img_size)
    top, left = rng.integers(0, img_size - extent, size=2)
    yy, xx = np.mgrid[0:extent, 0:extent]
    if rng.integers(len(SHAPES)) == 0:
        mask = np.ones((extent, extent), dtype=bool)
    else:
        r = (extent - 1) / 2
        mask = (yy - r) ** 2 + (xx - r) ** 2 <= r**2
    colour = np.clip(COLOURS[colour_idx] + rng.uniform(-0.08, 0.08, size=3), 0, 1)
    region = img[:, top:top + extent, left:left + extent]
    region[:, mask] = colour[:, None]
    img += rng.normal(0.0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


class SyntheticTask(Dataset):
    """A split of the synthetic task: items are `(image [3, H, W] after transform, label)`.

    Args:
        split: train800 | val200 | train800val200 | test.
        num_test: size of the test split.
        data_seed: seed of the pixels and labels (not of training).
        transform: applied to the uint8 image tensor (see `fpet.data.transforms.ToFloat`).
    """

    num_classes = NUM_CLASSES

    def __init__(self, split: str, img_size: int = 224, num_test: int = 500, data_seed: int = 1234,
                 transform: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        layout = dict(SPLIT_LAYOUT, test=("test", 0, num_test))
        if split not in layout:
            raise ValueError(f"split={split!r} is not one of {sorted(layout)}")
        self.split = split
        self.stream, self.offset, self.length = layout[split]
        self.img_size, self.data_seed = img_size, data_seed
        self.transform = transform
        rng = np.random.default_rng([data_seed, STREAM_IDS[self.stream], 7])
        self._label_order = rng.permutation(NUM_CLASSES)
        self._rendered: dict[int, Tensor] = {}  # each image is drawn once (150 KB at 224x224), then reused

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        """The class of item `index` (balanced: labels cycle through a seeded permutation)."""
        return int(self._label_order[(self.offset + index) % NUM_CLASSES])

    def image(self, index: int) -> Tensor:
        """The uint8 image `[3, H, W]` of item `index` (rendered on first use, then kept in memory)."""
        if index not in self._rendered:
            rng = np.random.default_rng([self.data_seed, STREAM_IDS[self.stream], self.offset + index])
            self._rendered[index] = torch.from_numpy(render_image(rng, self.label(index), self.img_size))
        return self._rendered[index]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image = self.image(index)
        return (self.transform(image) if self.transform else image), self.label(index)
