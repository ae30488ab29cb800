"""FPET's bipartite differentiable matching with a key-refinement adapter (paper section 4.2, Eq. 9-14).

At one layer (block 6 of ViT-B/16):

1. keys `K [B, N, head_dim]` (head mean of the attention keys) are detached (gradient stop, `stop_grad`), refined
   `K' = K + s * up(dropout(relu(down(K))))` by a 1-bit adapter (64 -> 32 -> 64, no biases) and L2-normalised;
2. checkerboard split: A = patches with (row + col) even, B = the others; the class (and distillation) tokens are
   in neither set, which equals the official code's `-inf` class-token column;
3. scores `C = K'_A K'_B^T [B, Na, Nb]`; soft matrix `sigmoid(C - mean(top1, top2))`; hard matrix one-hot at the
   row maximum; straight-through `M = hard + soft - soft.detach()`;
4. every A token merges into its B match: `x_B + M^T x_A`, size-weighted (the base class), giving
   [prefix, B] = 99 tokens on ViT-B/16 in B's order.

Gradients reach the refinement adapter through `M` (never the backbone keys when `stop_grad`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.merge.base import Reduce, TokenMerge
from fpet.merge.bipartite import split_positions, split_problems
from fpet.merge.schedule import Geometry, is_int
from fpet.pet.base import Bottleneck
from fpet.pet.binary import BinaryLinear
from fpet.state import TokenState

REFINE_BITS = {1: BinaryLinear, 32: nn.Linear}
"""`merge.refine_bits` -> linear layer of the refinement adapter (1-bit as the paper; 32 = full precision)."""


def bipartite_differentiable_matching(scores: Tensor) -> Tensor:
    """Matching matrix `[B, Na, Nb]` from similarity scores `[B, Na, Nb]` (Nb >= 2).

    Forward value: one-hot rows at the most similar B token (exactly one-hot even with ties). Gradient: that of the
    soft matrix `sigmoid(scores - mean(top1, top2))` (straight-through estimator). Without grad mode only the hard
    matrix is built.
    """
    hard = F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
    if not torch.is_grad_enabled():
        return hard
    top2 = scores.topk(2, dim=-1).values
    soft = torch.sigmoid(scores - top2.mean(dim=-1, keepdim=True))
    return hard + (soft - soft.detach())  # exactly `hard` in the forward pass


def key_refinement(head_dim: int, hidden: int, bits: int = 1, dropout: float = 0.1) -> Bottleneck:
    """The refinement adapter `up(dropout(relu(down(k))))`: `[..., head_dim] -> [..., head_dim]`, no biases.

    1-bit: both projections binarised, up drawn from N(0, 0.001) truncated to +-0.002 (a 1-bit weight cannot be
    all zero); 32-bit: up zero-initialised. Both as the official code.
    """
    if bits not in REFINE_BITS:
        raise ValueError(f"merge.refine_bits={bits} is not supported; use one of {sorted(REFINE_BITS)}")
    return Bottleneck(head_dim, hidden, head_dim, act="relu", dropout=dropout, linear=REFINE_BITS[bits],
                      up_std=0.001 if bits == 1 else None)


class FPETMerge(TokenMerge):
    """`merge=fpet`: bipartite differentiable matching of refined keys; every A token merges into set B.

    Args:
        head_dim: width of the head-mean keys (64 on ViT-B/16).
        split: `checkerboard` (paper) or `stripe`.
        stop_grad: detach the keys before refinement (paper); False is Table 3's "without gradient stopping" row.
        refine_dim: hidden width of the adapter (None = head_dim // 2); refine_bits: 1 or 32; scale: s of Eq. 10.
        size_grad: let gradients flow through the merged sizes into later proportional attention, as the official
            code's explicit attention does. Off by default: a mask that needs a gradient forces the unfused
            attention path in training (see docs/differences.md).
    """

    name, label = "fpet", "FPET"

    def __init__(self, head_dim: int, split: str = "checkerboard", stop_grad: bool = True,
                 refine_dim: Optional[int] = None, refine_bits: int = 1, scale: float = 1.0,
                 size_grad: bool = False) -> None:
        super().__init__()
        self.split, self.stop_grad, self.scale, self.size_grad = split, stop_grad, scale, size_grad
        if refine_dim is not None and (not is_int(refine_dim) or refine_dim < 1):
            raise ValueError(f"merge.refine_dim={refine_dim} must be a positive int (or null for head_dim // 2)")
        self.refinement = key_refinement(head_dim, head_dim // 2 if refine_dim is None else refine_dim, refine_bits)

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "FPETMerge":
        return cls(geo.head_dim, split=cfg.split, stop_grad=bool(cfg.stop_grad), refine_dim=cfg.refine_dim,
                   refine_bits=int(cfg.refine_bits), size_grad=bool(cfg.size_grad))

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        problems = split_problems(cfg.get("split"), geo, layers, min_b=2,  # top-2 needs two candidates
                                  accepted=("stripe", "checkerboard"))
        if cfg.get("r") is not None:
            problems.append(f"merge.r={cfg.r!r}: merge=fpet merges every token of set A (the split fixes how many); "
                            f"accepted null")
        if cfg.get("refine_bits") not in REFINE_BITS:
            problems.append(f"merge.refine_bits={cfg.get('refine_bits')!r}: accepted {sorted(REFINE_BITS)}")
        dim = cfg.get("refine_dim")
        if dim is not None and (not is_int(dim) or dim < 1):
            problems.append(f"merge.refine_dim={dim!r}: accepted a positive integer or null (head_dim // 2)")
        return problems

    def hparams(self) -> dict:
        return {"split": self.split, "stop_grad": self.stop_grad, "size_grad": self.size_grad}

    def refine_keys(self, keys: Tensor) -> Tensor:
        """`K [B, N, d] -> normalise(K + s * refinement(K))`, with the gradient stop on `K`."""
        if self.stop_grad:
            keys = keys.detach()
        return F.normalize(keys + self.scale * self.refinement(keys), dim=-1)

    def match(self, state: TokenState) -> Reduce:
        a_idx, b_idx = split_positions(self.split, state)
        k = self.refine_keys(state.keys)
        matching = bipartite_differentiable_matching(k.index_select(1, a_idx) @ k.index_select(1, b_idx).mT)
        prefix = state.num_prefix
        device = state.x.device
        out_idx = torch.cat([torch.arange(prefix, device=device), b_idx])  # output layout: [prefix, B]
        into_out = F.pad(matching, (prefix, 0)).mT  # [B, P + Nb, Na]: prefix rows receive nothing

        def reduce(t: Tensor, mode: str) -> Tensor:
            t_a, t_out = t.index_select(1, a_idx), t.index_select(1, out_idx)
            if mode == "sum":
                return torch.baddbmm(t_out, into_out.to(t.dtype), t_a)
            # an elementwise reduction has no matrix form: the hard assignment only
            dst = (matching.argmax(dim=-1) + prefix)[..., None].expand_as(t_a)
            return t_out.scatter_reduce(1, dst, t_a, reduce=mode)

        return reduce

    def forward(self, state: TokenState) -> TokenState:
        state = super().forward(state)
        return state if self.size_grad else state.replace(size=state.size.detach())
