"""From `cfg.merge` and a timm ViT to a merge schedule `{block index: strategy}`, with the config checked.

Keys (configs/merge/*.yaml): `layer` (block index; ToMe also takes null = every block), `r` (ToMe/BSM:
tokens removed per merging layer), `split` (`stripe` | `checkerboard`), FPET's `stop_grad`, `refine_dim`,
`refine_bits`, `size_grad`. The backbone's `merge_layer` (its middle block) is the default layer.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from omegaconf import DictConfig
from torch import nn

from fpet.merge.base import TokenMerge
from fpet.merge.bipartite import SPLITS, BipartiteSoftMatching
from fpet.merge.fpet import FPETMerge
from fpet.merge.pool import NeighbourPool


class Geometry(NamedTuple):
    """What a merge strategy needs to know about the backbone."""

    depth: int
    grid: tuple[int, int]
    num_prefix: int
    head_dim: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def geometry(vit: nn.Module) -> Geometry:
    """Blocks, patch grid, prefix tokens (class, distillation) and attention head width of a timm ViT (also one
    built on the meta device)."""
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    return Geometry(len(vit.blocks), grid, int(getattr(vit, "num_prefix_tokens", 1)), int(vit.blocks[0].attn.head_dim))


EVERY_BLOCK = {"tome"}
"""Strategies for which `merge.layer: null` means every block; the others merge at one block."""
USES_R = {"tome", "bsm"}
"""Strategies whose `merge.r` says how many tokens a merging block removes."""


class MergeConfigError(ValueError):
    """`cfg.merge` does not fit the strategy or the backbone; `problems` lists each (key, value, accepted)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def merge_problems(cfg: DictConfig, geo: Geometry) -> list[str]:
    """Every problem of `cfg.merge` (layer, r, split) for a backbone of geometry `geo`; empty when it builds.

    The one place the rules live: `build_merges` raises them, `fpet.validate` lists them before anything is built.
    """
    name, layer, r, split = cfg.name, cfg.get("layer"), cfg.get("r"), cfg.get("split")
    if name == "none":
        return []
    last, every = geo.depth - 1, name in EVERY_BLOCK
    problems = []
    if layer is None and not every:
        problems.append(f"merge.layer=None: merge={name} merges at one block; accepted 0..{last}")
    elif layer is not None and (not _is_int(layer) or not 0 <= layer <= last):
        problems.append(f"merge.layer={layer!r}: outside the backbone's {geo.depth} blocks; accepted 0..{last}"
                        + ("; null merges at every block" if every else ""))
    if name in USES_R and r is not None and (not _is_int(r) or not 1 <= r <= geo.num_patches // 2):
        problems.append(
            f"merge.r={r!r}: accepted 1..{geo.num_patches // 2} or null (bipartite matching merges at most half "
            f"of the {geo.num_patches} patch tokens of a {geo.grid[0]}x{geo.grid[1]} grid per layer, one per "
            f"token of set A; null merges every A token)")
    if name == "fpet" and r is not None:
        problems.append(f"merge.r={r!r}: merge=fpet merges every token of set A (the split fixes how many); "
                        f"accepted null")
    if split is not None and split not in SPLITS:
        problems.append(f"merge.split={split!r}: accepted {list(SPLITS)}")
    elif split == "checkerboard" and every and layer is None:
        problems.append("merge.split=checkerboard needs the full patch grid, so it works at one merge layer only; "
                        "merge.layer=null merges at every block. Set merge.layer to one block or use "
                        "merge.split=stripe.")
    return problems


def _layers(cfg: DictConfig, geo: Geometry) -> list[int]:
    """`merge.layer` as block indices (null = every block); `merge_problems` has checked it."""
    return list(range(geo.depth)) if cfg.layer is None else [cfg.layer]


def build_tome(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """`merge=tome`: `r` tokens at every block (`layer: null`) or at one block."""
    geo = geometry(vit)
    return {i: BipartiteSoftMatching(cfg.r, cfg.split, geo.grid, geo.num_prefix) for i in _layers(cfg, geo)}


def build_bsm(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """`merge=bsm`: bipartite soft matching once, `r` tokens (98 on a 14x14 grid: 197 -> 99) at `merge.layer`."""
    geo = geometry(vit)
    return {cfg.layer: BipartiteSoftMatching(cfg.r, cfg.split, geo.grid, geo.num_prefix)}


def build_fpet(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
    """`merge=fpet`: bipartite differentiable matching with key refinement once, at `merge.layer`."""
    geo = geometry(vit)
    merge = FPETMerge(geo.head_dim, geo.grid, geo.num_prefix, split=cfg.split, stop_grad=bool(cfg.stop_grad),
                      refine_dim=cfg.get("refine_dim"), refine_bits=int(cfg.get("refine_bits", 1)),
                      size_grad=bool(cfg.get("size_grad", False)))
    return {cfg.layer: merge}


def build_pool(mode: str):
    """Builder of `merge=avgpool|maxpool` at `merge.layer`."""

    def build(cfg: DictConfig, vit: nn.Module) -> dict[int, TokenMerge]:
        geo = geometry(vit)
        return {cfg.layer: NeighbourPool(mode, geo.grid, geo.num_prefix)}

    return build
