"""LTMP: learned thresholds for token merging and pruning (Bonnaerens & Dambre, TMLR 2023), as `merge=ltmp`.

At each block it sits at (every block by default), between attention and MLP:

1. **merge**: bipartite edges on head-mean keys (cosine): the kept non-prefix tokens alternate between set A (even
   sequence index, as ToMe's `x[::2]`) and set B; an A token merges into its most similar B token when that
   similarity exceeds the block's learned merge threshold `theta_m` (size-weighted, sizes add up);
2. **prune**: then every token whose importance, the attention it receives (mean over heads and over the kept
   queries; a B token that absorbed A tokens takes the max of theirs and its own), is at or below the learned prune
   threshold `theta_p` is dropped. Prefix tokens (class, distillation, prompts) are never merged or pruned.

Training (the official `threshold_masking.py`): masks `sigmoid((v - theta) / tau)` (tau 0.1) with straight-through
hard values (`v > theta` in the forward pass), kept in `state.mask` and applied as attention masks (the explicit
masked softmax, `fpet.vit.masked_softmax`), so the batch keeps its shape; the loss adds `reg_scale * (FLOPs ratio -
reduction_target)^2` (`relative_flops`, the official formula) and the thresholds are clamped to [0, 1] after each
step. Initial thresholds: merge 0.9, prune 0 (the training code; its inference classes start at 1 and 0).

Inference: the same decisions with hard masks. With batch size 1 the dropped tokens are really removed (fewer
tokens, fewer FLOPs); with a larger batch the kept counts differ per image, so the masked form is used and nothing
is saved (`merge.inference=auto`); `merge.inference=masked` always masks. Because the split alternates over the
*kept* tokens in their order, and the importance averages over kept queries only, masked and removed forms make
the same decisions (docs/differences.md lists where this departs from the official code).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.merge.base import TokenMerge
from fpet.merge.schedule import Geometry
from fpet.state import TokenState

INFERENCE_MODES = ("auto", "masked")


def threshold_mask(values: Tensor, threshold: Tensor, tau: float) -> Tensor:
    """`values > threshold` as 0/1 in the forward pass, with the gradient of `sigmoid((values - threshold) / tau)`
    (straight-through estimator). Without grad mode only the hard mask is built."""
    hard = (values > threshold).to(threshold.dtype)
    if not torch.is_grad_enabled():
        return hard
    soft = torch.sigmoid((values - threshold) / tau)
    return soft + (hard - soft).detach()


def relative_flops(trace: tuple, dim: int) -> Tensor | float:
    """LTMP's FLOPs ratio of a traced forward against the unreduced model (official `train.py`):
    `mean_l [2 n_l d^2 + n_l^2 d + 4 n'_l d^2] / (6 n d^2 + n^2 d)` with `n_l`, `n'_l` the effective tokens at
    block l's attention and MLP (`TokenState.trace`) and `n` the input length."""
    n = trace[0][0]
    full = 6 * n * dim ** 2 + n ** 2 * dim
    per_block = [(2 * a * dim ** 2 + a ** 2 * dim + 4 * m * dim ** 2) / full for a, m in trace]
    return sum(per_block) / len(per_block)


