"""Efficiency measurement, the same for every method.

- FLOPs: fvcore convention (one multiply-add = one FLOP), per image, with the attention matmuls inside
  `F.scaled_dot_product_attention` counted (fvcore does not see into the fused op). ViT-B/16 at 224: 17.58 G.
- Latency: inference at `bench.infer_batch`, median of `bench.repeats` timed batches after `bench.warmup`,
  device-synchronised; per-image milliseconds and images per second.
- Training: seconds per iteration (forward + backward + AdamW step) at `bench.train_batch`; megabytes of tensors
  saved for backward in one step (parameters excluded; deterministic and comparable across machines); CUDA peak
  allocated memory of a step when on a GPU.
- Parameters: PET (trainable, head and merge excluded: the Table 2 convention), head, merge.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.pet.inject import head_module
from fpet.vit import training_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """`params_pet` (trainable minus head and merge), `params_head`, `params_merge`, `params_trainable`,
    `params_total`."""
    head = list(head_module(model).parameters())
    merge = list(getattr(model, "merges", nn.ModuleDict()).parameters())
    excluded = {id(p) for p in head + merge}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "params_pet": sum(p.numel() for p in trainable if id(p) not in excluded),
        "params_head": sum(p.numel() for p in head),
        "params_merge": sum(p.numel() for p in merge),
        "params_trainable": sum(p.numel() for p in trainable),
        "params_total": sum(p.numel() for p in model.parameters()),
    }


def _sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOPs of `scaled_dot_product_attention(q [.., N, d], k [.., M, d], v [.., M, dv])`: QK^T and AV."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model: nn.Module, img_size: int, device: torch.device | str = "cpu") -> float:
    """GFLOPs per image of one forward pass at `img_size` (fvcore, eval mode)."""
    was_training = model.training
    model.eval()
    images = torch.randn(1, 3, img_size, img_size, device=device)
    try:
        with warnings.catch_warnings():  # torch.jit deprecation notices from fvcore's import and tracer
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            analysis = FlopCountAnalysis(model, images)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return analysis.total() / 1e9
    finally:
        model.train(was_training)


@torch.no_grad()
def count_tokens_out(model: nn.Module, img_size: int, device: torch.device | str = "cpu") -> Optional[int]:
    """Tokens entering the final norm (197 for ViT-B/16 without merging) for one seeded random image; None for a
    model without token state. A strategy whose count depends on the image (LTMP) gives that image's count (a
    constant image would merge all its identical patches); a run records the per-image mean and range on its data
    (`kept_token_stats`)."""
    if not hasattr(model, "forward_tokens"):
        return None
    was_training = model.training
    model.eval()
    try:
        image = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
        return int(model.forward_tokens(image).x.shape[1])
    finally:
        model.train(was_training)


@torch.no_grad()
def kept_token_stats(model: nn.Module, loader: Any, device: torch.device,
                     preprocess: Optional[Callable] = None) -> Optional[dict[str, Any]]:
    """Tokens each image keeps after the last block, over `loader` (strategies whose count varies per image, e.g.
    LTMP): mean, min, max, images, and the batch size it ran at (masked form; the same decisions as removal at
    batch size 1). None for a model without such a strategy."""
    merges = getattr(model, "merges", {})
    if all(getattr(m, "static_tokens", True) for m in merges.values()):
        return None
    was_training = model.training
    model.eval()
    counts, batch = [], None
    try:
        for images, _ in loader:
            images = images.to(device)
            batch = batch or int(images.shape[0])
            counts.append(model.forward_tokens(preprocess(images) if preprocess else images).kept_counts().cpu())
    finally:
        model.train(was_training)
    kept = torch.cat(counts).float()
    return {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max()), "images": int(kept.numel()),
            "batch": batch}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROGRESS_DELAY_S = 10.0
"""A measurement that takes longer than this shows a progress bar on stderr (ViT-B/16 at batch 256 on a CPU takes
minutes); shorter ones print nothing."""


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device,
                    desc: str = "measuring") -> float:
    from tqdm.auto import tqdm

    times = []
    with tqdm(total=warmup + max(1, repeats), desc=desc, unit="call", delay=PROGRESS_DELAY_S, leave=False,
              dynamic_ncols=True) as bar:
        for _ in range(warmup):
            fn()
            bar.update(1)
        for _ in range(max(1, repeats)):
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - start)
            bar.update(1)
    return statistics.median(times)


def bench_autocast(device: torch.device, dtype: str) -> Any:
    """The autocast context of a measurement in `bench.dtype` (none for float32)."""
    return torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "float32" else nullcontext()


def measure_latency(model: nn.Module, batch: int, img_size: int, repeats: int = 10, warmup: int = 3,
                    dtype: str = "float32") -> dict[str, float]:
    """`latency_ms` per image and `throughput` (img/s) of inference at `batch`."""
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), bench_autocast(device, dtype):
            seconds = _median_seconds(lambda: model(images), repeats, warmup, device, f"latency (batch {batch})")
    finally:
        model.train(was_training)
    return {"latency_ms": 1000.0 * seconds / batch, "throughput": batch / seconds}


def saved_for_backward_bytes(model: nn.Module, step: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward while `step()` computes a loss (then backward).

    Parameters and buffers are excluded (they exist anyway); views of one storage count once.
    """
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(saved.values())


