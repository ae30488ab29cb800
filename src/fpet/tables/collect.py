"""results.json files -> runs -> per-method summaries (task accuracies, group means, Average, efficiency).

The VTAB-1K "Average" is the mean of the three group means (Natural, Specialized, Structured), not of the 19 tasks.
Accuracies are averaged over seeds per task; the +- std of a group mean or of the Average is the sample standard
deviation, over seeds, of that mean computed per seed (only seeds that cover every task of it count).

A table cell is one (backbone, protocol, hyper-parameter origin, method, task, seed). Runs of one cell with the same
run fingerprint (fpet.identity.config_fingerprint) are duplicates: the latest is used and the others are named.
Runs of one cell whose fingerprints differ are refused (`ConflictingRunsError` names each run and the differing keys)
until `where` (`--where KEY=VALUE`) keeps one config.
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
from fpet.errors import UserError
from fpet.identity import config_changes, config_fingerprint, flatten, location_keys

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
    cfg = default_config(backbone=backbone, merge=merge) or default_config(merge=merge)  # unknown backbone: default's
    if cfg is None:
        return ()  # a strategy this checkout does not have
    if merge_layer is not None:
        cfg.backbone.merge_layer = merge_layer
    return tuple(OmegaConf.to_container(cfg.merge, resolve=True).items())


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
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The run fingerprint of the recorded config (fpet.identity.config_fingerprint), dotted keys; {}: none recorded."""

    @property
    def cell(self) -> tuple:
        """What one table cell holds: backbone, data protocol, hyper-parameter origin, row, task, seed."""
        return self.backbone, self.protocol, self.selection, self.method.key, self.task, self.seed

    def describe(self) -> str:
        """`<row>, <task>, seed <seed>` for messages."""
        pet, variant = self.method.key
        return f"{pet} + {variant}, {self.task}, seed {self.seed}"


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
        finished_at=results.get("finished_at") or "", path=path, config=recorded_fingerprint(results.get("config")),
        **provenance_of(results))