def alternate_kept(mask: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Sets A and B `[B, N]` (bool) of the kept non-prefix tokens, alternating in sequence order: the k-th kept
    token is in A when `k + num_prefix` is even (ToMe's even / odd split when nothing was dropped)."""
    kept = mask[..., 0] > 0
    kept[:, :num_prefix] = False
    rank = kept.cumsum(dim=1) - 1
    in_a = kept & ((rank + num_prefix) % 2 == 0)
    return in_a, kept & ~in_a


class LTMP(TokenMerge):
    """`merge=ltmp`: learned-threshold merging then pruning at one block.

    Args:
        tau: temperature of the soft masks (0.1).
        merge_init, prune_init: initial thresholds (0.9 and 0, the official training code).
        reduction_target: FLOPs ratio the budget loss aims at (0.75); reg_scale: its weight (10).
        inference: `auto` (tokens removed at batch size 1, masked otherwise) or `masked`.
    """

    name, label = "ltmp", "LTMP"
    needs = frozenset({"keys", "attn_received"})
    every_block = True
    static_tokens = False

    def __init__(self, tau: float = 0.1, merge_init: float = 0.9, prune_init: float = 0.0,
                 reduction_target: float = 0.75, reg_scale: float = 10.0, inference: str = "auto") -> None:
        super().__init__()
        self.tau, self.reduction_target, self.reg_scale, self.inference = tau, reduction_target, reg_scale, inference
        self.merge_threshold = nn.Parameter(torch.full((1,), float(merge_init)))
        self.prune_threshold = nn.Parameter(torch.full((1,), float(prune_init)))

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "LTMP":
        return cls(float(cfg.tau), float(cfg.merge_init), float(cfg.prune_init), float(cfg.reduction_target),
                   float(cfg.reg_scale), str(cfg.inference))

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        problems = []
        for key in ("merge_init", "prune_init"):
            value = cfg.get(key)
            if not _number(value) or not 0 <= value <= 1:
                problems.append(f"merge.{key}={value!r}: a threshold (cosine similarity / mean attention, clamped to "
                                f"[0, 1] in training); accepted a number in [0, 1]")
        if not _number(cfg.get("tau")) or cfg.get("tau") <= 0:
            problems.append(f"merge.tau={cfg.get('tau')!r}: accepted a positive number (0.1 in LTMP)")
        target = cfg.get("reduction_target")
        if not _number(target) or not 0 < target <= 1:
            problems.append(f"merge.reduction_target={target!r}: the FLOPs ratio to reach; accepted (0, 1]")
        if not _number(cfg.get("reg_scale")) or cfg.get("reg_scale") < 0:
            problems.append(f"merge.reg_scale={cfg.get('reg_scale')!r}: accepted a number >= 0")
        if cfg.get("inference") not in INFERENCE_MODES:
            problems.append(f"merge.inference={cfg.get('inference')!r}: accepted {list(INFERENCE_MODES)}")
        return problems

    def hparams(self) -> dict:
        return {"tau": self.tau, "inference": self.inference}

    def constrain(self) -> None:
        with torch.no_grad():
            self.merge_threshold.clamp_(0.0, 1.0)
            self.prune_threshold.clamp_(0.0, 1.0)

    def aux_loss(self, state: TokenState) -> Optional[Tensor]:
        if not self.training or self.reg_scale == 0 or not state.trace:
            return None
        ratio = relative_flops(state.trace, state.x.shape[-1])
        return self.reg_scale * (ratio - self.reduction_target) ** 2

    def forward(self, state: TokenState) -> TokenState:
        """`state [B, N] -> state`: masked `[B, N]` (training, or inference at batch > 1) or `[1, N']` with the
        dropped tokens removed (inference at batch size 1, `inference=auto`)."""
        x, size, P = state.x, state.sizes(), state.num_prefix
        B, N, _ = x.shape
        mask = state.mask if state.mask is not None else x.new_ones(B, N, 1)
        in_a, in_b = alternate_kept(mask.detach(), P)

        # 1. merge: A -> most similar B, when the similarity exceeds the merge threshold
        k = F.normalize(state.keys.detach(), dim=-1)
        scores = (k @ k.mT).masked_fill(~in_b[:, None, :], -math.inf)  # [B, N, N]: rows A, columns B
        best, dst = scores.max(dim=-1)  # [B, N]
        best = best.masked_fill(~in_a, -math.inf)
        merged = threshold_mask(best, self.merge_threshold, self.tau)  # [B, N], 1 where an A token merges
        hard = merged.detach()[..., None]
        into = dst[..., None]
        weighted = (x * size).scatter_add(1, into.expand_as(x), x * size * hard)
        size = size.scatter_add(1, into, size * hard)
        x = weighted / size
        source = None if state.source is None else state.source.scatter_add(
            1, into.expand_as(state.source), state.source * hard)
        mask = torch.where(in_a[..., None], 1.0 - merged[..., None], mask)

        # 2. prune: importance = attention received (a B token takes the max over the A tokens it absorbed)
        importance = state.attn_received
        absorbed = (importance * hard[..., 0]).to(importance.dtype)  # one dtype under autocast (bf16 hard mask)
        importance = importance.scatter_reduce(1, dst, absorbed, reduce="amax")
        importance = torch.cat([importance.new_full((B, P), math.inf), importance[:, P:]], dim=1)
        kept = mask.detach() > 0
        mask = torch.where(kept, threshold_mask(importance, self.prune_threshold, self.tau)[..., None], mask)

        if not self.training and self.inference == "auto" and B == 1:  # remove the dropped tokens
            keep = (mask[0, :, 0] > 0).nonzero()[:, 0]
            if torch.compiler.is_compiling():  # torch.export: the data-dependent count holds the prefix (always
                torch._check(keep.shape[0] > P)  # kept) and a patch token, so slicing off the prefix (prompts)
                # and broadcasting attention's bias [1, 1, 1, N] need no guard on it
            return state.replace(x=x[:, keep], size=size[:, keep], mask=None,
                                 source=None if source is None else source[:, keep])
        return state.replace(x=x, size=size, mask=mask, source=source)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
