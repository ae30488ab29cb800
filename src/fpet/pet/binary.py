"""1-bit linear layers (Bi-LoRA, Bi-AdaptFormer, FPET's key-refinement adapter).

Each weight matrix is standardised with its own mean and std, quantised to the optimal 1-bit levels of a unit
Gaussian (the Lloyd-Max quantiser: +-sqrt(2/pi) = +-0.7979), and mapped back with the same mean and std. The
forward pass therefore sees exactly two values per matrix; the backward pass uses the straight-through estimator,
so gradients reach the latent fp32 weights (and, through the mean and std, as in the official code).

A trained matrix is stored as its sign bits plus the float32 mean and std (`BinaryLinear.quantize`); loading them
back (`BinaryLinear.load_quantized`) reproduces the forward pass's weight bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAUSS_1BIT_LEVEL = math.sqrt(2.0 / math.pi)
"""Optimal 1-bit reconstruction level of N(0, 1): E[|z|] = 0.7979."""


def one_bit_levels(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """`+0.7979` where `bits` is True, `-0.7979` elsewhere (same shape, `dtype`)."""
    return torch.where(bits, GAUSS_1BIT_LEVEL, -GAUSS_1BIT_LEVEL).to(dtype)


def dequantize(bits: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """The two-valued matrix `mean +- 0.7979 * std` of sign `bits` (the same arithmetic as `binarize`)."""
    return one_bit_levels(bits, mean.dtype) * std + mean


def binarize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """`weight` quantised to `mean +- 0.7979 * std` with a straight-through gradient (same shape).

    The value is exactly one of the two levels (`zq + (z - z.detach())` adds an exact zero), so a matrix takes
    exactly two values and a stored (bits, mean, std) triple reproduces it bit for bit.
    """
    mean, std = weight.mean(), weight.std()
    z = (weight - mean) / (std + eps)
    z = one_bit_levels(z >= 0, z.dtype) + (z - z.detach())
    return z * std + mean


class BinaryLinear(nn.Linear):
    """`nn.Linear` whose weight is used 1-bit quantised (`binarize`) in the forward pass; no bias by default.

    After `load_quantized` (a task checkpoint) the weight holds the two-valued matrix itself and is used as is,
    like the official code's `fake_quan = False`; such a layer is for inference, not for further training.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.loaded: tuple[Tensor, Tensor, Tensor] | None = None

    def quantized_weight(self) -> Tensor:
        """The two-valued weight the forward pass uses, `[out, in]`."""
        return self.weight if self.loaded is not None else binarize(self.weight)

    @torch.no_grad()
    def quantize(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(bits [out, in] bool, mean, std)` (0-d) of the forward pass's weight, moved to the CPU.

        Mean and std are computed where the weight lives, as the forward pass computes them.
        """
        if self.loaded is not None:
            return self.loaded
        w = self.weight.detach()
        mean, std = w.mean(), w.std()
        return ((w - mean) / (std + 1e-5) >= 0).cpu(), mean.cpu(), std.cpu()

    @torch.no_grad()
    def load_quantized(self, bits: Tensor, mean: Tensor, std: Tensor) -> None:
        """Set the weight to the stored 1-bit matrix (`bits [out, in]`, 0-d mean and std) and use it as is."""
        if bits.shape != self.weight.shape:
            raise ValueError(f"1-bit weight of shape {tuple(bits.shape)} does not fit {tuple(self.weight.shape)}")
        bits, mean, std = bits.bool().cpu(), mean.float().cpu(), std.float().cpu()
        self.weight.copy_(dequantize(bits, mean, std))
        self.loaded = (bits, mean, std)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)
