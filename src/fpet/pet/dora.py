"""DoRA (Liu et al. 2024): LoRA with weight decomposition into magnitude and direction, on the fused `qkv`.

`W' = m * (W + s B A) / ||W + s B A||_row`, computed as the PEFT code does:
`y = g * (W x + s B(A(dropout(x)))) + b` with `g = m / ||W + s B A||_row` and the norm detached (no gradient through
it). A: C -> r (nn.Linear's kaiming-uniform init), B: r -> 3C (zero), `m [3C]` initialised to the row norms of the
frozen W, so a fresh layer is the frozen one. ViT-B/16, r = 8: 12 x (768 x 8 + 8 x 2304 + 2304) = 322,560.
The whole layer is one linear map, so it folds exactly for inference (`fold_dora`): `W' = g * (W + s B A)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import PETLayer, PETMethod
from fpet.pet.fact import check_rank
from fpet.pet.fold import fold_layers, linear_with
from fpet.pet.inject import replace_modules


class DoRALinear(PETLayer):
    """Wraps a linear (`qkv`): `[B, N, in] -> [B, N, out]` with DoRA's magnitude and low-rank direction update."""

    def __init__(self, base_layer: nn.Linear, dim: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        check_rank(dim, min(base_layer.in_features, base_layer.out_features))
        self.scale = scale
        self.lora_a = nn.Linear(base_layer.in_features, dim, bias=False)
        self.lora_b = nn.Linear(dim, base_layer.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            self.magnitude = nn.Parameter(base_layer.weight.norm(dim=1).clone())

    def direction(self) -> Tensor:
        """`W + s B A`, `[out, in]`."""
        return self.base_layer.weight + self.scale * (self.lora_b.weight @ self.lora_a.weight)

    def gain(self) -> Tensor:
        """`g = m / ||W + s B A||_row` with the norm detached, `[out]`."""
        return self.magnitude / self.direction().norm(dim=1).detach()

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        y = F.linear(x, base.weight) + self.scale * self.lora_b(self.lora_a(self.dropout(x)))
        y = self.gain() * y
        return y if base.bias is None else y + base.bias


@torch.no_grad()
def fold_dora_layer(layer: DoRALinear) -> nn.Linear:
    """A plain linear with `W' = g * (W + s B A)` (float64, cast back) and the frozen bias."""
    base = layer.base_layer
    direction = base.weight.double() + layer.scale * (layer.lora_b.weight.double() @ layer.lora_a.weight.double())
    gain = layer.magnitude.double() / direction.norm(dim=1)
    return linear_with(base, gain[:, None] * direction, base.bias)


def inject_dora(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.attn.qkv` of a timm ViT in `DoRALinear`; returns the wrapped module names."""
    return replace_modules(vit, "blocks.*.attn.qkv",
                           lambda qkv: DoRALinear(qkv, dim=cfg.dim, scale=cfg.scale, dropout=cfg.dropout))


def fold_dora(vit: nn.Module) -> list[str]:
    """Fold every `DoRALinear` into a plain linear in place; returns the folded names."""
    return fold_layers(vit, DoRALinear, fold_dora_layer)


DORA = PETMethod("dora", "DoRA", inject_dora, fold=fold_dora)
