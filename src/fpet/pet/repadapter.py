"""RepAdapter (Luo et al. 2023): linear sequential adapters after `norm1` and `norm2`.

`y + s * B(dropout(A(y)))` on the output `y` of each LayerNorm: A is dense `C -> dim` with bias (xavier-uniform
weight, zero bias), B is grouped (`groups = 2`) `dim -> C` with bias, zero-initialised, so a fresh adapter is the
identity. Being linear, the adapter folds into the next linear layer (`attn.qkv` after `norm1`, `mlp.fc1` after
`norm2`) for inference (`fold_repadapter`): the next linear reads `y' = (I + s B A) y + s (B a + b)`, so
`W' = W + s W B A` and `c' = c + s W (B a + b)` (B's grouped weight as a block-diagonal matrix).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import PETLayer, PETMethod
from fpet.pet.fold import linear_with
from fpet.pet.inject import replace_modules


class GroupedLinear(nn.Module):
    """A 1x1 grouped convolution on the channel axis: `[..., in_features] -> [..., out_features]`.

    The weight has `nn.Conv1d`'s grouped layout `[out_features, in_features // groups]`: output group g (rows
    `g * out/groups ...`) reads input group g only. `dense_weight()` is the equivalent block-diagonal matrix.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True) -> None:
        super().__init__()
        if groups <= 0 or in_features % groups or out_features % groups:
            raise ValueError(f"pet.groups={groups} must divide both pet.dim={in_features} and the width "
                             f"{out_features}; use e.g. pet.groups=1 or 2")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def dense_weight(self) -> Tensor:
        """The block-diagonal `[out_features, in_features]` matrix of the grouped weight."""
        blocks = self.weight.reshape(self.groups, self.out_features // self.groups, -1)
        return torch.block_diag(*blocks.unbind(0))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


class RepAdapter(nn.Module):
    """The adapter branch `B(dropout(A(x)))`: `[..., C] -> [..., C]` through `dim` channels (identity-free)."""

    def __init__(self, width: int, dim: int, groups: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"adapter hidden dim must be > 0, got {dim} (set pet.dim to a positive integer)")
        self.down = nn.Linear(width, dim, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.up = GroupedLinear(dim, width, groups=groups, bias=True)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.down(x)))


class RepAdapterNorm(PETLayer):
    """Wraps a block's `norm1` or `norm2`: `y = norm(x); y + s * adapter(y)`, `[B, N, C] -> [B, N, C]`."""

    def __init__(self, base_layer: nn.Module, width: int, dim: int, scale: float, groups: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__(base_layer)
        self.scale = scale
        self.adapter = RepAdapter(width, dim, groups=groups, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        return y + self.scale * self.adapter(y)


def inject_repadapter(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.norm1` and `blocks.*.norm2` of a timm ViT in `RepAdapterNorm`; returns their names."""
    def wrap(norm: nn.Module) -> RepAdapterNorm:
        return RepAdapterNorm(norm, vit.embed_dim, dim=cfg.dim, scale=cfg.scale, groups=cfg.groups,
                              dropout=cfg.dropout)

    return replace_modules(vit, "blocks.*.norm1", wrap) + replace_modules(vit, "blocks.*.norm2", wrap)


@torch.no_grad()
def fold_norm_into(norm: RepAdapterNorm, linear: nn.Linear) -> nn.Linear:
    """`linear` reading `norm`'s adapted output, rewritten to read the plain LayerNorm output."""
    adapter, s = norm.adapter, norm.scale
    down_w, down_b = adapter.down.weight.double(), adapter.down.bias.double()          # [d, C], [d]
    up_w, up_b = adapter.up.dense_weight().double(), adapter.up.bias.double()          # [C, d], [C]
    w = linear.weight.double()                                                          # [out, C]
    bias = linear.bias.double() if linear.bias is not None else w.new_zeros(w.shape[0])
    new_w = w + s * (w @ up_w) @ down_w
    new_b = bias + s * w @ (up_w @ down_b + up_b)
    return linear_with(linear, new_w, new_b)


def fold_repadapter(vit: nn.Module) -> list[str]:
    """Fold every `RepAdapterNorm` into the plain linear it feeds (`norm1 -> attn.qkv`, `norm2 -> mlp.fc1`), in
    place; returns the folded norms' names. A norm whose next layer is not a plain `nn.Linear` (another method
    wraps it) is left as it is."""
    folded = []
    for i, block in enumerate(vit.blocks):
        for norm_name, owner, attr in (("norm1", block.attn, "qkv"), ("norm2", block.mlp, "fc1")):
            norm, target = getattr(block, norm_name), getattr(owner, attr, None)
            if isinstance(norm, RepAdapterNorm) and type(target) is nn.Linear:
                setattr(owner, attr, fold_norm_into(norm, target))
                setattr(block, norm_name, norm.base_layer)
                folded.append(f"blocks.{i}.{norm_name}")
    return folded


REPADAPTER = PETMethod("repadapter", "RepAdapter", inject_repadapter, fold=fold_repadapter)
