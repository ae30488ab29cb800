"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the token splits that it and FPET share.

A split divides the non-prefix tokens of a sequence `[B, N, C]` into two sets, A and B, given as positions in the
sequence. Prefix tokens (class, distillation, prompts: `state.num_prefix`) belong to neither set: they are never
merged and stay first.

- `stripe_split`: A = even, B = odd sequence index (ToMe's alternating split; on a 14x14 grid after the class
  token this gives vertical stripes).
- `checkerboard_split`: on the patch grid, A = cells with (row + col) even, B = (row + col) odd, in the official
  FPET order A = [(even, even), (odd, odd)], B = [(odd, even), (even, odd)], each block in raster order. It needs
  the full grid, so it works at the first merge only.
- `kth_split` (ToMe's `kth_bipartite_soft_matching`): B = every k-th non-prefix token (positions k-1, 2k-1, ...
  after the prefix), A = the others. ToMe's version also splits the class token and drops the tokens past the last
  full group of k; here the prefix is protected and every token belongs to A or B.
- `random_split` (ToMe's `random_bipartite_soft_matching`): per image, `r` random non-prefix tokens form A (all of
  them merge), the others B. ToMe draws over the class token too; here the prefix is protected.

`bipartite_soft_matching` merges the `r` A tokens most similar (cosine of head-mean keys) to their best B token,
with no gradient through the matching; `ToMe` (`merge=tome`) and `BSM` (`merge=bsm`) are its strategies.
`merge.r` is an int or ToMe's `[r, inflection]` schedule (`tome_schedule`, ToMe's `parse_r`): over the L merging
blocks `r_l = int(lo + l * (hi - lo) / (L - 1))` with `lo = int(r * (1 - inflection))`, `hi = 2r - lo`; inflection
0 is constant r, -1 decreases from 2r to 0 (ToMe's `(16, -1)`), 1 increases from 0 to 2r.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from fpet.merge.base import Reduce, TokenMerge
from fpet.merge.schedule import Geometry, _show, is_int
from fpet.state import TokenState

SPLITS = ("stripe", "checkerboard", "kth", "random")


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


def kth_split(num_tokens: int, num_prefix: int, k: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Positions `(a [Na], b [Nb])`: B = every k-th token after the prefix (k-1, 2k-1, ...), A = the others."""
    positions = torch.arange(num_prefix, num_tokens, device=device)
    in_b = (positions - num_prefix) % k == k - 1
    return positions[~in_b], positions[in_b]


def random_split(batch: int, num_tokens: int, num_prefix: int, r: int, device: torch.device | str = "cpu"
                 ) -> tuple[Tensor, Tensor]:
    """Positions `(a [B, r], b [B, N - P - r])` per image: `r` random non-prefix tokens in A, the rest in B."""
    order = torch.rand(batch, num_tokens - num_prefix, device=device).argsort(dim=1) + num_prefix
    return order[:, :r], order[:, r:]


def split_problems(split: object, geo: Geometry, layers: list[int], min_b: int = 1, k: object = None,
                   accepted: tuple[str, ...] = SPLITS) -> list[str]:
    """Problems of `merge.split` on a backbone: unknown kind, a grid whose set B is too small, a checkerboard at
    more than one block (it needs the full grid), `merge.k` of the kth split."""
    if split not in accepted:
        return [f"merge.split={split!r}: accepted {list(accepted)}"]
    rows, cols = geo.grid
    if split == "kth" and not (is_int(k) and 2 <= k <= geo.num_patches):
        return [f"merge.k={k!r}: merge.split=kth puts every k-th patch token in set B; accepted an integer "
                f"2..{geo.num_patches}"]
    if split == "checkerboard":
        _, b = checkerboard_split(geo.grid, geo.num_prefix)
    elif split == "kth":
        _, b = kth_split(geo.num_prefix + rows * cols, geo.num_prefix, k)
    else:  # stripe; random leaves at least as many tokens in B as A
        _, b = stripe_split(geo.num_prefix + rows * cols, geo.num_prefix)
    problems = []
    if len(b) < min_b:
        problems.append(f"merge.split={split}: the {rows}x{cols} patch grid gives set B only {len(b)} token(s); "
                        f"this merge needs at least {min_b}. Use a larger backbone.img_size (or smaller patches).")
    if split == "checkerboard" and len(layers) > 1:
        problems.append(f"merge.split=checkerboard needs the full patch grid, so it works at one merge block only; "
                        f"merge.layer names {len(layers)}. Set merge.layer to one block or use merge.split=stripe.")
    return problems


def split_positions(split: str, state: TokenState, k: Optional[int] = None, r: Optional[int] = None
                    ) -> tuple[Tensor, Tensor]:
    """Positions of sets A and B in `state`'s sequence (prefix tokens in neither): `[Na]` shared by the batch, or
    `[B, Na]` per image (`random`, which puts `r` tokens in A)."""
    if split == "stripe":
        return stripe_split(state.num_tokens, state.num_prefix, state.x.device)
    if split == "kth":
        return kth_split(state.num_tokens, state.num_prefix, k, state.x.device)
    if split == "random":
        patches = state.num_tokens - state.num_prefix
        return random_split(state.x.shape[0], state.num_tokens, state.num_prefix,
                            patches // 2 if r is None else min(r, patches // 2), state.x.device)
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
        r: tokens to remove; clipped to the size of A.
        a_idx, b_idx: positions of the two sets in the sequence (prefix tokens in neither), `[Na]` for the whole
            batch or `[B, Na]` per image.
        num_prefix: leading tokens that pass through unchanged.

    Returns `reduce(t [B, N, D], mode) -> [B, N - r, D]` laid out as [prefix, unmerged A (in A order), B].
    """
    batch = keys.shape[0]
    a_idx, b_idx = a_idx.expand(batch, -1), b_idx.expand(batch, -1)
    r = min(r, a_idx.shape[1])
    with torch.no_grad():
        k = keys / keys.norm(dim=-1, keepdim=True)
        scores = gather_tokens(k, a_idx) @ gather_tokens(k, b_idx).mT  # [B, Na, Nb]
        best, dst_all = scores.max(dim=-1)  # [B, Na]
        order = best.sort(dim=-1, descending=True, stable=True).indices
        src = order[:, :r]  # A tokens that merge
        dst = dst_all.gather(1, src)  # their B partners
        src = a_idx.gather(1, src)  # as positions in the sequence
        keep = a_idx.gather(1, order[:, r:].sort(dim=-1).values)  # A tokens that stay, in their original order

    def reduce(t: Tensor, mode: str) -> Tensor:
        D = t.shape[-1]
        moved = gather_tokens(t, src)
        t_b = gather_tokens(t, b_idx).scatter_reduce(1, dst[..., None].expand(-1, -1, D), moved, reduce=mode)
        return torch.cat([t[:, :num_prefix], gather_tokens(t, keep), t_b], dim=1)

    return reduce


def gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """`t [B, N, D]` at positions `idx [B, M]` -> `[B, M, D]`."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def tome_schedule(r: Any, num_layers: int) -> list[Optional[int]]:
    """Tokens removed at each of `num_layers` merging blocks: an int (or null) at each, or ToMe's `[r, inflection]`
    (`parse_r`: `r_l = int(lo + l * (hi - lo) / (L - 1))`, `lo = int(r * (1 - inflection))`, `hi = 2r - lo`)."""
    if r is None or is_int(r):
        return [r] * num_layers
    r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(lo + step * i) for i in range(num_layers)]


def r_problems(r: object, geo: Geometry) -> list[str]:
    """`merge.r`: tokens removed per block, 1 .. half the patches (one per token of set A), null (all of A), or
    ToMe's `[r, inflection]` schedule with inflection in [-1, 1]."""
    half = geo.num_patches // 2
    if r is None or (is_int(r) and 1 <= r <= half):
        return []
    if isinstance(r, (list, tuple, ListConfig)) and len(r) == 2:
        base, inflect = r
        if is_int(base) and 1 <= base <= half and isinstance(inflect, (int, float)) and not isinstance(inflect, bool) \
                and -1 <= inflect <= 1:
            return []
        return [f"merge.r={_show(r)}: ToMe's schedule [r, inflection] takes r in 1..{half} and an inflection in "
                f"[-1, 1] (-1: decreasing from 2r to 0, 0: constant, 1: increasing)"]
    return [f"merge.r={_show(r)}: accepted 1..{half} or null (bipartite matching merges at most half of the "
            f"{geo.num_patches} patch tokens of a {geo.grid[0]}x{geo.grid[1]} grid per block, one per token of set A; "
            f"null merges every A token), or ToMe's schedule [r, inflection]"]



class BipartiteSoftMatching(TokenMerge):
    """Merge `r` tokens by bipartite soft matching of head-mean keys at each block it sits at.

    Args:
        r: tokens removed at this block (clipped to the size of set A); None = every A token.
        split: `stripe`, `checkerboard` (needs the full patch grid, so only at the first merge), `kth` or `random`.
        k: B = every k-th token (`kth` only).
    """

    def __init__(self, r: Optional[int], split: str = "stripe", k: Optional[int] = None) -> None:
        super().__init__()
        self.r, self.split, self.k = r, split, k

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "BipartiteSoftMatching":
        return cls(cfg.r, cfg.split, cfg.get("k"))

    @classmethod
    def build(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> dict[int, TokenMerge]:
        """One module per block, `r` following ToMe's schedule over the merging blocks when `[r, inflection]`."""
        return {layer: cls(r, cfg.split, cfg.get("k")) for layer, r in zip(layers, tome_schedule(cfg.r, len(layers)))}

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        return r_problems(cfg.get("r"), geo) + split_problems(cfg.get("split"), geo, layers, k=cfg.get("k"))

    def hparams(self) -> dict:
        return {"r": self.r, "split": self.split, **({"k": self.k} if self.split == "kth" else {})}

    def export_problem(self) -> Optional[str]:
        if self.split == "random":
            return (f"merge={self.name} merge.split=random draws set A anew on every forward (ToMe's random "
                    f"split), so no file can reproduce its outputs; export with merge.split=stripe, checkerboard "
                    f"or kth")
        return None

    def match(self, state: TokenState) -> Reduce:
        a_idx, b_idx = split_positions(self.split, state, self.k, self.r)
        r = a_idx.shape[-1] if self.r is None else self.r
        return bipartite_soft_matching(state.keys, r, a_idx, b_idx, state.num_prefix)


class ToMe(BipartiteSoftMatching):
    """`merge=tome`: ToMe, `r` tokens at every block (`merge.layer=null`) or at the listed blocks."""

    name, label = "tome", "ToMe"
    every_block = True


class BSM(BipartiteSoftMatching):
    """`merge=bsm`: bipartite soft matching at chosen blocks (paper Table 3 "BSM@6": r = 98 once, 197 -> 99)."""

    name, label = "bsm", "BSM"
