"""The paper's tables from a `Study` (the summarised runs of one backbone and data protocol).

Every table has an "ours" row per method and, where the paper reports that method (ViT-B/16 on VTAB-1K), the paper's
row right below it. Relative changes are (x - reference) / reference in %.
"""
from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from fpet.errors import UserError
from fpet.tables.collect import (VTAB_TASKS, Method, Run, Stat, Summary, deduplicate, non_default, summarize,
                                 table_tasks)
from fpet.tables.paper import number, paper_method, paper_row
from fpet.tables.render import Column, Table

log = logging.getLogger(__name__)

PAPER_ROWS = ("full", "linear", "repadapter", "lora", "adaptformer", "bi_lora", "bi_adaptformer")
"""The PET rows of the paper's Tables 1 and 2 (in its order; other methods follow in registry order)."""
PAPER_PETS = PAPER_ROWS[2:]
"""The PET methods the paper combines with FPET (Tables 1 and 2)."""


def pet_label(pet: str) -> str:
    """A PET method's name in tables: its registry record's label (the config name for an unknown method)."""
    from fpet.pet import PET_METHODS

    method = PET_METHODS.get(pet)
    return method.label if method is not None else pet


def merge_label(merge: str) -> str:
    """A merge strategy's name in tables: its class's label (the config name for an unknown strategy)."""
    from fpet.merge import MERGE_STRATEGIES

    strategy = MERGE_STRATEGIES.get(merge)
    return strategy.label if strategy is not None else merge


def pet_order() -> tuple[str, ...]:
    """The paper's rows first, then every other registered method in registry order."""
    from fpet.pet import PET_METHODS

    return PAPER_ROWS + tuple(p for p in PET_METHODS if p not in PAPER_ROWS)

ACC_PROTOCOLS = {
    "acc_best": "best of the evaluations every train.eval_every (10) epochs, the official FPET code's protocol, "
                "which produced the paper's numbers (it selects on the test set)",
    "acc": "after the last epoch (no model selection on the evaluation split)",
}
MEMORY = {"peak_mem_mb": ("GB", 1 / 1024, "CUDA peak allocated memory of a training step"),
          "train_act_mb": ("MB", 1.0, "megabytes of tensors saved for backward in a training step (no GPU peak "
                                      "was measured; not comparable with the paper's GPU GB)")}


@dataclass
class Study:
    """The runs behind the tables and their per-row summaries."""

    runs: list[Run]
    groups: dict[str, list[str]]
    summaries: dict[tuple[str, str], Summary]
    backbone: str
    acc_key: str
    protocol: str
    paper: bool
    memory_key: str
    selection: str = "recipe"
    """Which runs: `recipe` (the paper's hyper-parameters), `selected` (a `+hparams` table), `any`."""
    mixed_sources: list[str] = field(default_factory=list)
    """Rows whose runs read different data (only when allowed; see `check_sources`)."""
    duplicates: list[str] = field(default_factory=list)
    """One line per cell that held several runs of the same config (the latest used; see `deduplicate`)."""
    configs: dict[tuple[str, str], str] = field(default_factory=dict)
    """Row -> its config in words (`row_config`); '' = this checkout's defaults."""

    def config_label(self, pet: str, variant: str = "none") -> Optional[str]:
        """The `config` cell of a row: `default`, `not recorded`, or `c<hash>` defined in the notes (None: no runs)."""
        if (pet, variant) not in self.configs:
            return None
        return config_label(self.configs[(pet, variant)])

    def get(self, pet: str, variant: str = "none") -> Optional[Summary]:
        return self.summaries.get((pet, variant))

    @property
    def tasks(self) -> list[str]:
        return [t for tasks in self.groups.values() for t in tasks]

    def memory(self, summary: Optional[Summary]) -> Optional[float]:
        """The memory figure of a row in the table's unit (GB for the CUDA peak, MB saved for backward)."""
        value = summary.efficiency.get(self.memory_key) if summary else None
        return None if value is None else value * MEMORY[self.memory_key][1]

    @property
    def memory_unit(self) -> str:
        return MEMORY[self.memory_key][0]

    def notes(self) -> list[str]:
        devices = sorted({r.device for r in self.runs if r.device})
        notes = [f"Accuracy: `{self.acc_key}` = {ACC_PROTOCOLS[self.acc_key]}; data protocol `{self.protocol}`; "
                 f"mean over seeds (± sample std when several).",
                 f"Ours: {self.backbone}, {len(self.runs)} runs; measured on {', '.join(devices) or 'n/a'}. "
                 f"Memory: {MEMORY[self.memory_key][2]}."]
        if self.paper:
            notes.append("paper: the values the paper reports (reference/paper/*.csv).")
        notes.append(f"Protocol: {protocol_text(self)}; data: {data_text(self)}.")
        notes += [f"MIXED DATA (allowed by --mix-sources): {m}" for m in self.mixed_sources]
        if self.duplicates:
            cells = f"{len(self.duplicates)} cell" + ("s" if len(self.duplicates) > 1 else "")
            notes.append(f"{cells} held several runs of the same config: the latest is used (make_tables names "
                         f"them).")
        return notes


