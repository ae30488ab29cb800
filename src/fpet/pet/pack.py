"""The tensors of a task file: what a model trained, with packed layers stored in their own form.

The default of every `PETMethod` (its `pack` / `load` may replace it): each trained parameter by its model name
(`vit.blocks.0.attn.qkv.lora_q.down.weight`, `vit.head.weight`, ...), float32 as trained, except the parameters of a
*packed layer*: a module with a `PACKED` tuple of parameter names and the two methods `packed_tensors() ->
{suffix: tensor}` and `load_packed({suffix: tensor})` stores those parameters as `<module name>.<suffix>` instead
(a `BinaryLinear` weight: `<name>.weight.bits`, `.weight.mean`, `.weight.std`, 1/32 of the fp32 size). The layer
type decides the packing, so a 1-bit layer packs the same wherever it sits (PET branch or merge strategy).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fpet.pet.inject import head_module


def pack_bits(bits: Tensor) -> Tensor:
    """Bool tensor (any shape) -> uint8 `[ceil(n / 8)]`, 8 bits per byte, bit i of a byte = element 8k + i."""
    flat = bits.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return (flat.view(-1, 8).int() * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """uint8 `[ceil(n / 8)]` -> bool tensor of `shape` (inverse of `pack_bits`)."""
    n = math.prod(shape)
    shifts = torch.arange(8, dtype=torch.int32)
    bits = (packed.int().unsqueeze(1) >> shifts) & 1
    return bits.flatten()[:n].bool().view(shape)


def packed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every packed layer (a module with `PACKED`, `packed_tensors` and `load_packed`)."""
    return {name: m for name, m in model.named_modules() if getattr(m, "PACKED", None) and hasattr(m, "load_packed")}


def _packed_params(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Full name of each packed parameter -> (its layer's name, the layer)."""
    return {f"{name}.{p}".lstrip("."): (name, m) for name, m in packed_layers(model).items() for p in m.PACKED}


def pack_task_tensors(model: nn.Module, include_head: bool = True) -> dict[str, Tensor]:
    """Name -> CPU tensor of everything `model` trains (parameters that require grad), packed layers packed."""
    packed = _packed_params(model)
    head = {id(p) for p in head_module(model).parameters()}
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or (not include_head and id(param) in head):
            continue
        if name in packed:
            layer_name, layer = packed[name]
            if layer_name not in done:
                done.add(layer_name)
                prefix = f"{layer_name}." if layer_name else ""
                out.update({prefix + k: v for k, v in layer.packed_tensors().items()})
        else:
            out[name] = param.detach().cpu().contiguous()
    return out


@torch.no_grad()
def load_task_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Inverse of `pack_task_tensors`: packed layers get their tensors, every other one is copied by name.

    The caller has checked the names, shapes and dtypes against `pack_task_tensors(model)`.
    """
    tensors = dict(tensors)
    for name, layer in packed_layers(model).items():
        prefix = f"{name}." if name else ""
        mine = {key[len(prefix):]: tensors.pop(key) for key in list(tensors)
                if any(key.startswith(f"{prefix}{p}.") for p in layer.PACKED)}
        if mine:
            layer.load_packed(mine)
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        params[name].copy_(tensor)


def task_tensors(model: nn.Module, include_head: bool = True) -> dict[str, Tensor]:
    """The task-file tensors of a model by its PET method's record (`pack`), else the default packing."""
    pack = getattr(getattr(model, "pet_method", None), "pack", None) or pack_task_tensors
    return pack(model, include_head)


def load_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load task-file tensors by the PET method's record (`load`), else the default."""
    load = getattr(getattr(model, "pet_method", None), "load", None) or load_task_tensors
    load(model, tensors)
