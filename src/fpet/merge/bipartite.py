"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the token splits that it and FPET share.

A split divides the non-prefix tokens of a sequence `[B, N, C]` into two sets, A and B, given as positions in the
sequence. Prefix tokens (class, distillation) belong to neither set: they are never merged and stay first.

- `stripe_split`: A = even, B = odd sequence index (ToMe's alternating split; on a 14x14 grid after the class
  token this gives vertical stripes).
- `checkerboard_split`: on the patch grid, A = cells with (row + col) even, B = (row + col) odd, in the official
  FPET order A = [(even, even), (odd, odd)], B = [(odd, even), (even, odd)], each block in raster order.

`bipartite_soft_matching` merges the `r` A tokens most similar (cosine of head-mean keys) to their best B token,
with no gradient through the matching; `BipartiteSoftMatching` is the strategy module for `merge=tome|bsm`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fpet.merge.base import Reduce, TokenMerge

SPLITS = ("stripe", "checkerboard")


def stripe_split(num_tokens: int, num_prefix: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Positions `(a [Na], b [Nb])` of ToMe's alternating split: A = even index, B = odd, prefix tokens excluded.

    With one class token this is exactly ToMe's `x[..., ::2, :]` / `x[..., 1::2, :]` minus the class token.
    """
    positions = torch.arange(num_prefix, num_tokens, device=device)
    return positions[positions % 2 == 0], positions[positions % 2 == 1]


def checkerboard_split(grid: tuple[int, int], num_prefix: int, device: torch.device | str = "cpu"
                       ) -> tuple[Tensor, Tensor]:
    """Positions `(a [Na], b [Nb])` of the checkerboard split of a `rows x cols` patch grid after `num_prefix` tokens.

    A = (row + col) even: [(even row, even col), (odd row, odd col)]; B = (row + col) odd: [(odd row, even col),
    (even row, odd col)]; each block in raster order (the official FPET layout). 14x14: 98 + 98 patches; an odd
    grid such as 7x7 gives 25 + 24.
    """
    rows, cols = grid
    cells = num_prefix + torch.arange(rows * cols, device=device).view(rows, cols)
    a = torch.cat([cells[0::2, 0::2].flatten(), cells[1::2, 1::2].flatten()])
    b = torch.cat([cells[1::2, 0::2].flatten(), cells[0::2, 1::2].flatten()])
    return a, b


def check_split(split: str, grid: tuple[int, int], num_prefix: int, min_b: int = 1) -> None:
    """Raise a clear error when `split` is unknown or the patch grid leaves B with fewer than `min_b` tokens."""
    if split not in SPLITS:
        raise ValueError(f"merge.split={split!r} is not one of {SPLITS}")
    rows, cols = grid
    if split == "checkerboard":
        _, b = checkerboard_split(grid, num_prefix)
    else:
        _, b = stripe_split(num_prefix + rows * cols, num_prefix)
    if len(b) < min_b:
        raise ValueError(
            f"the {rows}x{cols} patch grid gives set B of the {split} split only {len(b)} token(s); this merge needs "
            f"at least {min_b}. Use a larger backbone.img_size (or smaller patches).")


def bipartite_soft_matching(keys: Tensor, r: int, a_idx: Tensor, b_idx: Tensor, num_prefix: int) -> Reduce:
    """ToMe's matching: the `r` A tokens with the most similar B token merge into it.

    Args:
        keys: head-mean keys `[B, N, d]` (cosine similarity; no gradient flows through the matching).
        r: tokens to remove; clipped to `len(a_idx)`.
        a_idx, b_idx: positions of the two sets in the sequence (prefix tokens in neither).
        num_prefix: leading tokens that pass through unchanged.

    Returns `reduce(t [B, N, D], mode) -> [B, N - r, D]` laid out as [prefix, unmerged A (in A order), B].
    """
    r = min(r, len(a_idx))
    with torch.no_grad():
        k = keys / keys.norm(dim=-1, keepdim=True)
        scores = k.index_select(1, a_idx) @ k.index_select(1, b_idx).mT  # [B, Na, Nb]
        best, dst_all = scores.max(dim=-1)  # [B, Na]
        order = best.sort(dim=-1, descending=True, stable=True).indices
        src = order[:, :r]  # A tokens that merge
        dst = dst_all.gather(1, src)  # their B partners
        src = a_idx[src]  # as positions in the sequence
        keep = a_idx[order[:, r:].sort(dim=-1).values]  # A tokens that stay, in their original order

    def reduce(t: Tensor, mode: str) -> Tensor:
        B, _, D = t.shape
        kept = t.gather(1, keep[..., None].expand(B, -1, D))
        moved = t.gather(1, src[..., None].expand(B, -1, D))
        t_b = t.index_select(1, b_idx).scatter_reduce(1, dst[..., None].expand(B, -1, D), moved, reduce=mode)
        return torch.cat([t[:, :num_prefix], kept, t_b], dim=1)

    return reduce


class BipartiteMerge(TokenMerge):
    """Base of the strategies that split the tokens into sets A and B (`stripe` or `checkerboard`).

    Args:
        split: `stripe` or `checkerboard` (needs the full patch grid, so only at the first merge).
        grid: the patch grid (rows, cols) of the backbone.
        num_prefix: class (+ distillation) tokens, never merged.
        min_b: the fewest B tokens the strategy can work with (checked against the grid).
    """

    def __init__(self, split: str, grid: tuple[int, int], num_prefix: int, min_b: int = 1) -> None:
        super().__init__()
        check_split(split, grid, num_prefix, min_b)
        self.split, self.grid, self.num_prefix = split, (int(grid[0]), int(grid[1])), num_prefix
        a, b = checkerboard_split(self.grid, num_prefix)
        self.register_buffer("checker_a", a, persistent=False)
        self.register_buffer("checker_b", b, persistent=False)

    def split_indices(self, num_tokens: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Positions of sets A and B for a sequence of `num_tokens` tokens."""
        if self.split == "stripe":
            return stripe_split(num_tokens, self.num_prefix, device)
        check_full_grid(num_tokens, self.grid, self.num_prefix, what="merge.split=checkerboard")
        return self.checker_a, self.checker_b


class BipartiteSoftMatching(BipartiteMerge):
    """`merge=tome|bsm`: merge `r` tokens by bipartite soft matching of head-mean keys.

    Args:
        r: tokens removed at this layer (clipped to the size of set A); None = every A token.
        split, grid, num_prefix: see `BipartiteMerge`.
    """

    def __init__(self, r: Optional[int], split: str, grid: tuple[int, int], num_prefix: int) -> None:
        super().__init__(split, grid, num_prefix)
        self.r = r

    def match(self, x: Tensor, size: Tensor, keys: Tensor) -> Reduce:
        a_idx, b_idx = self.split_indices(x.shape[1], x.device)
        r = len(a_idx) if self.r is None else self.r
        return bipartite_soft_matching(keys, r, a_idx, b_idx, self.num_prefix)

    def extra_repr(self) -> str:
        return f"r={self.r}, split={self.split!r}, grid={self.grid}, num_prefix={self.num_prefix}"


def check_full_grid(num_tokens: int, grid: tuple[int, int], num_prefix: int, what: str) -> None:
    """Raise unless the sequence still holds the full patch grid (no merge before this layer)."""
    expected = num_prefix + grid[0] * grid[1]
    if num_tokens != expected:
        raise ValueError(
            f"{what} needs the full {grid[0]}x{grid[1]} patch grid ({expected} tokens) but got {num_tokens} "
            f"tokens: tokens were merged at an earlier layer. Use it at the first merge only (one merge.layer)"
            f"{' or merge.split=stripe' if 'split' in what else ''}.")
