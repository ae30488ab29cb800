"""Structural re-parameterisation for inference: the PET method's record folds what is linear.

`inference_model(model)` returns a folded deep copy (LoRA / Bi-LoRA into `qkv`, RepAdapter into `qkv` / `fc1`: a
plain timm ViT plus its merge strategies, with the same FLOPs and latency) and leaves the trained model as it is.
Methods without a `fold` (AdaptFormer's ReLU branch) are evaluated as trained.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from torch import nn

from fpet.pet.base import BlockHook, PETLayer

log = logging.getLogger(__name__)


@dataclass
class ReparamReport:
    """What `reparameterize` folded (module names, now plain layers) and which PET parts it left."""

    folded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def reparameterized(self) -> bool:
        return bool(self.folded)


def pet_parts(model: nn.Module) -> list[str]:
    """Names of the PET layers and block hooks of `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, (PETLayer, BlockHook))]


def reparameterize(model: nn.Module) -> ReparamReport:
    """Fold the PET method of `model` (a `TokenViT`) in place by its record's `fold`; returns what was folded and
    which PET parts remain."""
    method = getattr(model, "pet_method", None)
    fold = getattr(method, "fold", None)
    vit = getattr(model, "vit", model)
    report = ReparamReport(folded=fold(vit) if fold is not None else [])
    report.kept = pet_parts(vit)
    if report.folded:
        log.info("re-parameterised %d PET layers into the backbone's linear layers", len(report.folded))
    if report.kept:
        log.info("%d PET parts do not fold and stay (e.g. %s)", len(report.kept), report.kept[0])
    return report


def inference_model(model: nn.Module, enabled: bool = True) -> tuple[nn.Module, ReparamReport]:
    """The model to evaluate and time: a folded deep copy when `enabled` and the method folds, else `model`.

    The trained `model` is never changed (it keeps its PET layers for saving and further training).
    """
    method = getattr(model, "pet_method", None)
    if not enabled or getattr(method, "fold", None) is None or not pet_parts(model):
        return model, ReparamReport(kept=pet_parts(getattr(model, "vit", model)))
    folded = copy.deepcopy(model)
    return folded, reparameterize(folded)
