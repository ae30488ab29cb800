"""`build_model(cfg)`: backbone -> PET injection -> merge schedule -> freezing; and `model_problems(cfg)`, the
same steps on the meta device (no memory, no weights), so every rule the builders enforce is checked before any
work by the code that enforces it."""
from __future__ import annotations

from typing import Optional

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fpet.backbone import create_backbone
from fpet.merge import build_merges, geometry, merge_problems, strategy_class
from fpet.pet import pet_method, set_trainable
from fpet.pet.inject import TRAINABLE_MODES
from fpet.select import ScoringInput
from fpet.vit import TokenViT


def build_model(cfg: DictConfig, scoring: Optional[ScoringInput] = None) -> TokenViT:
    """The complete model for a composed train config; `cfg.dataset.num_classes` sizes the head.

    The timm `VisionTransformer` is `model.vit`; the PET method (its record: `model.pet_method`) is injected into it;
    a method that selects weights from data (its record's `select`: TR-PTS, GPS) scores them on the training split
    next, on `scoring.device` (default: CPU, no cache), and the model stays on that device; then the merge
    strategies are placed in `model.merges` keyed by block index (TR-PTS's sparse insertion reads the selection) and
    the strategy's `prepare` runs (DiffRate's rate search, cached next to the score cache);
    only what the method trains, the head and the merge parameters require grad (`pet.trainable` = all | head
    changes that for full fine-tuning and linear probing).
    """
    method = pet_method(cfg.pet.name)
    vit, pre_logits = create_backbone(cfg.backbone, num_classes=cfg.dataset.num_classes)
    method.inject(vit, cfg.pet)
    model = TokenViT(vit, pre_logits=pre_logits, pet_method=method)
    if method.select is not None:
        method.select(model, cfg, scoring if scoring is not None else ScoringInput())
    model.place_merges(build_merges(cfg.merge, vit))
    strategy_class(cfg.merge.name).prepare(model, cfg, scoring if scoring is not None else ScoringInput())
    set_trainable(model, cfg.pet.get("trainable", "pet"))
    return model


def meta_backbone(cfg: DictConfig) -> nn.Module:
    """`cfg.backbone`'s timm architecture built on the meta device: its geometry, no memory and no weights."""
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    with torch.device("meta"):
        return timm.create_model(cfg.arch, pretrained=False, num_classes=2, img_size=cfg.img_size, **kwargs)


def model_problems(cfg: DictConfig) -> list[str]:
    """Every problem of the backbone, PET and merge config: the builders run on the meta device."""
    try:
        vit = meta_backbone(cfg.backbone)
    except Exception as err:  # unknown timm arch or bad kwargs
        return [f"backbone.arch={cfg.backbone.get('arch')!r} with kwargs {dict(cfg.backbone.get('kwargs') or {})}: "
                f"timm cannot build it ({type(err).__name__}: {err})"]
    problems = pet_problems(cfg.pet, vit)  # injects the method into `vit`: the merge rules see it
    geo = geometry(vit)
    problems += merge_problems(cfg.merge, geo)
    if not problems:
        try:
            with torch.device("meta"):
                build_merges(cfg.merge, geo)
        except ValueError as err:
            problems.append(f"merge={cfg.merge.name}: {err}")
    return problems


def pet_problems(cfg: DictConfig, vit: nn.Module) -> list[str]:
    """The PET method's problems: a known name, its record's `check`, its `inject` run on the meta backbone."""
    try:
        method = pet_method(cfg.get("name"))
    except ValueError as err:
        return [str(err)]
    problems = list(method.check(cfg))
    if cfg.get("trainable", "pet") not in TRAINABLE_MODES:
        problems.append(f"pet.trainable={cfg.get('trainable')!r}: accepted {list(TRAINABLE_MODES)}")
    if not problems:
        try:
            with torch.device("meta"):
                method.inject(vit, cfg)
        except (ValueError, TypeError) as err:
            problems.append(f"pet={cfg.name}: {err}")
    return problems
