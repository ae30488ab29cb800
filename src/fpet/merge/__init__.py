"""Token-merge strategies behind one signature; `build_merges` turns `cfg.merge` into a layer schedule."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig
from torch import nn

from fpet.merge.base import Reduce, TokenMerge, merge_wavg

MergeBuilder = Callable[[DictConfig, nn.Module], dict[int, TokenMerge]]
"""`builder(cfg.merge, vit) -> {block index: strategy}`."""

MERGE_STRATEGIES: dict[str, MergeBuilder] = {
    "none": lambda cfg, vit: {},
}


def build_merges(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """The merge schedule for `cfg.merge` on a timm ViT: block index -> strategy module."""
    name = cfg.name
    if name not in MERGE_STRATEGIES:
        raise ValueError(f"merge={name!r} is not known; choose one of {sorted(MERGE_STRATEGIES)}")
    return MERGE_STRATEGIES[name](cfg, vit)


__all__ = ["MERGE_STRATEGIES", "Reduce", "TokenMerge", "build_merges", "merge_wavg"]
