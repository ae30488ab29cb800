"""train.loader=device: the splits held in memory give the DataLoader path's batches, order and results."""
from __future__ import annotations

import json
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from fpet.data import build_loaders
from fpet.data.device import DeviceLoader, materialize, resolve_loader, worker_context
from fpet.data.synthetic import SyntheticTask
from fpet.data.transforms import ToFloat
from fpet.resume import capture_rng, restore_rng
from fpet.train import run
from fpet.validate import ConfigError, validate_config

SMALL = ("dataset.protocol=val", "train.batch_size=64", "train.eval_batch_size=48")
"""train800 in 12 shuffled batches of 64 (32 dropped), val200 in batches of 48 (the last one short)."""


def _batches(loader, epochs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for _ in range(epochs) for batch in loader]


def test_device_loader_gives_the_dataloader_batches_in_the_same_order(make_cfg):
    plain = build_loaders(make_cfg(*SMALL, "train.loader=dataloader"))
    held = build_loaders(make_cfg(*SMALL, "train.loader=device"), torch.device("cpu"))
    assert isinstance(held.train, DeviceLoader) and not isinstance(plain.train, DeviceLoader)
    assert (len(held.train), len(held.eval)) == (len(plain.train), len(plain.eval)) == (12, 5)
    for split in ("train", "eval"):
        a, b = _batches(getattr(plain, split), 2), _batches(getattr(held, split), 2)  # epoch 2 reshuffles
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xb.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb)
    first, second = _batches(held.train, 2)[:12], _batches(held.train, 1)
    assert not torch.equal(first[0][1], second[0][1])  # a new permutation every epoch, not a fixed order
    assert held.eval.dataset is not None and len(held.eval.dataset) == 200


def test_resumed_generator_state_continues_with_the_same_batches(make_cfg):
    held = build_loaders(make_cfg(*SMALL, "train.loader=device"))
    _batches(held.train)  # epoch 1
    state = capture_rng(held.train)
    expected = _batches(held.train)  # epoch 2
    fresh = build_loaders(make_cfg(*SMALL, "train.loader=device"))
    restore_rng(state, fresh.train)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(expected, _batches(fresh.train)))


def test_short_training_runs_end_with_equal_metrics_and_weights(make_cfg, tmp_path):
    common = ("train.epochs=2", "train.eval_every=1", "train.limit_batches=3", "dataset.num_test=40",
              "optim.scheduler.warmup_t=0",
              "bench.latency=false", "bench.train=false", "bench.flops=false")
    out = {}
    for loader in ("dataloader", "device"):
        results = run(make_cfg(*common, f"train.loader={loader}"), tmp_path / loader)
        lines = (tmp_path / loader / "metrics.jsonl").read_text().splitlines()
        out[loader] = (results["evals"], [json.loads(x)["loss"] for x in lines],
                       load_file(tmp_path / loader / "task.safetensors"))
    (evals_a, loss_a, task_a), (evals_b, loss_b, task_b) = out["dataloader"], out["device"]
    assert evals_a == evals_b and loss_a == loss_b
    assert task_a.keys() == task_b.keys() and all(torch.equal(task_a[k], task_b[k]) for k in task_a)


def test_auto_picks_device_only_on_cuda_and_bad_values_are_refused(make_cfg):
    assert resolve_loader("auto", torch.device("cpu")) == "dataloader"
    assert resolve_loader("auto", torch.device("cuda", 0)) == "device"
    assert resolve_loader("dataloader", torch.device("cuda", 0)) == "dataloader"
    assert not isinstance(build_loaders(make_cfg(*SMALL)).train, DeviceLoader)  # default auto on the CPU
    with pytest.raises(ConfigError, match=r"train.loader='gpu'.*accepted \['dataloader', 'device', 'auto'\]"):
        validate_config(make_cfg("train.loader=gpu"))
    with pytest.raises(ConfigError, match=r"train.device_data_gb=-1"):
        validate_config(make_cfg("train.device_data_gb=-1"))


def test_materialize_refuses_float_images():
    images, labels = materialize(SyntheticTask("val200", img_size=32))
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist()[:3] == [
        SyntheticTask("val200").label(i) for i in range(3)]
    with pytest.raises(TypeError, match="train.loader=dataloader"):
        materialize(SyntheticTask("val200", img_size=32, transform=ToFloat()))


def _read_in_worker(num_workers: int) -> tuple[int, int, Optional[str]]:
    task = SyntheticTask("val200", img_size=32)
    images, _ = materialize(task, num_workers=num_workers)
    plain = DataLoader(task, batch_size=50, num_workers=num_workers, multiprocessing_context=worker_context(2))
    return len(images), sum(len(x) for x, _ in plain), worker_context(num_workers)


@pytest.mark.slow
def test_dataloader_workers_start_inside_a_joblib_worker():
    """hydra/launcher=local runs each run in a loky process, whose default start method a DataLoader cannot use."""
    from joblib import Parallel, delayed

    assert worker_context(2) is None  # outside a loky worker: the default start method
    assert Parallel(n_jobs=2, backend="loky")([delayed(_read_in_worker)(2)] * 2) == [(200, 200, "fork")] * 2
