"""SSF (Lian et al. 2022): a learnable per-channel scale and shift after the frozen layers.

`y = gamma * layer(x) + beta` after the patch-embedding convolution, `norm1`, `attn.qkv` (3C channels),
`attn.proj`, `norm2`, `mlp.fc1` (4C channels, before the GELU), `mlp.fc2` and the final norm, as the SSF code
(ViT-B/16: 12 x 16,896 + 2 x 1,536 = 205,824 parameters). Init as the SSF code: gamma ~ N(1, 0.02),
beta ~ N(0, 0.02), so a fresh model is close to, not equal to, the backbone.

Each scale-shift is affine and sits right after a linear, convolution or LayerNorm, so it folds exactly into that
layer for inference (`fold_ssf`): `W' = diag(gamma) W`, `b' = gamma * b + beta`; the folded model is the plain ViT.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import PETLayer, PETMethod
from fpet.pet.fold import fold_layers
from fpet.pet.inject import replace_modules

SSF_TARGETS = ("patch_embed.proj", "blocks.*.norm1", "blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.norm2",
               "blocks.*.mlp.fc1", "blocks.*.mlp.fc2", "norm")
"""The timm ViT modules whose outputs SSF scales and shifts."""


def out_channels(layer: nn.Module) -> int:
    """Output channels of a linear, convolution or LayerNorm."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.LayerNorm) and layer.weight is not None:
        return layer.normalized_shape[-1]
    raise ValueError(f"SSF folds into a Linear, Conv2d or affine LayerNorm, not {type(layer).__name__}")


class ScaleShift(PETLayer):
    """`gamma * base_layer(x) + beta` on the channel axis (last for `[B, N, C]`, 1 for a conv's `[B, C, H, W]`)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        width = out_channels(base_layer)
        self.channel_dim = 1 if isinstance(base_layer, nn.Conv2d) else -1
        self.scale = nn.Parameter(torch.empty(width))
        self.shift = nn.Parameter(torch.empty(width))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.channel_dim == 1:
            return y * self.scale[:, None, None] + self.shift[:, None, None]
        return y * self.scale + self.shift


@torch.no_grad()
def fold_scale_shift(layer: ScaleShift) -> nn.Module:
    """The wrapped layer with the scale-shift folded in (`W' = diag(gamma) W`, `b' = gamma * b + beta`, float64)."""
    base = layer.base_layer
    gamma, beta = layer.scale.double(), layer.shift.double()
    weight = base.weight
    weight.copy_(weight.double() * gamma.view(-1, *[1] * (weight.dim() - 1)))
    bias = base.bias.double() if base.bias is not None else torch.zeros_like(gamma)
    new_bias = (gamma * bias + beta).to(weight.dtype)
    if base.bias is None:
        base.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        base.bias.copy_(new_bias)
    return base


def inject_ssf(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every SSF target of a timm ViT in `ScaleShift`; returns the wrapped module names."""
    return [name for pattern in SSF_TARGETS for name in replace_modules(vit, pattern, ScaleShift)]


def fold_ssf(vit: nn.Module) -> list[str]:
    """Fold every `ScaleShift` into the layer it follows, in place; returns the folded names."""
    return fold_layers(vit, ScaleShift, fold_scale_shift)


SSF = PETMethod("ssf", "SSF", inject_ssf, fold=fold_ssf)
