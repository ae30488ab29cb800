"""VPT (Jia et al. 2022): learnable prompt tokens, inserted after the class token (VPT-shallow, VPT-deep).

- `vpt_shallow`: `pet.prompts` (p) tokens `[1, p, C]` are inserted after the class token before block 0 and go
  through all blocks like the patches (ViT-B/16: 768 p parameters).
- `vpt_deep`: block 0 inserts p tokens as above; before every later block i the p prompt outputs of block i - 1
  are replaced by the block's own new prompts `P_i` (ViT-B/16: 12 x 768 p = 9,216 p).

Init as the VPT code: `uniform(-v, v)`, `v = sqrt(6 / (3 * patch_h * patch_w + C))` (0.0625 on ViT-B/16), prompt
dropout 0.1 on the tokens of each sample. Prompts are protected prefix tokens (`TokenState.insert_prefix`): every
merge strategy keeps them first (after the class token), unmerged, with size 1, so `pet=vpt_deep merge=fpet` on
ViT-B/16 ends with 1 + p + 98 tokens. The head reads the class token. Nothing folds: the p extra tokens cost FLOPs
in every block.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from fpet.pet.base import BlockHook, PETMethod
from fpet.pet.inject import attach_to_blocks
from fpet.state import TokenState


def positive_int(value: object, key: str) -> int:
    """`value` if it is a positive integer, else a ValueError naming the config key and the fix."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key}={value!r}: must be a positive integer (e.g. {key}=10)")
    return value


class Prompts(BlockHook):
    """The prompt tokens `[1, p, C]` of one block: inserted after the prefix (`replace=False`) or replacing the
    prompt tokens at `start .. start + p` (`replace=True`, VPT-deep's blocks 1..L-1)."""

    def __init__(self, num: int, width: int, bound: float, dropout: float, start: int, replace: bool) -> None:
        super().__init__()
        positive_int(num, "pet.prompts")
        self.prompts = nn.Parameter(torch.empty(1, num, width))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.start, self.replace = start, replace

    def pre_block(self, state: TokenState) -> TokenState:
        tokens = self.dropout(self.prompts.expand(state.x.shape[0], -1, -1))   # [B, p, C], a mask per sample
        return state.set_prefix(self.start, tokens) if self.replace else state.insert_prefix(tokens)


def prompt_bound(vit: nn.Module) -> float:
    """VPT's init range `sqrt(6 / (3 * patch_h * patch_w + C))`."""
    patch = vit.patch_embed.patch_size
    return math.sqrt(6.0 / (3 * math.prod(patch) + vit.embed_dim))


def inject_prompts(vit: nn.Module, cfg: DictConfig, deep: bool) -> list[str]:
    """Attach `Prompts` to block 0 (insert) and, when `deep`, to every later block (replace)."""
    start = int(getattr(vit, "num_prefix_tokens", 1))

    def make(i: int, block: nn.Module) -> Prompts | None:
        if i > 0 and not deep:
            return None
        return Prompts(cfg.prompts, vit.embed_dim, prompt_bound(vit), cfg.dropout, start, replace=i > 0)

    return attach_to_blocks(vit, "prompt", make)


def inject_vpt_shallow(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """`pet.prompts` tokens before block 0; returns the attached module names (`blocks.0.prompt`)."""
    return inject_prompts(vit, cfg, deep=False)


def inject_vpt_deep(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """`pet.prompts` new tokens before every block; returns the attached module names."""
    return inject_prompts(vit, cfg, deep=True)


VPT_SHALLOW = PETMethod("vpt_shallow", "VPT-Shallow", inject_vpt_shallow)
VPT_DEEP = PETMethod("vpt_deep", "VPT-Deep", inject_vpt_deep)