CONFIG_NOTE = ("config: `default` = the run fingerprint of every run of the row is this checkout's default for its "
               "method, merge strategy and task (the paper's recipe; merge options are in the row name); "
               "`c…` = the keys that differ, defined below (`a|b`: the row's runs differ)")


def row_config(runs: list[Run]) -> str:
    """A row's config in words: the fingerprint keys of its runs that are not at the defaults, `key=value`
    (`key=a|b` where its runs differ); '' when none; `not recorded` when no run recorded its config."""
    if runs and not any(r.config for r in runs):
        return "not recorded"
    changed = [non_default(r) for r in runs]
    if any(c is None for c in changed):
        return "defaults unknown (not in this checkout)"
    keys = sorted({k for c in changed for k in c})
    parts = []
    for key in keys:
        values = list(dict.fromkeys("null" if r.config.get(key) is None else str(r.config.get(key)) for r in runs
                                    if key in r.config))
        parts.append(f"{key}={'|'.join(values)}")
    return ", ".join(parts)


def config_label(text: str) -> str:
    """`default` for '', the text itself for `not recorded` / `defaults unknown ...`, else `c` + 4 hex digits of its
    hash (stable across tables and protocols)."""
    import hashlib

    if text in ("", "not recorded") or text.startswith("defaults unknown"):
        return text or "default"
    return "c" + hashlib.sha1(text.encode()).hexdigest()[:4]


def config_notes(table: Table, study: Study) -> None:
    """Append the `config` column's explanation and a definition of each `c…` label the table shows."""
    if "config" not in [c.name for c in table.columns]:
        return
    shown = {label for cell in table.column("config") if cell for label in str(cell).split(" / ")}
    table.notes.append(CONFIG_NOTE + ".")
    for text in sorted(set(study.configs.values())):
        if config_label(text) in shown and config_label(text).startswith("c"):
            table.notes.append(f"config {config_label(text)}: {text}.")


def pick_backbone(runs: list[Run], backbone: Optional[str]) -> str:
    """The backbone the tables show: the one asked for, the only one found, or vit_b16 among several."""
    found = sorted({r.backbone for r in runs})
    if backbone:
        return backbone
    if len(found) == 1:
        return found[0]
    if "vit_b16" in found:
        log.info("results of several backbones (%s): showing vit_b16 (--backbone picks another)", ", ".join(found))
        return "vit_b16"
    raise ValueError(f"results of several backbones {found}; choose one with --backbone")


SELECTIONS = ("recipe", "selected", "any")


class MixedDataError(UserError, ValueError):
    """Runs of one table row read different data (sources or folders); refused unless allowed."""


def protocol_text(study: Study) -> str:
    """What a table's accuracy is, in words: "val-selected, final epoch, mean of 3 seeds", "best of test every 10
    epochs (paper code)", ..."""
    split = "val200" if study.protocol == "val" else "test"
    seeds = max((stat.n for s in study.summaries.values() for stat in s.tasks.values() if stat), default=0)
    seed_text = f"mean of {seeds} seeds" if seeds > 1 else "1 seed"
    if study.acc_key == "acc_best":
        every = sorted({r.eval_every for r in study.runs if r.eval_every}) or [10]
        return f"best of {split} every {'/'.join(map(str, every))} epochs (paper code), {seed_text}"
    names = sorted({r.selection for r in study.runs if r.selection})
    chosen = "val-selected" + (f" ({', '.join(names)})" if names else "") if study.selection == "selected" else \
        "paper recipe"
    return f"{chosen}, final epoch, {seed_text}"