def measure_training(model: nn.Module, batch: int, img_size: int, num_classes: int, repeats: int = 10,
                     warmup: int = 3, dtype: str = "float32") -> dict[str, Optional[float]]:
    """`train_s_per_iter`, `train_act_mb` and (on CUDA) `peak_mem_mb` of a training step at `batch`, its forward
    under autocast to `dtype` unless float32 (as `train.precision=bf16` trains).

    The step uses AdamW with lr 0 over the trainable parameters, so the model's weights do not change, and runs
    under a forked RNG so measuring does not disturb the training run's random stream.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return {"train_s_per_iter": None, "train_act_mb": None, "peak_mem_mb": None}
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        labels = torch.randint(0, num_classes, (batch,), device=device)
        return _measure_steps(model, params, images, labels, repeats, warmup, dtype)


def _measure_steps(model: nn.Module, params: list[nn.Parameter], images: Tensor, labels: Tensor, repeats: int,
                   warmup: int, dtype: str = "float32") -> dict[str, Optional[float]]:
    device = images.device
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)

    def loss_fn() -> Tensor:
        with bench_autocast(device, dtype):
            return training_loss(model, images, labels)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    was_training = model.training
    model.train()
    try:
        seconds = _median_seconds(train_step, repeats, warmup, device, f"training steps (batch {images.shape[0]})")
        act_bytes = saved_for_backward_bytes(model, loss_fn)
        peak = _cuda_peak_step_mb(train_step, device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"train_s_per_iter": seconds, "train_act_mb": act_bytes / 2**20, "peak_mem_mb": peak}


def _cuda_peak_step_mb(train_step: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def profile_model(model: nn.Module, bench: DictConfig, img_size: int, num_classes: int,
                  infer_model: Optional[nn.Module] = None) -> dict[str, Any]:
    """Every efficiency key of results.json for `model` (on its current device); skipped parts are None.

    Parameters and training are measured on `model`; tokens, FLOPs and latency on `infer_model` when given (the
    re-parameterised copy, `fpet.pet.inference_model`), else on `model`.
    """
    device = next(model.parameters()).device
    infer = model if infer_model is None else infer_model
    out: dict[str, Any] = {**count_parameters(model), "tokens_out": count_tokens_out(infer, img_size, device)}
    out["gflops"] = count_flops(infer, img_size, device) if bench.get("flops", True) else None
    out.update({"latency_ms": None, "throughput": None, "infer_batch": None})
    if bench.latency:
        out.update(measure_latency(infer, bench.infer_batch, img_size, bench.repeats, bench.warmup, bench.dtype))
        out["infer_batch"] = bench.infer_batch
    out.update({"train_s_per_iter": None, "train_act_mb": None, "peak_mem_mb": None, "train_batch": None})
    if bench.train:
        out.update(measure_training(model, bench.train_batch, img_size, num_classes, bench.repeats, bench.warmup,
                                    bench.dtype))
        out["train_batch"] = bench.train_batch
    out["dtype"] = bench.dtype
    return out
