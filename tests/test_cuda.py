"""The CUDA path (issue 15): forward equal to the CPU, a training run, every merge strategy, device-resident data,
peak memory, fused AdamW, the GPU lock. Marked `cuda`: skipped without a GPU; scripts/gpu_check.sh runs them on a
lent machine. FPET_CUDA_TESTS_DEVICE=cpu dry-runs the same logic on the CPU (gpu_check.sh --cpu-smoke); the checks
that only mean something on CUDA (peak memory, fused AdamW, pinned streaming, the GPU claim) then assert the CPU's
answer instead."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import fpet.sweep
from conftest import merge_overrides
from fpet.data import build_loaders
from fpet.data.device import DeviceLoader
from fpet.merge import MERGE_STRATEGIES
from fpet.pipeline import session_from_overrides
from fpet.precision import autocast, configure_precision
from fpet.profile import measure_training
from fpet.sweep import claim_device
from fpet.train import build_optimization, run

pytestmark = pytest.mark.cuda
DEVICE = torch.device(os.environ.get("FPET_CUDA_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
MERGES = tuple(sorted(MERGE_STRATEGIES))
SMALL = ("dataset.protocol=val", "train.batch_size=64", "train.eval_batch_size=48")


def _session(*overrides: str):
    return session_from_overrides(["backbone=vit_micro", "pet=lora", f"device={DEVICE.type}", *overrides])


@pytest.mark.parametrize("merge", MERGES)
def test_forward_on_the_gpu_equals_the_cpu_and_stays_finite_in_bf16(merge):
    configure_precision("fp32")  # IEEE float32 matmuls on both sides
    session = session_from_overrides(["backbone=vit_micro", "pet=lora", f"merge={merge}", "device=cpu",
                                      *merge_overrides(merge, "lora")])
    model = session.model.eval()
    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    moved = copy.deepcopy(model).to(DEVICE)
    with torch.inference_mode():
        ref, tokens_ref = model(images), model.forward_tokens(images).x.shape[1]
        out, tokens = moved(images.to(DEVICE)).cpu(), moved.forward_tokens(images.to(DEVICE)).x.shape[1]
        with autocast(DEVICE, "bf16"):
            low = moved(images.to(DEVICE)).float().cpu()
    assert tokens == tokens_ref
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low, ref, atol=0.1, rtol=0.05)


def test_device_resident_batches_equal_the_dataloader_ones(make_cfg):
    assert isinstance(build_loaders(make_cfg(*SMALL), DEVICE).train, DeviceLoader) == ON_CUDA  # auto
    for budget in (8, 0):  # 0: the splits stay in (pinned) host memory and stream batch by batch
        plain = build_loaders(make_cfg(*SMALL, "train.loader=dataloader"))
        held = build_loaders(make_cfg(*SMALL, "train.loader=device", f"train.device_data_gb={budget}"), DEVICE)
        assert held.train.images.device.type == (DEVICE.type if budget else "cpu")
        assert held.train.images.is_pinned() == (ON_CUDA and budget == 0)
        for split in ("train", "eval"):
            pairs = list(zip(getattr(plain, split), getattr(held, split)))
            assert len(pairs) == len(getattr(plain, split)) == len(getattr(held, split))
            for (xa, ya), (xb, yb) in pairs:
                assert xb.device.type == yb.device.type == DEVICE.type
                assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
                assert torch.equal(plain.preprocess(xa), held.preprocess(xb).cpu())


def test_short_runs_train_on_the_gpu_with_either_loader(make_cfg, tmp_path):
    common = ("train.epochs=2", "train.eval_every=1", "optim.scheduler.warmup_t=0", "dataset.num_test=64",
              f"device={DEVICE.type}")
    out = {}
    for name, extra in (("dataloader", ("train.loader=dataloader",)), ("device", ("train.loader=device",)),
                        ("bf16", ("train.loader=device", "train.precision=bf16"))):
        results = run(make_cfg(*common, *extra), tmp_path / name)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert results["precision"] == ("bf16" if name == "bf16" else "fp32")
        assert str(results["device"]).startswith("cpu") != ON_CUDA
        assert all(x["train_seconds"] > 0 for x in lines) and all(x["eval_seconds"] > 0 for x in lines)
        out[name] = (results, [x["loss"] for x in lines])
    (a, loss_a), (b, loss_b), (c, loss_c) = out["dataloader"], out["device"], out["bf16"]
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss_a), rtol=1e-3, atol=1e-5)  # atomics
    assert abs(a["acc"] - b["acc"]) <= 2 * 100 / 64
    assert all(torch.isfinite(torch.tensor(loss_c)))
    torch.testing.assert_close(torch.tensor(loss_c), torch.tensor(loss_a), rtol=0.05, atol=0.05)


def test_peak_training_memory_is_measured_and_bf16_saves_less():
    model = _session().model
    fp32 = measure_training(model, 8, 224, 6, repeats=1, warmup=1)
    bf16 = measure_training(model, 8, 224, 6, repeats=1, warmup=1, dtype="bfloat16")
    assert 0 < bf16["train_act_mb"] < fp32["train_act_mb"]
    if ON_CUDA:
        assert fp32["peak_mem_mb"] > fp32["train_act_mb"] and bf16["peak_mem_mb"] < fp32["peak_mem_mb"]
    else:
        assert fp32["peak_mem_mb"] is None


def test_adamw_is_fused_on_the_gpu(make_cfg):
    session = _session()
    optimizer, _ = build_optimization(session.cfg, session.model)
    assert bool(optimizer.param_groups[0].get("fused")) == ON_CUDA


def test_gpu_lock_gives_a_multirun_job_a_slot_of_the_real_gpu(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(fpet.sweep, "_multirun_job_num", lambda: 1)
    monkeypatch.setattr(fpet.sweep, "runs_per_gpu", lambda: 2)
    monkeypatch.setattr(fpet.sweep, "default_lock_dir", lambda: tmp_path)
    count = torch.cuda.device_count()
    with claim_device(make_cfg("device=auto")) as device:
        if ON_CUDA:
            assert device == f"cuda:{1 % count}" and torch.cuda.current_device() == 1 % count
            assert (tmp_path / f"gpu-{1 % count}.lock").exists()
        else:
            assert device == "auto" and not list(tmp_path.glob("*.lock"))
