"""The training loop: build, train, evaluate, measure, write results (docs/architecture.md).

Recipe (paper Table A8 + official code): AdamW, lr 1e-3, weight decay 1e-4, batch 64, cosine schedule with
warm-up stepped once per epoch as the official code does (`scheduler.step(e)` after epoch e, so epochs 0 and 1 both
run at the warm-up start value and epoch e >= 1 at the schedule's value for e - 1), drop-path 0.1, no augmentation.
Evaluation every `train.eval_every` epochs and after the last: `acc` is the final accuracy, `acc_best` the best
periodic one (the official code's protocol).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from fpet.checkpoint import load_task, save_task
from fpet.data import Loaders, build_loaders, split_record
from fpet.errors import UserError
from fpet.merge import set_train_progress
from fpet.pipeline import Session, open_session
from fpet.precision import autocast, compiled_forward
from fpet.resume import RollingCheckpoint, TrainState
from fpet.results import RunLogger, build_results, format_summary, write_json_atomic
from fpet.select import CACHE_NAME
from fpet.vit import training_loss

log = logging.getLogger(__name__)


def to_device(batch: tuple[Tensor, Tensor], device: torch.device, preprocess: Optional[Callable]
              ) -> tuple[Tensor, Tensor]:
    """Move a loader batch to `device`, then turn its uint8 images into float model input there."""
    images, labels = batch
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return (preprocess(images) if preprocess is not None else images), labels


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, precision: str = "fp32",
             preprocess: Optional[Callable] = None, forward: Optional[Callable] = None) -> float:
    """Top-1 accuracy in % over `loader`, in inference mode under `precision`'s autocast.

    The count of correct predictions stays on the device: one host sync per evaluation, not one per batch.
    `forward` (default `model`) is what is called on a batch, e.g. the compiled forward (`train.compile`).
    """
    model.eval()
    forward = model if forward is None else forward
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    for batch in loader:
        images, labels = to_device(batch, device, preprocess)
        with autocast(device, precision):
            logits = forward(images)
        correct += (logits.argmax(dim=-1) == labels).sum()
        total += labels.shape[0]
    return 100.0 * correct.item() / max(total, 1)


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the run stops and keeps its last good rolling checkpoint."""


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device,
                    bar: tqdm, epoch: int, precision: str = "fp32", limit_batches: Optional[int] = None,
                    preprocess: Optional[Callable] = None, loss_fn: Optional[Callable] = None) -> float:
    """One pass over `loader` (at most `limit_batches` batches) under `precision`'s autocast; returns the mean loss.
    `loss_fn(images, labels)` (default `training_loss` of `model`: cross-entropy plus the merge strategies'
    auxiliary losses) is what is called on a batch, e.g. its compiled form (`train.compile`).

    Raises `NonFiniteLossError` (naming epoch, step and lr) before a non-finite loss can reach the weights.
    """
    model.train()
    loss_fn = functools.partial(training_loss, model) if loss_fn is None else loss_fn
    total, steps = 0.0, 0
    per_epoch = min(len(loader), limit_batches) if limit_batches is not None else len(loader)
    for batch in loader:
        if limit_batches is not None and steps >= limit_batches:
            break
        set_train_progress(model, epoch, steps, per_epoch)  # training schedules of merge strategies (EViT)
        images, labels = to_device(batch, device, preprocess)
        with autocast(device, precision):
            loss = loss_fn(images, labels)
        value = loss.item()  # the one host sync of the step
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch + 1}, step {steps + 1} (lr "
                f"{optimizer.param_groups[0]['lr']:.3e}); stopped before updating the weights. Lower "
                f"optim.optimizer.lr or check the data; the last good rolling checkpoint is kept.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(model, "constrain_parameters"):
            model.constrain_parameters()
        total += value
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    return total / max(steps, 1)


def fused_kwargs(factory: Callable, params: list[nn.Parameter]) -> dict[str, Any]:
    """`{"fused": True}` when every parameter is a CUDA float tensor and the optimizer takes `fused` (AdamW): one
    kernel for the whole update instead of one per parameter tensor. Empty otherwise (the CPU keeps the default
    implementation, so CPU runs repeat their numbers exactly)."""
    import inspect

    target = getattr(factory, "func", factory)
    try:
        accepts = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        accepts = False
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if accepts and on_cuda else {}


def build_optimization(cfg: DictConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (fused on CUDA) and the epoch-stepped cosine schedule, from
    `cfg.optim`."""
    params = [p for p in model.parameters() if p.requires_grad]
    factory = instantiate(cfg.optim.optimizer)
    optimizer = factory(params=params, **fused_kwargs(factory, params))
    return optimizer, instantiate(cfg.optim.scheduler)(optimizer=optimizer)


def _keep_fused(optimizer: torch.optim.Optimizer, fused: Optional[bool]) -> None:
    """A restored optimizer state carries the `fused` flag of the machine that wrote it; keep this machine's."""
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = fused


def _progress_bar(cfg: DictConfig, loaders: Loaders, state: TrainState) -> tqdm:
    limit = cfg.train.get("limit_batches")
    steps = min(len(loaders.train), limit) if limit else len(loaders.train)
    return tqdm(total=int(cfg.train.epochs) * steps, initial=state.epoch * steps, desc="train", unit="it",
                disable=not cfg.train.progress, dynamic_ncols=True)


def fit(model: nn.Module, loaders: Loaders, cfg: DictConfig, device: torch.device, logger: RunLogger,
        run_dir: Path, final_model: Optional[Callable[[nn.Module], nn.Module]] = None) -> dict[str, Any]:
    """Train for `train.epochs`, resuming from `run_dir/last.ckpt` if an earlier attempt left one.

    Returns `acc`, `acc_best`, the evaluation history and the training wall time. The evaluation after the last
    epoch runs on `final_model(model)` when given (the re-parameterised copy).
    """
    optimizer, scheduler = build_optimization(cfg, model)
    fused = optimizer.param_groups[0].get("fused") if optimizer.param_groups else None
    ckpt = RollingCheckpoint(run_dir / "last.ckpt", cfg)
    state = ckpt.restore(model, optimizer, scheduler, loaders.train)
    _keep_fused(optimizer, fused)
    precision, compile_ = str(cfg.train.get("precision", "fp32")), bool(cfg.train.get("compile", False))
    forward = compiled_forward(model, compile_)
    loss_fn = compiled_forward(functools.partial(training_loss, model), compile_)
    resumed_from = state.epoch
    if state.epoch:
        log.info("resuming from %s after epoch %d", ckpt.path, state.epoch)
        logger.truncate(state.epoch)
    epochs, every = int(cfg.train.epochs), int(cfg.train.eval_every)
    with _progress_bar(cfg, loaders, state) as bar:
        for epoch in range(state.epoch, epochs):
            start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            loss = train_one_epoch(model, loaders.train, optimizer, device, bar, epoch, precision,
                                   cfg.train.get("limit_batches"), loaders.preprocess, loss_fn)
            scheduler.step(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "lr": lr,
                                      "train_seconds": time.perf_counter() - start}  # the loss syncs every step
            if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                last = epoch + 1 == epochs and final_model is not None
                eval_start = time.perf_counter()
                target = final_model(model) if last else model
                record["acc"] = evaluate(target, loaders.eval, device, precision, loaders.preprocess,
                                         forward if target is model else compiled_forward(target, compile_))
                record["eval_seconds"] = time.perf_counter() - eval_start
                state.evals.append({"epoch": epoch + 1, "acc": record["acc"]})
                bar.set_description(f"train (acc {record['acc']:.1f}%)")
            state.epoch, state.train_seconds = epoch + 1, state.train_seconds + time.perf_counter() - start
            logger.log(record, step=epoch + 1)  # before the checkpoint: a resume cuts lines after its epoch
            ckpt.save(model, optimizer, scheduler, loaders.train, state)
            log.info("epoch %d/%d  loss %.4f  lr %.2e%s", epoch + 1, epochs, loss, lr,
                     f"  {loaders.eval_split} acc {record['acc']:.2f}%" if "acc" in record else "")
    return {
        "acc": state.evals[-1]["acc"] if state.evals else None,
        "acc_best": max(e["acc"] for e in state.evals) if state.evals else None,
        "evals": state.evals,
        "train_seconds": state.train_seconds,
        "train_split": loaders.train_split,
        "eval_split": loaders.eval_split,
        "checkpoint": ckpt,
        "resumed_from_epoch": resumed_from,
    }


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """One run from a composed config: returns the results record, also written to `run_dir/results.json`.

    The pipeline (`fpet.pipeline`): the config is validated before any data is read or model built; the model
    trains (resuming from its rolling checkpoint when an earlier attempt was interrupted), is folded once for the
    final evaluation and the profile, and its task file is written; the checkpoint is removed once results.json
    is written (`train.keep_last_ckpt` keeps it).
    """
    session = open_session(cfg)
    if cfg.get("eval_only"):
        return evaluate_checkpoint(session, run_dir)
    run_dir = Path(run_dir)
    loaders = build_loaders(cfg, session.device)
    model = session.build(score_cache=run_dir / CACHE_NAME)
    log.info("run dir %s | %s on %s | %d trainable parameters", run_dir, cfg.backbone.name, session.device,
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    logger = RunLogger(cfg, run_dir)
    results = None
    try:
        fit_out = fit(model, loaders, cfg, session.device, logger, run_dir, lambda m: session.inference()[0])
        if cfg.train.save_task:
            save_task(model, run_dir / "task.safetensors", session.task_info())
        results = finish(session, fit_out, {**split_record(cfg, loaders), **kept_tokens_record(session, loaders)},
                         saved=cfg.train.save_task)
        write_json_atomic(run_dir / "results.json", results)
        if not cfg.train.get("keep_last_ckpt", False):
            fit_out["checkpoint"].path.unlink(missing_ok=True)
    finally:
        logger.finish(results)
    print(format_summary(results, run_dir), flush=True)
    return results


def finish(session: Session, fit_out: dict[str, Any], extra: dict[str, Any], saved: bool = True) -> dict[str, Any]:
    """The results record of a trained or loaded model: accuracy from `fit_out`, the profile, storage."""
    from fpet.data.provenance import data_provenance
    from fpet.hparams import hparams_record

    efficiency = session.profile()
    storage = session.storage() if saved else {"storage_bytes": None, "storage_bytes_no_head": None}
    extra = {"reparameterized": efficiency["reparameterized"],
             "storage_bytes_no_head": storage["storage_bytes_no_head"],
             "data": data_provenance(session.cfg), "hparams": hparams_record(session.cfg), **extra}
    return build_results(session.cfg, fit_out, efficiency, storage["storage_bytes"], session.device, extra)


def kept_tokens_record(session: Session, loaders: Loaders) -> dict[str, Any]:
    """`tokens_kept` (mean / min / max over the evaluation split) for strategies whose count varies per image."""
    from fpet.profile import kept_token_stats

    stats = kept_token_stats(session.inference()[0], loaders.eval, session.device, loaders.preprocess)
    return {} if stats is None else {"tokens_kept": stats}


def evaluate_checkpoint(session: Session, run_dir: str | Path) -> dict[str, Any]:
    """`eval_only=true checkpoint=PATH`: the backbone of the config plus a task file -> eval-split accuracy,
    profile, results.json (in `run_dir`, or `run_dir/eval/` when `run_dir` holds the training run's results)."""
    cfg, run_dir = session.cfg, Path(run_dir)
    loaders = build_loaders(cfg, session.device)
    model = session.build(task_file=cfg.checkpoint)
    info = load_task(model, cfg.checkpoint, session.task_info())
    infer = session.inference()[0]
    acc = evaluate(infer, loaders.eval, session.device, str(cfg.train.get("precision", "fp32")), loaders.preprocess,
                   compiled_forward(infer, bool(cfg.train.get("compile", False))))
    fit_out = {"acc": acc, "acc_best": None, "evals": [{"epoch": None, "acc": acc}], "train_split": None,
               "eval_split": loaders.eval_split}
    # epochs: what the task file trained (recorded since it has them), not the config's train.epochs
    results = finish(session, fit_out, {"eval_only": True, "checkpoint": str(cfg.checkpoint),
                                        "epochs": info.get("epochs"), **split_record(cfg, loaders, trained=False),
                                        **kept_tokens_record(session, loaders)})
    from fpet.launch import eval_output_dir

    out = eval_output_dir(run_dir) / "results.json"  # never overwrites the training run's results
    write_json_atomic(out, results)
    print(format_summary(results, out.parent), flush=True)
    return results


from fpet.launch import main  # noqa: E402,F401  (train.py's entry: skip / refuse / record around `run`)
