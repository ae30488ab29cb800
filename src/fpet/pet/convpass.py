"""Convpass (Jie & Deng 2022): convolutional bypasses beside attention and MLP.

`x + attn(n1) + s * DropPath(conv(n1))`, `x + mlp(n2) + s * DropPath(conv(n2))` with n1 = norm1(x),
n2 = norm2(x), where `conv(h) = up(dropout(QGELU(conv3x3(QGELU(down(h))))))`: `down` C -> r (xavier, bias 0), the
patches reshaped to their grid (14 x 14 x r on ViT-B/16) for a 3x3 convolution r -> r (zero weights with the
identity at the centre, or xavier per task: `pet.xavier_init`; bias 0), the prefix tokens (class token) through
the same convolution as 1 x 1 images, `up` r -> C (zero, bias 0), QuickGELU `x * sigmoid(1.702 x)`, dropout 0.1,
the block's drop-path rate (Convpass code, `convpass/vtab/convpass.py`). ViT-B/16, r = 8: 24 x 13,648 = 327,552.

The 3x3 convolution needs the patch grid, which a merge strategy destroys. Our choice: a bypass acts only while
the sequence holds the full grid (`TokenState.has_full_grid`), i.e. in the blocks before the first merging block
and beside the attention of that block (the merge sits between attention and MLP). The bypasses after it cannot
act: they are frozen and not stored (the train rule `convpass_parameters` reads the model's merge layers), so
`params_pet` and `storage_bytes` count only what acts. Nothing folds (non-linear).
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from timm.layers import DropPath

from fpet.pet.base import BlockHook, PETMethod
from fpet.pet.inject import attach_to_blocks
from fpet.state import TokenState

log = logging.getLogger(__name__)


class QuickGELU(nn.Module):
    """`x * sigmoid(1.702 x)`."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """One bypass: `[B, P + rows * cols, C] -> [B, P + rows * cols, C]` (P prefix tokens, then the patch grid)."""

    def __init__(self, width: int, dim: int, xavier_init: bool, dropout: float) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= width:
            raise ValueError(f"pet.dim={dim!r}: the bypass width must be an integer in 1..{width}, e.g. pet.dim=8")
        self.down = nn.Linear(width, dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.up = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if xavier_init:
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                nn.init.zeros_(self.conv.weight)
                self.conv.weight[:, :, 1, 1] += torch.eye(dim)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
        B, _, _ = h.shape
        d = self.act(self.down(h))                                              # [B, N, r]
        r = d.shape[-1]
        prefix = self.conv(d[:, :num_prefix].reshape(B * num_prefix, r, 1, 1)).reshape(B, num_prefix, r)
        patches = d[:, num_prefix:].reshape(B, *grid, r).permute(0, 3, 1, 2)    # [B, r, rows, cols]
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(B, -1, r)
        return self.up(self.dropout(self.act(torch.cat([prefix, patches], dim=1))))


class Convpass(BlockHook):
    """The two bypasses of one block; each acts only on the full patch grid (see the module docstring)."""

    def __init__(self, width: int, dim: int, scale: float, xavier_init: bool, dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.scale = scale
        self.attn_bypass = ConvBypass(width, dim, xavier_init, dropout)
        self.mlp_bypass = ConvBypass(width, dim, xavier_init, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _branch(self, bypass: ConvBypass, h: Tensor, state: TokenState) -> Optional[Tensor]:
        if not state.has_full_grid:
            return None
        return self.drop_path(bypass(h, state.num_prefix, state.grid)) * self.scale

    def attn_branch(self, x: Tensor, h: Tensor, state: TokenState) -> Optional[Tensor]:
        return self._branch(self.attn_bypass, h, state)

    def mlp_branch(self, x: Tensor, h: Tensor, state: TokenState) -> Optional[Tensor]:
        return self._branch(self.mlp_bypass, h, state)


def inject_convpass(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Attach a `Convpass` to every block; returns the attached module names (`blocks.3.convpass`)."""
    return attach_to_blocks(vit, "convpass", lambda i, block: Convpass(
        vit.embed_dim, cfg.dim, cfg.scale, cfg.xavier_init, cfg.dropout,
        drop_path=float(getattr(block.drop_path1, "drop_prob", 0.0))))


def convpass_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Convpass's train rule: the bypasses that can act, i.e. every bypass before the first merging block and
    the attention bypass of that block (all of them without merging)."""
    vit = getattr(model, "vit", model)
    layers = sorted(int(k) for k in getattr(model, "merges", {}))
    first = layers[0] if layers else len(vit.blocks)
    if layers:
        log.info("convpass: the bypasses from block %d's MLP on see merged tokens (no patch grid): they do not act "
                 "and stay frozen", first)
    for i, block in enumerate(vit.blocks):
        if i < first:
            yield from block.convpass.parameters()
        elif i == first:
            yield from block.convpass.attn_bypass.parameters()


CONVPASS = PETMethod("convpass", "Convpass", inject_convpass, trainable=convpass_parameters)
