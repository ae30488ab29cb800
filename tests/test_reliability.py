"""Reliability: resume after a kill, refused checkpoints, the numerical guard, config validation, determinism."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT
from fpet.resume import ResumeError
from fpet.train import NonFiniteLossError, run
from fpet.validate import ConfigError, validate_config

NO_BENCH = ["bench.flops=false", "bench.latency=false", "bench.train=false"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *FAST, *NO_BENCH, f"paths.output_dir={out}", "seed=5",
            "train.epochs=6", "train.limit_batches=3", *extra]


def run_dir_of(out: Path) -> Path:
    return out / "runs" / "vit_micro" / "synthetic" / "lora" / "none" / "seed5"


def test_sigkilled_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    ckpt = run_dir_of(killed) / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (run_dir_of(killed) / "results.json").exists(), "the kill came too late"
    done_epochs = torch.load(ckpt, weights_only=True)["state"]["epoch"]
    assert 1 <= done_epochs < 6

    # the resumed run and the uninterrupted reference run side by side (independent run dirs)
    procs = [subprocess.Popen(cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for out in (killed, clean)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    resumed = json.loads((run_dir_of(killed) / "results.json").read_text())
    reference = json.loads((run_dir_of(clean) / "results.json").read_text())
    assert resumed["resumed_from_epoch"] >= done_epochs and reference["resumed_from_epoch"] == 0
    assert resumed["evals"] == reference["evals"] and resumed["acc"] == reference["acc"]
    strip = lambda rows: [{k: r[k] for k in ("epoch", "loss", "lr", "acc") if k in r} for r in rows]  # noqa: E731
    assert strip(metrics(run_dir_of(killed))) == strip(metrics(run_dir_of(clean)))
    assert not (run_dir_of(killed) / "last.ckpt").exists()  # removed once results.json is written


def finished_run_with_checkpoint(make_cfg, run_dir: Path) -> Path:
    run(make_cfg("train.epochs=2", "train.keep_last_ckpt=true", *NO_BENCH), run_dir)
    (run_dir / "results.json").unlink()
    return run_dir / "last.ckpt"


def test_truncated_checkpoint_is_refused_with_the_fix(make_cfg, tmp_path):
    ckpt = finished_run_with_checkpoint(make_cfg, tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    with pytest.raises(ResumeError, match=r"truncated.*rm .*last\.ckpt"):
        run(make_cfg("train.epochs=2", *NO_BENCH), tmp_path)


def test_checkpoint_of_another_config_is_refused_naming_the_difference(make_cfg, tmp_path):
    finished_run_with_checkpoint(make_cfg, tmp_path)
    with pytest.raises(ResumeError, match=r"pet\.dim: 8 -> 4"):
        run(make_cfg("train.epochs=2", "pet.dim=4", *NO_BENCH), tmp_path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_checkpoint_that_would_run_code_is_refused(make_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "last.ckpt").write_bytes(pickle.dumps({"format": 1, "payload": Exploit()}))
    with pytest.raises(ResumeError, match="refused for safety"):
        run(make_cfg(*NO_BENCH), tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 4 else loss  # epoch 2, step 2 (2 steps per epoch)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)  # what the training loss calls
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2 \(lr .*\)"):
        run(make_cfg("train.epochs=3", *NO_BENCH), tmp_path)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state"]
    assert state["epoch"] == 1 and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("override, message", [
    ("merge=fpet merge.layer=12", "merge.layer=12: outside the backbone's 12 blocks; accepted an index 0..11"),
    ("merge=bsm merge.r=99", "merge.r=99: accepted 1..98"),
    ("pet.dim=0", "pet.dim=0: the adapter hidden dim must be a positive integer"),
    ("train.batch_size=1001", "train.batch_size=1001: larger than the train800val200 split (1000 images)"),
    ("dataset.protocol=holdout", "dataset.protocol='holdout': accepted ['test', 'val']"),
    ("merge=bsm merge.split=diagonal", "merge.split='diagonal': accepted ['stripe', 'checkerboard', 'kth', 'random']"),
    ("backbone.checkpoint=/no/such/ViT-B_16.npz", "backbone.checkpoint='/no/such/ViT-B_16.npz': no such file"),
    ("train.epochs=0", "train.epochs=0: must be a positive integer"),
    ("pet.name=prefix", "pet='prefix': accepted"),
    ("backbone.kwargs.embed_dim=63", "timm cannot build it"),
])
def test_bad_config_values_are_named_with_what_is_accepted(make_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(*override.split()))
    assert message in str(err.value)


def test_cli_rejects_bad_config_before_training_and_lists_every_problem(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *FAST, f"paths.output_dir={tmp_path}", "pet.dim=0", "merge=bsm",
           "merge.r=500"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "pet.dim=0" in proc.stderr and "merge.r=500" in proc.stderr and "nothing was run" in proc.stderr
    assert proc.stderr.startswith("error: ConfigError") and "Traceback" not in proc.stderr  # the message alone
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("last.ckpt"))


def test_cli_user_error_in_a_sweep_fails_that_job_with_its_traceback(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, f"paths.output_dir={tmp_path}", "pet.dim=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr and "pet.dim=0" in proc.stderr


def test_same_seed_repeats_exactly_and_another_seed_differs(make_cfg, tmp_path):
    results = [run(make_cfg(f"seed={s}", "train.epochs=2", *NO_BENCH), tmp_path / f"{i}")
               for i, s in enumerate((7, 7, 8))]
    losses = [[r["loss"] for r in metrics(tmp_path / f"{i}")] for i in range(3)]
    assert losses[0] == losses[1] and results[0]["evals"] == results[1]["evals"]
    assert losses[0] != losses[2]
