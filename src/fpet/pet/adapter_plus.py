"""Adapter+ (Steitz & Roth 2024): a post-block adapter with biases and a channel-wise scale.

After the whole block (attention and MLP with their residuals): `x + s * DropPath(up(GELU(down(x))))` with
`s [C]` a learnable channel-wise scale (init 1), `down` C -> `pet.dim` and `up` back, both with biases; both
weights trunc_normal(std 0.01, +-0.02), biases 0 (Adapter+'s "houlsby" init), no norm inside the adapter, adapter
drop-path 0.1 (as the Adapter+ code: `conf/adapter/adapter_plus.yaml`). ViT-B/16: 12 x (1537 r + 1536) parameters
(r = 8: 165,984). The GELU keeps it from folding; it acts per token, so it composes with every merge strategy.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.layers import DropPath
from torch import nn

from fpet.pet.base import BlockHook, Bottleneck, PETMethod
from fpet.pet.inject import attach_to_blocks
from fpet.state import TokenState

INIT_STD = 0.01
"""Adapter+'s trunc_normal std for both projections (cut at +-2 std)."""


class AdapterPlus(BlockHook):
    """The post-block adapter of one block: `[B, N, C] -> [B, N, C]` after the block's last residual."""

    def __init__(self, width: int, dim: int, drop_path: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.adapter = Bottleneck(width, dim, width, act="gelu", dropout=dropout, bias=True, up_std=INIT_STD)
        with torch.no_grad():
            nn.init.trunc_normal_(self.adapter.down.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        self.scaling = nn.Parameter(torch.ones(width))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def post_block(self, state: TokenState) -> TokenState:
        x = state.x
        return state.replace(x=x + self.drop_path(self.adapter(x)) * self.scaling)


def inject_adapter_plus(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Attach an `AdapterPlus` after every block; returns the attached module names (`blocks.3.adapter_plus`)."""
    return attach_to_blocks(vit, "adapter_plus", lambda i, block: AdapterPlus(
        vit.embed_dim, cfg.dim, drop_path=cfg.drop_path, dropout=cfg.dropout))


ADAPTER_PLUS = PETMethod("adapter_plus", "Adapter+", inject_adapter_plus)