def data_text(study: Study) -> str:
    sources = sorted({r.data_source for r in study.runs})
    return ", ".join(sources) or "none"


def check_sources(by_key: dict[tuple[str, str], list[Run]], allow: bool) -> list[str]:
    """Every row must read one data source, and each of its tasks one folder (data hash): `MixedDataError` naming
    the row and the runs, or (with `allow`) the descriptions for the table notes."""
    problems = []
    for key, runs in sorted(by_key.items()):
        sources = sorted({r.data_source for r in runs})
        if len(sources) > 1:
            example = {src: next(r.path for r in runs if r.data_source == src) for src in sources}
            problems.append(f"{label(*key)}: data sources {', '.join(sources)} (e.g. " +
                            "; ".join(f"{src}: {path}" for src, path in example.items()) + ")")
        by_task: dict[str, set] = defaultdict(set)
        for run in runs:
            if run.data_hash:
                by_task[run.task].add(run.data_hash)
        problems += [f"{label(*key)} / {task}: {len(hashes)} different data folders (hashes "
                     f"{', '.join(h[:12] for h in sorted(hashes))})" for task, hashes in by_task.items()
                     if len(hashes) > 1]
    if problems and not allow:
        raise MixedDataError("runs that read different data would share a table row:\n  - " +
                             "\n  - ".join(problems) + "\nKeep one data source per results folder, or pass "
                             "--mix-sources (make_tables(..., allow_mixed_sources=True)) to show them anyway, "
                             "noted in the tables")
    return problems


def build_study(runs: list[Run], acc_key: str = "acc_best", protocol: str = "test",
                backbone: Optional[str] = None, selection: str = "recipe",
                allow_mixed_sources: bool = False) -> Study:
    """Filter runs to one backbone, data protocol and hyper-parameter origin (`selection`: the paper's recipe, a
    `+hparams` table, or any), drop duplicates and summarise each (pet, variant) row. Rows mixing data sources
    raise `MixedDataError` unless `allow_mixed_sources`."""
    if acc_key not in ACC_PROTOCOLS:
        raise ValueError(f"accuracy protocol {acc_key!r} is not one of {sorted(ACC_PROTOCOLS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r} is not one of {SELECTIONS}")
    backbone = pick_backbone(runs, backbone) if runs else (backbone or "vit_b16")
    wanted = {"recipe": lambda r: r.selection is None, "selected": lambda r: r.selection is not None,
              "any": lambda r: True}[selection]
    runs, duplicates = deduplicate([r for r in runs if r.backbone == backbone and r.protocol == protocol and
                                    wanted(r)])
    groups = table_tasks(runs)
    tasks = {t for ts in groups.values() for t in ts}
    by_key: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.task in tasks:
            by_key[run.method.key].append(run)
    mixed = check_sources(by_key, allow_mixed_sources)
    summaries = {key: summarize(key, rs, groups, acc_key) for key, rs in by_key.items()}
    trained = [r for r in runs if r.efficiency.get("train_act_mb") is not None]
    memory_key = "peak_mem_mb" if trained and all(r.efficiency.get("peak_mem_mb") for r in trained) else \
        "train_act_mb"
    paper = backbone == "vit_b16" and any(t in VTAB_TASKS for t in tasks)
    return Study([r for rs in by_key.values() for r in rs], groups, summaries, backbone, acc_key, protocol, paper,
                 memory_key, selection, mixed, duplicates, {key: row_config(rs) for key, rs in by_key.items()})


CONFIG = Column("config", "{}")
"""The last column of every table: which config each of our rows used (`Study.config_label`, `config_notes`)."""


def label(pet: str, variant: str) -> str:
    """Row label: 'LoRA', 'LoRA + fpet', 'AdaptFormer + bsm@4', ..."""
    name = pet_label(pet)
    return name if variant == "none" else f"{name} + {variant}"


def _pet_rank(pet: str) -> tuple[int, str]:
    order = pet_order()
    return (order.index(pet) if pet in order else len(order), pet)


def main_rows(study: Study) -> list[tuple[str, str]]:
    """Rows of Tables 1 and 2: baselines, PET methods without merging, then with FPET (paper order), plus any other
    method found in the results with either setting."""
    rows: list[tuple[str, str]] = []
    if study.paper:
        rows += [(p, "none") for p in PAPER_ROWS] + [(p, "fpet") for p in PAPER_PETS]
    found = sorted((k for k in study.summaries if k[1] in ("none", "fpet") and k not in rows),
                   key=lambda k: (k[1] != "none", _pet_rank(k[0])))
    return rows + found


