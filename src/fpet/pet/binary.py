"""1-bit linear layers (Bi-LoRA, Bi-AdaptFormer, FPET's key-refinement adapter).

Each weight matrix is standardised with its own mean and std, quantised to the optimal 1-bit levels of a unit
Gaussian (the Lloyd-Max quantiser: +-sqrt(2/pi) = +-0.7979), and mapped back with the same mean and std. The
forward pass therefore sees exactly two values per matrix; the backward pass uses the straight-through estimator,
so gradients reach the latent fp32 weights (and, through the mean and std, as in the official code).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAUSS_1BIT_LEVEL = math.sqrt(2.0 / math.pi)
"""Optimal 1-bit reconstruction level of N(0, 1): E[|z|] = 0.7979."""


def binarize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """`weight` quantised to `mean +- 0.7979 * std` with a straight-through gradient (same shape)."""
    mean, std = weight.mean(), weight.std()
    z = (weight - mean) / (std + eps)
    zq = torch.where(z >= 0, GAUSS_1BIT_LEVEL, -GAUSS_1BIT_LEVEL).to(z.dtype)
    z = z + (zq - z).detach()
    return z * std + mean


class BinaryLinear(nn.Linear):
    """`nn.Linear` whose weight is used 1-bit quantised (`binarize`) in the forward pass; no bias by default."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)

    def quantized_weight(self) -> Tensor:
        """The two-valued weight the forward pass uses, `[out, in]`."""
        return binarize(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)
