"""FacT (Jie & Deng 2023): factor-tuning, the weight deltas of all blocks as one factorised tensor.

Shared by the whole model: `U` (C -> r, nn.Linear's default init) and `V` (r -> C, zero), so a fresh model is the
backbone. Each adapted linear adds `s * V(dropout(U(x) @ M))` with r x r core matrices `M` per block:

| layer | delta (as the FacT code) | cores |
|---|---|---|
| `attn.qkv` | `cat_j V(dp(U x @ M_j))`, j = q, k, v | 3 of r x r |
| `attn.proj` | `V(dp(U x @ M_o))` (x: the proj input) | 1 of r x r |
| `mlp.fc1` | `V(dp(U x @ M_fc1).unflatten(k, r)).flatten()`: k = hidden / C output chunks | r x kr |
| `mlp.fc2` | `V(dp(U(x.unflatten(k, C)).flatten() @ M_fc2))`: the hidden read as k chunks of C | kr x r |

- `fact_tt` (tensor train): the cores are free per block (nn.Linear without bias, default init, as the code's
  `*_FacTs`): ViT-B/16 `1536 r + 144 r^2` (r = 8: 21,504).
- `fact_tk` (Tucker): one core tensor `C [r, r, r]` and factor `P [r, depth * (4 + 2k)]` (both xavier-uniform);
  block i's matrices are `C @ P[:, 12 i : 12 i + 12]` (ViT-B/16, k = 4: q, k, v, o, then 4 + 4 MLP chunks):
  `1536 r + 144 r + r^3` (r = 8: 13,952).

Dropout 0.1 on the r-dimensional activations (FacT code). Every delta is linear in the layer input, so it folds
exactly into the frozen weight for inference (`fold_fact`): `W' = W + s A` with `A` the delta's matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.base import PETLayer, PETMethod
from fpet.pet.fold import fold_layers, linear_with
from fpet.pet.inject import replace_modules

KINDS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
"""Block-relative name of each adapted linear -> its kind."""


def check_rank(rank: object, width: int) -> int:
    """`rank` if it is an integer in 1..width, else a ValueError naming `pet.dim` and the fix."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= width:
        raise ValueError(f"pet.dim={rank!r}: the rank must be an integer in 1..{width} (the width), e.g. pet.dim=8")
    return rank


class FacTFactors(nn.Module):
    """The model-wide factors: `u` (C -> r), `v` (r -> C, zero) and, for FacT-TK, `core [r, r, r]` and
    `p [r, depth * per_block]`. Shared (one module) by every `FacTLinear` of the model."""

    def __init__(self, width: int, rank: int, tucker: bool, depth: int, per_block: int) -> None:
        super().__init__()
        check_rank(rank, width)
        self.u = nn.Linear(width, rank, bias=False)
        self.v = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.v.weight)
        if tucker:
            self.core = nn.Parameter(torch.empty(rank, rank, rank))
            self.p = nn.Parameter(torch.empty(rank, depth * per_block))
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.p)


