"""Token selection by class-token attention: keep the patch tokens the class token attends to most and fuse the
rest into one token (TR-PTS's task-relevant token selection, `merge=trpts`; EViT, `merge=evit`).

At a selection block, after attention, the patch tokens are scored by the class token's attention row averaged
over heads, `a = mean_h cls_attn[:, h, prefix:]` (`[B, P]`, post-softmax, with the proportional-attention bias
when sizes are set). The top-k tokens stay in their original order; the other ones become one token appended
last, whose size is the sum of their sizes. The protected prefix (class, distillation, prompt tokens) stays first
and untouched. Later selection blocks treat the fused token as an ordinary token.

| | kept patch tokens | fused token | sizes |
|---|---|---|---|
| `trpts` | `floor(rho * P)` | `sum a_i x_i / sum a_i` (normalised) | summed, proportional attention after |
| `evit` | `ceil(rho * P)` (EViT: `math.ceil(keep_rate * (N - 1))`) | `sum a_i x_i` (EViT: not normalised) | summed only with `merge.prop_attn=true` (EViT has no proportional attention) |

EViT trains with a keep-rate warm-up: 1 before epoch `shrink_start`, then a cosine from 1 down to rho reached at
epoch `shrink_end` (EViT's `adjust_keep_rate`, per iteration); the training loop reports its progress
(`fpet.merge.base.set_train_progress`), evaluation always uses rho. As in EViT, a run shorter than `shrink_start`
epochs trains at keep rate 1 throughout (`merge.shrink_start=0 merge.shrink_end=0` trains at rho from the start).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor

from fpet.merge.base import TokenMerge
from fpet.state import TokenState

if TYPE_CHECKING:
    from fpet.merge.schedule import Geometry


def _take(t: Tensor, index: Tensor) -> Tensor:
    """`t [B, N, D]` at `index [B, K]` -> `[B, K, D]`."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def _keep_problem(cfg: DictConfig) -> list[str]:
    keep = cfg.get("keep")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        return [f"merge.keep={keep!r}: accepted a keep rate rho in (0, 1]"]
    return []


class ClassAttentionSelect(TokenMerge):
    """Keep the top-scored patch tokens, fuse the rest (shared by `trpts` and `evit`; see the module docstring)."""

    needs = frozenset({"cls_attn"})
    normalize: bool = True
    prop_attn: bool = True

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = float(keep)

    def hparams(self) -> dict:
        return {"keep": self.keep}

    def keep_rate(self) -> float:
        """The keep rate of this forward pass."""
        return self.keep

    def kept_count(self, patches: int, keep: float) -> int:
        raise NotImplementedError

    def forward(self, state: TokenState) -> TokenState:
        """`state [B, prefix + P]` -> `[B, prefix + k + 1]`: kept tokens in their order, then the fused token."""
        n = state.num_prefix
        scores = state.cls_attn.mean(dim=1)[:, n:]  # [B, P]
        patches = int(scores.shape[1])
        k = self.kept_count(patches, self.keep_rate())
        if k >= patches:
            return state
        order = scores.argsort(dim=1, descending=True)
        kept = order[:, :k].sort(dim=1).values
        rest = order[:, k:]
        weights = scores.gather(1, rest)[..., None]  # [B, R, 1]
        if self.normalize:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        x, size = state.x, state.sizes()

        def select(t: Tensor, fused: Tensor) -> Tensor:
            return torch.cat([t[:, :n], _take(t[:, n:], kept), fused], dim=1)

        rest_size = _take(size[:, n:], rest)
        new_size = select(size, rest_size.sum(dim=1, keepdim=True))
        out = select(x, (_take(x[:, n:], rest) * weights.to(x.dtype)).sum(dim=1, keepdim=True))
        mask = None
        if state.mask is not None:
            fused_mask = (_take(state.mask[:, n:], rest) * rest_size).sum(1, keepdim=True) / rest_size.sum(1, True)
            mask = select(state.mask, fused_mask)
        source = None
        if state.source is not None:
            source = select(state.source, _take(state.source[:, n:], rest).sum(dim=1, keepdim=True))
        keep_sizes = self.prop_attn or state.size is not None
        return state.replace(x=out, size=new_size if keep_sizes else None, mask=mask, source=source)


