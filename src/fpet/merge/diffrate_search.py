"""DiffRate's rate search (`merge.search.steps > 0`): a short stage before training that learns the per-block counts
`P_l`, `M_l` of `merge=diffrate` (fpet.merge.diffrate, whose module docstring describes the method) and writes them
to `<run dir>/diffrate_schedule.json`; `DiffRate.prepare` calls it."""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fpet.merge.base import TokenMerge
from fpet.merge.diffrate import merge_into, similarity_match, sort_by_class_attention
from fpet.merge.schedule import Geometry
from fpet.state import TokenState

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the rate search


class _CeilSTE(torch.autograd.Function):
    """`ceil` forward, identity gradient (official `ste_ceil`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.ceil(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _MinSTE(torch.autograd.Function):
    """`min(n, a, b)` forward; the gradient goes to `a` and `b` unchanged, none to `n` (official `ste_min`)."""

    @staticmethod
    def forward(ctx: Any, n: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.minimum(n, torch.minimum(a, b))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        return None, grad, grad


class RateProxy(nn.Module):
    """A learned count of kept tokens (official `ddp.DiffRate`): candidates `patches, patches - g, ... > 0` patch
    tokens, a softmax over them (logits start equal), the expected count rounded up with a straight-through ceil,
    plus the class token."""

    def __init__(self, patches: int, granularity: int) -> None:
        super().__init__()
        self.register_buffer("candidates", torch.arange(patches, 0, -granularity).float(), persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))

    def kept(self) -> Tensor:
        """Class token + expected patch count, ceil with straight-through gradient (a 0-dim tensor)."""
        return _CeilSTE.apply(self.candidates @ self.logits.softmax(dim=-1)) + 1

    def token_mask(self, kept: int, upto: int, patches: int) -> Tensor:
        """`[patches]` over the sorted patch tokens: 0 at positions `kept - 1 .. upto - 1` (the tokens this step
        removes), 1 elsewhere, with the straight-through gradient of `P(count > position)`."""
        probs = self.logits.softmax(dim=-1)
        position = torch.arange(patches, device=probs.device, dtype=probs.dtype)
        keep_prob = ((position[:, None] < self.candidates[None, :]).to(probs.dtype) * probs).sum(dim=-1)
        hard = torch.ones_like(keep_prob)
        hard[kept - 1:upto - 1] = 0
        return hard - keep_prob.detach() + keep_prob


class DiffRateSearch(TokenMerge):
    """One block of the rate search (not a registered strategy): the official training-mode block. Tokens are
    sorted by class-token attention; pruned and merged tokens stay (masked out of attention from the next block
    on), merged tokens are also averaged into their destinations."""

    name = "diffrate_search"
    needs = frozenset({"cls_attn"})

    def __init__(self, patches: int, granularity: int) -> None:
        super().__init__()
        self.prune = RateProxy(patches, granularity)
        self.merge = RateProxy(patches, granularity)

    def forward(self, state: TokenState) -> TokenState:
        P = state.num_prefix
        B, N, _ = state.x.shape
        T = N - P
        x, size, mask, source = sort_by_class_attention(state, T)
        mask = x.new_ones(B, N, 1) if mask is None else mask
        last = int(mask[0, P:].detach().sum().round()) + 1  # kept tokens (class + patches): sorted first
        prune_kept = int(self.prune.kept())
        if prune_kept < last:
            mask = mask * torch.cat([mask.new_ones(P), self.prune.token_mask(prune_kept, last, T)])[None, :, None]
        mid = min(last, prune_kept)
        merge_kept = int(self.merge.kept())
        if merge_kept < mid:
            kept, end = merge_kept - 1, P + mid - 1
            head = x[:, :end]
            sim, dst = similarity_match(head, P, kept)
            merged = merge_into(head, P, kept, dst, "mean")
            x = torch.cat([merged, x[:, P + kept:]], dim=1)
            scaled = torch.cat([size[:, :P + kept], size[:, P + kept:end] * sim[..., None]], dim=1).clamp(min=1)
            size = torch.cat([merge_into(scaled, P, kept, dst, "sum"), scaled[:, P + kept:], size[:, end:]], dim=1)
            mask = mask * torch.cat([mask.new_ones(P), self.merge.token_mask(merge_kept, mid, T)])[None, :, None]
        return state.replace(x=x, size=size, mask=mask, source=source)


def search_flops(proxies: dict[int, DiffRateSearch], geo: Geometry, patch_size: int, num_classes: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """The official differentiable FLOPs count (multiply-adds) of one image: per block `4 N C^2 + 2 N^2 C` (attention)
    and `8 N' C^2` (MLP) with `N' = min(N, P_l, M_l)` (straight-through), plus patch embedding and head."""
    C = geo.embed_dim
    extra = geo.num_prefix - 1  # prefix tokens beside the class token (prompts) are never removed
    N = torch.tensor(float(geo.num_prefix + geo.num_patches), device=device)
    flops = N * C * patch_size * patch_size * 3 + C * num_classes
    for layer in range(geo.depth):
        flops = flops + 4 * N * C * C + 2 * N * N * C
        if layer in proxies:
            N = _MinSTE.apply(N, proxies[layer].prune.kept() + extra, proxies[layer].merge.kept() + extra)
        flops = flops + 8 * N * C * C
    return flops


def search_batches(cfg: DictConfig) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """Batches of the run's training split (shuffled by `seed`, `merge.search.batch_size`), as float input,
    repeated without end."""

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader

        from fpet.data import build_dataset, protocol_splits
        from fpet.data.transforms import ToFloat

        dataset = build_dataset(cfg.dataset, protocol_splits(cfg.dataset.protocol)[0], cfg.paths.data_dir)
        loader = DataLoader(dataset, batch_size=int(cfg.merge.search.batch_size), shuffle=True,
                            generator=torch.Generator().manual_seed(int(cfg.seed)))
        to_float = ToFloat(cfg.dataset.get("normalize", "none"))
        while True:
            for images, labels in loader:
                yield to_float(images), labels

    return batches


def search_schedule(model: nn.Module, cfg: DictConfig, layers: list[int],
                    batches: Callable[[], Iterator[tuple[Tensor, Tensor]]], device: torch.device | str = "cpu"
                    ) -> dict[str, Any]:
    """DiffRate's rate search on a copy of `model` (a `TokenViT`) for `merge.search.steps` steps; `model` is not
    changed. The rate logits train with AdamW (lr `arch_lr` -> `arch_min_lr` by cosine over the steps, no weight
    decay, as the official search); the model's trainable parameters (PET, head) train beside them at `model_lr`
    (0: frozen as in the official search, which starts from a trained head). Block 0 is never compressed.
    Returns `{"prune_kept": [...], "merge_kept": [...], "gflops": ..., "steps": ...}` over `layers`."""
    from fpet.merge.schedule import geometry

    search = cfg.merge.search
    geo = geometry(model.vit)
    patch_size = int(cfg.backbone.img_size) // geo.grid[0]
    work = copy.deepcopy(model).train()
    proxies = {layer: DiffRateSearch(geo.num_patches, int(search.granularity)) for layer in layers if layer != 0}
    full = 1 + geo.num_patches
    if not proxies:  # block 0 only: never compressed
        return {"prune_kept": [full] * len(layers), "merge_kept": [full] * len(layers), "gflops": None, "steps": 0}
    work.place_merges(proxies)
    work.to(device)
    arch = [p for m in proxies.values() for p in m.parameters()]
    groups = [{"params": arch, "lr": float(search.arch_lr), "weight_decay": 0.0}]
    trained = [p for n, p in work.named_parameters() if p.requires_grad and not n.startswith("merges.")]
    if float(search.model_lr) > 0 and trained:
        groups.append({"params": trained, "lr": float(search.model_lr), "weight_decay": 0.0})
    else:
        for p in trained:
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups)
    num_classes = int(cfg.dataset.num_classes)
    steps = int(search.steps)
    stream = batches()
    for step in range(steps):
        cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.param_groups[0]["lr"] = float(search.arch_min_lr) + (float(search.arch_lr) -
                                                                      float(search.arch_min_lr)) * cosine
        images, labels = next(stream)
        images, labels = images.to(device), labels.to(device)
        flops = search_flops(proxies, geo, patch_size, num_classes, device)
        loss = F.cross_entropy(work(images), labels) + float(search.flops_weight) * (
            flops / 1e9 - float(search.target_gflops)) ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        flops = search_flops(proxies, geo, patch_size, num_classes, device)
    prune = [full if layer == 0 else int(proxies[layer].prune.kept()) for layer in layers]
    merge = [full if layer == 0 else int(proxies[layer].merge.kept()) for layer in layers]
    log.info("DiffRate search (%d steps): prune_kept %s, merge_kept %s, %.3f GFLOPs (target %s)", steps, prune, merge,
             float(flops) / 1e9, search.target_gflops)
    return {"prune_kept": prune, "merge_kept": merge, "gflops": float(flops) / 1e9, "steps": steps}


def schedule_key(cfg: DictConfig, layers: list[int]) -> dict[str, Any]:
    """What decides a searched schedule (a stored one is reused only for the same values)."""
    pick = {"merge": ("layer",), "dataset": ("name", "protocol", "normalize", "num_classes", "img_size", "data_seed"),
            "backbone": ("name", "arch", "checkpoint", "kwargs", "img_size")}
    key = {f"{group}.{k}": OmegaConf.to_container(cfg[group], resolve=True).get(k)
           for group, keys in pick.items() for k in keys}
    key["merge.search"] = OmegaConf.to_container(cfg.merge.search, resolve=True)
    key["pet"] = OmegaConf.to_container(cfg.pet, resolve=True)
    key["layers"], key["seed"] = layers, int(cfg.seed)
    return json.loads(json.dumps(key, sort_keys=True))


def read_schedule(path: Optional[Path], key: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The schedule stored at `path` if it was searched with `key` (any key when None), else None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        record = json.loads(Path(path).read_text())
        if key is not None and record.get("key") != key:
            log.warning("%s was searched with other settings; searching again", path)
            return None
        if not (isinstance(record["prune_kept"], list) and isinstance(record["merge_kept"], list)):
            return None
        return record
    except (ValueError, KeyError, OSError) as err:
        log.warning("cannot read the DiffRate schedule %s (%s); searching again", path, err)
        return None
