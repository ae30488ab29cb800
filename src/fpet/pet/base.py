"""What every PET method shares: the layer that wraps a module, the block-level hook, and the registry record.

- `PETLayer` wraps the module it adapts as `base_layer` (frozen) and adds a small branch (LoRA, RepAdapter, ...).
- `BlockHook` is a PET part that acts at block level (prompt tokens before a block, a branch beside attention or the
  MLP, an adapter after the block). It is a child module of the block; the token-state forward (`fpet.vit`) calls
  every hook of a block at its points.
- `PETMethod` is a method's registry record: how it is injected, which parameters train, how it folds for
  inference, how its task tensors are packed and loaded, how its config is checked. Everything outside the
  method's own file reads the record (`fpet.pet.PET_METHODS`), never a list of method names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

if TYPE_CHECKING:
    from fpet.state import TokenState


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


class BlockHook(nn.Module):
    """A block-level PET part; override the points it acts at (the defaults do nothing).

    - `pre_block(state) -> state` before the block (e.g. insert or replace prompt tokens);
    - `attn_branch(x, h, state) -> [B, N, C] | None`: added to the residual stream with the attention output;
      `x` is the block input, `h = norm1(x)`;
    - `mlp_branch(x, h, state) -> [B, N, C] | None`: added with the MLP output; `x` is the stream before the MLP
      (after a merge), `h = norm2(x)`;
    - `post_block(state) -> state` after the block (e.g. a post-block adapter).

    Branches are added outside the block's drop-path and layer scale. Every parameter of a hook that is not a
    `PETLayer`'s `base_layer` is a PET parameter.
    """

    def pre_block(self, state: "TokenState") -> "TokenState":
        return state

    def attn_branch(self, x: Tensor, h: Tensor, state: "TokenState") -> Optional[Tensor]:
        return None

    def mlp_branch(self, x: Tensor, h: Tensor, state: "TokenState") -> Optional[Tensor]:
        return None

    def post_block(self, state: "TokenState") -> "TokenState":
        return state


class Bottleneck(nn.Module):
    """`up(dropout(act(down(x))))`: `[..., in_dim] -> [..., out_dim]` through `hidden` channels.

    `linear` builds the two projections (nn.Linear, or a 1-bit linear for the Bi- variants). The up-projection is
    zero-initialised when `up_std` is None (the adapter starts as an identity branch), else drawn from a narrow
    truncated normal (1-bit weights cannot be all zero).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, act: Optional[str] = None, dropout: float = 0.0,
                 bias: bool = False, linear: type[nn.Module] = nn.Linear, up_std: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
            raise ValueError(f"pet.dim={hidden!r}: the adapter hidden dim must be a positive integer")
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


def pet_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The default train rule: every parameter of a `PETLayer` or `BlockHook` except those of a wrapped
    `base_layer` (the frozen original module)."""
    frozen = {id(p) for m in model.modules() if isinstance(m, PETLayer) for p in m.base_layer.parameters()}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (PETLayer, BlockHook)):
            for param in module.parameters():
                if id(param) not in frozen and id(param) not in seen:
                    seen.add(id(param))
                    yield param


def no_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Train rule of the methods that add nothing (`full`, `linear`: `pet.trainable` decides)."""
    return iter(())


def no_problems(cfg: DictConfig) -> list[str]:
    """Default config check: a method whose rules are all enforced by its constructors (validation runs them on
    the meta device)."""
    return []


Injector = Callable[[nn.Module, DictConfig], list[str]]
"""`inject(vit, cfg.pet) -> names of the wrapped or attached modules` (in place)."""
Folder = Callable[[nn.Module], list[str]]
"""`fold(vit) -> names of the folded modules` (in place, eval mode; the model computes the same function)."""


@dataclass(frozen=True)
class PETMethod:
    """The registry record of one PET method (`fpet.pet.PET_METHODS[name]`).

    Attributes:
        name: the config name (`pet=<name>`, configs/pet/<name>.yaml).
        label: the row name in tables (`LoRA`, `Bi-AdaptFormer`).
        inject: adds the method to a timm ViT in place (wrap modules, attach block hooks).
        trainable: the parameters the method trains (the head and merge parameters always train; `pet.trainable`
            = all | head overrides the rule for full fine-tuning and linear probing).
        fold: re-parameterises the trained method into the backbone for inference (None: nothing folds).
        pack / load: the task file's tensors of a model, and their inverse (default: trained parameters, 1-bit
            layers as packed bits; `fpet.pet.pack`).
        check: config problems the constructors cannot see; `validate` also runs `inject` on the meta device.
        select: data-dependent set-up after injection, before the merges are placed (TR-PTS, GPS: score the
            weights on the training split and choose the entries that train), `select(model, cfg, source)` with
            the full config and a `fpet.select.ScoringInput` (device, score cache, or a task file to adopt the
            selection from); returns a summary. None: nothing to select.
    """

    name: str
    label: str
    inject: Injector
    trainable: Callable[[nn.Module], Iterator[nn.Parameter]] = pet_parameters
    fold: Optional[Folder] = None
    pack: Optional[Callable[[nn.Module, bool], dict[str, Tensor]]] = None
    load: Optional[Callable[[nn.Module, dict[str, Tensor]], None]] = None
    check: Callable[[DictConfig], list[str]] = no_problems
    select: Optional[Callable[[nn.Module, DictConfig, Any], dict]] = None
