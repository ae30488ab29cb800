"""Helpers of structural re-parameterisation: the matrices of linear branches and plain layers holding them.

Folding is exact in eval mode (dropout off); it is done in float64 and cast back. Each method's own fold function
(its record's `fold`) uses these; `fpet.pet.reparam.inference_model` runs the record's function on a copy.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fpet.pet.base import Bottleneck


def effective_weight(linear: nn.Linear) -> Tensor:
    """The weight a linear layer's forward pass uses (the two-valued matrix of a 1-bit layer), `[out, in]`."""
    quantized = getattr(linear, "quantized_weight", None)
    return quantized() if quantized is not None else linear.weight


def bottleneck_matrix(branch: Bottleneck) -> Tensor:
    """`up @ down` in float64, `[out, in]`, of a linear bias-free bottleneck (LoRA's)."""
    if not isinstance(branch.act, nn.Identity) or branch.down.bias is not None or branch.up.bias is not None:
        raise ValueError("only a bottleneck without activation and biases folds into one matrix")
    return effective_weight(branch.up).double() @ effective_weight(branch.down).double()


def linear_with(base: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain `nn.Linear` like `base` (device, dtype, frozen or not) holding `weight` and `bias`."""
    w = base.weight
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(w.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(w.requires_grad if base.bias is None else base.bias.requires_grad)
    return out


def fold_layers(root: nn.Module, layer_type: type[nn.Module], fold: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule of `root` of type `layer_type` by `fold(module)` (a plain layer computing the same
    function), in place; returns the replaced names. Shared by the folds that rewrite one wrapped layer at a time."""
    names = [name for name, m in root.named_modules() if isinstance(m, layer_type)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, fold(getattr(parent, attr)))
    return names
