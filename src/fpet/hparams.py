"""Validation-selected hyper-parameters (README "Protocols"): search on train800 -> val200, select, final runs.

1. Search: `python train.py -m experiment=tune pet=lora dataset=cifar100,dtd` runs ordinary runs with
   `dataset.protocol=val`, one directory per trial: `<sweep dir>/<run_id>/<search tag>`, the tag built from the
   trial's hyper-parameter overrides (`search_tag`, the `${fpet.search_tag:}` resolver), so finished trials are
   skipped and interrupted ones resume like any run.
2. Selection (`scripts/select_hparams.py RESULTS_DIR`): per task x (PET method, merge strategy), the best final-epoch
   validation accuracy (mean over search seeds); ties go to the smaller `optim.optimizer.lr`, then the smaller
   `optim.optimizer.weight_decay`, then the other searched keys in name order, smaller first (`TIE_RULE`). Written
   as `configs/hparams/<name>.yaml` (`hparams_yaml`), with the run directory, validation accuracy and search size of
   every value.
3. Final runs: `+hparams=<name>` sets every selected key to `${fpet.hparam:<key>}`, which reads the entry of the
   run's task, PET method and merge strategy (`hparam_value`) and refuses a combination that was not searched.
"""
from __future__ import annotations

import json
import logging
import math
import shlex
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from fpet.errors import UserError
from fpet.identity import FINGERPRINT_IGNORES, flatten

log = logging.getLogger(__name__)

SEARCH_GROUPS = ("optim", "pet", "merge", "train")
"""Config groups whose keys a search may vary (the recipe, the PET method's and the merge strategy's options)."""
DERIVED_KEYS = ("pet.name", "merge.name", "merge.tag", "optim.optimizer._target_", "optim.optimizer._partial_",
                "optim.scheduler._target_", "optim.scheduler._partial_")
"""Keys that name or follow from other keys: never hyper-parameters of their own."""
NOT_SEARCHED = (*DERIVED_KEYS, "train.epochs", "train.eval_every", "train.limit_batches",
                *(f"{group}.{key}" for group, keys in FINGERPRINT_IGNORES.items() for key in keys))
"""Keys that are not hyper-parameters to select even when runs differ in them (derived, run length, bookkeeping)."""
LR, WD = "optim.optimizer.lr", "optim.optimizer.weight_decay"
TIE_RULE = (f"best final-epoch accuracy on val200 (train800 -> val200), mean over search seeds; ties broken by the "
            f"smaller {LR}, then the smaller {WD}, then the other searched keys in name order (smaller first)")
SHORT_NAMES = {LR: "lr", WD: "wd", "train.batch_size": "bs"}
"""Short names of common keys in a search tag; other keys lose their group (`pet.scale` -> `scale`), merge keys
keep a `merge_` prefix."""


class HparamsError(UserError, KeyError):
    """A `+hparams=<name>` table without an entry for the run, or search results that cannot be selected from."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# -- 1. search runs ---------------------------------------------------------------------------------------------

def searchable(key: str) -> bool:
    """A dotted config key a search may vary (`optim.optimizer.lr`, `pet.scale`, `merge.layer`, ...)."""
    return key.split(".", 1)[0] in SEARCH_GROUPS and "." in key and key not in NOT_SEARCHED


def _tag_value(value: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-+e" else "-" for c in value.strip("[]()'\" "))
    return keep.strip("-") or "none"


def tag_part(key: str, value: str) -> str:
    """One searched value in a directory name: `lr0.001`, `wd0.0001`, `scale10`, `merge_layer4`, `dim16`."""
    if key in SHORT_NAMES:
        name = SHORT_NAMES[key]
    elif key.startswith("merge."):
        name = "merge_" + key.split(".", 1)[1].replace(".", "_")
    else:
        name = key.split(".", 1)[1].replace(".", "_")
    return f"{name}{_tag_value(value)}"


def search_tag(overrides: Sequence[str]) -> str:
    """The trial directory name of a search run from its command-line overrides: every searchable key, in name
    order (`["optim.optimizer.lr=0.01", "pet=lora", "optim.optimizer.weight_decay=1e-4"]` -> `lr0.01_wd1e-4`);
    `default` when none is given."""
    parts = {}
    for text in overrides:
        key, sep, value = text.lstrip("+~").partition("=")
        if sep and searchable(key):
            parts[key] = tag_part(key, value)
    return "_".join(parts[k] for k in sorted(parts)) or "default"


def search_tag_resolver() -> str:
    """`${fpet.search_tag:}`: `search_tag` of the current Hydra job's overrides (`single` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "single"
    return search_tag(list(HydraConfig.get().overrides.task))


