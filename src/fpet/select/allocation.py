"""From entry scores to trained entries: TR-PTS's two-stage budget allocation and GPS's fixed count per row.

1. Global stage: the top `M` percent of all candidate entries by score (`critical_counts`: how many of them fall
   in each weight matrix).
2. Layer weights: `w_l` = the share of block l's candidate entries that are in the global top-M% (its density).
3. Connections per output row: `C_l = max(1, round(C_min * w_l / min w))` (`connection_budgets`), the minimum taken
   over blocks with w > 0; a block with no critical entry gets the guard's 1 connection.
4. Within a matrix, every output row trains its top-C_l input connections by score (`row_selection`).

GPS is step 4 with the same `C_min` for every matrix. A "layer" is a transformer block (its qkv, proj, fc1 and
fc2 share C_l); the patch embedding gets C_min. `sparse_block_order` ranks the blocks of a model whose weights were
selected from the sparsest up, the order TR-PTS's "sparse insertion" places token selection in.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fpet.select.fisher import block_of


def critical_counts(scores: dict[str, Tensor], percent: float) -> dict[str, int]:
    """How many entries of each matrix are among the global top-`percent` % of all entries (at least one entry).

    Ties at the threshold are broken by `torch.topk` (exactly `ceil(percent / 100 * total)` entries count) over the
    matrices in name order, so the counts do not depend on the dict's order (scores read back from the cache come
    in the file's order, a fresh pass in the model's).
    """
    names = sorted(scores)
    sizes = [scores[n].numel() for n in names]
    flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
    k = min(flat.numel(), max(1, math.ceil(percent / 100.0 * flat.numel())))
    top = flat.topk(k, sorted=False).indices
    owner = torch.bucketize(top, torch.tensor(sizes).cumsum(0), right=True)
    counts = torch.bincount(owner, minlength=len(names))
    counted = dict(zip(names, (int(c) for c in counts)))
    return {n: counted[n] for n in scores}


def block_weights(critical: dict[str, int], scores: dict[str, Tensor]) -> dict[int, float]:
    """`w_l`: block -> share of its candidate entries in the global top-M% (the patch embedding is no block)."""
    hits: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for name, count in critical.items():
        block = block_of(name)
        if block is not None:
            hits[block] = hits.get(block, 0) + count
            sizes[block] = sizes.get(block, 0) + scores[name].numel()
    return {b: hits[b] / sizes[b] for b in sorted(hits)}


def round_half_up(value: float) -> int:
    """Conventional rounding (2.5 -> 3), not Python's round-half-to-even."""
    return int(math.floor(value + 0.5))


def connection_budgets(weights: dict[int, float], c_min: int) -> dict[int, int]:
    """`C_l = max(1, round(C_min * w_l / min w))` per block; min over the blocks with w > 0 (all C_min if none)."""
    positive = [w for w in weights.values() if w > 0]
    if not positive:
        return {b: max(1, c_min) for b in weights}
    w_min = min(positive)
    return {b: max(1, round_half_up(c_min * w / w_min)) for b, w in weights.items()}


def row_selection(score: Tensor, count: int) -> Tensor:
    """Per output row the `count` input connections of highest score: `score [out, ...] -> index [out, C]` (long,
    ascending within a row), `C = min(count, inputs per row)`."""
    flat = score.flatten(1)
    count = max(1, min(int(count), flat.shape[1]))
    return flat.topk(count, dim=1).indices.sort(dim=1).values


def sparse_block_order(vit: nn.Module) -> Optional[tuple[int, ...]]:
    """The blocks from the fewest selected weight entries up (ties: fewer critical entries, then block index), read
    from the modules that report `selected_count` and `critical` (the selecting PET layers); None without such
    modules (the PET method selects no weights)."""
    keys = []
    found = False
    for i, block in enumerate(vit.blocks):
        layers = [m for m in block.modules() if hasattr(m, "selected_count") and hasattr(m, "critical")]
        found = found or bool(layers)
        keys.append((sum(m.selected_count for m in layers), sum(m.critical for m in layers), i))
    return tuple(k[2] for k in sorted(keys)) if found else None
