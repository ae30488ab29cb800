"""DiffRate: differentiable compression rates (Chen et al., ICCV 2023), as `merge=diffrate`.

At each block it sits at (every block by default), between attention and MLP, with per-block token counts
`P_l` (kept after pruning) and `M_l` (kept after merging), both counting the class token and the patch tokens as the
official `compression_rate.json` does (other prefix tokens, e.g. prompts, come on top and are never touched):

1. the patch tokens are sorted by the class token's attention, mean over heads (`cls_attn`, post-softmax, with the
   proportional-attention bias), highest first; prefix tokens stay first;
2. **prune**: only the first `P_l - 1` patch tokens stay;
3. **merge**: each patch token beyond the first `M_l - 1` merges into its most cosine-similar token among them
   (metric: the block's features `x`, detached, not keys; prefix tokens are never destinations). Tokens are merged
   by a plain mean of the destination and its sources (official `scatter_reduce(mean)`), sizes by adding each
   source's size scaled by its match similarity (`size_src * sim`, the official rule for proportional attention).

Counts are static (`min(current, P_l, M_l)`), so the graph traces with a dynamic batch. The default schedule is
the published ViT-B (DeiT) one at 11.5 GFLOPs (official `compression_rate.json`).

**Rate search** (`merge.search.steps > 0`, `fpet.merge.diffrate_search`): a short stage before training, on a copy of the
model, learns each block's counts: per block two distributions over candidate counts (every `granularity`-th patch
count, softmax of learned logits, all equal at the start), the expected count rounded up with a straight-through
ceil; in the forward pass pruned and merged tokens stay in the sequence and are masked out of attention (masks with
straight-through gradients of `P(count > position)`); the loss is `CE + flops_weight * (GFLOPs - target)^2` with the
official differentiable FLOPs count. Block 0 is never compressed. The counts are written to
`<run dir>/diffrate_schedule.json` with the settings that produced them; a resumed run reads them back.
docs/token_reduction.md lists the readings and the differences from the official code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn

from fpet.errors import UserError
from fpet.fileio import write_text_atomic
from fpet.merge.base import TokenMerge
from fpet.merge.bipartite import gather_tokens
from fpet.merge.schedule import Geometry, _show, is_int
from fpet.state import TokenState

log = logging.getLogger(__name__)

SCHEDULE_NAME = "diffrate_schedule.json"
SEARCH_KEYS = ("steps", "batch_size", "target_gflops", "flops_weight", "arch_lr", "arch_min_lr", "granularity",
               "model_lr")


def sort_by_class_attention(state: TokenState, keep: int) -> tuple[Tensor, Tensor, Optional[Tensor],
                                                                     Optional[Tensor]]:
    """The prefix, then the `keep` patch tokens with the highest head-mean class-token attention, in that order:
    `(x [B, P + keep, C], size, mask, source)` (mask and source None when the state has none)."""
    P = state.num_prefix
    order = state.cls_attn.mean(dim=1)[:, P:].argsort(dim=1, descending=True)[:, :keep] + P
    index = torch.cat([torch.arange(P, device=order.device).expand(order.shape[0], P), order], dim=1)

    def take(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else gather_tokens(t, index)

    return take(state.x), take(state.sizes()), take(state.mask), take(state.source)


def similarity_match(x: Tensor, num_prefix: int, kept: int) -> tuple[Tensor, Tensor]:
    """DiffRate's merge partners: for each token after the first `num_prefix + kept` of `x [B, N, C]`, its most
    cosine-similar token among patch tokens `num_prefix .. num_prefix + kept` (no gradient). Returns (similarity
    `[B, N - P - kept]`, destination index into the kept patch tokens)."""
    with torch.no_grad():
        metric = F.normalize(x.detach(), dim=-1)
        end = num_prefix + kept
        return (metric[:, end:] @ metric[:, num_prefix:end].mT).max(dim=-1)


def merge_into(t: Tensor, num_prefix: int, kept: int, dst: Tensor, mode: str) -> Tensor:
    """`t [B, N, D]`: tokens after `num_prefix + kept` reduced (`mode`: mean / sum / amax, the destination
    included) into their destinations among the kept patch tokens -> `[B, num_prefix + kept, D]`."""
    end = num_prefix + kept
    index = dst[..., None].expand(-1, -1, t.shape[-1])
    if mode != "mean":
        merged = t[:, num_prefix:end].scatter_reduce(1, index, t[:, end:], reduce=mode)
    else:  # scatter_reduce(mean) as sum / count: the same values, and an ONNX graph (ScatterElements has no mean)
        ones = torch.ones_like(t[:, :, :1])
        count = ones[:, num_prefix:end].scatter_add(1, dst[..., None], ones[:, end:])
        merged = t[:, num_prefix:end].scatter_add(1, index, t[:, end:]) / count
    return torch.cat([t[:, :num_prefix], merged], dim=1)


class DiffRate(TokenMerge):
    """`merge=diffrate`: one block of DiffRate's prune-then-merge with fixed counts (see the module docstring).

    Args:
        prune_kept, merge_kept: class token + patch tokens kept after pruning / after merging (`P_l`, `M_l`).
    """

    name, label = "diffrate", "DiffRate"
    needs = frozenset({"cls_attn"})
    every_block = True

    def __init__(self, prune_kept: int, merge_kept: int) -> None:
        super().__init__()
        self.prune_kept, self.merge_kept = int(prune_kept), int(merge_kept)

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: Geometry) -> "DiffRate":
        return cls(cfg.prune_kept[0], cfg.merge_kept[0])

    @classmethod
    def build(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> dict[int, TokenMerge]:
        """Block `layers[i]` keeps `prune_kept[i]` then `merge_kept[i]` tokens."""
        return {layer: cls(p, m) for layer, p, m in zip(layers, cfg.prune_kept, cfg.merge_kept)}

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
        return schedule_problems(cfg, geo, layers) + search_problems(cfg.get("search"))

    @classmethod
    def prepare(cls, model: nn.Module, cfg: DictConfig, source: Any) -> Optional[dict[str, Any]]:
        """With `merge.search.steps > 0`: the searched schedule (read from the run directory, from the directory of
        the task file being evaluated, or searched now on the training split and written there) replaces the
        configured one in `model.merges`. Returns the schedule record, or None when nothing is searched."""
        from fpet.merge.diffrate_search import read_schedule, schedule_key, search_batches, search_schedule

        search = cfg.merge.search
        if int(search.steps) == 0:
            return None
        layers = sorted(int(k) for k in model.merges)
        if source.task_file is not None:
            record = read_schedule(Path(source.task_file).with_name(SCHEDULE_NAME), None)
            if record is None:
                raise ScheduleMissingError(
                    f"merge=diffrate merge.search.steps={search.steps}: the searched schedule {SCHEDULE_NAME} is not "
                    f"next to the task file {source.task_file}; copy it from the training run's directory (or "
                    f"evaluate with merge.search.steps=0 and the schedule as merge.prune_kept / merge.merge_kept)")
        else:
            path = None if source.cache is None else Path(source.cache).with_name(SCHEDULE_NAME)
            key = schedule_key(cfg, layers)
            record = read_schedule(path, key) if path is not None else None
            if record is None:
                model.to(source.device)
                record = search_schedule(model, cfg, layers, search_batches(cfg), source.device)
                record["key"] = key
                if path is not None:
                    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
            else:
                log.info("DiffRate schedule read from %s (not searched again)", path)
        model.place_merges({layer: cls(p, m) for layer, p, m in zip(layers, record["prune_kept"],
                                                                    record["merge_kept"])})
        return record

    def hparams(self) -> dict:
        return {"prune_kept": self.prune_kept, "merge_kept": self.merge_kept}

    def counts(self, patches: int) -> tuple[int, int]:
        """Patch tokens left after pruning and after merging, from `patches` patch tokens."""
        pruned = min(patches, self.prune_kept - 1)
        return pruned, min(pruned, self.merge_kept - 1)

    def forward(self, state: TokenState) -> TokenState:
        """`state [B, P + T] -> [B, P + min(T, P_l - 1, M_l - 1)]`: sorted, pruned, merged; prefix first."""
        P = state.num_prefix
        pruned, merged = self.counts(state.num_tokens - P)
        if merged == state.num_tokens - P:
            return state  # nothing removed (the official code sorts anyway: the same outputs in another order)
        x, size, mask, source = sort_by_class_attention(state, pruned)
        if merged < pruned:
            sim, dst = similarity_match(x, P, merged)
            if mask is not None:
                mask = merge_into(mask * size, P, merged, dst, "sum") / merge_into(size, P, merged, dst, "sum")
            weighted = torch.cat([size[:, :P + merged], size[:, P + merged:] * sim.clamp_min(0)[..., None]], dim=1)
            x = merge_into(x, P, merged, dst, "mean")
            size = merge_into(weighted, P, merged, dst, "sum")
            source = None if source is None else merge_into(source, P, merged, dst, "amax")
        return state.replace(x=x, size=size, mask=mask, source=source)


class ScheduleMissingError(UserError, FileNotFoundError):
    """An evaluation of a searched DiffRate run cannot find the schedule the run searched."""


# ------------------------------------------------------------------ config rules


def schedule_problems(cfg: DictConfig, geo: Geometry, layers: list[int]) -> list[str]:
    """`merge.prune_kept` / `merge.merge_kept`: one count per merging block, each 2 .. 1 + patches."""
    problems = []
    top = 1 + geo.num_patches
    for key in ("prune_kept", "merge_kept"):
        value = cfg.get(key)
        values = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
        accepted = (f"accepted a list of {len(layers)} token counts (class token + patch tokens kept, 2..{top}), one "
                    f"per merging block (merge.layer)")
        if values is None or not all(is_int(v) and 2 <= v <= top for v in values):
            problems.append(f"merge.{key}={_show(value)}: {accepted}")
        elif len(values) != len(layers):
            problems.append(f"merge.{key}={_show(value)}: {len(values)} counts for {len(layers)} merging block(s); "
                            f"{accepted}. The default is DiffRate's 12-block ViT-B schedule")
    return problems


def search_problems(search: Any) -> list[str]:
    """`merge.search`: steps >= 0 and, when searching, positive sizes, rates and target."""
    if not isinstance(search, (dict, DictConfig)):
        return [f"merge.search={search!r}: accepted a group with keys {list(SEARCH_KEYS)}"]
    problems = [f"merge.search.{k}: missing; accepted keys {list(SEARCH_KEYS)}" for k in SEARCH_KEYS if k not in search]
    if problems:
        return problems
    if not is_int(search.steps) or search.steps < 0:
        problems.append(f"merge.search.steps={search.steps!r}: accepted an integer >= 0 (0: no search, the "
                        f"configured schedule)")
    for k in ("batch_size", "granularity"):
        if not is_int(search[k]) or search[k] < 1:
            problems.append(f"merge.search.{k}={search[k]!r}: accepted a positive integer")
    for k in ("target_gflops", "arch_lr"):
        if not _number(search[k]) or search[k] <= 0:
            problems.append(f"merge.search.{k}={search[k]!r}: accepted a positive number")
    for k in ("flops_weight", "arch_min_lr", "model_lr"):
        if not _number(search[k]) or search[k] < 0:
            problems.append(f"merge.search.{k}={search[k]!r}: accepted a number >= 0")
    return problems


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
