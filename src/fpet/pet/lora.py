"""LoRA on the query and value parts of timm's fused `qkv` projection (DESIGN section 6)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import Bottleneck, PETLayer
from fpet.pet.inject import replace_modules


class LoRAQKV(PETLayer):
    """`qkv(x) + s * [down_q/up_q(x), 0, down_v/up_v(x)]`: `[B, N, C] -> [B, N, 3 * C]`; k is untouched.

    No nonlinearity, no biases, dropout on the hidden (official code), up-projections zero-initialised, so a fresh
    layer computes exactly `qkv(x)`.
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


def inject_lora(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.attn.qkv` of a timm ViT in `LoRAQKV`; returns the wrapped module names."""
    return replace_modules(
        vit, "blocks.*.attn.qkv",
        lambda qkv: LoRAQKV(qkv, dim=cfg.dim, scale=cfg.scale, dropout=cfg.dropout),
    )
