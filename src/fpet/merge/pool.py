"""Pooling ablations (paper Table A3/A4): a fixed regional prior instead of a learned matching.

Each patch merges with its right-hand neighbour: the `rows x cols` grid becomes `rows x ceil(cols / 2)` (14x14 ->
14x7 = 98 tokens + the class token, the same count as FPET). `avgpool` takes the size-weighted mean of a pair,
`maxpool` the elementwise max; sizes add up in both. With an odd number of columns the last column stays alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fpet.merge.base import Reduce, TokenMerge
from fpet.merge.bipartite import check_full_grid

POOL_MODES = ("avg", "max")


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
    """`merge=avgpool|maxpool` at one layer: merge each patch with its right-hand neighbour.

    Args:
        mode: `avg` (size-weighted mean) or `max` (elementwise max).
        grid: patch grid (rows, cols); needs the full grid, so it pools once at the first merge.
        num_prefix: class (+ distillation) tokens, kept first and untouched.
    """

    def __init__(self, mode: str, grid: tuple[int, int], num_prefix: int) -> None:
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pooling mode {mode!r} is not one of {POOL_MODES}")
        self.mode, self.grid, self.num_prefix = mode, (int(grid[0]), int(grid[1])), num_prefix
        self.weighted = mode == "avg"

    def match(self, x: Tensor, size: Tensor, keys: Tensor) -> Reduce:
        check_full_grid(x.shape[1], self.grid, self.num_prefix, what=f"merge={self.mode}pool")
        return lambda t, mode: pool_neighbour_pairs(t, self.grid, self.num_prefix, mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, grid={self.grid}, num_prefix={self.num_prefix}"
