"""The training loop end to end: results.json contract, logs, task file, CLI entry points."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT
from fpet.results import RESULT_KEYS
from fpet.train import run


def test_one_epoch_run_writes_the_results_contract(make_cfg, tmp_path):
    results = run(make_cfg("train.epochs=2", "train.eval_every=1"), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(RESULT_KEYS) <= on_disk.keys()
    assert on_disk["acc"] == results["acc"] and 0 <= on_disk["acc"] <= 100
    assert on_disk["acc_best"] == max(e["acc"] for e in on_disk["evals"]) and len(on_disk["evals"]) == 2
    assert (on_disk["task"], on_disk["backbone"], on_disk["pet"], on_disk["merge"]) == \
        ("synthetic", "vit_micro", "lora", "none")
    assert on_disk["protocol"] == "test" and on_disk["eval_split"] == "test"
    # images read: train800val200 and the synthetic test split (dataset.num_test); no reference table to check
    assert (on_disk["num_train"], on_disk["num_eval"], on_disk["sizes_checked"]) == (1000, 64, None)
    assert on_disk["storage_bytes"] == (tmp_path / "run" / "task.safetensors").stat().st_size
    assert on_disk["gflops"] > 0 and on_disk["tokens_out"] == 197 and on_disk["latency_ms"] > 0
    assert on_disk["config"]["pet"]["dim"] == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all("loss" in x and "lr" in x for x in lines)


def test_summary_says_why_a_figure_is_missing(tmp_path):
    from fpet.results import format_summary

    results = {"task": "dtd", "backbone": "vit_micro", "pet": "lora", "merge": "none", "seed": 0, "acc": 50.0,
               "acc_best": None, "eval_only": True, "eval_split": "test", "gflops": 0.2, "tokens_out": 197,
               "latency_ms": None, "train_s_per_iter": None, "train_act_mb": None, "params_pet": 1,
               "params_head": 2, "params_merge": 0, "device": "cpu",
               "config": {"bench": {"flops": True, "latency": False, "train": False}}}
    text = format_summary(results, tmp_path)
    assert "best n/a %" in text and "latency n/a ms/img" in text
    why = text.split("n/a = not measured: ")[1].splitlines()[0]
    assert "best: eval_only=true evaluates once" in why
    assert "latency: bench.latency=false (bench.latency=true measures it)" in why
    assert "train s/it and saved-for-backward: bench.train=false" in why and "GFLOPs" not in why
    measured = {**results, "acc_best": 50.0, "eval_only": False, "latency_ms": 1.0, "train_s_per_iter": 1.0,
                "train_act_mb": 1.0}
    assert "n/a" not in format_summary(measured, tmp_path)


def test_lr_schedule_is_stepped_after_each_epoch_like_the_official_code(make_cfg, tmp_path):
    run(make_cfg("train.epochs=5", "train.eval_every=5", "optim.scheduler.warmup_t=2", "bench.flops=false",
                 "bench.latency=false", "bench.train=false"), tmp_path)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # epoch 0: the warm-up start set at construction; epoch e >= 1: schedule(e - 1)
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-6)
    assert lrs[2] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lrs[3] > lrs[4] >= 1e-5


def test_train_py_cli_names_its_run_dir_by_axes(tmp_path):
    out = tmp_path / "outputs"
    cmd = [sys.executable, str(ROOT / "train.py"), *FAST, f"paths.output_dir={out}", "seed=3", "pet=adaptformer",
           "bench.latency=false", "bench.train=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "runs" / "vit_micro" / "synthetic" / "adaptformer" / "none" / "seed3"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["seed"] == 3 and results["pet"] == "adaptformer"
    assert (run_dir / "train.log").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert "accuracy  final" in proc.stdout


def test_benchmark_prints_json_on_last_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "backbone=vit_micro", "pet=adaptformer",
           "bench.infer_batch=2", "bench.train_batch=2", "bench.repeats=1", "bench.warmup=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("gflops", "tokens_out", "params_pet", "params_head", "params_merge", "latency_ms", "throughput",
                "train_s_per_iter", "train_act_mb", "peak_mem_mb", "device", "dtype"):
        assert key in out
    assert out["tokens_out"] == 197 and out["params_pet"] == 12 * 2 * 64 * 8


@pytest.mark.slow
def test_demo_settings_learn_the_synthetic_task(make_cfg, tmp_path):
    cfg = make_cfg("experiment=demo", "bench.flops=false", "bench.latency=false", "bench.train=false",
                   fast=["logger=none", "train.progress=false"])
    results = run(cfg, tmp_path)
    assert results["acc"] > 3 * 100 / 6  # three times chance


@pytest.mark.slow
def test_wandb_offline_writes_into_the_run_dir(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(make_cfg("logger=wandb", "logger.mode=offline", "bench.flops=false", "bench.latency=false",
                 "bench.train=false"), tmp_path)
    assert any((tmp_path / "wandb").glob("offline-run-*"))
