"""PiToMe: energy-guided token merging (Tran et al., NeurIPS 2024), as `merge=pitome`.

At every block it sits at (every block by default), between attention and MLP, on the head-mean keys of the
`T` non-prefix tokens (prefix tokens: class, distillation, prompts, never merged and kept first):

1. cosine similarities `S = K̂ K̂ᵀ` `[B, T, T]` (`K̂` the normalised keys) and the energy of each token
   `E_i = mean_j ELU(S_ij - m_l)` (alpha 1) with the margin `m_l = margin * (1 - l / L)` at block l of L
   (official: 0.75 - 0.75 l / L); tokens sorted by energy, highest first;
2. `r = floor(T - T * ratio)` tokens are removed (official expression, in Python floats);
3. blocks `l < ceil(L / 2)` (official `pitome_bsm`): every token in energy order, alternately into A and B; the `r`
   A tokens whose best B match is most similar merge into it (ToMe's bipartite soft matching on that split);
   later blocks (official `pitome`): only the `2r` highest-energy tokens may merge, alternately A and B, and every A
   token merges into its most similar B token; the others are protected;
4. size-weighted average of each group (`merge_wavg`), sizes summed.

The official timm patch keeps the sizes for the weighted averages but does not give them to attention (no
proportional attention): `merge.prop_attn=false` (default) does the same (`TokenState.prop_attn`); true adds
`log(size)` as ToMe does. Layout after a merge: [prefix, unmerged or protected tokens, B tokens], as the official
code orders them. No gradient flows through the matching.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from fpet.merge.base import Reduce, TokenMerge
from fpet.merge.bipartite import gather_tokens
from fpet.merge.schedule import Geometry, _show
from fpet.state import TokenState


def energy_order(keys: Tensor, margin: float, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """PiToMe's energy score: `keys [B, T, d]` -> (cosine similarities `S [B, T, T]`, token indices `[B, T]` by
    energy `mean_j ELU(S_ij - margin, alpha)`, highest first)."""
    k = F.normalize(keys, p=2, dim=-1)
    sim = k @ k.mT
    energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
    return sim, energy.argsort(dim=-1, descending=True)


def pitome_matching(sim: Tensor, order: Tensor, r: int, bsm: bool, num_prefix: int) -> Reduce:
    """Group the non-prefix tokens given their similarities `sim [B, T, T]` and energy order `order [B, T]`.

    `bsm` (first half of the blocks): A = order[0::2], B = order[1::2]; the `r` A tokens with the most similar B
    token merge into it. Otherwise: A = order[0:2r:2], B = order[1:2r:2], every A merges into its best B; the rest
    (order[2r:]) are protected. Returns `reduce(t [B, N, D], mode) -> [B, N - r, D]` laid out as [prefix,
    unmerged (bsm: by decreasing match) or protected (energy order), B (energy order)].
    """
    batch, T, _ = sim.shape
    with torch.no_grad():
        if bsm:
            a_idx, b_idx = order[:, 0::2], order[:, 1::2]
        else:
            a_idx, b_idx = order[:, 0:2 * r:2], order[:, 1:2 * r:2]
            keep_idx = order[:, 2 * r:]
        scores = sim.gather(2, b_idx[:, None, :].expand(batch, T, b_idx.shape[1]))
        scores = scores.gather(1, a_idx[:, :, None].expand(batch, a_idx.shape[1], b_idx.shape[1]))
        best, dst = scores.max(dim=-1)  # [B, Na]
        if bsm:
            edges = best.argsort(dim=-1, descending=True)
            keep_idx = a_idx.gather(1, edges[:, r:])
            src_idx = a_idx.gather(1, edges[:, :r])
            dst = dst.gather(1, edges[:, :r])
        else:
            src_idx = a_idx
        keep_idx, src_idx, b_idx = keep_idx + num_prefix, src_idx + num_prefix, b_idx + num_prefix

    def reduce(t: Tensor, mode: str) -> Tensor:
        merged = gather_tokens(t, b_idx).scatter_reduce(1, dst[..., None].expand(-1, -1, t.shape[-1]),
                                                       gather_tokens(t, src_idx), reduce=mode)
        return torch.cat([t[:, :num_prefix], gather_tokens(t, keep_idx), merged], dim=1)

    return reduce


class PiToMe(TokenMerge):
    """`merge=pitome`: one block of PiToMe (see the module docstring).

    Args:
        ratio: keep ratio of the block's non-prefix tokens, in [0.5, 1] (`r = floor(T - T * ratio)` removed).
        margin: the block's energy margin `m_l`.
        bsm: the first-half rule (bipartite soft matching over all tokens in energy order) or the later one.
        prop_attn: give the merged sizes to attention (`log(size)`); PiToMe's code does not.
    """

    name, label = "pitome", "PiToMe"
    needs = frozenset({"keys"})
    every_block = True

    def __init__(self, ratio: float, margin: float, bsm: bool, prop_attn: bool = False) -> None:
        super().__init__()
        self.ratio, self.margin, self.bsm, self.prop_attn = float(ratio), float(margin), bool(bsm), bool(prop_attn)

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "PiToMe":
        return cls.build(cfg, geo, [geo.depth // 2])[geo.depth // 2]

    @classmethod
    def build(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> dict[int, TokenMerge]:
        """Block l gets its ratio (one value, or the list's entry), margin `margin * (1 - l / L)` and rule
        (bipartite for `l < ceil(L / 2)`)."""
        ratios = keep_ratios(cfg.ratio, len(layers))
        first_half = math.ceil(geo.depth * 0.5)
        return {layer: cls(ratio, cfg.margin - cfg.margin * (layer / geo.depth), layer < first_half, cfg.prop_attn)
                for layer, ratio in zip(layers, ratios)}

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        problems = ratio_problems(cfg.get("ratio"), len(layers))
        margin = cfg.get("margin")
        if not _number(margin) or not 0 <= margin <= 1:
            problems.append(f"merge.margin={margin!r}: the energy margin of block 0 (m_l = margin * (1 - l / L), "
                            f"PiToMe: 0.75); accepted a number in [0, 1]")
        if not isinstance(cfg.get("prop_attn"), bool):
            problems.append(f"merge.prop_attn={cfg.get('prop_attn')!r}: accepted true or false")
        return problems

    def hparams(self) -> dict:
        return {"ratio": self.ratio, "margin": round(self.margin, 6), "bsm": self.bsm}

    def removed(self, tokens: int) -> int:
        """`r = floor(T - T * ratio)` for `T` non-prefix tokens (PiToMe's expression)."""
        return math.floor(tokens - tokens * self.ratio) if self.ratio < 1.0 else 0

    def match(self, state: TokenState) -> Reduce:
        P = state.num_prefix
        r = self.removed(state.num_tokens - P)
        with torch.no_grad():
            sim, order = energy_order(state.keys[:, P:].detach(), self.margin)
        return pitome_matching(sim, order, r, self.bsm, P)

    def forward(self, state: TokenState) -> TokenState:
        """`state [B, P + T] -> [B, P + T - r]`: size-weighted merges; sizes kept (in attention only with
        `prop_attn`)."""
        if self.removed(state.num_tokens - state.num_prefix) == 0:
            return state
        return dataclasses.replace(super().forward(state), prop_attn=self.prop_attn)


def keep_ratios(ratio: Any, count: int) -> list[float]:
    """`merge.ratio` (one keep ratio, or one per merging block) as a list of `count` floats."""
    if isinstance(ratio, (list, tuple, ListConfig)):
        return [float(v) for v in ratio]
    return [float(ratio)] * count


def ratio_problems(ratio: Any, count: int) -> list[str]:
    """A keep ratio in [0.5, 1] (at most half of the tokens merge per block: the later blocks pair the 2r
    highest-energy tokens), or a list of them, one per merging block."""
    values = list(ratio) if isinstance(ratio, (list, tuple, ListConfig)) else [ratio]
    accepted = (f"accepted a keep ratio in [0.5, 1] (PiToMe: 0.9 to 0.975; at most half of a block's tokens can "
                f"merge) or a list of {count}, one per merging block (merge.layer)")
    if not all(_number(v) and 0.5 <= v <= 1 for v in values):
        return [f"merge.ratio={_show(ratio)}: {accepted}"]
    if isinstance(ratio, (list, tuple, ListConfig)) and len(values) != count:
        return [f"merge.ratio={_show(ratio)}: {len(values)} values for {count} merging block(s); {accepted}"]
    return []


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