# -- 3. final runs ----------------------------------------------------------------------------------------------

def entry_of(root: DictConfig) -> Any:
    """The `hparams.selected` entry of the config's task, PET method and merge strategy; `HparamsError` naming
    what the table holds when there is none."""
    table, task, pet, merge = root.hparams, root.dataset.name, root.pet.name, root.merge.name
    entry = OmegaConf.select(table, f"selected.{task}.{pet}.{merge}", default=None)
    if entry is None:
        have = sorted(f"{t}/{p}/{m}" for t, pets in (table.get("selected") or {}).items()
                      for p, merges in pets.items() for m in merges)
        raise HparamsError(
            f"+hparams={table.name} has no values for dataset={task} pet={pet} merge={merge} (it holds "
            f"{', '.join(have[:8]) or 'nothing'}{' ...' if len(have) > 8 else ''}). Search that combination first "
            f"(python train.py -m experiment=tune dataset={task} pet={pet} merge={merge}), then select again; or "
            f"drop +hparams for the paper's recipe.")
    return entry


def check_hparams(cfg: DictConfig) -> None:
    """With `+hparams=<name>`: the table has an entry for this run (`HparamsError` otherwise), checked before
    anything reads a selected value (validation, the finished-run check)."""
    if cfg.get("hparams") is not None:
        entry_of(cfg)


