"""From `cfg.merge` and a backbone to a merge schedule `{block index: strategy}`, with the shared rules checked.

`merge.layer` is a block index, a list of them, or null (every block, for strategies with `every_block`); the
strategy class (`MERGE_STRATEGIES[cfg.merge.name]`) adds its own rules (`config_problems`) and builds the module of
each block (`from_config`). `merge_problems` lists every problem without building anything (validation calls it
before any work); `build_merges` raises them.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from omegaconf import DictConfig, ListConfig
from torch import nn

from fpet.errors import UserError
from fpet.merge.base import TokenMerge


class Geometry(NamedTuple):
    """What a merge strategy (or PET method) needs to know about the backbone."""

    depth: int
    grid: tuple[int, int]
    num_prefix: int
    head_dim: int
    num_heads: int = 1
    embed_dim: int = 0
    sparse_order: Optional[tuple[int, ...]] = None
    """Blocks from the fewest selected weight entries up, where the PET method selects weights (TR-PTS, GPS:
    `fpet.select.sparse_block_order`; all zero before the selection); None otherwise."""

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def geometry(vit: nn.Module) -> Geometry:
    """Blocks, patch grid, prefix tokens (class, distillation), head width and count, width of a timm ViT (also one
    built on the meta device), and the blocks by selected weights where the PET method selects them."""
    from fpet.select import sparse_block_order

    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    attn = vit.blocks[0].attn
    return Geometry(len(vit.blocks), grid, int(getattr(vit, "num_prefix_tokens", 1)), int(attn.head_dim),
                    int(attn.num_heads), int(vit.embed_dim), sparse_block_order(vit))


class MergeConfigError(UserError, ValueError):
    """`cfg.merge` does not fit the strategy or the backbone; `problems` lists each (key, value, accepted)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_layers(strategy: type[TokenMerge], layer: Any, geo: Geometry) -> tuple[list[int], list[str]]:
    """`merge.layer` (int, list of ints, or null) as sorted block indices, and its problems."""
    last = geo.depth - 1
    if layer is None:
        if strategy.every_block:
            return list(range(geo.depth)), []
        return [], [f"merge.layer=null: merge={strategy.name} merges at chosen blocks; accepted a block index "
                    f"0..{last} or a list of them"]
    values = list(layer) if isinstance(layer, (list, tuple, ListConfig)) else [layer]
    bad = [v for v in values if not is_int(v) or not 0 <= v <= last]
    if bad or not values:
        hint = "; null merges at every block" if strategy.every_block else ""
        return [], [f"merge.layer={_show(layer)}: {'outside' if values else 'an empty list:'} the backbone's "
                    f"{geo.depth} blocks; accepted an index 0..{last} or a list of them{hint}"]
    layers = sorted(set(values))
    if strategy.max_layers is not None and len(layers) > strategy.max_layers:
        return layers, [f"merge.layer={_show(layer)}: merge={strategy.name} sits at most at {strategy.max_layers} "
                        f"block(s); accepted one block index 0..{last}"]
    return layers, []


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, ListConfig) else repr(value)


def strategy_class(name: Optional[str]) -> type[TokenMerge]:
    from fpet.merge import MERGE_STRATEGIES

    if name not in MERGE_STRATEGIES:
        raise MergeConfigError([f"merge={name!r}: accepted {sorted(MERGE_STRATEGIES)}"])
    return MERGE_STRATEGIES[name]


def merge_problems(cfg: DictConfig, geo: Geometry) -> list[str]:
    """Every problem of `cfg.merge` for a backbone of geometry `geo`; empty when it builds."""
    try:
        strategy = strategy_class(cfg.get("name"))
    except MergeConfigError as err:
        return err.problems
    layers, problems = strategy.layers(cfg, geo)
    return problems + strategy.config_problems(cfg, geo, layers)


def merge_layers(cfg: DictConfig, geo: Geometry) -> list[int]:
    """The blocks the strategy of `cfg.merge` sits at (raises `MergeConfigError` listing every problem)."""
    problems = merge_problems(cfg, geo)
    if problems:
        raise MergeConfigError(problems)
    strategy = strategy_class(cfg.name)
    return strategy.layers(cfg, geo)[0]


def build_merges(cfg: DictConfig, vit_or_geo: nn.Module | Geometry) -> dict[int, TokenMerge]:
    """The merge schedule of `cfg.merge`: block index -> its strategy module (one per block)."""
    geo = vit_or_geo if isinstance(vit_or_geo, Geometry) else geometry(vit_or_geo)
    return strategy_class(cfg.name).build(cfg, geo, merge_layers(cfg, geo))
