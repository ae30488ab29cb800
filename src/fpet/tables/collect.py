"""results.json files -> runs -> per-method summaries (task accuracies, group means, Average, efficiency).

The VTAB-1K "Average" is the mean of the three group means (Natural, Specialized, Structured), not of the 19 tasks.
Accuracies are averaged over seeds per task; the +- std of a group mean or of the Average is the sample standard
deviation, over seeds, of that mean computed per seed (only seeds that cover every task of it count).
"""
from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

VTAB_TASKS: dict[str, str] = {
    "cifar100": "natural", "caltech101": "natural", "dtd": "natural", "oxford_flowers102": "natural",
    "oxford_iiit_pet": "natural", "svhn": "natural", "sun397": "natural",
    "patch_camelyon": "specialized", "eurosat": "specialized", "resisc45": "specialized",
    "diabetic_retinopathy": "specialized",
    "clevr_count": "structured", "clevr_dist": "structured", "dmlab": "structured", "kitti_dist": "structured",
    "dsprites_loc": "structured", "dsprites_ori": "structured", "smallnorb_azi": "structured",
    "smallnorb_ele": "structured",
}
"""The 19 tasks in the paper's column order -> group (shared/reference/vtab1k.md)."""

VTAB_GROUPS = ("natural", "specialized", "structured")
ACC_KEYS = ("acc", "acc_best")
"""The accuracy protocols of results.json: final (after the last epoch) and best of the periodic evaluations."""
EFFICIENCY_KEYS = ("latency_ms", "throughput", "gflops", "peak_mem_mb", "train_act_mb", "train_s_per_iter",
                   "params_pet", "params_merge", "storage_bytes")


MERGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fpet": {"layer": 6, "split": "checkerboard", "stop_grad": True},
    "bsm": {"layer": 6, "r": 98, "split": "stripe"},
    "tome": {"r": 8},
    "avgpool": {"layer": 6},
    "maxpool": {"layer": 6},
}
"""The options that define each strategy's runs and their paper setting (DESIGN section 5): a run that departs
from one is a variant of its own; options not listed here do not change a strategy's row."""


@dataclass(frozen=True)
class Method:
    """A PET method with a merge strategy and the strategy's options (None where not applicable)."""

    pet: str
    merge: str = "none"
    layer: Optional[int] = None
    r: Optional[int] = None
    split: Optional[str] = None
    stop_grad: Optional[bool] = None
    default_layer: Optional[int] = None
    """The backbone's middle block (`backbone.merge_layer`), where the paper merges; None = 6 (ViT-B/16)."""

    @property
    def variant(self) -> str:
        """The merge setting as a short name: `none`, `fpet`, `fpet@4` (layer 4), `bsm+checkerboard`,
        `fpet+no_stop_grad`, `tome+r16`; options at the paper's setting are left out."""
        if self.merge == "none":
            return "none"
        options = MERGE_DEFAULTS.get(self.merge, dict.fromkeys(("layer", "r", "split", "stop_grad")))
        name = self.merge
        for option, default in options.items():
            value = getattr(self, option)
            if option == "layer" and self.default_layer is not None:
                default = self.default_layer
            if value is None or value == default:
                continue
            if option == "layer":
                name += f"@{value}"
            elif option == "r":
                name += f"+r{value}"
            elif option == "stop_grad":
                name += "+stop_grad" if value else "+no_stop_grad"
            else:
                name += f"+{value}"
        return name

    @property
    def key(self) -> tuple[str, str]:
        """(pet, variant): the identity of a table row."""
        return self.pet, self.variant


@dataclass(frozen=True)
class Run:
    """One finished run, reduced to what the tables use."""

    method: Method
    task: str
    group: str
    seed: int
    accuracy: dict[str, Optional[float]]
    efficiency: dict[str, Any]
    backbone: str
    protocol: str
    device: str
    finished_at: str
    path: str


@dataclass(frozen=True)
class Stat:
    """Mean over `n` values with their sample std (None for a single value)."""

    mean: float
    std: Optional[float] = None
    n: int = 1

    @staticmethod
    def of(values: Iterable[float]) -> Optional["Stat"]:
        values = [float(v) for v in values]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return Stat(statistics.fmean(values), std, len(values))


def _method(results: dict[str, Any]) -> Method:
    merge = results.get("merge") or "none"
    if merge == "none":
        return Method(results["pet"])
    config = results.get("config") or {}
    stop_grad = (config.get("merge") or {}).get("stop_grad")
    middle = (config.get("backbone") or {}).get("merge_layer")
    layer, r = results.get("merge_layer"), results.get("merge_r")
    return Method(results["pet"], merge, None if layer is None else int(layer), None if r is None else int(r),
                  results.get("merge_split"), None if stop_grad is None else bool(stop_grad),
                  None if middle is None else int(middle))


def run_from_results(results: dict[str, Any], path: str) -> Run:
    """A `Run` from one results.json record."""
    task = results["task"]
    group = ((results.get("config") or {}).get("dataset") or {}).get("group") or VTAB_TASKS.get(task, "other")
    return Run(
        method=_method(results), task=task, group=group, seed=int(results["seed"]),
        accuracy={k: results.get(k) for k in ACC_KEYS},
        efficiency={k: results.get(k) for k in EFFICIENCY_KEYS}, backbone=results["backbone"],
        protocol=results.get("protocol") or "test", device=results.get("device") or "",
        finished_at=results.get("finished_at") or "", path=path)