def hparam_value(key: str, *, _root_: DictConfig) -> Any:
    """`${fpet.hparam:<key>}`: the selected value of `key` for this run's task, PET method and merge strategy."""
    entry = entry_of(_root_)
    values = entry.get("values") or {}
    if key not in values:
        raise HparamsError(f"+hparams={_root_.hparams.name}: the entry of {_root_.dataset.name}/{_root_.pet.name}/"
                           f"{_root_.merge.name} has no value for {key} (it has {sorted(values)}); select again")
    value = values[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def hparams_record(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """What results.json records of `+hparams`: the table's name and where this run's values came from (None
    without `+hparams`)."""
    if cfg.get("hparams") is None:
        return None
    entry = OmegaConf.to_container(entry_of(cfg), resolve=True)
    return {"name": cfg.hparams.name, "rule": cfg.hparams.get("rule"), **entry}


# -- 2. selection -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    """One finished search run: what it was, its hyper-parameters (flattened searchable keys) and its final-epoch
    validation accuracy."""

    run_dir: Path
    backbone: str
    task: str
    pet: str
    merge: str
    seed: int
    acc: float
    values: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def trial_from_results(results: dict[str, Any], run_dir: Path) -> Trial:
    """A `Trial` from a results.json record of a `dataset.protocol=val` run."""
    config = results.get("config") or {}
    flat = flatten({g: config.get(g) for g in SEARCH_GROUPS if isinstance(config.get(g), dict)})
    values = {k: v for k, v in flat.items() if searchable(k)}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides: tuple[str, ...] = ()
    if overrides_file.is_file():
        overrides = tuple(str(o) for o in (OmegaConf.load(overrides_file) or []))
    return Trial(run_dir, results["backbone"], results["task"], results["pet"], results.get("merge") or "none",
                 int(results["seed"]), float(results["acc"]), values, results.get("data") or {}, overrides)


def load_trials(root: str | Path) -> tuple[list[Trial], dict[str, int]]:
    """Finished validation-protocol runs below `root` and counts of what was left out (and why)."""
    from fpet.results import load_complete_results

    root = Path(root)
    if not root.is_dir():
        raise HparamsError(f"results directory {str(root)!r} does not exist; pass the search's sweep folder "
                           f"(outputs/tune)")
    trials, skipped = [], defaultdict(int)
    for path in sorted(root.rglob("results.json")):
        results = load_complete_results(path.parent)
        if results is None:
            skipped["unfinished or eval-only"] += 1
        elif results.get("protocol") != "val":
            skipped[f"dataset.protocol={results.get('protocol')} (not a search run)"] += 1
        elif results.get("acc") is None:
            skipped["no final accuracy"] += 1
        else:
            trials.append(trial_from_results(results, path.parent))
    return trials, dict(skipped)


def _order(value: Any) -> tuple:
    """Sort key for one value: numbers by value (None first), everything else by its text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, _hashable(value))


def tie_key(values: dict[str, Any], keys: Sequence[str]) -> tuple:
    """Order among equally good settings: smaller lr, smaller weight decay, then `keys` in name order."""
    ordered = [LR, WD, *sorted(k for k in keys if k not in (LR, WD))]
    return tuple(_order(values.get(k)) for k in ordered)


@dataclass
class Choice:
    """The selected setting of one task x method and where it came from."""

    values: dict[str, Any]
    val_acc: float
    run_dirs: list[str]
    seeds: list[int]
    search_size: int
    searched: list[str]
    tied: int
    data: dict[str, Any]
    ranking: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


def _data_identity(trial: Trial) -> tuple:
    return trial.data.get("source", "unknown"), trial.data.get("hash")


def select_group(trials: list[Trial]) -> Choice:
    """The best setting among the trials of one task x method (see `TIE_RULE`)."""
    sources = {_data_identity(t) for t in trials}
    if len(sources) > 1:
        first = trials[0]
        raise HparamsError(f"the search runs of {first.task}/{first.pet}/{first.merge} read different data "
                           f"({sorted(map(str, sources))}); select runs of one data folder (move the others away)")
    keys = sorted({k for t in trials for k in t.values})
    searched = [k for k in keys if len({_hashable(t.values.get(k)) for t in trials}) > 1]
    settings: dict[str, list[Trial]] = defaultdict(list)
    for trial in trials:
        settings[_hashable({k: trial.values.get(k) for k in searched})].append(trial)
    scored = []
    for group in settings.values():
        seeds = sorted(t.seed for t in group)
        if len(seeds) != len(set(seeds)):
            raise HparamsError(f"two search runs of one setting and seed: {[str(t.run_dir) for t in group]}")
        scored.append((statistics.fmean(t.acc for t in group), group))
    best = max(acc for acc, _ in scored)
    ties = [(acc, g) for acc, g in scored if math.isclose(acc, best, rel_tol=0, abs_tol=1e-9)]
    acc, group = min(ties, key=lambda item: tie_key(item[1][0].values, searched))
    chosen = group[0]
    ranking = sorted(((a, {k: g[0].values.get(k) for k in searched}) for a, g in scored),
                     key=lambda item: (-item[0], tie_key(item[1], searched)))
    return Choice({k: chosen.values.get(k) for k in keys}, acc, sorted(str(t.run_dir) for t in group),
                  sorted(t.seed for t in group), len(scored), searched, len(ties), chosen.data, ranking)


@dataclass
class Selection:
    """Every task x method's choice, the backbone, and the overrides all search runs shared (for the final command)."""

    backbone: str
    choices: dict[tuple[str, str, str], Choice]
    common_overrides: list[str]
    root: Path

    @property
    def keys(self) -> list[str]:
        """Every key the final runs take from the table: lr and weight decay, and whatever any task searched."""
        searched = {k for c in self.choices.values() for k in c.searched}
        return sorted({LR, WD} | searched)


FINAL_DROPS = ("experiment", "dataset", "pet", "merge", "seed", "dataset.protocol", "hparams")
"""Override keys of the search runs that the final command sets itself."""


def _common_overrides(trials: list[Trial], keys: Iterable[str]) -> list[str]:
    """The overrides every search run had, minus what the final command sets (task, method, seed, the selected
    keys, the protocol) and Hydra's own."""
    drop = set(FINAL_DROPS) | set(keys)
    shared: Optional[list[str]] = None
    for trial in trials:
        kept = [o for o in trial.overrides
                if (k := o.lstrip("+~").partition("=")[0]) not in drop and not k.startswith("hydra")]
        shared = kept if shared is None else [o for o in shared if o in kept]
    return shared or []


def select(trials: list[Trial]) -> Selection:
    """Select per task x (PET method, merge strategy) from finished search runs of one backbone."""
    if not trials:
        raise HparamsError("no finished search runs (dataset.protocol=val) found; run the search first: "
                           "python train.py -m experiment=tune pet=lora dataset=cifar100,dtd")
    backbones = sorted({t.backbone for t in trials})
    if len(backbones) > 1:
        raise HparamsError(f"search runs of several backbones ({', '.join(backbones)}); select each from its own "
                           f"folder (e.g. outputs/tune/<backbone>)")
    groups: dict[tuple[str, str, str], list[Trial]] = defaultdict(list)
    for trial in trials:
        groups[(trial.task, trial.pet, trial.merge)].append(trial)
    choices = {key: select_group(group) for key, group in sorted(groups.items())}
    selection = Selection(backbones[0], choices, [], Path(trials[0].run_dir))
    selection.common_overrides = _common_overrides(trials, selection.keys)
    return selection


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def hparams_config(selection: Selection, name: str, root: str | Path) -> dict[str, Any]:
    """The content of `configs/hparams/<name>.yaml` (a `@package _global_` config)."""
    selected: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    keys = selection.keys
    for (task, pet, merge), choice in selection.choices.items():
        selected[task][pet][merge] = {
            "values": {k: choice.values.get(k) for k in keys},
            "val_acc": round(choice.val_acc, 4), "search_size": choice.search_size, "searched": choice.searched,
            "tied": choice.tied, "seeds": choice.seeds, "run_dirs": choice.run_dirs,
            "data": {k: choice.data.get(k) for k in ("source", "hash") if k in choice.data}}
    body = {
        "hparams": {"name": name, "backbone": selection.backbone, "rule": TIE_RULE,
                    "source": str(Path(root).resolve()),
                    "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "keys": keys, "selected": json.loads(json.dumps(selected, default=str))},
        "dataset": {"protocol": "test"},
        **_nested({k: f"${{fpet.hparam:{k}}}" for k in keys}),
        "hydra": {"run": {"dir": "${paths.output_dir}/selected/${hparams.name}/${run_id}"},
                  "sweep": {"dir": "${paths.output_dir}/selected/${hparams.name}"}},
    }
    return body


def hparams_yaml(selection: Selection, name: str, root: str | Path) -> str:
    """`configs/hparams/<name>.yaml` as text: a header saying what it is and how to use it, then the config."""
    header = [
        "# @package _global_",
        f"# Validation-selected hyper-parameters, written by scripts/select_hparams.py from {Path(root)}.",
        f"# Selection: {TIE_RULE}.",
        "# Each entry (task -> PET method -> merge strategy) names the run directories, validation accuracy and",
        "# search size it came from. Final runs (train800val200 -> test, final epoch):",
        f"#   {final_command(selection, name)}",
    ]
    return "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(hparams_config(selection, name, root)))


def final_commands(selection: Selection, name: str, seeds: Sequence[int] = (0, 1, 2)) -> list[str]:
    """The sweep command(s) of the final runs: one when the selected tasks x methods form a full grid, else one
    per method."""
    methods = sorted({(p, m) for _, p, m in selection.choices})
    tasks_of = {pm: sorted(t for t, p, m in selection.choices if (p, m) == pm) for pm in methods}
    common = " ".join(shlex.quote(o) for o in selection.common_overrides)
    seed_list = ",".join(str(s) for s in seeds)

    def command(pets: list[str], merges: list[str], tasks: list[str]) -> str:
        parts = ["python train.py -m", f"+hparams={name}", f"dataset={','.join(tasks)}", f"pet={','.join(pets)}",
                 f"merge={','.join(merges)}", f"seed={seed_list}", common]
        return " ".join(p for p in parts if p)

    pets, merges = sorted({p for p, _ in methods}), sorted({m for _, m in methods})
    all_tasks = sorted({t for t, _, _ in selection.choices})
    if len(methods) == len(pets) * len(merges) and all(tasks_of[pm] == all_tasks for pm in methods):
        return [command(pets, merges, all_tasks)]
    return [command([p], [m], tasks_of[(p, m)]) for p, m in methods]


def final_command(selection: Selection, name: str, seeds: Sequence[int] = (0, 1, 2)) -> str:
    """`final_commands` joined into one shell line."""
    return " && ".join(final_commands(selection, name, seeds))
