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
from functools import lru_cache
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf

from fpet.data.vtab_rules import GROUPS, TASKS

log = logging.getLogger(__name__)

VTAB_TASKS: dict[str, str] = {name: spec.group for name, spec in TASKS.items()}
"""The 19 tasks in the paper's column order -> group (from `fpet.data.vtab_rules.TASKS`, the one task list)."""

VTAB_GROUPS = GROUPS
ACC_KEYS = ("acc", "acc_best")
"""The accuracy protocols of results.json: final (after the last epoch) and best of the periodic evaluations."""
EFFICIENCY_KEYS = ("latency_ms", "throughput", "gflops", "peak_mem_mb", "train_act_mb", "train_s_per_iter",
                   "params_pet", "params_merge", "storage_bytes")
NOT_OPTIONS = ("name", "tag")
"""Merge config keys that never make a variant."""


@lru_cache(maxsize=None)
def _merge_defaults(merge: str, backbone: str, merge_layer: Optional[int]) -> tuple[tuple[str, Any], ...]:
    from fpet.config import compose_config

    extra = [] if merge_layer is None else [f"backbone.merge_layer={merge_layer}"]
    for overrides in ([f"backbone={backbone}", *extra], extra):  # an unknown backbone: the default one's
        try:
            cfg = compose_config([f"merge={merge}", *overrides])
        except Exception:  # noqa: BLE001 - a strategy or backbone this checkout does not have
            continue
        return tuple(OmegaConf.to_container(cfg.merge, resolve=True).items())
    return ()


def merge_defaults(merge: str, backbone: str, merge_layer: Optional[int] = None) -> dict[str, Any]:
    """The defaults of `merge=<merge>` on `backbone` (its configs/merge/<merge>.yaml composed with the backbone:
    the one source of the paper settings), `{}` when this checkout has no such strategy."""
    return dict(_merge_defaults(merge, backbone, merge_layer))


def option_text(key: str, value: Any) -> str:
    """One merge option in a variant name: `@4` (layer), `+r16`, `+no_stop_grad`, `+checkerboard` (split)."""
    if key == "layer":
        from fpet.config import layer_tag

        return "@" + (layer_tag(value) or "all")
    if key == "r":
        return f"+r{value}"
    if isinstance(value, bool):
        return f"+{key}" if value else f"+no_{key}"
    return f"+{value}" if key == "split" else f"+{key}={value}"


@dataclass(frozen=True)
class Method:
    """A PET method with a merge strategy and the merge options that depart from the strategy's defaults."""

    pet: str
    merge: str = "none"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def variant(self) -> str:
        """The merge setting as a short name: `none`, `fpet`, `fpet@4` (layer 4), `bsm+checkerboard`,
        `fpet+no_stop_grad`, `tome+r16`; options at the strategy's default (the paper's setting) are left out."""
        if self.merge == "none":
            return "none"
        return self.merge + "".join(option_text(k, v) for k, v in self.options)

    @property
    def key(self) -> tuple[str, str]:
        """(pet, variant): the identity of a table row."""
        return self.pet, self.variant

    @staticmethod
    def at_layer(pet: str, merge: str, layer: int, backbone: str = "vit_b16") -> "Method":
        """`pet` with `merge` at block `layer`, its other options at their defaults (the layer tables' cells)."""
        default = merge_defaults(merge, backbone).get("layer")
        return Method(pet, merge, () if layer == default else (("layer", layer),))


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
    selection: Optional[str] = None
    """Name of the `+hparams=<name>` table the run's hyper-parameters came from; None: the paper's recipe."""
    data_source: str = "unknown"
    """Which data the run read (`data.source` of results.json, fpet.data.provenance)."""
    data_hash: Optional[str] = None
    eval_every: Optional[int] = None


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


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def method_of(results: dict[str, Any]) -> Method:
    """The table row of a results record: its PET method, merge strategy and the merge options (from its config;
    the top-level `merge_*` keys for older records) that differ from the strategy's defaults."""
    merge = results.get("merge") or "none"
    if merge == "none":
        return Method(results["pet"])
    config = results.get("config") or {}
    options = dict(config.get("merge") or {})
    for key in ("layer", "r", "split"):
        options.setdefault(key, results.get(f"merge_{key}"))
    middle = (config.get("backbone") or {}).get("merge_layer")
    defaults = merge_defaults(merge, results.get("backbone") or "vit_b16", middle)
    differing = tuple((k, _hashable(v)) for k, v in sorted(options.items())
                      if k not in NOT_OPTIONS and v is not None and v != defaults.get(k))
    return Method(results["pet"], merge, differing)


def run_from_results(results: dict[str, Any], path: str) -> Run:
    """A `Run` from one results.json record."""
    task = results["task"]
    group = ((results.get("config") or {}).get("dataset") or {}).get("group") or VTAB_TASKS.get(task, "other")
    return Run(
        method=method_of(results), task=task, group=group, seed=int(results["seed"]),
        accuracy={k: results.get(k) for k in ACC_KEYS},
        efficiency={k: results.get(k) for k in EFFICIENCY_KEYS}, backbone=results["backbone"],
        protocol=results.get("protocol") or "test", device=results.get("device") or "",
        finished_at=results.get("finished_at") or "", path=path, **provenance_of(results))


def provenance_of(results: dict[str, Any]) -> dict[str, Any]:
    """The `Run` fields saying where a record's hyper-parameters and data came from."""
    config = results.get("config") or {}
    hparams = results.get("hparams") or config.get("hparams") or {}
    data = results.get("data") or {}
    return {"selection": hparams.get("name") if isinstance(hparams, dict) else None,
            "data_source": data.get("source") or "unknown", "data_hash": data.get("hash"),
            "eval_every": (config.get("train") or {}).get("eval_every")}


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
        latest[(run.backbone, run.protocol, run.selection, run.method.key, run.task, run.seed)] = run
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
