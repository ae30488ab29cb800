"""Token-merge strategies behind one signature (`merge(state) -> state`); the strategy class is the registry
record. Adding a strategy: its file (a `TokenMerge` subclass with `name`, `from_config` and its rules), its config
(configs/merge/<name>.yaml), one line in `MERGE_STRATEGIES`, its tests (docs/architecture.md)."""
from __future__ import annotations

from fpet.merge.base import NoMerge, Reduce, TokenMerge, merge_wavg, set_train_progress
from fpet.merge.bipartite import (BSM, BipartiteSoftMatching, ToMe, bipartite_soft_matching, checkerboard_split,
                                  stripe_split)
from fpet.merge.diffrate import DiffRate
from fpet.merge.fpet import FPETMerge, bipartite_differentiable_matching
from fpet.merge.ltmp import LTMP
from fpet.merge.pitome import PiToMe
from fpet.merge.pool import AvgPool, MaxPool, NeighbourPool
from fpet.merge.schedule import (Geometry, MergeConfigError, build_merges, geometry, merge_layers, merge_problems,
                                 strategy_class)
from fpet.merge.token_select import ClassAttentionSelect, EViTSelect, TRPTSSelect

MERGE_STRATEGIES: dict[str, type[TokenMerge]] = {cls.name: cls for cls in (
    NoMerge,
    ToMe,
    BSM,
    FPETMerge,
    AvgPool,
    MaxPool,
    LTMP,
    PiToMe,
    DiffRate,
    TRPTSSelect,
    EViTSelect,
)}
"""`merge=<name>` -> the strategy class; one line per strategy."""

__all__ = [
    "AvgPool", "BSM", "DiffRate", "LTMP", "PiToMe", "BipartiteSoftMatching", "ClassAttentionSelect", "EViTSelect", "TRPTSSelect",
    "set_train_progress", "FPETMerge", "Geometry", "MERGE_STRATEGIES", "MaxPool",
    "MergeConfigError", "NeighbourPool", "NoMerge", "Reduce", "ToMe", "TokenMerge", "bipartite_differentiable_matching",
    "bipartite_soft_matching", "build_merges", "checkerboard_split", "geometry", "merge_layers", "merge_problems",
    "merge_wavg", "stripe_split", "strategy_class",
]
