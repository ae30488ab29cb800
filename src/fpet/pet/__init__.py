"""PET methods: each wraps the module it adapts (`base_layer`) and is injected by name."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig
from torch import nn

from fpet.pet.adaptformer import AdaptFormerMLP, inject_adaptformer
from fpet.pet.base import Bottleneck, PETLayer
from fpet.pet.bi import inject_bi_adaptformer, inject_bi_lora
from fpet.pet.binary import BinaryLinear, binarize
from fpet.pet.inject import head_module, replace_modules, set_trainable
from fpet.pet.lora import LoRAQKV, inject_lora
from fpet.pet.reparam import ReparamReport, inference_model, reparameterize
from fpet.pet.repadapter import RepAdapterNorm, inject_repadapter

PETInjector = Callable[[nn.Module, DictConfig], list[str]]
"""`injector(vit, cfg.pet) -> names of the wrapped modules`."""


def inject_nothing(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """The baselines `full` and `linear` add no PET layer; `pet.trainable` (all | head) decides what trains."""
    return []


PET_METHODS: dict[str, PETInjector] = {
    "lora": inject_lora,
    "adaptformer": inject_adaptformer,
    "repadapter": inject_repadapter,
    "bi_lora": inject_bi_lora,
    "bi_adaptformer": inject_bi_adaptformer,
    "full": inject_nothing,
    "linear": inject_nothing,
}


def inject_pet(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Inject the PET method `cfg.name` into a timm ViT in place; returns the wrapped module names."""
    if cfg.name not in PET_METHODS:
        raise ValueError(f"pet={cfg.name!r} is not known; choose one of {sorted(PET_METHODS)}")
    return PET_METHODS[cfg.name](vit, cfg)


__all__ = [
    "AdaptFormerMLP", "BinaryLinear", "Bottleneck", "LoRAQKV", "PETLayer", "PET_METHODS", "RepAdapterNorm",
    "ReparamReport", "binarize", "head_module", "inference_model", "inject_pet", "replace_modules",
    "reparameterize", "set_trainable",
]
