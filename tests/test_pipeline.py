"""The one pipeline (validate -> seed -> device -> build -> fold -> profile) behind runs and scripts: every rule
checked before any work, scripts report like runs, the efficiency figures of a script equal a run's, no noise."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import fpet.train
from conftest import FAST, ROOT
from fpet.checkpoint import save_task
from fpet.pipeline import open_session, session_from_overrides
from fpet.train import run
from fpet.validate import ConfigError

sys.path.insert(0, str(ROOT / "scripts"))
from benchmark import benchmark  # noqa: E402
from benchmark_grid import measure_cell  # noqa: E402

QUICK = ["bench.infer_batch=2", "bench.train_batch=2", "bench.repeats=1", "bench.warmup=0"]


@pytest.mark.parametrize("overrides, message", [
    (["pet=repadapter", "pet.groups=3"], "pet.groups=3 must divide both pet.dim=8 and the width 64"),
    (["pet=lora", "pet.dim=0"], "pet.dim=0: the adapter hidden dim must be a positive integer"),
    (["dataset.img_size=112"], "dataset.img_size=112 differs from backbone.img_size=224"),
    (["merge=fpet", "merge.refine_bits=4"], "merge.refine_bits=4: accepted [1, 32]"),
])
def test_every_rule_is_checked_before_any_data_is_read(make_cfg, tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(fpet.train, "build_loaders", lambda cfg: pytest.fail("data was read before validation"))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(make_cfg(*overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_image_size_has_one_source(make_cfg):
    cfg = make_cfg("backbone.img_size=112")
    assert cfg.dataset.img_size == 112  # the dataset follows the backbone


def test_a_run_shorter_than_its_warm_up_is_warned_about(make_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="fpet.pipeline"):
        open_session(make_cfg("train.epochs=2"), check_files=False)
    assert "train.epochs=2 is not longer than the 10 warm-up epochs" in caplog.text
    assert "optim.scheduler.warmup_t=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fpet.pipeline"):
        open_session(make_cfg("train.epochs=2", "optim.scheduler.warmup_t=0"), check_files=False)
    assert "warm-up" not in caplog.text


def test_benchmark_reports_storage_bytes_of_the_task_file_a_run_writes(make_cfg, tmp_path):
    out = benchmark(["backbone=vit_micro", "pet=bi_adaptformer", "bench.latency=false", "bench.train=false"])
    session = session_from_overrides(["backbone=vit_micro", "pet=bi_adaptformer"])
    size = save_task(session.model, tmp_path / "task.safetensors", session.task_info())
    assert out["storage_bytes"] == size and 0 < out["storage_bytes_no_head"] < size


def test_benchmark_grid_cells_measure_the_model_a_run_reports(make_cfg, tmp_path):
    """LoRA is folded for evaluation and timing: the grid's GFLOPs are the run's, the plain ViT's."""
    trained = run(make_cfg("pet=lora", "bench.latency=false", "bench.train=false"), tmp_path / "run")
    cell = measure_cell("lora", "none", ["backbone=vit_micro", "dataset.num_classes=6", "bench.latency=false",
                                         "bench.train=false"])
    plain = measure_cell("linear", "none", ["backbone=vit_micro", "dataset.num_classes=6", "bench.latency=false",
                                            "bench.train=false"])
    assert "error" not in cell and cell["gflops"] == trained["gflops"] == plain["gflops"]
    assert cell["storage_bytes"] == trained["storage_bytes"]


def test_scripts_report_bad_config_like_a_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "backbone=vit_micro", "pet=repadapter",
           "pet.groups=3", *QUICK]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: ConfigError: invalid config (nothing was run)" in proc.stderr
    assert "pet.groups=3 must divide" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argument, message", [
    ("--rounds", "--rounds: not an option of this script (--help lists them)"),
    ("pet=lorax", "Could not find 'pet/lorax'"),
    ("pet==", "Error parsing override 'pet=='"),  # Hydra cannot parse it
])
def test_a_script_names_a_bad_argument_without_a_traceback(argument, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        session_from_overrides(["backbone=vit_micro", argument])


def test_a_normal_run_prints_no_deprecation_noise(make_cfg, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(make_cfg("train.epochs=1", "optim.scheduler.warmup_t=0"), tmp_path / "run")
    noise = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [m for m in noise if "jit" in m or "reinit" in m], noise


def test_written_outputs_honour_the_umask(make_cfg, tmp_path):
    old = os.umask(0o022)
    try:
        run(make_cfg("train.keep_last_ckpt=true", "bench.latency=false", "bench.train=false"), tmp_path / "run")
    finally:
        os.umask(old)
    for name in ("results.json", "task.safetensors", "last.ckpt", "metrics.jsonl"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("merge, layer, tag", [("fpet", "[2,6]", "fpet_l2-6"), ("fpet", "4", "fpet_l4"),
                                               ("tome", "null", "tome_r8"), ("tome", "[3,5]", "tome_r8_l3-5")])
def test_merge_tags_name_list_valued_layers(make_cfg, merge, layer, tag):
    cfg = make_cfg(f"merge={merge}", f"merge.layer={layer}")
    assert cfg.merge.tag == tag and cfg.run_id.endswith(f"/{tag}/seed0")
    assert json.dumps(cfg.merge.tag)  # a plain string, usable as a folder name
