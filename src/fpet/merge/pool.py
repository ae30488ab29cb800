"""Pooling ablations (paper Table A3/A4): a fixed regional prior instead of a learned matching.

Each patch merges with its right-hand neighbour: the `rows x cols` grid becomes `rows x ceil(cols / 2)` (14x14 ->
14x7 = 98 tokens + the class token, the same count as FPET). `avgpool` takes the size-weighted mean of a pair,
`maxpool` the elementwise max; sizes add up in both. With an odd number of columns the last column stays alone.
It needs the full grid, so it pools at one block.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from fpet.merge.base import Reduce, TokenMerge
from fpet.merge.bipartite import check_full_grid
from fpet.merge.schedule import Geometry
from fpet.state import TokenState


def pool_neighbour_pairs(t: Tensor, grid: tuple[int, int], num_prefix: int, mode: str) -> Tensor:
    """`[B, P + rows * cols, D] -> [B, P + rows * ceil(cols / 2), D]`: sum ("sum") or max ("amax") of column pairs."""
    B, _, D = t.shape
    rows, cols = grid
    patches = t[:, num_prefix:].reshape(B, rows, cols, D)
    if cols % 2:  # a neutral partner for the last column: 0 for sums, -inf for maxima
        patches = F.pad(patches, (0, 0, 0, 1), value=0.0 if mode == "sum" else float("-inf"))
    pairs = patches.reshape(B, rows, -1, 2, D)
    pooled = pairs.sum(dim=3) if mode == "sum" else pairs.amax(dim=3)
    return torch.cat([t[:, :num_prefix], pooled.reshape(B, -1, D)], dim=1)


class NeighbourPool(TokenMerge):
    """Merge each patch with its right-hand neighbour at one block; prefix tokens kept first and untouched."""

    needs = frozenset()
    max_layers = 1
    mode: ClassVar[str] = "avg"

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "NeighbourPool":
        return cls()

    def hparams(self) -> dict:
        return {"mode": self.mode}

    def match(self, state: TokenState) -> Reduce:
        check_full_grid(state, what=f"merge={self.name}")
        return lambda t, mode: pool_neighbour_pairs(t, state.grid, state.num_prefix, mode)


class AvgPool(NeighbourPool):
    """`merge=avgpool`: size-weighted mean of each pair."""

    name, label, mode = "avgpool", "avg pool", "avg"


class MaxPool(NeighbourPool):
    """`merge=maxpool`: elementwise max of each pair (sizes still add up)."""

    name, label, mode = "maxpool", "max pool", "max"
    weighted = False