def find_results(root: str | Path) -> list[Path]:
    """Every results.json below `root` (recursively), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {str(root)!r} does not exist; pass the folder that holds the "
                                f"run directories, e.g. outputs/multirun")
    return sorted(root.rglob("results.json"))


def load_runs(root: str | Path) -> list[Run]:
    """Runs of every complete results.json below `root`; unreadable or unfinished files are skipped with a log."""
    runs = []
    for path in find_results(root):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("skipping unreadable %s (%s)", path, err)
            continue
        if not isinstance(results, dict) or results.get("complete") is not True:
            log.warning("skipping unfinished %s", path)
            continue
        if results.get("eval_only"):  # a re-evaluation of a task file (train.py eval_only=true), not a run
            log.info("skipping eval-only %s", path)
            continue
        runs.append(run_from_results(results, str(path)))
    return runs


def deduplicate(runs: list[Run]) -> list[Run]:
    """One run per (backbone, protocol, method, task, seed): the latest finished one (e.g. a single run and the
    same cell of a sweep)."""
    latest: dict[tuple, Run] = {}
    for run in sorted(runs, key=lambda r: r.finished_at):
        latest[(run.backbone, run.protocol, run.method.key, run.task, run.seed)] = run
    if len(latest) < len(runs):
        log.info("%d duplicate runs (same method, task and seed) ignored; the latest of each is used",
                 len(runs) - len(latest))
    return list(latest.values())


@dataclass
class Summary:
    """One method over the tasks of a table: per task, per group, Average, and mean efficiency over its runs."""

    key: tuple[str, str]
    tasks: dict[str, Stat] = field(default_factory=dict)
    groups: dict[str, Optional[Stat]] = field(default_factory=dict)
    average: Optional[Stat] = None
    efficiency: dict[str, Optional[float]] = field(default_factory=dict)
    runs: int = 0


def _per_seed_mean(acc: dict[str, dict[int, float]], tasks: list[str], seed: int) -> Optional[float]:
    values = [acc[t][seed] for t in tasks if seed in acc.get(t, {})]
    return statistics.fmean(values) if len(values) == len(tasks) else None


def _group_stat(acc: dict[str, dict[int, float]], tasks: list[str], seeds: list[int]) -> Optional[Stat]:
    """Mean over `tasks` of the seed-mean accuracy (None if a task has no run); std over per-seed means."""
    if not tasks or any(not acc.get(t) for t in tasks):
        return None
    mean = statistics.fmean(statistics.fmean(acc[t].values()) for t in tasks)
    per_seed = [m for s in seeds if (m := _per_seed_mean(acc, tasks, s)) is not None]
    return Stat(mean, statistics.stdev(per_seed) if len(per_seed) > 1 else None, len(per_seed))


def summarize(key: tuple[str, str], runs: list[Run], groups: dict[str, list[str]],
              acc_key: str = "acc_best") -> Summary:
    """`Summary` of the runs of one table row `key` (pet, variant) with accuracy `acc_key`; `groups` maps each
    group of the table to its tasks (in column order)."""
    acc: dict[str, dict[int, float]] = defaultdict(dict)
    for run in runs:
        if run.accuracy.get(acc_key) is not None:
            acc[run.task][run.seed] = float(run.accuracy[acc_key])
    seeds = sorted({s for per_task in acc.values() for s in per_task})
    summary = Summary(key, runs=len(runs))
    summary.tasks = {t: Stat.of(v.values()) for t, v in acc.items()}
    summary.groups = {g: _group_stat(acc, tasks, seeds) for g, tasks in groups.items()}
    if groups and all(summary.groups.values()):
        all_groups = list(groups.values())
        mean = statistics.fmean(s.mean for s in summary.groups.values())
        per_seed = []
        for seed in seeds:
            means = [_per_seed_mean(acc, tasks, seed) for tasks in all_groups]
            if all(m is not None for m in means):
                per_seed.append(statistics.fmean(means))
        summary.average = Stat(mean, statistics.stdev(per_seed) if len(per_seed) > 1 else None, len(per_seed))
    for key in EFFICIENCY_KEYS:
        values = [r.efficiency[key] for r in runs if r.efficiency.get(key) is not None]
        summary.efficiency[key] = statistics.fmean(values) if values else None
    return summary


def table_tasks(runs: list[Run]) -> dict[str, list[str]]:
    """Group -> tasks of the tables: the 19 VTAB-1K tasks when any run is a VTAB task (other tasks are left out),
    else every task found, grouped by its `dataset.group`."""
    if any(r.task in VTAB_TASKS for r in runs):
        other = sorted({r.task for r in runs} - VTAB_TASKS.keys())
        if other:
            log.info("tasks outside VTAB-1K left out of the tables: %s", ", ".join(other))
        return {g: [t for t, tg in VTAB_TASKS.items() if tg == g] for g in VTAB_GROUPS}
    groups: dict[str, list[str]] = defaultdict(list)
    for group, task in sorted({(r.group, r.task) for r in runs}):
        groups[group].append(task)
    return dict(groups)
