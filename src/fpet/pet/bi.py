"""Bi-LoRA and Bi-AdaptFormer (Jie et al. 2023, as used by FPET): LoRA / AdaptFormer with 1-bit weights.

The same layers as `LoRAQKV` and `AdaptFormerMLP`, with `BinaryLinear` projections (no biases), hidden dim 32 and
the up-projection drawn from `trunc_normal(std=up_std, a=-2 up_std, b=2 up_std)` (official: std 0.001), because a
1-bit matrix cannot start at zero. Per-task scales differ from the fp32 methods (configs/pet/bi_*.yaml). Bi-LoRA
folds like LoRA (with the two-valued matrices); task files store the 1-bit weights packed.
"""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from fpet.pet.adaptformer import AdaptFormerMLP
from fpet.pet.base import PETMethod
from fpet.pet.binary import BinaryLinear
from fpet.pet.inject import replace_modules
from fpet.pet.lora import LoRAQKV, fold_lora


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


BI_LORA = PETMethod("bi_lora", "Bi-LoRA", inject_bi_lora, fold=fold_lora)
BI_ADAPTFORMER = PETMethod("bi_adaptformer", "Bi-AdaptFormer", inject_bi_adaptformer)
