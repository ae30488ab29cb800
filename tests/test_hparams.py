"""Validation-selected hyper-parameters: search tags, selection with ties on hand-made results, the +hparams table
driving the config and a run, data provenance, tables that refuse mixed data and show both protocols."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import pytest
from omegaconf import OmegaConf

from fake_vtab import write_fake_task
from fpet.config import compose_config
from fpet.data.provenance import data_provenance, lists_hash
from fpet.hparams import HparamsError, check_hparams, hparams_yaml, load_trials, search_tag, select
from fpet.results import RESULT_KEYS
from fpet.tables import make_tables
from fpet.tables.build import MixedDataError
from fpet.validate import validate_config


def write_result(root: Path, task: str, pet: str = "lora", lr: float = 1e-3, wd: float = 1e-4, acc: float = 50.0,
                 seed: int = 0, merge: str = "none", protocol: str = "val", scale: float = 1.0,
                 data: Optional[dict] = None, hparams: Optional[str] = None, group: str = "synthetic",
                 acc_best: Optional[float] = None) -> Path:
    """One complete results.json as a run writes it (the keys selection and tables read), in its own folder."""
    run_dir = root / task / pet / merge / f"seed{seed}" / f"lr{lr}_wd{wd}_scale{scale}_{hparams}"
    results: dict[str, Any] = {k: None for k in RESULT_KEYS}
    results.update(task=task, backbone="vit_micro", pet=pet, merge=merge, seed=seed, epochs=2, acc=acc,
                   acc_best=acc if acc_best is None else acc_best, protocol=protocol, device="cpu",
                   dtype="float32", complete=True, finished_at="2026-01-01T00:00:00+00:00",
                   data=data or {"source": "synthetic", "hash": f"h-{task}"},
                   hparams={"name": hparams} if hparams else None,
                   config={"seed": seed, "dataset": {"name": task, "group": group, "protocol": protocol},
                           "optim": {"optimizer": {"lr": lr, "weight_decay": wd}},
                           "pet": {"name": pet, "dim": 8, "scale": scale},
                           "merge": {"name": merge, "tag": merge, "layer": None},
                           "train": {"epochs": 2, "batch_size": 8, "eval_every": 10}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_search_tag_names_the_searched_values_only():
    overrides = ["optim.optimizer.weight_decay=0.0001", "pet=lora", "dataset=dtd", "optim.optimizer.lr=0.01",
                 "pet.scale=10", "merge.layer=[2,6]", "train.epochs=2", "paths.output_dir=/tmp/x", "seed=1"]
    assert search_tag(overrides) == "merge_layer2-6_lr0.01_wd0.0001_scale10"
    assert search_tag(["pet=lora", "seed=0"]) == "default"


GRID = {"a": {(1e-3, 1e-4): 50.0, (1e-2, 1e-4): 60.0, (1e-3, 1e-3): 60.0, (1e-2, 1e-3): 55.0},
        "b": {(1e-3, 1e-4): 70.0, (1e-3, 1e-3): 70.0, (1e-2, 1e-4): 40.0, (1e-2, 1e-3): 40.0}}


def test_selection_takes_the_best_val_accuracy_and_breaks_ties_by_smaller_lr_then_wd(tmp_path):
    for task, cells in GRID.items():
        for (lr, wd), acc in cells.items():
            write_result(tmp_path, task, lr=lr, wd=wd, acc=acc)
    # c: the mean over seeds decides (80, 60 -> 70 loses to 75, 75)
    for seed, acc in ((0, 80.0), (1, 60.0)):
        write_result(tmp_path, "c", lr=1e-3, acc=acc, seed=seed)
        write_result(tmp_path, "c", lr=1e-2, acc=75.0, seed=seed)
    write_result(tmp_path, "c", lr=1e-1, acc=99.0, protocol="test")  # a test-protocol run never counts
    trials, skipped = load_trials(tmp_path)
    assert len(trials) == 12 and list(skipped.values()) == [1]
    selection = select(trials)
    a, b, c = (selection.choices[(t, "lora", "none")] for t in "abc")
    assert (a.values["optim.optimizer.lr"], a.values["optim.optimizer.weight_decay"]) == (1e-3, 1e-3)
    assert (a.val_acc, a.tied, a.search_size) == (60.0, 2, 4)
    assert (b.values["optim.optimizer.lr"], b.values["optim.optimizer.weight_decay"]) == (1e-3, 1e-4)
    assert b.tied == 2 and a.searched == ["optim.optimizer.lr", "optim.optimizer.weight_decay"]
    assert c.values["optim.optimizer.lr"] == 1e-2 and c.val_acc == 75.0 and c.seeds == [0, 1]
    assert c.search_size == 2 and c.searched == ["optim.optimizer.lr"] and len(c.run_dirs) == 2


def test_search_runs_of_different_data_are_not_selected_together(tmp_path):
    write_result(tmp_path, "a", lr=1e-3, data={"source": "noah_format", "hash": "x"})
    write_result(tmp_path, "a", lr=1e-2, data={"source": "tfds_export", "hash": "y"})
    with pytest.raises(HparamsError, match="different data"):
        select(load_trials(tmp_path)[0])


def _table(tmp_path: Path, name: str = "sel") -> Path:
    """A search with a per-task scale for lora on synthetic and synthetic_b -> configs/hparams/<name>.yaml."""
    search = tmp_path / "tune"
    for scale, acc in ((0.1, 40.0), (10.0, 60.0)):
        write_result(search, "synthetic", lr=1e-2, wd=1e-3, scale=scale, acc=acc)
    for scale, acc in ((0.1, 70.0), (10.0, 50.0)):
        write_result(search, "synthetic_b", lr=3e-3, wd=1e-4, scale=scale, acc=acc)
    selection = select(load_trials(search)[0])
    config_dir = tmp_path / "extra"
    (config_dir / "hparams").mkdir(parents=True)
    (config_dir / "hparams" / f"{name}.yaml").write_text(hparams_yaml(selection, name, search))
    (config_dir / "dataset").mkdir()
    (config_dir / "dataset" / "synthetic_b.yaml").write_text(
        "defaults:\n  - synthetic\n  - _self_\n\nname: synthetic_b\ndata_seed: 4321\n")
    return config_dir


def test_hparams_table_sets_each_tasks_selected_values_and_refuses_unsearched_runs(tmp_path):
    config_dir = _table(tmp_path)
    search = [f"hydra.searchpath=[file://{config_dir}]", "+hparams=sel", "backbone=vit_micro"]
    a = compose_config([*search, "dataset=synthetic"])
    b = compose_config([*search, "dataset=synthetic_b"])
    assert (a.optim.optimizer.lr, a.optim.optimizer.weight_decay, a.pet.scale) == (1e-2, 1e-3, 10.0)
    assert (b.optim.optimizer.lr, b.optim.optimizer.weight_decay, b.pet.scale) == (3e-3, 1e-4, 0.1)
    assert a.dataset.protocol == "test" and a.hparams.selected.synthetic.lora.none.search_size == 2
    entry = b.hparams.selected.synthetic_b.lora.none
    assert entry.val_acc == 70.0 and entry.run_dirs[0].endswith("lr0.003_wd0.0001_scale0.1_None")
    overridden = compose_config([*search, "dataset=synthetic", "optim.optimizer.lr=0.5"])
    assert overridden.optim.optimizer.lr == 0.5  # the command line still wins
    other = compose_config([*search, "dataset=synthetic", "pet=adaptformer"])
    with pytest.raises(HparamsError, match="no values for dataset=synthetic pet=adaptformer merge=none"):
        check_hparams(other)
    with pytest.raises(HparamsError, match="experiment=tune dataset=synthetic pet=adaptformer"):
        validate_config(other, check_files=False)


@pytest.mark.slow
def test_hparams_table_drives_a_run(tmp_path):
    from fpet.train import main

    config_dir = _table(tmp_path)
    cfg = compose_config([f"hydra.searchpath=[file://{config_dir}]", "+hparams=sel", "backbone=vit_micro",
                          "dataset=synthetic_b", "logger=none", "train.progress=false", "train.epochs=1",
                          "train.limit_batches=1", "train.batch_size=8", "dataset.num_test=16", "bench.flops=false",
                          "bench.latency=false", "bench.train=false", "train.save_task=false",
                          f"paths.output_dir={tmp_path / 'out'}"])
    results = main(cfg, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["config"]["optim"]["optimizer"]["lr"] == 3e-3 and stored["config"]["pet"]["scale"] == 0.1
    assert stored["hparams"]["name"] == "sel" and stored["hparams"]["val_acc"] == 70.0
    assert stored["protocol"] == "test" and results["train_split"] == "train800val200"
    assert stored["data"]["source"] == "synthetic" and len(stored["data"]["hash"]) == 64


def test_provenance_changes_with_a_list_file_and_uses_the_exporters_manifest(tmp_path, make_cfg):
    write_fake_task(tmp_path, "dtd", sizes={"train800": 8, "val200": 4, "test": 6})
    cfg = make_cfg("dataset=dtd", f"paths.data_dir={tmp_path}", fast=["backbone=vit_micro", "logger=none"])
    first = data_provenance(cfg)
    assert first["source"] == "noah_format" and first["hashed"] == "list files + image sizes"
    task_dir = tmp_path / "vtab-1k" / "dtd"
    test_list = task_dir / "test.txt"
    lines = test_list.read_text().splitlines(keepends=True)
    test_list.write_text("".join(lines[:-1]))
    second = data_provenance(cfg)
    assert second["hash"] != first["hash"]
    assert second["hash"] == lists_hash(task_dir)

    splits = {s: {"list_sha256": hashlib.sha256((task_dir / f"{s}.txt").read_bytes()).hexdigest()}
              for s in ("train800", "val200", "train800val200", "test")}
    manifest = {"format": 1, "tasks": {"dtd": {"folder": "dtd", "splits": splits, "tfds": "dtd:3.0.1",
                                               "tfds_version": "3.0.1"}}}
    (tmp_path / "vtab-1k" / "manifest.json").write_text(json.dumps(manifest))
    exported = data_provenance(cfg)
    assert exported["source"] == "tfds_export" and exported["tfds_version"] == "3.0.1"
    test_list.write_text("".join(lines))  # a list edited after the export: no longer the exporter's folder
    assert data_provenance(cfg)["source"] == "noah_format"


def test_image_size_change_changes_the_folder_hash(tmp_path):
    root = write_fake_task(tmp_path, "dtd", sizes={"train800": 4, "val200": 2, "test": 3})
    before = lists_hash(root)
    with (root / "images" / "img0.jpg").open("ab") as f:
        f.write(b"\0")
    assert lists_hash(root) != before


def test_tables_refuse_rows_that_mix_data_sources(tmp_path):
    write_result(tmp_path, "synthetic", protocol="test", data={"source": "noah_format", "hash": "a"})
    write_result(tmp_path, "synthetic", protocol="test", seed=1, data={"source": "tfds_export", "hash": "b"})
    with pytest.raises(MixedDataError, match="noah_format, tfds_export"):
        make_tables(tmp_path, tmp_path / "t", figures=False)
    study, _ = make_tables(tmp_path, tmp_path / "t", figures=False, allow_mixed_sources=True)
    assert study.mixed_sources and "MIXED DATA" in (tmp_path / "t" / "table2.md").read_text()


def test_tables_show_the_paper_protocol_and_the_val_selected_one_side_by_side(tmp_path):
    for seed in range(3):
        write_result(tmp_path / "recipe", "synthetic", protocol="test", seed=seed, acc=50.0, acc_best=58.0)
        write_result(tmp_path / "selected", "synthetic", protocol="test", seed=seed, acc=61.0 + seed,
                     acc_best=70.0, hparams="sel")
    make_tables(tmp_path, tmp_path / "t", protocol="both", figures=False)
    with (tmp_path / "t" / "table2.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "LoRA"]
    assert [r["protocol"] for r in rows] == ["best of test every 10 epochs (paper code), mean of 3 seeds",
                                            "val-selected (sel), final epoch, mean of 3 seeds"]
    assert rows[0]["synthetic"].startswith("58.0") and rows[1]["synthetic"].startswith("62.0")
    make_tables(tmp_path, tmp_path / "s", protocol="selected", figures=False)
    with (tmp_path / "s" / "table2.csv").open() as f:
        assert [r["synthetic"][:4] for r in csv.DictReader(f) if r["method"] == "LoRA"] == ["62.0"]


ROOT = Path(__file__).resolve().parents[1]
TINY = ["backbone=vit_micro", "logger=none", "train.progress=false", "train.epochs=1", "train.limit_batches=2",
        "train.batch_size=8", "dataset.num_test=32", "optim.scheduler.warmup_t=0", "bench.latency=false",
        "bench.train=false", "bench.flops=false", "train.save_task=false"]


def _run(cmd: list[str], cwd: Path) -> str:
    import subprocess
    import sys

    cmd = [sys.executable if c == "python" else str(ROOT / c) if c in ("train.py", "scripts/select_hparams.py",
                                                                       "scripts/make_tables.py") else c
           for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_search_select_final_runs_and_table_end_to_end(tmp_path):
    """The README's Protocols commands on the synthetic task: a 2-setting search, selection, the printed final
    command (1 seed here), the table; a re-launched search trains nothing."""
    import shlex

    out = tmp_path / "out"
    search = ["python", "train.py", "-m", "experiment=tune", "pet=lora", "dataset=synthetic", *TINY,
              "optim.optimizer.weight_decay=1e-4", f"paths.output_dir={out}"]
    _run(search, tmp_path)
    trials = sorted(p.parent.name for p in (out / "tune").rglob("results.json"))
    assert trials == ["lr0.001_wd0.0001_scheduler_warmup_t0_bs8", "lr0.01_wd0.0001_scheduler_warmup_t0_bs8"]
    printed = _run(["python", "scripts/select_hparams.py", str(out / "tune"), "--out", str(tmp_path / "cfg"),
                    "--name", "e2e", "--seeds", "0"], tmp_path)
    command = printed.strip().splitlines()[-1]
    assert command.startswith("python train.py -m +hparams=e2e dataset=synthetic pet=lora merge=none seed=0")
    _run(shlex.split(command), tmp_path)
    final = json.loads(next((out / "selected" / "e2e").rglob("results.json")).read_text())
    assert final["protocol"] == "test" and final["hparams"]["search_size"] == 2
    assert final["config"]["optim"]["optimizer"]["lr"] == final["hparams"]["values"]["optim.optimizer.lr"]
    _run(["python", "scripts/make_tables.py", str(out), "--protocol", "selected", "--no-figures"], tmp_path)
    with (out / "tables" / "table2.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["method"] == "LoRA")
    assert row["protocol"] == "val-selected (e2e), final epoch, 1 seed" and row["synthetic"] != ""
    assert _run(search, tmp_path).count("skipping finished run") == 2


@pytest.mark.slow
def test_optuna_search_runs_budgeted_trials_as_ordinary_runs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = tmp_path / "out"
    cmd = ["python", "train.py", "-m", "experiment=tune_optuna", "pet=lora", "dataset=synthetic", *TINY,
           "hydra.sweeper.n_trials=2", f"paths.output_dir={out}"]
    _run(cmd, tmp_path)
    trials = sorted((out / "tune").rglob("results.json"))
    assert len(trials) == 2 and all(json.loads(t.read_text())["protocol"] == "val" for t in trials)
    assert all(t.parent.name.startswith("lr") and "_wd" in t.parent.name for t in trials)
    assert len(select(load_trials(out / "tune")[0]).choices) == 1
