"""Token-merge strategies behind one signature; `build_merges` turns `cfg.merge` into a layer schedule."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig
from torch import nn

from fpet.merge.base import Reduce, TokenMerge, merge_wavg
from fpet.merge.bipartite import BipartiteSoftMatching, bipartite_soft_matching, checkerboard_split, stripe_split
from fpet.merge.fpet import FPETMerge, bipartite_differentiable_matching
from fpet.merge.pool import NeighbourPool
from fpet.merge.schedule import (MergeConfigError, build_bsm, build_fpet, build_pool, build_tome, geometry,
                                 merge_problems)

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
    """The merge schedule for `cfg.merge` on a timm ViT: block index -> strategy module.

    `MergeConfigError` lists every problem of the config (`merge_problems`); a patch grid too small for the split
    is a `ValueError` of the strategy's constructor.
    """
    name = cfg.name
    if name not in MERGE_STRATEGIES:
        raise MergeConfigError([f"merge={name!r}: accepted {sorted(MERGE_STRATEGIES)}"])
    problems = merge_problems(cfg, geometry(vit))
    if problems:
        raise MergeConfigError(problems)
    return MERGE_STRATEGIES[name](cfg, vit)


__all__ = [
    "BipartiteSoftMatching", "FPETMerge", "MERGE_STRATEGIES", "MergeConfigError", "NeighbourPool", "Reduce",
    "TokenMerge", "geometry", "merge_problems",
    "bipartite_differentiable_matching", "bipartite_soft_matching", "build_merges", "checkerboard_split",
    "merge_wavg", "stripe_split",
]
