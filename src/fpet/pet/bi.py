"""Bi-LoRA and Bi-AdaptFormer (Jie et al. 2023, as used by FPET): LoRA / AdaptFormer with 1-bit weights.

The same layers as `LoRAQKV` and `AdaptFormerMLP`, with `BinaryLinear` projections (no biases), hidden dim 32 and
the up-projection drawn from `trunc_normal(std=up_std, a=-2 up_std, b=2 up_std)` (official: std 0.001), because a
1-bit matrix cannot start at zero. Per-task scales differ from the fp32 methods (configs/pet/bi_*.yaml).
"""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from fpet.pet.adaptformer import AdaptFormerMLP
from fpet.pet.binary import BinaryLinear
from fpet.pet.inject import replace_modules
from fpet.pet.lora import LoRAQKV


def inject_bi_lora(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.attn.qkv` in a 1-bit `LoRAQKV`; returns the wrapped module names."""
    return replace_modules(
        vit, "blocks.*.attn.qkv",
        lambda qkv: LoRAQKV(qkv, dim=cfg.dim, scale=cfg.scale, dropout=cfg.dropout, linear=BinaryLinear,
                            up_std=cfg.up_std),
    )


def inject_bi_adaptformer(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.mlp` in a 1-bit `AdaptFormerMLP`; returns the wrapped module names."""
    return replace_modules(
        vit, "blocks.*.mlp",
        lambda mlp: AdaptFormerMLP(mlp, dim=cfg.dim, scale=cfg.scale, dropout=cfg.dropout, linear=BinaryLinear,
                                   up_std=cfg.up_std),
    )
