"""AdaptFormer (and its 1-bit variant, Bi-AdaptFormer): a ReLU bottleneck in parallel with the MLP.

`x + mlp(norm2(x)) + s * up(dropout(relu(down(x))))` with the residual stream `x` before `norm2` as the branch's
input, added outside the MLP's drop-path and layer scale; hidden dim `pet.dim` (8), no biases (official FPET code),
up-projection zero-initialised. The ReLU keeps it from folding.
"""
from __future__ import annotations

from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import BlockHook, Bottleneck, PETLayer, PETMethod
from fpet.pet.inject import replace_modules


class AdaptFormerMLP(PETLayer, BlockHook):
    """Wraps a block's `mlp`: `forward(h)` is the frozen MLP; the block hook adds the branch beside it."""

    def __init__(self, base_layer: nn.Module, dim: int, scale: float, dropout: float = 0.1,
                 linear: type[nn.Module] = nn.Linear, up_std: float | None = None) -> None:
        super().__init__(base_layer)
        c = base_layer.fc1.in_features
        self.scale = scale
        self.adapter = Bottleneck(c, dim, c, act="relu", dropout=dropout, linear=linear, up_std=up_std)

    def forward(self, h: Tensor) -> Tensor:
        return self.base_layer(h)

    def mlp_branch(self, x: Tensor, h: Tensor, state: object) -> Tensor:
        """The adapter branch on the residual stream before `norm2`: `[B, N, C] -> [B, N, C]`."""
        return self.scale * self.adapter(x)


def inject_adaptformer(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap every `blocks.*.mlp` of a timm ViT in `AdaptFormerMLP`; returns the wrapped module names."""
    return replace_modules(vit, "blocks.*.mlp",
                           lambda mlp: AdaptFormerMLP(mlp, dim=cfg.dim, scale=cfg.scale, dropout=cfg.dropout))


ADAPTFORMER = PETMethod("adaptformer", "AdaptFormer", inject_adaptformer)