def rel(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """Relative change in % of `value` against `reference` (None if either is missing)."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value - reference) / reference


def diff(value: Any, reference: Any) -> Optional[float]:
    """value - reference for numbers or Stats (their means); None if either is missing."""
    a = value.mean if isinstance(value, Stat) else value
    b = reference.mean if isinstance(reference, Stat) else reference
    return None if a is None or b is None else a - b


def _n_tasks(study: Study, summary: Optional[Summary]) -> str:
    return f"{len(summary.tasks) if summary else 0}/{len(study.tasks)}"


def table2(study: Study) -> Table:
    """Table 2: accuracy per task, per group and the Average (mean of the group means), with # params."""
    groups = list(study.groups)
    columns = [Column("method"), Column("source"), Column("params (M)", "{:.2f}"), Column("Average"),
               *[Column(f"{g.capitalize()} (mean)") for g in groups], *[Column(t) for t in study.tasks],
               Column("tasks"), CONFIG]
    title = "Table 2: top-1 accuracy (%) per task, group means and Average (mean of the group means)"
    table = Table("table2", title, columns, notes=study.notes())
    for pet, variant in main_rows(study):
        s = study.get(pet, variant)
        params = None
        if s and s.efficiency.get("params_pet") is not None:
            params = (s.efficiency["params_pet"] + (s.efficiency.get("params_merge") or 0)) / 1e6
        table.rows.append([label(pet, variant), "ours", params, s.average if s else None,
                           *[s.groups.get(g) if s else None for g in groups],
                           *[s.tasks.get(t) if s else None for t in study.tasks], _n_tasks(study, s),
                           study.config_label(pet, variant)])
        paper = paper_row("table2", method=paper_method(pet, variant) or "") if study.paper else None
        if paper:
            accs = {t: number(paper.get(t)) for t in study.tasks}
            means = [statistics.fmean(accs[t] for t in study.groups[g]) for g in groups]
            table.rows.append([label(pet, variant), "paper", number(paper["params_m"]), number(paper["average"]),
                               *means, *accs.values(), "", ""])
    table.notes.append("params: trainable parameters without the head (PET + merge), as the paper's # param.")
    return table


def _efficiency(study: Study, s: Optional[Summary]) -> tuple[Any, Any, Any, Any]:
    e = s.efficiency if s else {}
    return s.average if s else None, e.get("latency_ms"), e.get("gflops"), study.memory(s)


def _metric_columns(name: str, short: str) -> list[Column]:
    return [Column(name, "{:.2f}"), Column(f"{short} vs full (%)", "{:+.1f}"),
            Column(f"{short} vs w/o merge (%)", "{:+.1f}")]


def table1(study: Study) -> Table:
    """Table 1: Average accuracy, inference time, GFLOPs and training memory, each also relative to full
    fine-tuning and (merged rows) to the same PET method without merging."""
    columns = [Column("method"), Column("source"), Column("acc"), *_metric_columns("time (ms/img)", "time"),
               *_metric_columns("GFLOPs", "GFLOPs"), *_metric_columns(f"memory ({study.memory_unit})", "memory"),
               CONFIG]
    table = Table("table1", "Table 1: accuracy and efficiency (inference at batch 256, training at batch 64)",
                  columns, notes=study.notes())
    ours_full = _efficiency(study, study.get("full"))
    paper_full = paper_efficiency("full") if study.paper else None
    for pet, variant in main_rows(study):
        ours = _efficiency(study, study.get(pet, variant))
        base = _efficiency(study, study.get(pet)) if variant != "none" else None
        table.rows.append([*_table1_row(label(pet, variant), "ours", ours, ours_full, base),
                           study.config_label(pet, variant)])
        paper = paper_efficiency(paper_method(pet, variant)) if study.paper else None
        if paper:
            paper_base = paper_efficiency(pet) if variant != "none" else None
            row = _table1_row(label(pet, variant), "paper", paper, paper_full, paper_base)
            if study.memory_key != "peak_mem_mb":
                row[9] = None  # the paper's GPU GB beside our saved-for-backward MB would mislead
            table.rows.append([*row, ""])
    table.notes.append("vs full: against full fine-tuning of the same source; vs w/o merge: against the same PET "
                       "method without token merging. Time and GFLOPs are per image.")
    return table


def paper_efficiency(method: Optional[str]) -> Optional[tuple]:
    row = paper_row("table1", method=method) if method else None
    if row is None:
        return None
    return tuple(number(row[k]) for k in ("acc", "time_ms_per_img", "gflops", "train_mem_gb"))


def _table1_row(name: str, source: str, values: tuple, full: Optional[tuple], base: Optional[tuple]) -> list:
    acc, time, gflops, mem = values
    row = [name, source, acc]
    for i, value in ((1, time), (2, gflops), (3, mem)):
        row += [value, rel(value, full[i] if full else None), rel(value, base[i] if base else None)]
    return row


TABLE3_ROWS = (
    ("w/o merging", "none", "none"),
    ("LTMP", "ltmp", "ltmp"),
    ("ToMe", "tome", "tome"),
    ("BSM at layer 6", "bsm", "bsm_layer6"),
    ("+ checkerboard", "bsm+checkerboard", "bsm_layer6_checkerboard"),
    ("+ key refinement (w/o gradient stopping)", "fpet+no_stop_grad", "bsm_layer6_checkerboard_refine_nostop"),
    ("FPET (ours)", "fpet", "fpet"),
)
"""(label, our variant or None if not implemented, the paper's row name) of Table 3."""


def table3(study: Study, pet: str = "bi_adaptformer") -> Table:
    """Table 3: token-reduction strategies as differences against the same PET method without merging."""
    columns = [Column("method"), Column("source"), Column("acc"), Column("Δ acc", "{:+.2f}"),
               Column("Δ time (ms)", "{:+.2f}"), Column("Δ GFLOPs", "{:+.2f}"),
               Column(f"Δ memory ({study.memory_unit})", "{:+.2f}"), Column("tasks"), CONFIG]
    table = Table("table3", f"Table 3: token reduction strategies on {pet_label(pet)}", columns,
                  notes=study.notes())
    base = _efficiency(study, study.get(pet))
    for name, variant, paper_name in TABLE3_ROWS:
        s = study.get(pet, variant) if variant else None
        ours = _efficiency(study, s)
        table.rows.append([name, "ours", ours[0], *[diff(a, b) for a, b in zip(ours, base)], _n_tasks(study, s),
                           study.config_label(pet, variant) if variant else None])
        paper = paper_row("table3", method=paper_name) if study.paper and pet == "bi_adaptformer" else None
        if paper:
            mem = number(paper["delta_mem_gb"]) if study.memory_key == "peak_mem_mb" else None
            table.rows.append([name, "paper", None, number(paper["delta_acc"]), number(paper["delta_time_ms"]), None,
                               mem, "", ""])
    table.notes.append(f"Δ: against {pet_label(pet)} without merging (first row). LTMP at batch sizes above 1 "
                       f"masks tokens instead of removing them (no time saved), as in the paper.")
    return table


A6_MERGES = ("ltmp", "tome", "fpet")
"""The token-reduction strategies of Table A6 (their default options: the paper's settings)."""


def tableA6(study: Study) -> Table:
    """Table A6: Average accuracy change (points) of LTMP, ToMe and FPET against the same PET method without
    merging, for the PET methods of Table 2 (and any other found with one of them)."""
    columns = [Column("method"), Column("source"), Column("w/o merging", "{:.2f}"),
               *[Column(f"Δ {merge_label(m)}", "{:+.2f}") for m in A6_MERGES], Column("tasks"), CONFIG]
    table = Table("tableA6", "Table A6: accuracy change (Average, points) of token reduction against no merging",
                  columns, notes=study.notes())
    found = sorted({k[0] for k in study.summaries if k[1] in A6_MERGES} - set(PAPER_PETS), key=_pet_rank)
    for pet in (PAPER_PETS if study.paper else ()) + tuple(found):
        cells = [study.get(pet, v) for v in ("none", *A6_MERGES)]
        base = cells[0].average if cells[0] else None
        labels = dict.fromkeys(x for v in ("none", *A6_MERGES) if (x := study.config_label(pet, v)) is not None)
        table.rows.append([pet_label(pet), "ours", base, *[diff(s.average if s else None, base) for s in cells[1:]],
                           "/".join(str(len(s.tasks) if s else 0) for s in cells) + f" of {len(study.tasks)}",
                           " / ".join(labels) or None])
        reported = [paper_row("misc", table="A6", row=pet, metric=f"delta_acc_{m}") for m in A6_MERGES]
        if study.paper and any(reported):
            average = paper_row("table2", method=pet)
            table.rows.append([pet_label(pet), "paper", number(average["average"]) if average else None,
                               *[number(r["value"]) if r else None for r in reported], "", ""])
    table.notes.append("Δ: Average of the method with the strategy minus its Average without merging (first "
                       "number column); tasks: w/o merging / " + " / ".join(merge_label(m) for m in A6_MERGES) +
                       ". Strategies at their defaults: LTMP every block (FLOPs target 0.75), ToMe 8 tokens at each "
                       "of 12 layers, FPET at layer 6. paper: Table A6; its w/o merging is Table 2's Average.")
    return table


TRPTS_ROWS = (("full", "none", "Full fine-tuning", "full"), ("lora", "none", "LoRA", "lora"),
              ("gps", "none", "GPS", "gps"), ("trpts", "none", "TR-PTS parameter selection only", None),
              ("trpts", "trpts", "TR-PTS (parameter + token selection)", "trpts"))
"""(pet, variant, label, the row of reference/paper/trpts_vtab_accuracy.csv or None) of the TR-PTS table."""
TRPTS_PROTOCOL = "reported by TR-PTS (no code published; protocol not stated)"


def _trpts_paper(method: str, study: Study) -> Optional[list]:
    """A TR-PTS paper row's numbers: params %, its stated 19-task mean, and (only when all 19 tasks are given) the
    mean of the group means, the group means and the tasks."""
    row = paper_row("trpts", method=method)
    if row is None:
        return None
    accs = {t: number(row.get(t)) for t in study.tasks}
    complete = all(v is not None for v in accs.values())
    means = [statistics.fmean(accs[t] for t in study.groups[g]) if complete else None for g in study.groups]
    return [None, number(row["params_percent"]), number(row["mean_19"]),
            statistics.fmean(means) if complete else None, *means, *accs.values()]


def trpts_table(study: Study) -> Table:
    """TR-PTS on VTAB-1K with both averages: the flat mean of the 19 tasks (what TR-PTS reports) and the mean of the
    three group means (the Average of the FPET paper), beside TR-PTS's reported numbers."""
    groups = list(study.groups)
    columns = [Column("method"), Column("source"), Column("params (M)", "{:.2f}"), Column("params (%)", "{:.2f}"),
               Column("Mean of tasks (TR-PTS)", "{:.2f}"), Column("Average = mean of group means (FPET)", "{:.2f}"),
               *[Column(f"{g.capitalize()} (mean)") for g in groups], *[Column(t) for t in study.tasks],
               Column("tasks"), CONFIG]
    table = Table("trpts", "TR-PTS: top-1 accuracy (%), the mean of the tasks and the mean of the group means",
                  columns, notes=study.notes(), paper_protocol=TRPTS_PROTOCOL)
    extra = sorted((k for k in study.summaries if k not in {r[:2] for r in TRPTS_ROWS} and
                    (k[0] in ("trpts", "gps") or k[1].startswith(("trpts", "evit")))),
                   key=lambda k: (_pet_rank(k[0]), k[1]))
    rows = [r for r in TRPTS_ROWS if r[:2] in study.summaries or (study.paper and r[3])]
    for pet, variant, name, paper_name in rows + [(*k, label(*k), None) for k in extra]:
        s = study.get(pet, variant)
        params = None
        if s and s.efficiency.get("params_pet") is not None:
            params = (s.efficiency["params_pet"] + (s.efficiency.get("params_merge") or 0)) / 1e6
        table.rows.append([name, "ours", params, None, s.flat if s else None,
                           s.average if s else None, *[s.groups.get(g) if s else None for g in groups],
                           *[s.tasks.get(t) if s else None for t in study.tasks], _n_tasks(study, s),
                           study.config_label(pet, variant)])
        paper = _trpts_paper(paper_name, study) if study.paper and paper_name else None
        if paper:
            table.rows.append([name, "paper", *paper, "", ""])
    sizes = " / ".join(f"{len(tasks)} {g}" for g, tasks in study.groups.items())
    table.notes.append(f"Mean of tasks: the plain mean of the {len(study.tasks)} tasks, the VTAB-1K number TR-PTS "
                       f"reports; Average: the mean of the group means ({sizes} tasks), the FPET paper's (Table 2). "
                       f"The two differ for the same runs: the groups weigh their tasks differently.")
    full = paper_row("table2", method="full") if study.paper else None
    if full:
        accs = [number(full[t]) for t in VTAB_TASKS]
        table.notes.append(f"paper: TR-PTS's reported numbers (reference/paper/trpts_vtab_accuracy.csv): the 19-task "
                           f"mean and the % of parameters tuned (selected entries, biases and head over ViT-B/16 and "
                           f"the head); no group means or per-task values were available. Its full fine-tuning "
                           f"{number(paper_row('trpts', method='full')['mean_19']):.2f} is the 19-task mean "
                           f"({statistics.fmean(accs):.2f}) of the row whose mean of group means the FPET paper "
                           f"reports as {number(full['average'])}.")
    table.notes.append("params (M): ours, trainable parameters without the head (PET + merge), as Table 2.")
    return table


TRPTS_ABLATION_ROWS = (
    ("components", "none", "neither (linear probing)", ("linear", "none")),
    ("components", "token", "token selection only", ("linear", "trpts")),
    ("components", "param", "parameter selection only", ("trpts", "none")),
    ("components", "both", "both (TR-PTS)", ("trpts", "trpts")),
    ("placement", "dense", "token selection at the parameter-dense blocks", None),
    ("placement", "random", "token selection at random blocks", None),
    ("placement", "sparse", "token selection at the parameter-sparse blocks (TR-PTS)", ("trpts", "trpts")),
)
"""(ablation, row of reference/paper/trpts_ablations.csv, label, our (pet, variant prefix) or None) of TR-PTS's
ablations; the token-only row is pet=linear with merge=trpts at explicit blocks (any `merge.layer`)."""
TRPTS_ABLATION_TASKS = ("dsprites_loc", "oxford_flowers102", "sun397", "patch_camelyon")


def trpts_ablation(study: Study) -> Table:
    """TR-PTS's component and placement ablations on the tasks it reports, ours beside its reported values."""
    tasks = [t for t in TRPTS_ABLATION_TASKS if t in study.tasks]
    columns = [Column("ablation", "{}"), Column("method"), Column("source"), *[Column(t) for t in tasks], CONFIG]
    table = Table("trpts_ablation", "TR-PTS ablations: top-1 accuracy (%) on the tasks it reports", columns,
                  notes=study.notes(), paper_protocol=TRPTS_PROTOCOL)
    for ablation, row, name, ours in TRPTS_ABLATION_ROWS:
        key = None
        if ours is not None:
            key = next((k for k in sorted(study.summaries) if k[0] == ours[0] and
                        (k[1] == ours[1] or ours[1] != "none" and k[1].startswith(ours[1] + "@"))), ours)
            s = study.get(*key)
            table.rows.append([ablation, name if key[1] in ("none", "trpts") else f"{name}: {key[1]}", "ours",
                               *[s.tasks.get(t) if s else None for t in tasks], study.config_label(*key)])
        paper = paper_row("trpts_ablations", ablation=ablation, row=row) if study.paper else None
        if paper:
            table.rows.append([ablation, name, "paper", *[number(paper[t]) for t in tasks], ""])
    table.notes.append("Placement: token selection (keep 0.95) at the blocks with the most, random or fewest selected "
                       "parameters; only the last (sparse insertion, merge.layer=null) is implemented here. "
                       "paper: reference/paper/trpts_ablations.csv.")
    return table


LAYERS = (6, 4, 2, 1, 0)
LAYER_MERGES = ("maxpool", "avgpool", "bsm", "fpet")


def layer_table(study: Study, name: str, pet: str) -> Table:
    """Tables A3 / A4: merging 196 -> 98 patch tokens at layer 6, 4, 2, 1 or 0 with each strategy."""
    columns = [Column("layer", "{}"), Column("method"), Column("source"), Column("acc", "{:.2f}"),
               Column("Δ acc", "{:+.2f}"), Column("time (ms/img)", "{:.2f}"), Column("GFLOPs", "{:.2f}"),
               Column("GFLOPs vs w/o merge (%)", "{:+.1f}"), Column(f"memory ({study.memory_unit})", "{:.2f}"),
               Column("tasks"), CONFIG]
    title = f"Table {name[5:]}: merge layer trade-off on {pet_label(pet)}"
    table = Table(name, title, columns, notes=study.notes())
    base = _efficiency(study, study.get(pet))
    paper_base = _paper_layer(study, name, "none", "none")
    cells = [("n/a", "none")] + [(layer, merge) for layer in LAYERS for merge in LAYER_MERGES]
    for layer, merge in cells:
        variant = "none" if merge == "none" else Method.at_layer(pet, merge, layer, study.backbone).variant
        s = study.get(pet, variant)
        acc, time, gflops, mem = _efficiency(study, s)
        table.rows.append([layer, merge_label(merge), "ours", acc, diff(acc, base[0]), time, gflops,
                           rel(gflops, base[2]), mem, _n_tasks(study, s), study.config_label(pet, variant)])
        paper = _paper_layer(study, name, str(layer) if merge != "none" else "none", merge)
        if paper:
            table.rows.append([layer, merge_label(merge), "paper", paper[0], diff(paper[0], paper_base[0]),
                               paper[1], paper[2], rel(paper[2], paper_base[2]), None, "", ""])
    table.notes.append(f"Δ acc and GFLOPs vs w/o merge: against {pet_label(pet)} without merging (first "
                       f"row). Layers are 0-based block indices.")
    return table


def _paper_layer(study: Study, name: str, layer: str, merge: str) -> Optional[tuple]:
    row = paper_row(name, layer=layer, method=merge) if study.paper else None
    return None if row is None else tuple(number(row[k]) for k in ("acc", "time_ms", "gflops"))


def efficiency_table(cells: list[dict[str, Any]], hardware: str, paper: bool) -> Table:
    """Table 1's efficiency columns (plus training speed, parameters, storage) from scripts/benchmark_grid.py
    cells: dicts with `pet`, `merge` and the efficiency keys of results.json (`error` for a cell that failed)."""
    peak = all(c.get("peak_mem_mb") is not None for c in cells if not c.get("error"))
    memory_key, (unit, scale, _) = ("peak_mem_mb", MEMORY["peak_mem_mb"]) if peak else \
        ("train_act_mb", MEMORY["train_act_mb"])
    columns = [Column("method"), Column("source"), *_metric_columns("time (ms/img)", "time"),
               *_metric_columns("GFLOPs", "GFLOPs"), *_metric_columns(f"memory ({unit})", "memory"),
               Column("train (s/it)", "{:.3f}"), Column("params (M)", "{:.3f}"), Column("storage (MB)", "{:.2f}"),
               Column("note")]
    table = Table("efficiency", f"Table 1 efficiency columns measured on {hardware}", columns)

    def values(c: Optional[dict]) -> tuple:
        if not c or c.get("error"):
            return None, None, None, None
        mem = c.get(memory_key)
        return None, c.get("latency_ms"), c.get("gflops"), None if mem is None else mem * scale

    by_key = {(c["pet"], c["merge"]): c for c in cells}
    full, paper_full = values(by_key.get(("full", "none"))), paper_efficiency("full") if paper else None
    for c in cells:
        pet, variant = c["pet"], c["merge"]
        base = values(by_key.get((pet, "none"))) if variant != "none" else None
        row = _table1_row(label(pet, variant), "ours", values(c), full, base)[3:]
        params = None if c.get("params_pet") is None else (c["params_pet"] + (c.get("params_merge") or 0)) / 1e6
        storage = None if c.get("storage_bytes") is None else c["storage_bytes"] / 2**20
        table.rows.append([label(pet, variant), "ours", *row, c.get("train_s_per_iter"), params, storage,
                           c.get("error") or ""])
        reported = paper_efficiency(paper_method(pet, variant)) if paper else None
        if reported:
            paper_base = paper_efficiency(pet) if variant != "none" else None
            row = _table1_row(label(pet, variant), "paper", reported, paper_full, paper_base)[3:]
            if not peak:
                row[6] = None  # the paper's GPU GB beside our saved-for-backward MB would mislead
            table.rows.append([label(pet, variant), "paper", *row, None, None, None, ""])
    table.notes = [f"Memory: {MEMORY[memory_key][2]}. Time per image at the inference batch; GFLOPs per image "
                   f"(fvcore); params: trainable without the head; storage: the task checkpoint file.",
                   "vs full: against full fine-tuning; vs w/o merge: against the same PET method without merging."]
    if paper:
        table.notes.append("paper: Table 1 of the paper (ViT-B/16 on their GPU; memory in GB at batch 64).")
    return table
