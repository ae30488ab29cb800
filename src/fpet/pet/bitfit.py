"""BitFit (Zaken et al. 2022) and LayerNorm tuning: train a subset of the frozen ViT's own parameters.

Nothing is added to the model, so nothing folds and inference is the plain ViT. The train rule picks, in
`model.vit` (the head trains anyway; a frozen `pre_logits` layer outside `vit` stays frozen):

- `bitfit`: every bias: patch embedding, `qkv`, `proj`, `fc1`, `fc2`, `norm1`, `norm2` and the final norm
  (ViT-B/16: 12 x 8,448 + 768 + 768 = 102,912);
- `ln_tune`: weight and bias of every LayerNorm: `norm1`, `norm2`, the final norm (ViT-B/16: 38,400).

The task file holds the trained values under the backbone's own names (`vit.blocks.0.attn.qkv.bias`, ...).
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from fpet.pet.base import PETMethod
from fpet.pet.baselines import inject_nothing
from fpet.pet.inject import head_module


def _backbone_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """(name, owning module, parameter) of every parameter of `model.vit` outside the head."""
    vit = getattr(model, "vit", model)
    head = {id(p) for p in head_module(model).parameters()}
    for module_name, module in vit.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in head:
                yield f"{module_name}.{name}", module, param


def bias_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """BitFit's train rule: every bias of the backbone (head excluded: it trains anyway)."""
    return (p for name, _, p in _backbone_params(model) if name.rsplit(".", 1)[-1] == "bias")


def layernorm_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """LayerNorm tuning's train rule: weight and bias of every `nn.LayerNorm` of the backbone."""
    return (p for _, module, p in _backbone_params(model) if isinstance(module, nn.LayerNorm))


BITFIT = PETMethod("bitfit", "BitFit", inject_nothing, trainable=bias_parameters)
LN_TUNE = PETMethod("ln_tune", "LN-Tune", inject_nothing, trainable=layernorm_parameters)
