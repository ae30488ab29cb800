"""How long the merge modules take inside one inference forward pass (paper: 0.56% of the pipeline latency).

Forward hooks on every merge module (device-synchronised on CUDA) add up the time spent in them; the same loop
times the whole forward pass, so the fraction comes from one measurement.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_merge_time(model: nn.Module, batch: int, img_size: int, repeats: int = 10, warmup: int = 3
                       ) -> dict[str, Optional[float]]:
    """`merge_ms` (per image, inside merge modules: refinement, matching and merging) and `merge_frac` (their share
    of the whole forward pass), medians over `repeats` inference batches; None for a model without merges."""
    merges = list(getattr(model, "merges", nn.ModuleDict()).values())
    if not merges:
        return {"merge_ms": None, "merge_frac": None}
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    spent: list[float] = []
    starts: list[float] = []

    def before(module: nn.Module, args: tuple) -> None:
        _sync(device)
        starts.append(time.perf_counter())

    def after(module: nn.Module, args: tuple, out: tuple) -> None:
        _sync(device)
        spent.append(time.perf_counter() - starts.pop())

    handles = [h for m in merges for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    was_training = model.training
    model.eval()
    in_merge, total = [], []
    try:
        with torch.inference_mode():
            for i in range(warmup + max(1, repeats)):
                spent.clear()
                _sync(device)
                start = time.perf_counter()
                model(images)
                _sync(device)
                if i >= warmup:
                    total.append(time.perf_counter() - start)
                    in_merge.append(sum(spent))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"merge_ms": 1000.0 * statistics.median(in_merge) / batch,
            "merge_frac": statistics.median(m / t for m, t in zip(in_merge, total))}
