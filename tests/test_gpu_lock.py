"""Several runs per GPU: the local launcher's `runs_per_gpu` and the GPU lock's slots (no GPU needed)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import fpet.sweep
from conftest import ROOT
from fpet.sweep import acquire_gpu, claim_device, register_resolvers


def _launcher(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["hydra/launcher=local", *overrides], return_hydra_config=True).hydra.launcher


def test_each_gpu_admits_runs_per_gpu_holders(tmp_path):
    with acquire_gpu(0, 2, tmp_path, runs_per_gpu=2) as a, acquire_gpu(1, 2, tmp_path, runs_per_gpu=2) as b, \
            acquire_gpu(0, 2, tmp_path, runs_per_gpu=2) as c, acquire_gpu(1, 2, tmp_path, runs_per_gpu=2) as d:
        assert (a, b, c, d) == (0, 1, 0, 1)  # jobs 0..3 prefer GPU i % 2; each GPU holds two
        with acquire_gpu(0, 1, tmp_path / "one", runs_per_gpu=3) as e, \
                acquire_gpu(0, 1, tmp_path / "one", runs_per_gpu=3) as f:
            assert (e, f) == (0, 0)
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["gpu-0.lock", "gpu-0.slot1.lock", "gpu-1.lock",
                                                              "gpu-1.slot1.lock"]


def test_a_run_beyond_the_slots_waits_until_one_frees(tmp_path):
    got: list[int] = []

    def late_job() -> None:
        with acquire_gpu(0, 1, tmp_path, runs_per_gpu=2, poll_seconds=0.01) as index:
            got.append(index)

    with acquire_gpu(0, 1, tmp_path, runs_per_gpu=2):
        with acquire_gpu(0, 1, tmp_path, runs_per_gpu=2):
            waiter = threading.Thread(target=late_job)
            waiter.start()
            time.sleep(0.3)
            assert got == []  # both slots of the only GPU are held
        waiter.join(timeout=5)  # slot 1 freed: the third run goes ahead while slot 0 is still held
        assert got == [0]


def test_claim_device_takes_a_slot_of_a_fake_gpu(make_cfg, tmp_path, monkeypatch):
    picked: list[int] = []
    monkeypatch.setattr(fpet.sweep, "num_gpus", lambda: 2)
    monkeypatch.setattr(fpet.sweep, "_multirun_job_num", lambda: 3)
    monkeypatch.setattr(fpet.sweep, "runs_per_gpu", lambda: 2)
    monkeypatch.setattr(fpet.sweep, "default_lock_dir", lambda: tmp_path)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    with acquire_gpu(1, 2, tmp_path, runs_per_gpu=2):  # another run holds GPU 1's first slot
        with claim_device(make_cfg("device=auto")) as device:
            assert device == "cuda:1" and picked == [1]  # job 3 prefers GPU 1, which has a second slot
    monkeypatch.setattr(fpet.sweep, "num_gpus", lambda: 1)  # one GPU: the lock still admits runs_per_gpu
    with acquire_gpu(0, 1, tmp_path, runs_per_gpu=2):
        with claim_device(make_cfg("device=auto")) as device:
            assert device == "cuda:0"
    with claim_device(make_cfg("device=cpu")) as device:
        assert device == "cpu"


def test_local_launcher_takes_runs_per_gpu_and_hands_joblib_the_rest():
    launcher = _launcher("hydra.launcher.runs_per_gpu=3")
    assert launcher.runs_per_gpu == 3 and launcher.n_jobs == 3 * max(1, torch.cuda.device_count())
    built = instantiate(launcher)
    assert built.runs_per_gpu == 3 and "runs_per_gpu" not in built.joblib and built.joblib["n_jobs"] == launcher.n_jobs
    with pytest.raises(InstantiationException, match=r"hydra.launcher.runs_per_gpu=0: must be an integer >= 1"):
        instantiate(_launcher("hydra.launcher.runs_per_gpu=0"))
