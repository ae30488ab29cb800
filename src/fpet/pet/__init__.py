"""PET methods: each wraps the module it adapts (`base_layer`) or attaches a block hook, and has one registry
record (`PETMethod`: inject, train rule, fold, pack, check) in its own file. Adding a method: its file, its config
(configs/pet/<name>.yaml), one line in `PET_METHODS`, its tests (docs/architecture.md)."""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from fpet.errors import UserError
from fpet.pet.adapter_plus import ADAPTER_PLUS
from fpet.pet.adaptformer import ADAPTFORMER, AdaptFormerMLP
from fpet.pet.base import BlockHook, Bottleneck, PETLayer, PETMethod
from fpet.pet.baselines import FULL, LINEAR
from fpet.pet.bi import BI_ADAPTFORMER, BI_LORA
from fpet.pet.bitfit import BITFIT, LN_TUNE
from fpet.pet.dora import DORA
from fpet.pet.fact import FACT_TK, FACT_TT
from fpet.pet.binary import BinaryLinear, binarize
from fpet.pet.convpass import CONVPASS
from fpet.pet.inject import attach_to_blocks, head_module, replace_modules, set_trainable
from fpet.pet.lora import LORA, LoRAQKV
from fpet.pet.reparam import ReparamReport, inference_model, reparameterize
from fpet.pet.repadapter import REPADAPTER, RepAdapterNorm
from fpet.pet.sparse import GPS, TRPTS, SparseTuned
from fpet.pet.ssf import SSF
from fpet.pet.vpt import VPT_DEEP, VPT_SHALLOW

PET_METHODS: dict[str, PETMethod] = {m.name: m for m in (
    LORA,
    ADAPTFORMER,
    REPADAPTER,
    BI_LORA,
    BI_ADAPTFORMER,
    FULL,
    LINEAR,
    BITFIT,
    LN_TUNE,
    VPT_SHALLOW,
    VPT_DEEP,
    SSF,
    FACT_TT,
    FACT_TK,
    DORA,
    ADAPTER_PLUS,
    CONVPASS,
    TRPTS,
    GPS,
)}
"""`pet=<name>` -> the method's record; one line per method."""


class PETConfigError(UserError, ValueError):
    """`cfg.pet` names no registered method."""


def pet_method(name: str) -> PETMethod:
    """The record of `pet=<name>`; a clear error naming the registered methods otherwise."""
    if name not in PET_METHODS:
        raise PETConfigError(f"pet={name!r}: accepted {sorted(PET_METHODS)}")
    return PET_METHODS[name]


def inject_pet(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Inject the PET method `cfg.name` into a timm ViT in place; returns the wrapped / attached module names."""
    return pet_method(cfg.name).inject(vit, cfg)


__all__ = [
    "AdaptFormerMLP", "BinaryLinear", "BlockHook", "Bottleneck", "LoRAQKV", "PETLayer", "PETMethod", "PET_METHODS",
    "RepAdapterNorm", "ReparamReport", "SparseTuned", "attach_to_blocks", "binarize", "head_module", "inference_model", "inject_pet",
    "pet_method", "replace_modules", "reparameterize", "set_trainable",
]
