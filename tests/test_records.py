"""Run records a user can trust (issue 18): a finished run's folder is never rewritten by a later command, failures
land in train.log, typos in `+key` overrides are refused, commands start without importing torch."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from torch.utils.data import DataLoader, Dataset

import fpet.train
from conftest import FAST, ROOT
from fpet.config import CONFIG_DIR, compose_config, register_resolvers
from fpet.data.vtab import VTABDataError
from fpet.errors import user_message
from fpet.launch import main
from fpet.results import build_results, write_json_atomic
from fpet.validate import ConfigError, appended_key_problems, check_appended_keys

QUIET = ["bench.flops=false", "bench.latency=false", "bench.train=false", "train.save_task=false"]


def _train_py(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, *flags, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def _imported(stderr: str) -> set[str]:
    """Top-level modules named by `python -X importtime`."""
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time")}


def test_help_answers_without_importing_torch(tmp_path):
    proc = _train_py("--help", cwd=tmp_path, importtime=True)
    assert proc.returncode == 0 and "== Configuration groups ==" in proc.stdout
    assert {"torch", "timm"}.isdisjoint(_imported(proc.stderr))


def test_a_refused_rerun_leaves_the_finished_run_folder_as_it_was(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(*QUIET)
    write_json_atomic(run_dir / "results.json", build_results(cfg, {"acc": 50.0}, {}, None, torch.device("cpu")))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the config of the finished run\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- its overrides\n")
    (run_dir / "train.log").write_text("its log\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    common = [*FAST, *QUIET, f"paths.output_dir={tmp_path / 'outputs'}", f"hydra.run.dir={run_dir}"]
    refused = _train_py(*common, "train.epochs=4", cwd=tmp_path, importtime=True)
    assert refused.returncode == 1 and "RunDirConflict" in refused.stderr and "train.epochs: 1 -> 4" in refused.stderr
    skipped = _train_py(*common, "device=cpu", cwd=tmp_path, importtime=True)  # same run: skipped
    assert skipped.returncode == 0 and "skipping finished run" in skipped.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    for proc in (refused, skipped):  # answered without the heavy imports
        assert {"torch", "timm"}.isdisjoint(_imported(proc.stderr))


def test_an_eval_only_run_gets_a_folder_of_its_own():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        train = compose("train", overrides=["paths.output_dir=/o"], return_hydra_config=True)
        evaluation = compose("train", overrides=["paths.output_dir=/o", "eval_only=true"], return_hydra_config=True)
    assert evaluation.hydra.run.dir == train.hydra.run.dir + "/eval" == "/o/runs/vit_b16/synthetic/lora/none/seed0/eval"
    assert train.hydra.output_subdir is None  # .hydra/ is written by fpet.launch after the skip / conflict check


def test_eval_only_records_the_epochs_the_checkpoint_trained(make_cfg, tmp_path):
    trained = fpet.train.run(make_cfg("train.epochs=2", "bench.flops=false", "bench.latency=false",
                                      "bench.train=false"), tmp_path / "run")
    assert trained["epochs"] == 2
    evaluated = fpet.train.run(make_cfg("eval_only=true", f"checkpoint={tmp_path / 'run' / 'task.safetensors'}",
                                        "bench.flops=false", "bench.latency=false", "bench.train=false"),
                               tmp_path / "run")
    assert evaluated["eval_only"] is True and evaluated["epochs"] == 2  # not the config's train.epochs (1)
    assert (tmp_path / "run" / "eval" / "results.json").is_file()


@pytest.fixture
def run_log(tmp_path):
    """A train.log file handler on the root logger, as Hydra installs it."""
    handler = logging.FileHandler(tmp_path / "run" / "train.log", delay=True)
    (tmp_path / "run").mkdir()
    logging.getLogger().addHandler(handler)
    yield tmp_path / "run" / "train.log"
    logging.getLogger().removeHandler(handler)
    handler.close()


def test_a_failed_run_writes_the_error_into_its_train_log(make_cfg, tmp_path, monkeypatch, run_log):
    def broken(cfg, run_dir):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(fpet.train, "run", broken)
    with pytest.raises(RuntimeError):
        main(make_cfg(*QUIET), tmp_path / "run")
    text = run_log.read_text()
    assert "run failed: RuntimeError: the disk is full" in text and "Traceback" in text


def test_an_interrupted_run_says_how_to_resume(make_cfg, tmp_path, monkeypatch, run_log):
    def interrupted(cfg, run_dir):
        (Path(run_dir) / "last.ckpt").write_bytes(b"")  # an epoch had finished
        raise KeyboardInterrupt

    monkeypatch.setattr(fpet.train, "run", interrupted)
    with pytest.raises(KeyboardInterrupt, match="run the same command again to resume"):
        main(make_cfg(*QUIET), tmp_path / "run")
    assert "run failed: KeyboardInterrupt" in run_log.read_text()


@pytest.mark.parametrize("override, near", [("+trian.epochs=3", "train.epochs=3"), ("+train.epoch=3", "train.epochs=3"),
                                            ("+seeed=1", "seed=1")])
def test_an_appended_typo_is_refused_with_the_nearest_key(override, near):
    with pytest.raises(ConfigError, match=f"did you mean {near}"):
        check_appended_keys([override], compose_config([override]))


def test_appending_in_the_documented_places_is_accepted():
    overrides = ["+ablation=fpet", "+backbone.kwargs.depth=4", "+merge.keep=0.5", "++train.epochs=3"]
    assert appended_key_problems([*overrides, "+hparams=tune"], compose_config(overrides)) == []


def test_the_shared_vtab_defaults_are_no_dataset_option():
    assert not (CONFIG_DIR / "dataset" / "_vtab.yaml").exists()
    with pytest.raises(MissingConfigException, match="dataset/_vtab"):
        compose_config(["dataset=_vtab"])
    assert compose_config(["dataset=dtd"]).dataset.cache is True  # the tasks still get the shared defaults


class _Corrupt(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise VTABDataError("dtd/test.txt:7: cannot read image images/x.jpg (corrupt JPEG)")


def test_an_error_from_a_loader_worker_reads_as_one_message():
    with pytest.raises(VTABDataError) as caught:
        next(iter(DataLoader(_Corrupt(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # how torch re-raises it
    assert user_message(caught.value) == "dtd/test.txt:7: cannot read image images/x.jpg (corrupt JPEG)"


def test_no_tracked_file_is_ignored():
    proc = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    assert proc.stdout.split() == []
