"""Task checkpoints: only what a task trained (PET, head, merge parameters), as safetensors.

Layout of a task file (format version 2):

- the tensors of the model's PET method record (`pack`; default `fpet.pet.pack`): every trained parameter by its
  model name, float32 as trained, and packed layers in their own form (a 1-bit `BinaryLinear` weight as
  `<name>.weight.bits` + `.weight.mean` + `.weight.std`, 1/32 of the fp32 size);
- metadata (the safetensors header's string map): `format`, `format_version`, `one_bit_level` (the 1-bit level the
  packed weights are to be read with) and `fpet`, a JSON object naming the backbone, the PET and merge configs and
  the class count the file belongs to.

Loading is strict: the file must be a readable safetensors file (never a pickle), its metadata must match the
model's config, and its tensor names, shapes and dtypes must be exactly the ones the model trains. Version-1 files
(before the 1-bit level was corrected to the official 0.6745) load only when they hold no 1-bit weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from fpet.backbone import CheckpointError
from fpet.fileio import atomic_open
from fpet.pet.binary import ONE_BIT_LEVEL
from fpet.pet.pack import load_tensors, task_tensors

FORMAT = "fpet-task"
FORMAT_VERSION = "2"
FREE_KEYS = {"pet": ("scales", "dropout"), "merge": ("tag",)}
"""Config keys of a task file's groups that may differ when it is loaded (training-only or naming)."""
V1_FIELDS = {"pet": "pet", "pet_dim": "pet.dim", "pet_scale": "pet.scale", "merge": "merge",
             "merge_layer": "merge.layer", "merge_r": "merge.r", "merge_split": "merge.split"}
"""Version-1 metadata field -> the config key it recorded."""


def _group(cfg: DictConfig, group: str) -> dict[str, Any]:
    values = OmegaConf.to_container(cfg[group], resolve=True)
    return {k: v for k, v in values.items() if k not in FREE_KEYS.get(group, ())}


def task_metadata(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """What a task file belongs to: backbone, the PET and merge configs, class count (plus the task's name and the
    epochs it trained, which an eval_only run records)."""
    vit = getattr(model, "vit", model)
    return {"backbone": cfg.backbone.name, "arch": cfg.backbone.arch, "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks), "img_size": int(cfg.backbone.img_size), "pet": _group(cfg, "pet"),
            "merge": _group(cfg, "merge"), "num_classes": int(cfg.dataset.num_classes), "task": cfg.dataset.name,
            "epochs": int(cfg.train.epochs)}


def _file_metadata(info: Optional[dict[str, Any]]) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "one_bit_level": repr(ONE_BIT_LEVEL),
            "fpet": json.dumps(info or {})}


def save_task(model: nn.Module, path: str | Path, info: Optional[dict[str, Any]] = None) -> int:
    """Write the task file of `model` to `path` atomically; returns its size in bytes (`storage_bytes`).

    `info` is `task_metadata(cfg, model)`; loading checks it against the loading model's config.
    """
    data = save(task_tensors(model), metadata=_file_metadata(info))
    with atomic_open(path, "wb") as f:
        f.write(data)
    return len(data)


def task_storage_bytes(model: nn.Module, include_head: bool = True, info: Optional[dict[str, Any]] = None) -> int:
    """Size in bytes of the task file `save_task` would write (`include_head=False`: Table 2's convention)."""
    return len(save(task_tensors(model, include_head), metadata=_file_metadata(info)))


def read_task_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(info, tensors)` of a task file; clear errors for a missing, truncated, foreign or outdated file."""
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
    version = meta.get("format_version")
    if version == "1" and any(key.endswith(".bits") for key in tensors):
        raise CheckpointError(
            f"{path} is a version-1 task file with 1-bit weights, written with the 1-bit level 0.7979 (sqrt(2/pi)); "
            f"this code uses the official level {ONE_BIT_LEVEL:.4f}, so those weights would not give the model "
            f"that was trained. Train the task again to get a version-{FORMAT_VERSION} file.")
    if version not in ("1", FORMAT_VERSION):
        raise CheckpointError(f"{path} has task format version {version!r}; this code reads version "
                              f"{FORMAT_VERSION} (and version 1 without 1-bit weights)")
    info = json.loads(meta["fpet"])
    return (_from_v1(info) if version == "1" else info), tensors


def _from_v1(info: dict[str, Any]) -> dict[str, Any]:
    """Version-1 metadata (flat fields) as the parts of the version-2 layout it has."""
    out = {k: info.get(k) for k in ("backbone", "arch", "embed_dim", "depth", "num_classes", "task")}
    out["pet"] = {"name": info.get("pet"), "dim": info.get("pet_dim"), "scale": info.get("pet_scale")}
    out["merge"] = {"name": info.get("merge"), "layer": info.get("merge_layer"), "r": info.get("merge_r"),
                    "split": info.get("merge_split")}
    out["version"] = 1
    return out


def metadata_differences(found: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`override -> (file value, config value)` for every identity field that differs (only the keys the file
    records are compared, so a key added by a newer version does not refuse older files)."""
    diff: dict[str, tuple[Any, Any]] = {}
    overrides = {"backbone": "backbone", "embed_dim": "backbone.kwargs.embed_dim", "depth": "backbone.kwargs.depth",
                 "img_size": "backbone.img_size", "num_classes": "dataset.num_classes"}
    for key, override in overrides.items():
        if key in ("embed_dim", "depth") and "backbone" in diff:
            continue  # another backbone: its width and depth differ too
        if key in found and found.get(key) != expected.get(key):
            diff[override] = (found.get(key), expected.get(key))
    for group in ("pet", "merge"):
        ours, theirs = found.get(group) or {}, expected.get(group) or {}
        for key, value in ours.items():
            if key in FREE_KEYS.get(group, ()) or key not in theirs:
                continue
            if value != theirs[key]:
                diff[group if key == "name" else f"{group}.{key}"] = (value, theirs[key])
    return diff


def check_metadata(path: str | Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise if the file's backbone / PET / merge config / class count differ from the model's config."""
    bad = metadata_differences(found, expected)
    if bad:
        fixes = " ".join(f"{k}={override_value(v[0])}" for k, v in bad.items())
        detail = ", ".join(f"{k}: file {v[0]!r} vs config {v[1]!r}" for k, v in bad.items())
        raise CheckpointError(f"{path} was trained for another model ({detail}). Evaluate it with the settings "
                              f"it was trained with, e.g. {fixes}")


def override_value(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def task_overrides(info: dict[str, Any], groups: tuple[str, ...] = ("backbone", "dataset", "pet", "merge")
                   ) -> list[str]:
    """Overrides (as on train.py's command line) that compose the config a task file's metadata `info` records:
    `backbone=<name>`, `dataset=<task>`, and `pet=<name>` / `merge=<name>` with every recorded key of theirs."""
    out = []
    if "backbone" in groups and info.get("backbone"):
        out.append(f"backbone={info['backbone']}")
        if info.get("img_size"):
            out.append(f"backbone.img_size={info['img_size']}")
    if "dataset" in groups and info.get("task"):
        out.append(f"dataset={info['task']}")
    for group in ("pet", "merge"):
        if group in groups and info.get(group):
            values = dict(info[group])
            out += [f"{group}={values.pop('name', 'none')}",
                    *(f"{group}.{key}={override_value(value)}" for key, value in values.items())]
    return out


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
    Packed layers (1-bit weights) get their stored form and use it as is.
    """
    info, tensors = read_task_file(path)
    if expected is not None:
        check_metadata(path, info, expected)
    check_tensors(path, tensors, task_tensors(model))
    load_tensors(model, tensors)
    return info
