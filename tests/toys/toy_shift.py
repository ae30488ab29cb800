"""`pet=toy_shift`: a learnable per-channel shift added beside every block's MLP (a `BlockHook`), zero-initialised.

Linear and input-independent, so it folds exactly into the MLP's output bias (`fc2.bias += shift`): the folded model
is a plain timm ViT.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet import BlockHook, PETMethod, attach_to_blocks


class ToyShift(BlockHook):
    """`x + mlp(norm2(x)) + shift`: `shift [C]`, zero at init."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))

    def mlp_branch(self, x: Tensor, h: Tensor, state) -> Tensor:
        return self.shift.expand_as(x)


def inject(vit: nn.Module, cfg: DictConfig) -> list[str]:
    return attach_to_blocks(vit, "toy_shift", lambda i, block: ToyShift(vit.embed_dim))


@torch.no_grad()
def fold(vit: nn.Module) -> list[str]:
    """Add each shift to its block's `mlp.fc2.bias` and remove the hook (exact in eval mode)."""
    folded = []
    for i, block in enumerate(vit.blocks):
        hook = getattr(block, "toy_shift", None)
        if hook is not None:
            block.mlp.fc2.bias.add_(hook.shift)
            del block.toy_shift
            folded.append(f"blocks.{i}.toy_shift")
    return folded


TOY_SHIFT = PETMethod("toy_shift", "Toy shift", inject, fold=fold)
