"""The paper's sweep presets (configs/experiment/table*.yaml) against the PET, merge and dataset configs.

These need the configs of the merge strategies, the PET methods and the 19 VTAB-1K tasks; a test skips while a whole
family is absent (a branch before they were merged) and fails when a family is only partly there.
"""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from conftest import ROOT
from fpet.tables import VTAB_TASKS

CONFIGS = ROOT / "configs"
FAMILIES = {
    "merge": ["tome", "bsm", "fpet", "avgpool", "maxpool", "ltmp", "trpts"],
    "pet": ["repadapter", "bi_lora", "bi_adaptformer", "full", "linear", "trpts"],
    "dataset": list(VTAB_TASKS),
}


def require(*families: str) -> None:
    """Skip if a family's configs are all absent; fail naming the missing ones if only some are there."""
    for family in families:
        missing = [n for n in FAMILIES[family] if not (CONFIGS / family / f"{n}.yaml").exists()]
        if len(missing) == len(FAMILIES[family]):
            pytest.skip(f"no configs/{family}/ configs of the paper yet (run after merging them)")
        assert not missing, f"configs/{family}/ lacks {missing}"


def compose_cell(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def sweep_cells(experiment: str, *extra: str) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes of `-m experiment=<experiment> <extra>`."""
    params = compose_cell(f"experiment={experiment}").hydra.sweeper.params
    arguments = [f"{k}={v}" for k, v in params.items()] + list(extra)
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]


@pytest.mark.parametrize("experiment, runs", [("vtab1k", 19), ("table1", 190), ("table2", 190), ("table3", 133),
                                              ("tableA3", 380), ("tableA4", 380), ("tableA6", 380), ("trpts", 19)])
def test_preset_grid_sizes(experiment, runs):
    require("merge", "pet", "dataset")
    assert len(sweep_cells(experiment)) == runs


def test_every_vtab_task_composes_in_its_group():
    require("dataset")
    for task, group in VTAB_TASKS.items():
        cfg = compose_cell(f"dataset={task}")
        assert (cfg.dataset.name, cfg.dataset.group) == (task, group)


@pytest.mark.parametrize("experiment, pet, expected", [
    ("table2", None, {(p, m) for p in ("lora", "adaptformer", "repadapter", "bi_lora", "bi_adaptformer")
                      for m in ("none", "fpet")}),
    ("table3", "bi_adaptformer", {("bi_adaptformer", m) for m in
                                  ("none", "ltmp", "tome", "bsm", "bsm+checkerboard", "fpet+no_stop_grad", "fpet")}),
    pytest.param("tableA6", None, {(p, m) for p in ("lora", "adaptformer", "repadapter", "bi_lora", "bi_adaptformer")
                                   for m in ("none", "ltmp", "tome", "fpet")}, marks=pytest.mark.slow),  # 20 cells, 7 s
    ("trpts", "trpts", {("trpts", "trpts")}),
    ("tableA3", "adaptformer", {("adaptformer", f"{m}@{layer}" if layer != 6 else m)
                                for m in ("maxpool", "avgpool", "bsm", "fpet") for layer in (0, 1, 2, 4)} |
     {("adaptformer", m) for m in ("maxpool", "avgpool", "bsm", "fpet")}),
    ("tableA4", "bi_adaptformer", {("bi_adaptformer", f"{m}@{layer}" if layer != 6 else m)
                                   for m in ("maxpool", "avgpool", "bsm", "fpet") for layer in (0, 1, 2, 4)} |
     {("bi_adaptformer", m) for m in ("maxpool", "avgpool", "bsm", "fpet")}),
])
def test_preset_cells_are_the_paper_rows_in_distinct_run_dirs(experiment, pet, expected):
    """Each cell (one task) composes, is the table row make_tables expects, and has a run dir of its own."""
    require("merge", "pet", "dataset")
    from omegaconf import OmegaConf

    from fpet.tables.collect import method_of

    rows, dirs = set(), set()
    for cell in sweep_cells(experiment, "dataset=dtd"):
        cfg = compose_cell(f"experiment={experiment}", *cell)
        record = {"pet": cfg.pet.name, "merge": cfg.merge.name, "backbone": cfg.backbone.name,
                  "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("merge", "backbone")}}
        rows.add(method_of(record).key)  # the row make_tables puts this run in
        dirs.add(cfg.hydra.sweep.subdir)
        assert pet is None or cfg.pet.name == pet
    assert rows == expected
    assert len(dirs) == len(rows), "two cells of the preset would share a run directory"
