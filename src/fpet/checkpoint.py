"""Task checkpoints: only what a task trained (PET, head, merge parameters), as safetensors.

Layout of a task file:

- every trained parameter by its model name (`vit.blocks.0.attn.qkv.lora_q.down.weight`, `vit.head.weight`, ...),
  float32 as trained;
- every trained `BinaryLinear` weight (Bi-LoRA, Bi-AdaptFormer, FPET's key-refinement adapter, wherever it sits)
  as `<name>.bits` (the sign bits packed 8 per uint8, little-endian bit order) plus `<name>.mean` and
  `<name>.std` (0-d float32): 1/32 of the fp32 size;
- metadata (the safetensors header's string map): `format`, `format_version` and `fpet`, a JSON object naming the
  backbone, PET method, merge strategy and class count the file belongs to.

Loading is strict: the file must be a readable safetensors file (never a pickle), its metadata must match the
model's config, and its tensor names, shapes and dtypes must be exactly the ones the model trains.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import Tensor, nn

from fpet.backbone import CheckpointError
from fpet.pet.binary import BinaryLinear
from fpet.pet.inject import head_module

FORMAT = "fpet-task"
FORMAT_VERSION = "1"

CHECKED_FIELDS = {
    "backbone": "backbone", "embed_dim": "backbone", "depth": "backbone", "pet": "pet", "pet_dim": "pet.dim",
    "pet_scale": "pet.scale", "merge": "merge", "merge_layer": "merge.layer", "merge_r": "merge.r",
    "merge_split": "merge.split", "num_classes": "dataset.num_classes",
}
"""Metadata field -> the override that sets it; a file whose field differs from the model's config is refused."""


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


def task_metadata(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """What a task file belongs to: backbone, PET method, merge strategy, class count (plus the task's name)."""
    vit = getattr(model, "vit", model)
    return {
        "backbone": cfg.backbone.name, "arch": cfg.backbone.arch, "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks), "pet": cfg.pet.name, "pet_dim": cfg.pet.get("dim"),
        "pet_scale": cfg.pet.get("scale"), "merge": cfg.merge.name, "merge_layer": cfg.merge.get("layer"),
        "merge_r": cfg.merge.get("r"), "merge_split": cfg.merge.get("split"),
        "num_classes": int(cfg.dataset.num_classes), "task": cfg.dataset.name,
    }


def task_tensors(model: nn.Module, include_head: bool = True) -> dict[str, Tensor]:
    """Name -> CPU tensor of everything `model` trains (parameters that require grad), 1-bit weights packed."""
    binary = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, BinaryLinear)}
    head = {id(p) for p in head_module(model).parameters()}
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or (not include_head and id(param) in head):
            continue
        if name in binary:
            bits, mean, std = binary[name].quantize()
            out.update({f"{name}.bits": pack_bits(bits), f"{name}.mean": mean.float(), f"{name}.std": std.float()})
        else:
            out[name] = param.detach().cpu().contiguous()
    return out


def _file_metadata(info: Optional[dict[str, Any]]) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fpet": json.dumps(info or {})}


def save_task(model: nn.Module, path: str | Path, info: Optional[dict[str, Any]] = None) -> int:
    """Write the task file of `model` to `path` atomically; returns its size in bytes (`storage_bytes`).

    `info` is `task_metadata(cfg, model)`; loading checks it against the loading model's config.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(task_tensors(model), str(tmp), metadata=_file_metadata(info))
    os.replace(tmp, path)
    return path.stat().st_size


def task_storage_bytes(model: nn.Module, include_head: bool = True, info: Optional[dict[str, Any]] = None) -> int:
    """Size in bytes of the task file `save_task` would write (`include_head=False`: Table 2's convention)."""
    return len(save(task_tensors(model, include_head), metadata=_file_metadata(info)))


def read_task_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(info, tensors)` of a task file; clear errors for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint={str(path)!r} does not exist; pass checkpoint=PATH to the "
                              f"task.safetensors a training run wrote into its run directory")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read task checkpoint {path}: {type(err).__name__}: {err}. The file is "
                              f"truncated or corrupt, or not a safetensors file (task checkpoints are only read "
                              f"as safetensors, never unpickled).") from err
    if meta.get("format") != FORMAT or "fpet" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an fpet task checkpoint (metadata format="
                              f"{meta.get('format')!r}); a backbone weight file goes to backbone.checkpoint=PATH")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has task format version {meta.get('format_version')!r}; this code reads "
                              f"version {FORMAT_VERSION}")
    return json.loads(meta["fpet"]), tensors


def check_metadata(path: str | Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise if the file's backbone / method / merge / class count differ from the model's config."""
    bad = {k: (found.get(k), expected.get(k)) for k in CHECKED_FIELDS if found.get(k) != expected.get(k)}
    if bad:
        fixes = " ".join(sorted({f"{CHECKED_FIELDS[k]}={v[0]}" for k, v in bad.items()}))
        detail = ", ".join(f"{k}: file {v[0]!r} vs config {v[1]!r}" for k, v in bad.items())
        raise CheckpointError(f"{path} was trained for another model ({detail}). Evaluate it with the settings "
                              f"it was trained with, e.g. {fixes}")


def check_tensors(path: str | Path, found: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Raise unless the file holds exactly the expected names with the expected shapes and dtypes."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [f"{k}: file {found[k].dtype} {tuple(found[k].shape)} vs model {v.dtype} {tuple(v.shape)}"
             for k, v in expected.items() if k in found and (found[k].shape != v.shape or found[k].dtype != v.dtype)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not fit the model: {len(missing)} missing {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with another shape "
                              f"or dtype {wrong[:3]}. Was it written for another pet / merge / backbone?")


@torch.no_grad()
def load_task(model: nn.Module, path: str | Path, expected: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load a task file into `model` (built by `build_model` from the same config) strictly; returns its info.

    `expected` is `task_metadata(cfg, model)`; None skips the metadata check (tensor names are always checked).
    1-bit weights are unpacked into their `BinaryLinear` layers, which then use them as stored.
    """
    info, tensors = read_task_file(path)
    if expected is not None:
        check_metadata(path, info, expected)
    check_tensors(path, tensors, task_tensors(model))
    params = dict(model.named_parameters())
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, BinaryLinear) and f"{key}.bits" in tensors:
            bits = unpack_bits(tensors.pop(f"{key}.bits"), module.weight.shape)
            module.load_quantized(bits, tensors.pop(f"{key}.mean"), tensors.pop(f"{key}.std"))
    for name, tensor in tensors.items():
        params[name].copy_(tensor)
    return info
