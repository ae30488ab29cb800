"""The paper's baselines: full fine-tuning and linear probing add no PET layer; `pet.trainable` (all | head) in
their configs decides what trains."""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from fpet.pet.base import PETMethod, no_parameters


def inject_nothing(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """No PET layer."""
    return []


FULL = PETMethod("full", "Full fine-tuning", inject_nothing, trainable=no_parameters)
LINEAR = PETMethod("linear", "Linear probing", inject_nothing, trainable=no_parameters)
