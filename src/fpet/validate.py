"""Config validation up front: every problem of a composed config, before any data is read or model built.

Each message names the key, the bad value and what is accepted. The backbone's geometry (depth, patch grid, prefix
tokens) is read from the timm architecture built on the `meta` device (no memory, no weights), so the checks hold
for every backbone without restating timm's numbers in configs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fpet.data import DATASET_KINDS, PROTOCOLS, SPLIT_SIZES
from fpet.data.transforms import NORMALIZE_MODES
from fpet.data.vtab import check_task_files
from fpet.merge import MERGE_STRATEGIES, MergeConfigError, build_merges
from fpet.pet import PET_METHODS
from fpet.pet.inject import TRAINABLE_MODES


class ConfigError(ValueError):
    """One or more invalid config values; the message lists each with the accepted values."""


def meta_backbone(cfg: DictConfig) -> nn.Module:
    """`cfg.backbone`'s timm architecture built on the meta device: its geometry, no memory and no weights."""
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    with torch.device("meta"):
        return timm.create_model(cfg.arch, pretrained=False, num_classes=2, img_size=cfg.img_size, **kwargs)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_train(cfg: DictConfig) -> list[str]:
    """Recipe keys: epochs, batch sizes, evaluation period, learning rate, seed."""
    errors = []
    for key in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
        value = cfg.train.get(key)
        if not _positive_int(value):
            errors.append(f"train.{key}={value!r}: must be a positive integer")
    limit = cfg.train.get("limit_batches")
    if limit is not None and not _positive_int(limit):
        errors.append(f"train.limit_batches={limit!r}: must be a positive integer or null")
    lr = cfg.optim.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        errors.append(f"optim.optimizer.lr={lr!r}: must be a positive number")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        errors.append(f"seed={cfg.seed!r}: must be a non-negative integer")
    return errors


def check_dataset(cfg: DictConfig) -> list[str]:
    """Kind, protocol, normalisation, class count, and a batch size the training split can fill."""
    ds, errors = cfg.dataset, []
    if ds.get("kind") not in DATASET_KINDS:
        errors.append(f"dataset.kind={ds.get('kind')!r}: accepted {sorted(DATASET_KINDS)}")
    if ds.get("protocol") not in PROTOCOLS:
        errors.append(f"dataset.protocol={ds.get('protocol')!r}: accepted {sorted(PROTOCOLS)} "
                      f"(test: train800val200 -> test, val: train800 -> val200)")
    elif _positive_int(cfg.train.batch_size):
        train_split = PROTOCOLS[ds.protocol][0]
        if cfg.train.batch_size > SPLIT_SIZES[train_split]:
            errors.append(f"train.batch_size={cfg.train.batch_size}: larger than the {train_split} split "
                          f"({SPLIT_SIZES[train_split]} images); with drop_last no batch would train")
    if ds.get("normalize", "none") not in NORMALIZE_MODES:
        errors.append(f"dataset.normalize={ds.get('normalize')!r}: accepted {list(NORMALIZE_MODES)}")
    if not _positive_int(ds.get("num_classes")) or ds.num_classes < 2:
        errors.append(f"dataset.num_classes={ds.get('num_classes')!r}: must be an integer >= 2")
    return errors


def check_pet(cfg: DictConfig) -> list[str]:
    """Method name, adapter width, trainable mode."""
    pet, errors = cfg.pet, []
    if pet.get("name") not in PET_METHODS:
        errors.append(f"pet={pet.get('name')!r}: accepted {sorted(PET_METHODS)}")
    if "dim" in pet and pet.dim is not None and not _positive_int(pet.dim):
        errors.append(f"pet.dim={pet.dim!r}: the adapter hidden dim must be a positive integer")
    if pet.get("trainable", "pet") not in TRAINABLE_MODES:
        errors.append(f"pet.trainable={pet.get('trainable')!r}: accepted {list(TRAINABLE_MODES)}")
    return errors


def check_merge(cfg: DictConfig, vit: Optional[nn.Module]) -> list[str]:
    """Strategy name, and on the meta backbone every rule the merge schedule enforces (`merge_problems`: layer
    within the depth, r at most half the patches, split kind) plus the strategy's own grid checks."""
    name = cfg.merge.get("name")
    if name not in MERGE_STRATEGIES:
        return [f"merge={name!r}: accepted {sorted(MERGE_STRATEGIES)}"]
    if vit is None:
        return []
    try:
        with torch.device("meta"):
            build_merges(cfg.merge, vit)
    except MergeConfigError as err:
        return err.problems
    except ValueError as err:  # e.g. a patch grid too small for the split
        return [f"merge={name}: {err}"]
    return []


def check_paths(cfg: DictConfig) -> list[str]:
    """Weight file and data folders that the run will need."""
    errors = []
    ckpt = cfg.backbone.get("checkpoint")
    if ckpt and not Path(ckpt).is_file():
        url = cfg.backbone.get("download_url")
        errors.append(f"backbone.checkpoint={ckpt!r}: no such file" + (f" (download: {url})" if url else "") +
                      "; or backbone.checkpoint=null for random init")
    check = DATASET_CHECKS.get(cfg.dataset.get("kind"))
    if check is not None:
        errors += check(cfg.dataset, Path(cfg.paths.data_dir))
    if cfg.get("eval_only") and not cfg.get("checkpoint"):
        errors.append("checkpoint=None: eval_only=true needs checkpoint=PATH (the task.safetensors a training run "
                      "wrote)")
    elif cfg.get("eval_only") and not Path(cfg.checkpoint).is_file():
        errors.append(f"checkpoint={cfg.checkpoint!r}: no such task checkpoint")
    return errors


DATASET_CHECKS: dict[str, Callable[[DictConfig, Path], list[str]]] = {"vtab": check_task_files}
"""dataset.kind -> up-front check of its files (returns messages); registered by the data readers."""


def validate_config(cfg: DictConfig, check_files: bool = True) -> None:
    """Raise `ConfigError` listing every invalid value of `cfg` (nothing has been read or built yet)."""
    errors = check_train(cfg) + check_dataset(cfg) + check_pet(cfg)
    vit = None
    try:
        vit = meta_backbone(cfg.backbone)
    except Exception as err:  # unknown timm arch or bad kwargs
        errors.append(f"backbone.arch={cfg.backbone.get('arch')!r} with kwargs "
                      f"{dict(cfg.backbone.get('kwargs') or {})}: timm cannot build it ({type(err).__name__}: {err})")
    errors += check_merge(cfg, vit)
    if check_files:
        errors += check_paths(cfg)
    if errors:
        raise ConfigError("invalid config (nothing was run):\n  - " + "\n  - ".join(errors))
