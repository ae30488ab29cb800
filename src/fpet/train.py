"""The training loop: build, train, evaluate, measure, write results (DESIGN sections 3 and 7).

Recipe (paper Table A8 + official code): AdamW, lr 1e-3, weight decay 1e-4, batch 64, cosine schedule with
warm-up stepped once per epoch as the official code does (`scheduler.step(e)` after epoch e, so epochs 0 and 1 both
run at the warm-up start value and epoch e >= 1 at the schedule's value for e - 1), drop-path 0.1, no augmentation.
Evaluation every `train.eval_every` epochs and after the last: `acc` is the final accuracy, `acc_best` the best
periodic one (the official code's protocol).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fpet.checkpoint import save_task
from fpet.data import Loaders, build_loaders
from fpet.model import build_model
from fpet.profile import profile_model
from fpet.results import RunLogger, build_results, format_summary, write_json_atomic

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return device


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False) -> float:
    """Top-1 accuracy in % over `loader`."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        total += labels.numel()
    return 100.0 * correct / max(total, 1)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    bar: tqdm, amp: bool = False, limit_batches: Optional[int] = None) -> float:
    """One pass over `loader` (at most `limit_batches` batches); returns the mean loss."""
    model.train()
    total, steps = 0.0, 0
    for images, labels in loader:
        if limit_batches is not None and steps >= limit_batches:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    return total / max(steps, 1)


def fit(model: nn.Module, loaders: Loaders, cfg: DictConfig, device: torch.device,
        logger: RunLogger) -> dict[str, Any]:
    """Train for `train.epochs`; returns `acc`, `acc_best`, the evaluation history and the wall time."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optim.optimizer)(params=params)
    scheduler = instantiate(cfg.optim.scheduler)(optimizer=optimizer)
    epochs, every = int(cfg.train.epochs), int(cfg.train.eval_every)
    limit = cfg.train.get("limit_batches")
    steps_per_epoch = min(len(loaders.train), limit) if limit else len(loaders.train)
    evals: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, desc="train", unit="it", disable=not cfg.train.progress,
               dynamic_ncols=True)
    with bar:
        for epoch in range(epochs):
            lr = optimizer.param_groups[0]["lr"]
            loss = train_one_epoch(model, loaders.train, optimizer, device, bar, cfg.train.amp, limit)
            scheduler.step(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "lr": lr}
            if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                record["acc"] = evaluate(model, loaders.eval, device, cfg.train.amp)
                evals.append({"epoch": epoch + 1, "acc": record["acc"]})
                bar.set_description(f"train (acc {record['acc']:.1f}%)")
            logger.log(record, step=epoch + 1)
            log.info("epoch %d/%d  loss %.4f  lr %.2e%s", epoch + 1, epochs, loss, lr,
                     f"  {loaders.eval_split} acc {record['acc']:.2f}%" if "acc" in record else "")
    return {
        "acc": evals[-1]["acc"] if evals else None,
        "acc_best": max(e["acc"] for e in evals) if evals else None,
        "evals": evals,
        "train_seconds": time.perf_counter() - start,
        "train_split": loaders.train_split,
        "eval_split": loaders.eval_split,
    }


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """One run from a composed config: returns the results record, also written to `run_dir/results.json`."""
    run_dir = Path(run_dir)
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    loaders = build_loaders(cfg)
    model = build_model(cfg).to(device)
    log.info("run dir %s | %s on %s | %d trainable parameters", run_dir, cfg.backbone.name, device,
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    logger = RunLogger(cfg, run_dir)
    try:
        fit_out = fit(model, loaders, cfg, device, logger)
        storage = save_task(model, run_dir / "task.safetensors") if cfg.train.save_task else None
        efficiency = profile_model(model, cfg.bench, cfg.backbone.img_size, cfg.dataset.num_classes)
        results = build_results(cfg, fit_out, efficiency, storage, device)
        write_json_atomic(run_dir / "results.json", results)
    finally:
        logger.finish(locals().get("results"))
    print(format_summary(results, run_dir), flush=True)
    return results


def main(cfg: DictConfig, run_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Entry point used by `train.py`: the Hydra run dir unless one is given."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    return run(cfg, run_dir)
