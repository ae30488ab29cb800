"""What every PET layer shares: it wraps the module it adapts as `base_layer` and adds a small branch."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn


class PETLayer(nn.Module):
    """Base class: `base_layer` is the frozen original module; every other parameter is the PET branch."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def pet_parameters(self) -> Iterator[nn.Parameter]:
        """The branch's own parameters (everything not under `base_layer`)."""
        for name, param in self.named_parameters():
            if not name.startswith("base_layer."):
                yield param


class Bottleneck(nn.Module):
    """`up(dropout(act(down(x))))`: `[..., in_dim] -> [..., out_dim]` through `hidden` channels.

    `linear` builds the two projections (nn.Linear, or a 1-bit linear for the Bi- variants). The up-projection is
    zero-initialised when `up_std` is None (the adapter starts as an identity branch), else drawn from a narrow
    truncated normal (1-bit weights cannot be all zero).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        act: Optional[str] = None,
        dropout: float = 0.0,
        bias: bool = False,
        linear: type[nn.Module] = nn.Linear,
        up_std: Optional[float] = None,
    ) -> None:
        super().__init__()
        if hidden <= 0:
            raise ValueError(f"adapter hidden dim must be > 0, got {hidden} (set pet.dim to a positive integer)")
        self.down = linear(in_dim, hidden, bias=bias)
        self.act = {None: nn.Identity(), "relu": nn.ReLU(), "gelu": nn.GELU()}[act]
        self.dropout = nn.Dropout(dropout)
        self.up = linear(hidden, out_dim, bias=bias)
        with torch.no_grad():
            if up_std is None:
                nn.init.zeros_(self.up.weight)
            else:
                nn.init.trunc_normal_(self.up.weight, std=up_std, a=-2 * up_std, b=2 * up_std)
            if bias:
                nn.init.zeros_(self.down.bias)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(x))))
