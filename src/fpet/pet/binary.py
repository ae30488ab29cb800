"""1-bit linear layers (Bi-LoRA, Bi-AdaptFormer, FPET's key-refinement adapter), as the official `QLinear`.

Each weight matrix is standardised with its own mean and (unbiased) std, `z = (w - mean) / (std + 1e-5)`,
quantised to `sign(z) * 0.6745` and mapped back, `* std + mean`. 0.6745 = Phi^-1(0.75) is what the official
`QLinear.quantize(bit=1)` loop converges to: the median of each half of a unit Gaussian (its loop alternates
decision boundary and "centre" = the Gaussian quantile at the middle of each cell's probability mass), not the
Lloyd-Max centroid sqrt(2/pi) = 0.7979. The forward pass therefore sees exactly two values per matrix; the backward
pass uses the straight-through estimator, so gradients reach the latent fp32 weights (and, through the mean and
std, as in the official code).

A trained matrix is stored as its sign bits plus the float32 mean and std (`BinaryLinear.quantize`); loading them
back (`BinaryLinear.load_quantized`) reproduces the forward pass's weight bit for bit.
"""
from __future__ import annotations

from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONE_BIT_LEVEL = NormalDist().inv_cdf(0.75)
"""The official 1-bit level: Phi^-1(0.75) = 0.6744897..., the median of |z| for z ~ N(0, 1)."""


def one_bit_levels(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """`+0.6745` where `bits` is True, `-0.6745` elsewhere (same shape, `dtype`)."""
    return torch.where(bits, ONE_BIT_LEVEL, -ONE_BIT_LEVEL).to(dtype)


def dequantize(bits: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """The two-valued matrix `mean +- 0.6745 * std` of sign `bits` (the same arithmetic as `binarize`)."""
    return one_bit_levels(bits, mean.dtype) * std + mean


def binarize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """`weight` quantised to `mean +- 0.6745 * std` with a straight-through gradient (same shape).

    The value is exactly one of the two levels (`zq + (z - z.detach())` adds an exact zero), so a matrix takes
    exactly two values and a stored (bits, mean, std) triple reproduces it bit for bit. `z = 0` maps to the upper
    level (the official `sign` gives 0 there, a set of measure zero for trained float weights).
    """
    mean, std = weight.mean(), weight.std()
    z = (weight - mean) / (std + eps)
    z = one_bit_levels(z >= 0, z.dtype) + (z - z.detach())
    return z * std + mean


class BinaryLinear(nn.Linear):
    """`nn.Linear` whose weight is used 1-bit quantised (`binarize`) in the forward pass; no bias by default.

    After `load_quantized` (a task checkpoint) the weight holds the two-valued matrix itself and is used as is,
    like the official code's `fake_quan = False`; such a layer is for inference, not for further training.
    In a task file the weight is stored packed (`packed_tensors`): `weight.bits` (8 signs per byte),
    `weight.mean`, `weight.std`.
    """

    PACKED = ("weight",)
    """Parameters this layer stores in packed form instead of as float tensors."""

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
        self.weight.copy_(dequantize(bits, mean, std).to(self.weight.device))
        self.loaded = (bits, mean, std)

    def packed_tensors(self) -> dict[str, Tensor]:
        """The task-file tensors of the weight: `{"weight.bits": uint8, "weight.mean": 0-d, "weight.std": 0-d}`."""
        from fpet.pet.pack import pack_bits

        bits, mean, std = self.quantize()
        return {"weight.bits": pack_bits(bits), "weight.mean": mean.float(), "weight.std": std.float()}

    def load_packed(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `packed_tensors`."""
        from fpet.pet.pack import unpack_bits

        self.load_quantized(unpack_bits(tensors["weight.bits"], self.weight.shape), tensors["weight.mean"],
                            tensors["weight.std"])

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)
