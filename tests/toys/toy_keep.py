"""`merge=toy_keep`: keep the patch tokens the class token attends to most (head mean of `cls_attn`), drop the rest.

A pruning strategy: it reads the class-token attention row from the token state (`needs = {"cls_attn"}`), keeps
`floor(keep * patches)` patches in their original order, and drops the others with their sizes.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor

from fpet.merge import Reduce, TokenMerge
from fpet.merge.schedule import Geometry


class ToyKeep(TokenMerge):
    name, label = "toy_keep", "Toy keep"
    needs = frozenset({"cls_attn"})

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "ToyKeep":
        return cls(cfg.keep)

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        keep = cfg.get("keep")
        return [] if isinstance(keep, float) and 0 < keep <= 1 else [f"merge.keep={keep!r}: accepted (0, 1]"]

    def match(self, state) -> Reduce:
        n = state.num_prefix
        scores = state.cls_attn.mean(dim=1)[:, n:]  # [B, N - n]
        count = int(self.keep * scores.shape[1])
        kept = n + scores.topk(count, dim=-1).indices.sort(dim=-1).values  # [B, count]

        def reduce(t: Tensor, mode: str) -> Tensor:
            patches = t.gather(1, kept[..., None].expand(-1, -1, t.shape[-1]))
            return torch.cat([t[:, :n], patches], dim=1)

        return reduce
