"""Per-image tensor transform shared by every dataset: uint8 `[3, H, W]` -> float `[3, H, W]`.

The official FPET code feeds `ToTensor()` output (values in [0, 1]) with no mean/std normalisation;
`dataset.normalize=imagenet` switches to ImageNet mean/std as NOAH and other baselines do.
"""
from __future__ import annotations

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_MODES = ("none", "imagenet")


class ToFloat:
    """`uint8 [3, H, W] -> float32 [3, H, W]` in [0, 1], then optionally ImageNet-normalised."""

    def __init__(self, normalize: str = "none") -> None:
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"dataset.normalize={normalize!r} is not one of {NORMALIZE_MODES}")
        self.normalize = normalize
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        x = image.float().div_(255.0)
        if self.normalize == "imagenet":
            x = (x - self.mean) / self.std
        return x

    def __repr__(self) -> str:
        return f"ToFloat(normalize={self.normalize!r})"
