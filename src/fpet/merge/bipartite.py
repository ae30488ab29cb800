"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the token splits that it and FPET share.

A split divides the non-prefix tokens of a sequence `[B, N, C]` into two sets, A and B, given as positions in the
sequence. Prefix tokens (class, distillation, prompts: `state.num_prefix`) belong to neither set: they are never
merged and stay first.

- `stripe_split`: A = even, B = odd sequence index (ToMe's alternating split; on a 14x14 grid after the class
  token this gives vertical stripes).
- `checkerboard_split`: on the patch grid, A = cells with (row + col) even, B = (row + col) odd, in the official
  FPET order A = [(even, even), (odd, odd)], B = [(odd, even), (even, odd)], each block in raster order. It needs
  the full grid, so it works at the first merge only.

`bipartite_soft_matching` merges the `r` A tokens most similar (cosine of head-mean keys) to their best B token,
with no gradient through the matching; `ToMe` (`merge=tome`) and `BSM` (`merge=bsm`) are its strategies.
"""
from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from torch import Tensor

from fpet.merge.base import Reduce, TokenMerge
from fpet.merge.schedule import Geometry, is_int
from fpet.state import TokenState

SPLITS = ("stripe", "checkerboard")


def stripe_split(num_tokens: int, num_prefix: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Positions `(a [Na], b [Nb])` of ToMe's alternating split: A = even index, B = odd, prefix tokens excluded.

    With one class token this is exactly ToMe's `x[..., ::2, :]` / `x[..., 1::2, :]` minus the class token.
    """
    first_even = num_prefix + num_prefix % 2  # strided ranges, not a boolean mask: sizes known when traced
    first_odd = num_prefix + 1 - num_prefix % 2
    return (torch.arange(first_even, num_tokens, 2, device=device),
            torch.arange(first_odd, num_tokens, 2, device=device))


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


def split_problems(split: object, geo: Geometry, layers: list[int], min_b: int = 1) -> list[str]:
    """Problems of `merge.split` on a backbone: unknown kind, a grid whose set B is too small, a checkerboard at
    more than one block (it needs the full grid)."""
    if split not in SPLITS:
        return [f"merge.split={split!r}: accepted {list(SPLITS)}"]
    rows, cols = geo.grid
    if split == "checkerboard":
        _, b = checkerboard_split(geo.grid, geo.num_prefix)
    else:
        _, b = stripe_split(geo.num_prefix + rows * cols, geo.num_prefix)
    problems = []
    if len(b) < min_b:
        problems.append(f"merge.split={split}: the {rows}x{cols} patch grid gives set B only {len(b)} token(s); "
                        f"this merge needs at least {min_b}. Use a larger backbone.img_size (or smaller patches).")
    if split == "checkerboard" and len(layers) > 1:
        problems.append(f"merge.split=checkerboard needs the full patch grid, so it works at one merge block only; "
                        f"merge.layer names {len(layers)}. Set merge.layer to one block or use merge.split=stripe.")
    return problems


def split_positions(split: str, state: TokenState) -> tuple[Tensor, Tensor]:
    """Positions of sets A and B in `state`'s sequence (prefix tokens in neither)."""
    if split == "stripe":
        return stripe_split(state.num_tokens, state.num_prefix, state.x.device)
    check_full_grid(state, what="merge.split=checkerboard")
    return checkerboard_split(state.grid, state.num_prefix, state.x.device)


def check_full_grid(state: TokenState, what: str) -> None:
    """Raise unless the sequence still holds the full patch grid (no merge before this block)."""
    expected = state.num_prefix + state.grid[0] * state.grid[1]
    if state.num_tokens != expected:
        raise ValueError(
            f"{what} needs the full {state.grid[0]}x{state.grid[1]} patch grid ({expected} tokens) but got "
            f"{state.num_tokens} tokens: tokens were merged at an earlier block. Use it at the first merge only "
            f"(one merge.layer){' or merge.split=stripe' if 'split' in what else ''}.")


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


def r_problems(r: object, geo: Geometry) -> list[str]:
    """`merge.r`: tokens removed per block, 1 .. half the patches (one per token of set A), or null (all of A)."""
    if r is None or (is_int(r) and 1 <= r <= geo.num_patches // 2):
        return []
    return [f"merge.r={r!r}: accepted 1..{geo.num_patches // 2} or null (bipartite matching merges at most half of "
            f"the {geo.num_patches} patch tokens of a {geo.grid[0]}x{geo.grid[1]} grid per block, one per token of "
            f"set A; null merges every A token)"]


class BipartiteSoftMatching(TokenMerge):
    """Merge `r` tokens by bipartite soft matching of head-mean keys at each block it sits at.

    Args:
        r: tokens removed at this block (clipped to the size of set A); None = every A token.
        split: `stripe` or `checkerboard` (needs the full patch grid, so only at the first merge).
    """

    def __init__(self, r: Optional[int], split: str = "stripe") -> None:
        super().__init__()
        self.r, self.split = r, split

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "BipartiteSoftMatching":
        return cls(cfg.r, cfg.split)

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        return r_problems(cfg.get("r"), geo) + split_problems(cfg.get("split"), geo, layers)

    def hparams(self) -> dict:
        return {"r": self.r, "split": self.split}

    def match(self, state: TokenState) -> Reduce:
        a_idx, b_idx = split_positions(self.split, state)
        r = len(a_idx) if self.r is None else self.r
        return bipartite_soft_matching(state.keys, r, a_idx, b_idx, state.num_prefix)


class ToMe(BipartiteSoftMatching):
    """`merge=tome`: ToMe, `r` tokens at every block (`merge.layer=null`) or at the listed blocks."""

    name, label = "tome", "ToMe"
    every_block = True


class BSM(BipartiteSoftMatching):
    """`merge=bsm`: bipartite soft matching at chosen blocks (paper Table 3 "BSM@6": r = 98 once, 197 -> 99)."""

    name, label = "bsm", "BSM"
