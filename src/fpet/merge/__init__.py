"""Token-merge strategies behind one signature; `build_merges` turns `cfg.merge` into a layer schedule."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig
from torch import nn

from fpet.merge.base import Reduce, TokenMerge, merge_wavg
from fpet.merge.bipartite import BipartiteSoftMatching, bipartite_soft_matching, checkerboard_split, stripe_split
from fpet.merge.fpet import FPETMerge, bipartite_differentiable_matching
from fpet.merge.pool import NeighbourPool
from fpet.merge.schedule import build_bsm, build_fpet, build_pool, build_tome

MergeBuilder = Callable[[DictConfig, nn.Module], dict[int, TokenMerge]]
"""`builder(cfg.merge, vit) -> {block index: strategy}`."""

MERGE_STRATEGIES: dict[str, MergeBuilder] = {
    "none": lambda cfg, vit: {},
    "tome": build_tome,
    "bsm": build_bsm,
    "fpet": build_fpet,
    "avgpool": build_pool("avg"),
    "maxpool": build_pool("max"),
}


def build_merges(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """The merge schedule for `cfg.merge` on a timm ViT: block index -> strategy module."""
    name = cfg.name
    if name not in MERGE_STRATEGIES:
        raise ValueError(f"merge={name!r} is not known; choose one of {sorted(MERGE_STRATEGIES)}")
    return MERGE_STRATEGIES[name](cfg, vit)


__all__ = [
    "BipartiteSoftMatching", "FPETMerge", "MERGE_STRATEGIES", "NeighbourPool", "Reduce", "TokenMerge",
    "bipartite_differentiable_matching", "bipartite_soft_matching", "build_merges", "checkerboard_split",
    "merge_wavg", "stripe_split",
]