class TRPTSSelect(ClassAttentionSelect):
    """`merge=trpts`: TR-PTS's task-relevant token selection at its sparse-insertion blocks.

    `merge.layer=null` places it at the `merge.sparse_k` blocks with the fewest selected weight entries
    (`Geometry.sparse_order`, needs `pet=trpts` or `pet=gps`); a block index or a list places it there.
    """

    name, label = "trpts", "TR-PTS tokens"

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: "Geometry") -> "TRPTSSelect":
        return cls(cfg.keep)

    @classmethod
    def layers(cls, cfg: DictConfig, geo: "Geometry") -> tuple[list[int], list[str]]:
        if cfg.get("layer") is not None:
            return super().layers(cfg, geo)
        k = cfg.get("sparse_k")
        if geo.sparse_order is None:
            return [], [f"merge.layer=null: merge=trpts then selects tokens at the merge.sparse_k={k} blocks with the "
                        f"fewest selected parameters (TR-PTS's sparse insertion), which only a parameter-selecting PET "
                        f"method has: use pet=trpts or pet=gps, or give the blocks, e.g. merge.layer=[3,6,9]"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= geo.depth:
            return [], [f"merge.sparse_k={k!r}: accepted a block count 1..{geo.depth}"]
        return sorted(geo.sparse_order[:k]), []

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: "Geometry", layers: list[int]) -> list[str]:
        return _keep_problem(cfg)

    def kept_count(self, patches: int, keep: float) -> int:
        """`floor(rho * P)` (at least 1; rounded to 9 digits first so 0.95 * 20 is 19, not 18)."""
        return max(1, math.floor(round(keep * patches, 9)))


class EViTSelect(ClassAttentionSelect):
    """`merge=evit`: EViT (Liang et al. 2022) at blocks 3, 6, 9 with rho = 0.7 and its keep-rate warm-up."""

    name, label = "evit", "EViT"
    normalize = False

    def __init__(self, keep: float, shrink_start: int, shrink_end: int, prop_attn: bool) -> None:
        super().__init__(keep)
        self.shrink_start, self.shrink_end = int(shrink_start), int(shrink_end)
        self.prop_attn = bool(prop_attn)
        self.train_keep: Optional[float] = None  # set by the training loop each step (set_train_progress)

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: "Geometry") -> "EViTSelect":
        return cls(cfg.keep, cfg.shrink_start, cfg.shrink_end, cfg.prop_attn)

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: "Geometry", layers: list[int]) -> list[str]:
        problems = _keep_problem(cfg)
        start, end = cfg.get("shrink_start"), cfg.get("shrink_end")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, end)):
            problems.append(f"merge.shrink_start={start!r}, merge.shrink_end={end!r}: accepted epochs >= 0 (the "
                            f"keep-rate warm-up: 1 before shrink_start, rho from shrink_end on; 0 and 0: none)")
        if not isinstance(cfg.get("prop_attn"), bool):
            problems.append(f"merge.prop_attn={cfg.get('prop_attn')!r}: accepted true or false")
        return problems

    def hparams(self) -> dict:
        return {"keep": self.keep, "shrink": (self.shrink_start, self.shrink_end), "prop_attn": self.prop_attn}

    def kept_count(self, patches: int, keep: float) -> int:
        """EViT's `math.ceil(keep_rate * (N - 1))` (N - 1 = the patch tokens)."""
        return math.ceil(keep * patches)

    def keep_rate(self) -> float:
        return self.train_keep if self.training and self.train_keep is not None else self.keep

    def train_progress(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        self.train_keep = evit_keep_rate(iteration, epoch, self.shrink_start, self.shrink_end, iters_per_epoch,
                                         self.keep)


def evit_keep_rate(iteration: int, epoch: int, warmup_epochs: int, total_epochs: int, iters_per_epoch: int,
                   base_keep_rate: float, max_keep_rate: float = 1.0) -> float:
    """EViT's keep-rate schedule (`helpers.adjust_keep_rate`): 1 before `warmup_epochs`, `base_keep_rate` from
    `total_epochs` on, a cosine between them over the iterations (`iteration` counts from the first epoch)."""
    if epoch < warmup_epochs:
        return max_keep_rate
    if epoch >= total_epochs:
        return base_keep_rate
    total = iters_per_epoch * (total_epochs - warmup_epochs)
    done = iteration - iters_per_epoch * warmup_epochs
    return base_keep_rate + (max_keep_rate - base_keep_rate) * (math.cos(done / total * math.pi) + 1) * 0.5
