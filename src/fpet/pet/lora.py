"""LoRA on the query and value parts of timm's fused `qkv` projection (and its 1-bit variant, Bi-LoRA).

`qkv(x) + s * [up_q(dropout(down_q(x))), 0, up_v(dropout(down_v(x)))]`: hidden dim `pet.dim` (8), no nonlinearity,
no biases, dropout 0.1 on the hidden (official FPET code), up-projections zero-initialised; k untouched. Linear, so
it folds into `qkv` for inference (`fold_lora`): `W_q += s * up_q @ down_q`, `W_v += s * up_v @ down_v`.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import Bottleneck, PETLayer, PETMethod
from fpet.pet.fold import bottleneck_matrix, linear_with
from fpet.pet.inject import replace_modules


class LoRAQKV(PETLayer):
    """`qkv(x) + s * [lora_q(x), 0, lora_v(x)]`: `[B, N, C] -> [B, N, 3 * C]`; a fresh layer computes `qkv(x)`.

    `linear` builds the projections (nn.Linear, or `BinaryLinear` for Bi-LoRA, whose up-projection starts near,
    not at, zero: `up_std`).
    """

    def __init__(self, base_layer: nn.Linear, dim: int, scale: float, dropout: float = 0.1,
                 linear: type[nn.Module] = nn.Linear, up_std: float | None = None) -> None:
        super().__init__(base_layer)
        if base_layer.out_features % 3:
            raise ValueError(f"LoRA expects a fused qkv linear, got out_features={base_layer.out_features}")
        c_in, c_out = base_layer.in_features, base_layer.out_features // 3
        self.scale = scale
        self.lora_q = Bottleneck(c_in, dim, c_out, dropout=dropout, linear=linear, up_std=up_std)
        self.lora_v = Bottleneck(c_in, dim, c_out, dropout=dropout, linear=linear, up_std=up_std)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.base_layer(x).chunk(3, dim=-1)
        return torch.cat([q + self.scale * self.lora_q(x), k, v + self.scale * self.lora_v(x)], dim=-1)


@torch.no_grad()
def fold_lora_layer(layer: LoRAQKV) -> nn.Linear:
    """The fused `qkv` linear with the q and v deltas of `layer` added: `[B, N, C] -> [B, N, 3C]`."""
    base = layer.base_layer
    c = base.out_features // 3
    weight = base.weight.double().clone()
    weight[:c] += layer.scale * bottleneck_matrix(layer.lora_q)
    weight[2 * c:] += layer.scale * bottleneck_matrix(layer.lora_v)
    return linear_with(base, weight, base.bias)


def fold_lora(vit: nn.Module) -> list[str]:
    """Fold every `LoRAQKV` of a timm ViT into a plain `qkv` linear in place; returns the folded names."""
    folded = []
    for i, block in enumerate(vit.blocks):
        if isinstance(block.attn.qkv, LoRAQKV):
            block.attn.qkv = fold_lora_layer(block.attn.qkv)
            folded.append(f"blocks.{i}.attn.qkv")
    return folded


def inject_lora(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.attn.qkv` of a timm ViT in `LoRAQKV`; returns the wrapped module names."""
    return replace_modules(vit, "blocks.*.attn.qkv",
                           lambda qkv: LoRAQKV(qkv, dim=cfg.dim, scale=cfg.scale, dropout=cfg.dropout))


LORA = PETMethod("lora", "LoRA", inject_lora, fold=fold_lora)
