"""From `cfg.merge` and a timm ViT to a merge schedule `{block index: strategy}`, with the config checked.

Keys (configs/merge/*.yaml): `layer` (block index; ToMe also takes null = every block), `r` (ToMe/BSM:
tokens removed per merging layer), `split` (`stripe` | `checkerboard`), FPET's `stop_grad`, `refine_dim`,
`refine_bits`, `size_grad`. The backbone's `merge_layer` (its middle block) is the default layer.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from omegaconf import DictConfig
from torch import nn

from fpet.merge.base import TokenMerge
from fpet.merge.bipartite import BipartiteSoftMatching
from fpet.merge.fpet import FPETMerge
from fpet.merge.pool import NeighbourPool


class Geometry(NamedTuple):
    """What a merge strategy needs to know about the backbone."""

    depth: int
    grid: tuple[int, int]
    num_prefix: int
    head_dim: int


def geometry(vit: nn.Module) -> Geometry:
    """Blocks, patch grid, prefix tokens (class, distillation) and attention head width of a timm ViT."""
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    return Geometry(len(vit.blocks), grid, int(getattr(vit, "num_prefix_tokens", 1)), int(vit.blocks[0].attn.head_dim))


def resolve_layers(layer: Any, depth: int, name: str, every_block_if_none: bool = False) -> list[int]:
    """`merge.layer` (a block index; null = every block where allowed) as a list of block indices."""
    if layer is None:
        if every_block_if_none:
            return list(range(depth))
        raise ValueError(f"merge={name} merges at one block: set merge.layer to a block index in 0..{depth - 1}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
        raise ValueError(f"merge.layer={layer} must be a block index in 0..{depth - 1} (this backbone has {depth} "
                         f"blocks){'; null merges at every block' if every_block_if_none else ''}")
    return [layer]


def check_r(r: Optional[int], geo: Geometry, name: str) -> None:
    """`merge.r` must be a positive int no larger than half the patch tokens (bipartite matching's limit)."""
    patches = geo.grid[0] * geo.grid[1]
    if r is None:
        return
    if not isinstance(r, int) or not 1 <= r <= patches // 2:
        raise ValueError(
            f"merge.r={r} for merge={name}: bipartite matching merges at most half of the {patches} patch tokens "
            f"({geo.grid[0]}x{geo.grid[1]} grid) per layer, one per token of set A. Use 1 <= merge.r <= "
            f"{patches // 2}, or merge.r=null to merge every A token.")


def _check_single_grid_split(cfg: DictConfig, layers: list[int]) -> None:
    if cfg.split == "checkerboard" and len(layers) > 1:
        raise ValueError("merge.split=checkerboard needs the full patch grid, so it works at one merge layer only; "
                         "merge.layer=null merges at every block. Set merge.layer to one block or use "
                         "merge.split=stripe.")


def build_tome(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """`merge=tome`: `r` tokens at every block (`layer: null`) or at one block."""
    geo = geometry(vit)
    layers = resolve_layers(cfg.layer, geo.depth, cfg.name, every_block_if_none=True)
    check_r(cfg.r, geo, cfg.name)
    _check_single_grid_split(cfg, layers)
    return {i: BipartiteSoftMatching(cfg.r, cfg.split, geo.grid, geo.num_prefix) for i in layers}


def build_bsm(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """`merge=bsm`: bipartite soft matching once, `r` tokens (98 on a 14x14 grid: 197 -> 99) at `merge.layer`."""
    geo = geometry(vit)
    (layer,) = resolve_layers(cfg.layer, geo.depth, cfg.name)
    check_r(cfg.r, geo, cfg.name)
    return {layer: BipartiteSoftMatching(cfg.r, cfg.split, geo.grid, geo.num_prefix)}


def build_fpet(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """`merge=fpet`: bipartite differentiable matching with key refinement once, at `merge.layer`."""
    geo = geometry(vit)
    (layer,) = resolve_layers(cfg.layer, geo.depth, cfg.name)
    if cfg.get("r") is not None:
        raise ValueError(f"merge.r={cfg.r}: merge=fpet merges every token of set A (the split fixes how many); "
                         f"leave merge.r=null")
    merge = FPETMerge(geo.head_dim, geo.grid, geo.num_prefix, split=cfg.split, stop_grad=bool(cfg.stop_grad),
                      refine_dim=cfg.get("refine_dim"), refine_bits=int(cfg.get("refine_bits", 1)),
                      size_grad=bool(cfg.get("size_grad", False)))
    return {layer: merge}


def build_pool(mode: str):
    """Builder of `merge=avgpool|maxpool` at `merge.layer`."""

    def build(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
        geo = geometry(vit)
        (layer,) = resolve_layers(cfg.layer, geo.depth, cfg.name)
        return {layer: NeighbourPool(mode, geo.grid, geo.num_prefix)}

    return build
