"""Sweeps: skipping finished runs, one GPU per job, the joblib multirun end to end, the launcher presets."""
from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fpet.train
from conftest import ROOT
from fpet.results import RESULT_KEYS, build_results, load_complete_results, write_json_atomic
from fpet.sweep import RunDirConflict, acquire_gpu, claim_device, config_differences, register_resolvers
from fpet.train import main

QUIET = ["bench.flops=false", "bench.latency=false", "bench.train=false", "train.save_task=false"]


def _complete(**changes) -> dict:
    results = {k: 1 for k in RESULT_KEYS}
    results.update(complete=True, config={})
    results.update(changes)
    return results


@pytest.mark.parametrize("content, finished", [
    (json.dumps(_complete()), True),
    (json.dumps(_complete(complete=False)), False),
    (json.dumps({k: v for k, v in _complete().items() if k != "gflops"}), False),  # a contract key missing
    ('{"task": "cifar1', False),  # truncated
    (None, False),  # no file
])
def test_load_complete_results(tmp_path, content, finished):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    assert (load_complete_results(tmp_path) is not None) == finished


def test_finished_run_is_skipped_and_another_config_is_not_written_over_it(make_cfg, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fpet")
    first = build_results(make_cfg(*QUIET), {"acc": 50.0}, {}, None, torch.device("cpu"))  # as fpet.train.run writes
    write_json_atomic(tmp_path / "results.json", first)
    calls = []
    monkeypatch.setattr(fpet.train, "run", lambda cfg, run_dir: calls.append(cfg) or {"acc": None})
    again = main(make_cfg(*QUIET, "device=cpu", "train.progress=true"), tmp_path)  # not what a run computes
    assert again["finished_at"] == first["finished_at"] and calls == []
    assert "skipping finished run" in caplog.text
    with pytest.raises(RunDirConflict, match=r"train\.epochs: 1 -> 2.*train\.skip_finished=false"):
        main(make_cfg(*QUIET, "train.epochs=2"), tmp_path)  # e.g. a smoke test's folder reused for the real run
    assert calls == []
    main(make_cfg(*QUIET, "train.epochs=2", "train.skip_finished=false"), tmp_path)
    assert len(calls) == 1


def test_config_differences_ignore_locations_and_new_keys(make_cfg, tmp_path):
    cfg = make_cfg()
    stored = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    stored["paths"]["output_dir"] = "/elsewhere"
    stored["dataset"]["num_workers"] = 8
    del stored["train"]["eval_every"]  # written by an older version without the key
    stored["pet"]["dim"] = 4
    assert config_differences(stored, cfg) == ["pet.dim: 4 -> 8"]


def test_each_job_gets_a_free_gpu_lock(tmp_path):
    with acquire_gpu(0, 2, tmp_path) as first:
        with acquire_gpu(2 % 2, 2, tmp_path) as second:  # job 2 prefers GPU 0, which job 0 holds
            assert (first, second) == (0, 1)
    with acquire_gpu(1, 2, tmp_path) as third:  # released again
        assert third == 1


def test_claim_device_outside_a_multirun_keeps_the_config(make_cfg):
    with claim_device(make_cfg("device=cpu")) as device:
        assert device == "cpu"


def _compose_hydra(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def readme_slurm_defaults() -> dict:
    """`hydra.launcher.<key>` -> value from the README's SLURM table."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `hydra\.launcher\.(\w+)` \| `([^`]*)` \|", text, flags=re.M)
    return {key: yaml.safe_load(value) for key, value in rows}


def test_slurm_preset_is_what_the_readme_says():
    launcher = _compose_hydra("hydra/launcher=slurm").hydra.launcher
    documented = readme_slurm_defaults()
    assert {"partition", "gpus_per_node", "timeout_min", "array_parallelism", "cpus_per_task", "mem_gb"} <= \
        documented.keys()
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert {k: launcher[k] for k in documented} == documented
    custom = _compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60")
    assert (custom.hydra.launcher.partition, custom.hydra.launcher.timeout_min) == ("gpu", 60)


def test_local_preset_runs_one_job_per_gpu():
    launcher = _compose_hydra("hydra/launcher=local").hydra.launcher
    assert launcher._target_.endswith("LocalLauncher") and launcher.n_jobs == max(1, torch.cuda.device_count())
    assert launcher.runs_per_gpu == 1


SYNTHETIC_B = "defaults:\n  - synthetic\n  - _self_\n\nname: synthetic_b\ndata_seed: 4321\n"


def _multirun(tmp_path: Path) -> subprocess.CompletedProcess:
    """2 tasks x 2 PET methods through the joblib launcher on vit_micro, fast settings."""
    (tmp_path / "extra" / "dataset").mkdir(parents=True, exist_ok=True)
    (tmp_path / "extra" / "dataset" / "synthetic_b.yaml").write_text(SYNTHETIC_B)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
           f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "dataset=synthetic,synthetic_b",
           "pet=lora,adaptformer", "backbone=vit_micro", "logger=none", "train.progress=false", "train.epochs=1",
           "train.limit_batches=2", "train.batch_size=8", "dataset.num_test=64", "bench.latency=false",
           "bench.train=false", "bench.flops=false", f"paths.output_dir={tmp_path / 'outputs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_joblib_multirun_fills_the_table_and_a_rerun_skips_every_run(tmp_path):
    _multirun(tmp_path)
    sweep = tmp_path / "outputs" / "multirun"
    files = sorted(sweep.rglob("results.json"))
    assert [f.relative_to(sweep).parts[1:3] for f in files] == [
        ("synthetic", "adaptformer"), ("synthetic", "lora"), ("synthetic_b", "adaptformer"), ("synthetic_b", "lora")]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), str(sweep), "--no-figures"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with (sweep / "tables" / "table2.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "ours"]
    assert {r["method"] for r in rows} == {"LoRA", "AdaptFormer"}
    assert sum(r[t] != "" for r in rows for t in ("synthetic", "synthetic_b")) == 4
    rerun = _multirun(tmp_path)
    assert (rerun.stdout + rerun.stderr).count("skipping finished run") == 4
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


@pytest.mark.slow
def test_submitit_runs_a_sweep_job_in_its_own_process(tmp_path):
    """The submitit launcher (the SLURM preset's engine) with its local executor: the job process must find this
    checkout's code and the resolvers that were pickled with the sweep."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", "pet=lora", "backbone=vit_micro", "logger=none", "train.progress=false",
           "train.epochs=1", "train.limit_batches=2", "train.batch_size=8", "dataset.num_test=64", *QUIET,
           f"paths.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.rglob("*_log.err"))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-2000:]
    assert load_complete_results(tmp_path / "multirun" / "vit_micro" / "synthetic" / "lora" / "none" / "seed0")
