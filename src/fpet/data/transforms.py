"""uint8 images -> model input: float in [0, 1], optionally ImageNet-normalised.

Datasets yield uint8 `[3, H, W]` (decoded once and cached); the loaders batch them as uint8 and the training loop
converts each batch on its device with `ToFloat`, so a cached epoch does no per-image float work on the CPU.

The official FPET code feeds `ToTensor()` output (values in [0, 1]) with no mean/std normalisation;
`dataset.normalize=imagenet` switches to ImageNet mean/std as NOAH and other baselines do.
"""
from __future__ import annotations

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_MODES = ("none", "imagenet")


def to_float(images: Tensor, normalize: str = "none") -> Tensor:
    """`uint8 [..., 3, H, W] -> float32 [..., 3, H, W]` in [0, 1] (float input passes through), then
    ImageNet mean/std when `normalize == "imagenet"`."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
        x = (x - mean) / std
    return x


class ToFloat:
    """`uint8 [..., 3, H, W] -> float32` model input: one image in a dataset or a whole batch in the loop."""

    def __init__(self, normalize: str = "none") -> None:
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"dataset.normalize={normalize!r} is not one of {NORMALIZE_MODES}")
        self.normalize = normalize

    def __call__(self, images: Tensor) -> Tensor:
        return to_float(images, self.normalize)

    def __repr__(self) -> str:
        return f"ToFloat(normalize={self.normalize!r})"