def recorded_fingerprint(config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The run fingerprint (what decides the numbers) of a results.json `config`, flattened to dotted keys."""
    return flatten(config_fingerprint(OmegaConf.create(config))) if config else {}


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


class ConflictingRunsError(UserError, ValueError):
    """Runs of one table cell (method, task, seed) differ in config; refused rather than one picked silently."""


class RunFilterError(UserError, ValueError):
    """A `--where KEY=VALUE` filter that is malformed or names a key no run records."""


@lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> Any:
    from fpet.config import compose_config

    try:
        return compose_config(list(overrides))
    except Exception:  # noqa: BLE001 - an option this checkout does not have
        return None


VTAB_DEFAULTS = ["/vtab_task@_here_", "_self_"]


@lru_cache(maxsize=None)
def group_node(group: str, name: str) -> Any:
    """The `<group>` node of `<group>=<name>` (None: no such option). A file without a defaults list, or a VTAB
    task file (the shared configs/vtab_task.yaml, then its own keys), is read as Hydra merges it, without a compose
    (0.2 s each); other files are composed."""
    from fpet.config import CONFIG_DIR

    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        return None
    node = OmegaConf.load(path)
    defaults = list(node.pop("defaults", []))
    if not defaults:
        return node
    if group == "dataset" and defaults == VTAB_DEFAULTS:
        return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "vtab_task.yaml"), node)
    composed = _composed((f"{group}={name}",))
    return None if composed is None else composed[group]


def default_config(**options: Optional[str]) -> Any:
    """This checkout's default train config with the given options (`backbone=`, `pet=`, `merge=`, `dataset=`;
    None: the default one), unresolved; None when an option does not exist here."""
    import copy

    cfg = copy.deepcopy(_composed(()))
    for group, name in options.items():
        if name is not None:
            node = group_node(group, name)
            if node is None:
                return None
            cfg[group] = node
    return cfg


@lru_cache(maxsize=None)
def default_fingerprint(backbone: str, pet: str, merge: str, task: str) -> tuple[tuple[tuple[str, Any], ...],
                                                                                   frozenset[str]]:
    """This checkout's default run fingerprint of `backbone=.. pet=.. merge=.. dataset=..` (dotted keys; the
    dataset group is left out for a task without a config; empty for a method or strategy this checkout lacks) and
    its location keys (paths, not config)."""
    cfg = default_config(backbone=backbone, pet=pet, merge=merge)
    if cfg is None:
        known = default_config(backbone=backbone) or default_config()
        return (), frozenset(location_keys(OmegaConf.to_container(known, resolve=False)))
    data = group_node("dataset", task)
    if data is not None:
        cfg.dataset = data
    fingerprint = config_fingerprint(cfg)
    if data is None:
        fingerprint.pop("dataset", None)
    raw = OmegaConf.to_container(cfg, resolve=False)
    return tuple(_hashable_items(flatten(fingerprint))), frozenset(location_keys(raw))


def _hashable_items(flat: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, repr(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()]


CELL_KEYS = ("seed", "dataset.protocol", "merge.tag")
"""Fingerprint keys that are the cell itself (or only name it): never a config difference within a cell."""


def _defaults_of(run: Run) -> tuple[dict[str, Any], frozenset[str]]:
    items, locations = default_fingerprint(run.backbone, run.method.pet, run.method.merge, run.task)
    return {k: v for k, v in items}, locations


def run_config_differences(a: Run, b: Run) -> list[str]:
    """Dotted fingerprint keys both runs record with different values (cell keys and file locations left out)."""
    locations = _defaults_of(a)[1]
    return [k for k in config_changes(a.config, b.config, shared_only=True)
            if k not in CELL_KEYS and k not in locations]


def non_default(run: Run) -> Optional[dict[str, Any]]:
    """The recorded fingerprint keys of `run` whose values differ from this checkout's defaults for its backbone,
    method, merge strategy and task (merge options are in the row name; cell keys and locations left out); None
    when this checkout has no defaults for them (a method or strategy it lacks)."""
    defaults, locations = _defaults_of(run)
    if not defaults:
        return None
    out = {}
    for key, value in run.config.items():
        shown = repr(value) if isinstance(value, (list, dict)) else value
        if key in defaults and shown != defaults[key] and key not in CELL_KEYS and key not in locations \
                and not key.startswith("merge."):
            out[key] = value
    return out


def _value_text(value: Any) -> str:
    return "null" if value is None else str(value)


def deduplicate(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per table cell (`Run.cell`). Same fingerprint: the latest finished one, and a line naming the kept and
    the ignored runs for each such cell. Different fingerprints: `ConflictingRunsError` naming every run of each
    such cell with its values of the differing keys."""
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.finished_at):
        cells[run.cell].append(run)
    kept, duplicates, conflicts = [], [], []
    for cell_runs in cells.values():
        latest = cell_runs[-1]
        kept.append(latest)
        if len(cell_runs) == 1:
            continue
        keys = sorted({k for i, a in enumerate(cell_runs) for b in cell_runs[i + 1:]
                       for k in run_config_differences(a, b)})
        if keys:
            lines = [f"    {r.path} (finished {r.finished_at or '?'}): " +
                     ", ".join(f"{k}={_value_text(r.config.get(k))}" for k in keys) for r in cell_runs]
            conflicts.append(f"{latest.describe()}: {len(cell_runs)} runs differ in {', '.join(keys)}\n" +
                             "\n".join(lines))
        else:
            duplicates.append(f"{latest.describe()}: {len(cell_runs)} runs of the same config; using {latest.path} "
                              f"(finished {latest.finished_at or '?'}), ignoring " +
                              ", ".join(r.path for r in cell_runs[:-1]))
    if conflicts:
        raise ConflictingRunsError(
            "runs of the same table cell (method, task, seed) were made with different configs, so no cell can be "
            "filled without choosing:\n  - " + "\n  - ".join(conflicts) + "\nKeep one config with --where KEY=VALUE "
            "(make_tables(..., where={KEY: VALUE}); e.g. --where train.epochs=100), or move the other runs out of "
            "the results folder")
    for line in duplicates:
        log.warning("duplicate runs: %s", line)
    return kept, duplicates


def _matches(value: Any, text: str) -> bool:
    """A recorded config value equals a command-line value (`6`, `0.003`, `3e-3`, `true`, `null`, `adamw`)."""
    if value is None or isinstance(value, bool):
        return text.strip().lower() == _value_text(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return str(value) == text.strip()


def select_runs(runs: list[Run], where: dict[str, str]) -> list[Run]:
    """The runs whose recorded fingerprint has every `where` key at its value (`--where KEY=VALUE`); a key no run
    records is a `UserError` with the nearest recorded keys."""
    import difflib

    known = {k for r in runs for k in r.config}
    for key in where:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=3) or sorted(known)[:5]
            raise RunFilterError(f"--where {key}=...: no run records {key!r} in its config; recorded keys "
                                 f"include {', '.join(near)}")
    chosen = [r for r in runs if all(k in r.config and _matches(r.config[k], v) for k, v in where.items())]
    log.info("--where %s: %d of %d runs kept", " ".join(f"{k}={v}" for k, v in where.items()), len(chosen), len(runs))
    return chosen


@dataclass
class Summary:
    """One method over the tasks of a table: per task, per group, Average, and mean efficiency over its runs."""

    key: tuple[str, str]
    tasks: dict[str, Stat] = field(default_factory=dict)
    groups: dict[str, Optional[Stat]] = field(default_factory=dict)
    average: Optional[Stat] = None
    """VTAB-1K's Average as the FPET paper reports it: the mean of the group means."""
    flat: Optional[Stat] = None
    """The mean of all the table's tasks (TR-PTS reports this one for VTAB-1K)."""
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
    summary.flat = _group_stat(acc, [t for tasks in groups.values() for t in tasks], seeds)
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
