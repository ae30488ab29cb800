"""Task checkpoints: only what a task trained (PET, head, merge parameters), as safetensors."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every parameter that requires grad (contiguous CPU copies)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_task(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> int:
    """Write the trainable parameters to `path` atomically; returns the file size in bytes (`storage_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(trainable_state_dict(model), str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path.stat().st_size
