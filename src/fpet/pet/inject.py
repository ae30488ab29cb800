"""Injection by module replacement or attachment, and the one freezing function."""
from __future__ import annotations

import fnmatch
from typing import Callable, Optional

from torch import nn

TRAINABLE_MODES = ("pet", "all", "head")


def replace_modules(root: nn.Module, pattern: str, wrap: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule whose dotted name matches `pattern` (fnmatch, e.g. `blocks.*.attn.qkv`) by
    `wrap(module)`. Returns the replaced names; raises if nothing matches (a wrong pattern must not pass silently).
    """
    names = [name for name, _ in root.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
    if not names:
        raise ValueError(f"no module of {type(root).__name__} matches {pattern!r}")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, wrap(getattr(parent, attr)))
    return names


def attach_to_blocks(vit: nn.Module, name: str, make: Callable[[int, nn.Module], Optional[nn.Module]]) -> list[str]:
    """Add `make(i, block)` as child `name` of every block `i` of a timm ViT (skipped where it returns None);
    returns the new modules' names (`blocks.3.prompt`). For `BlockHook`s, which the forward finds as children."""
    names = []
    for i, block in enumerate(vit.blocks):
        if hasattr(block, name):
            raise ValueError(f"blocks.{i} already has a child {name!r}; choose another name for the hook")
        module = make(i, block)
        if module is not None:
            block.add_module(name, module)
            names.append(f"blocks.{i}.{name}")
    return names


def set_trainable(model: nn.Module, mode: str = "pet") -> None:
    """Freeze everything, then unfreeze by `mode` (`pet.trainable`).

    - `pet`:  the parameters the model's PET method trains (its record's `trainable` rule), the classification
      head and the merge strategies' parameters;
    - `all`:  every parameter (full fine-tuning);
    - `head`: the head (linear probing), plus merge parameters if a learnable merge is used.
    """
    from fpet.pet.base import pet_parameters

    if mode not in TRAINABLE_MODES:
        raise ValueError(f"pet.trainable={mode!r} is not one of {TRAINABLE_MODES}")
    for param in model.parameters():
        param.requires_grad_(mode == "all")
    if mode == "all":
        return
    if mode == "pet":
        method = getattr(model, "pet_method", None)
        for param in (method.trainable if method is not None else pet_parameters)(model):
            param.requires_grad_(True)
    for param in head_module(model).parameters():
        param.requires_grad_(True)
    for param in getattr(model, "merges", nn.ModuleDict()).parameters():
        param.requires_grad_(True)


def head_module(model: nn.Module) -> nn.Module:
    """The classification head(s) of a `TokenViT` (or of a bare timm ViT)."""
    vit = getattr(model, "vit", model)
    head = vit.get_classifier()
    return nn.ModuleList(head) if isinstance(head, tuple) else head  # distilled DeiT: (head, head_dist)