class FacTLinear(PETLayer):
    """One adapted linear (`kind`: qkv, proj, fc1, fc2) of block `block`: `base(x) + s * delta(x)`."""

    def __init__(self, base_layer: nn.Linear, kind: str, factors: FacTFactors, block: int, scale: float,
                 dropout: float, tucker: bool) -> None:
        super().__init__(base_layer)
        self.kind, self.block, self.scale, self.tucker = kind, block, scale, tucker
        self.factors = factors
        self.dropout = nn.Dropout(dropout)
        width, rank = factors.u.in_features, factors.u.out_features
        self.chunks = max(base_layer.in_features, base_layer.out_features) // width      # k of the MLP
        if kind in ("fc1", "fc2") and self.chunks * width != max(base_layer.in_features, base_layer.out_features):
            raise ValueError(f"FacT needs an MLP hidden width that is a multiple of the width {width}")
        if not tucker:  # FacT-TT: this layer's own cores, as nn.Linear(in, out) without bias
            shapes = {"qkv": [(rank, rank)] * 3, "proj": [(rank, rank)], "fc1": [(rank, self.chunks * rank)],
                      "fc2": [(self.chunks * rank, rank)]}[kind]
            self.cores = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes)

    def matrices(self) -> list[Tensor]:
        """The r-space matrices `M` (applied as `u @ M`): qkv 3 x [r, r], proj [r, r], fc1 [r, kr], fc2 [kr, r]."""
        if not self.tucker:
            return [core.weight.t() for core in self.cores]
        f, k = self.factors, self.chunks
        rank = f.core.shape[0]
        start = self.block * (4 + 2 * k)
        if self.kind in ("qkv", "proj"):
            cp = f.core @ f.p[:, start:start + 4]                                 # [r, r, 4]
            return [cp[:, :, j] for j in range(3)] if self.kind == "qkv" else [cp[:, :, 3]]
        cp = f.core @ f.p[:, start + 4:start + 4 + 2 * k]                         # [r, r, 2k]
        if self.kind == "fc1":
            return [cp[:, :, :k].reshape(rank, k * rank)]
        return [cp[:, :, k:].reshape(rank, k * rank).t()]

    def delta(self, x: Tensor, u: Tensor, v: Tensor, mats: list[Tensor], dropout: nn.Module) -> Tensor:
        """`delta(x)` without the scale from explicit factors (the forward's, or float64 ones for folding):
        `[..., in] -> [..., out]`."""
        if self.kind == "qkv":
            h = F.linear(x, u)
            return torch.cat([F.linear(dropout(h @ m), v) for m in mats], dim=-1)
        if self.kind == "proj":
            return F.linear(dropout(F.linear(x, u) @ mats[0]), v)
        if self.kind == "fc1":
            h = dropout(F.linear(x, u) @ mats[0])                                 # [..., k r]
            return F.linear(h.unflatten(-1, (self.chunks, -1)), v).flatten(-2)
        h = F.linear(x.unflatten(-1, (self.chunks, -1)), u).flatten(-2)          # [..., k r]
        return F.linear(dropout(h @ mats[0]), v)

    def forward(self, x: Tensor) -> Tensor:
        f = self.factors
        return self.base_layer(x) + self.scale * self.delta(x, f.u.weight, f.v.weight, self.matrices(),
                                                            self.dropout)

    @torch.no_grad()
    def delta_matrix(self) -> Tensor:
        """The delta as a float64 `[out, in]` matrix (the delta applied to the identity), scale included."""
        f = self.factors
        eye = torch.eye(self.base_layer.in_features, dtype=torch.float64, device=f.u.weight.device)
        mats = [m.double() for m in self.matrices()]
        return self.scale * self.delta(eye, f.u.weight.double(), f.v.weight.double(), mats, nn.Identity()).t()


def inject_fact(vit: nn.Module, cfg: DictConfig, tucker: bool) -> list[str]:
    """Wrap `qkv`, `proj`, `fc1`, `fc2` of every block in `FacTLinear` with one shared `FacTFactors`."""
    width = vit.embed_dim
    hidden = vit.blocks[0].mlp.fc1.out_features
    factors = FacTFactors(width, cfg.dim, tucker, len(vit.blocks), 4 + 2 * (hidden // width))
    names = []
    for i in range(len(vit.blocks)):
        for rel, kind in KINDS.items():
            names += replace_modules(vit, f"blocks.{i}.{rel}", lambda m, kind=kind, i=i: FacTLinear(
                m, kind, factors, i, scale=cfg.scale, dropout=cfg.dropout, tucker=tucker))
    return names


def inject_fact_tt(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """FacT-TT on every block's qkv, proj, fc1, fc2; returns the wrapped module names."""
    return inject_fact(vit, cfg, tucker=False)


def inject_fact_tk(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """FacT-TK on every block's qkv, proj, fc1, fc2; returns the wrapped module names."""
    return inject_fact(vit, cfg, tucker=True)


def fold_fact_layer(layer: FacTLinear) -> nn.Linear:
    """The frozen linear with the delta added: `W' = W + s A` (float64, cast back)."""
    base = layer.base_layer
    return linear_with(base, base.weight.double() + layer.delta_matrix(), base.bias)


def fold_fact(vit: nn.Module) -> list[str]:
    """Fold every `FacTLinear` of a timm ViT into a plain linear in place; returns the folded names."""
    return fold_layers(vit, FacTLinear, fold_fact_layer)


FACT_TT = PETMethod("fact_tt", "FacT-TT", inject_fact_tt, fold=fold_fact)
FACT_TK = PETMethod("fact_tk", "FacT-TK", inject_fact_tk, fold=fold_fact)
