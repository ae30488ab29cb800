"""results.json files -> the paper's tables (Markdown, LaTeX, CSV) and figures (PNG).

Tables read only results.json files; `scripts/make_tables.py RESULTS_DIR` is the command line:

    from fpet.tables import make_tables
    make_tables("outputs/multirun", "outputs/tables", acc_key="acc_best")
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional

from fpet.tables.build import (Study, build_study, layer_table, table1, table2, table3, tableA6, trpts_ablation,
                               trpts_table)
from fpet.tables.collect import (VTAB_TASKS, ConflictingRunsError, Method, Run, RunFilterError, Stat, Summary,
                                 load_runs, select_runs)
from fpet.tables.figures import write_figures
from fpet.tables.render import Column, Table, to_csv, to_latex, to_markdown

TABLES: dict[str, Callable[[Study], Table]] = {
    "table1": table1,
    "table2": table2,
    "table3": table3,
    "tableA3": partial(layer_table, name="tableA3", pet="adaptformer"),
    "tableA4": partial(layer_table, name="tableA4", pet="bi_adaptformer"),
    "tableA6": tableA6,
    "trpts": trpts_table,
    "trpts_ablation": trpts_ablation,
}
RENDERERS = {"md": to_markdown, "tex": to_latex, "csv": to_csv}


REPORTS = {
    "paper": dict(protocol="test", selection="recipe", acc_key="acc_best"),
    "selected": dict(protocol="test", selection="selected", acc_key="acc"),
}
"""make_tables `--protocol paper|selected` (and `both`): the paper's recipe scored as the official code does (best
of the test evaluations every 10 epochs), or validation-selected hyper-parameters (`+hparams`) at the final epoch."""
PAPER_PROTOCOL = "reported by the paper (official code: best of test every 10 epochs)"


def with_protocol(table: Table, text: str) -> Table:
    """`table` with a `protocol` column after `source` saying what each row's accuracy is (`text` for ours)."""
    names = [c.name for c in table.columns]
    at = names.index("source") + 1 if "source" in names else 1
    table.columns.insert(at, Column("protocol", "{}"))
    for row in table.rows:
        row.insert(at, (table.paper_protocol or PAPER_PROTOCOL) if "paper" in row[:at] else text)
    return table


def side_by_side(first: Table, second: Table) -> Table:
    """`first` with each of `second`'s own rows placed right after `first`'s row of the same method (the cells
    before `source`); rows `first` lacks go at the end; `second`'s paper rows are dropped (`first` has them)."""
    at = [c.name for c in first.columns].index("source")
    own = [row for row in second.rows if row[at] == "ours"]
    rows: list[list] = []
    for row in first.rows:
        rows.append(row)
        if row[at] == "ours":
            rows += [r for r in own if r[:at] == row[:at]]
    placed = {id(r) for r in rows}
    first.rows = rows + [r for r in own if id(r) not in placed]
    first.notes = list(dict.fromkeys([*first.notes, *second.notes]))
    return first


def build_tables(study: Study, companion: Optional[Study] = None) -> dict[str, Table]:
    """Every table of `study` with its protocol column; with a `companion` study (another protocol over the same
    methods) its rows sit beside each method's rows."""
    from fpet.tables.build import config_notes, protocol_text

    def one(build: Callable[[Study], Table], of: Study) -> Table:
        table = with_protocol(build(of), protocol_text(of))
        config_notes(table, of)
        return table

    out = {}
    for name, build in TABLES.items():
        table = one(build, study)
        out[name] = table if companion is None else side_by_side(table, one(build, companion))
    return out


def write_tables(study: Study, out_dir: str | Path, companion: Optional[Study] = None) -> list[Path]:
    """Every table as `<name>.md`, `.tex` and `.csv` in `out_dir`, plus all Markdown tables in `tables.md`
    (`companion`: a second protocol's rows beside each method, see `build_tables`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, markdown = [], []
    for name, table in build_tables(study, companion).items():
        for ext, render in RENDERERS.items():
            path = out_dir / f"{name}.{ext}"
            path.write_text(render(table))
            written.append(path)
        markdown.append(to_markdown(table))
    (out_dir / "tables.md").write_text("\n".join(markdown))
    return [*written, out_dir / "tables.md"]


def make_tables(results_dir: str | Path, out_dir: Optional[str | Path] = None, acc_key: str = "acc_best",
                protocol: str = "test", backbone: Optional[str] = None,
                figures: bool = True, allow_mixed_sources: bool = False,
                where: Optional[dict[str, str]] = None) -> tuple[Study, list[Path]]:
    """Read every results.json below `results_dir`; write the tables (and figures) to `out_dir`
    (default `<results_dir>/tables`). Returns the study behind them and the written files.

    `protocol`: `test` / `val` (the data protocol; the paper's recipe runs, accuracy `acc_key`), `paper` (test,
    recipe, best of the periodic test evaluations), `selected` (test, `+hparams` runs, final epoch) or `both`
    (paper and selected rows side by side; the study returned is the paper one). Rows whose runs read different
    data are refused unless `allow_mixed_sources`. Runs of one cell with different configs are refused
    (`ConflictingRunsError`) unless `where` ({dotted fingerprint key: value}) keeps one config."""
    runs = load_runs(results_dir)
    if where:
        runs = select_runs(runs, where)
    companion = None
    if protocol in REPORTS or protocol == "both":
        first = "paper" if protocol == "both" else protocol
        study = build_study(runs, backbone=backbone, allow_mixed_sources=allow_mixed_sources, **REPORTS[first])
        if protocol == "both":
            companion = build_study(runs, backbone=study.backbone, allow_mixed_sources=allow_mixed_sources,
                                    **REPORTS["selected"])
    else:
        study = build_study(runs, acc_key, protocol, backbone, allow_mixed_sources=allow_mixed_sources)
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "tables"
    written = write_tables(study, out_dir, companion)
    if figures:
        written += write_figures(study, out_dir)
    return study, written


__all__ = ["ConflictingRunsError", "REPORTS", "RunFilterError", "build_tables", "side_by_side", "with_protocol",
           "Column", "Method", "Run", "Stat", "Study", "Summary", "TABLES", "Table", "VTAB_TASKS", "build_study",
           "load_runs", "make_tables", "select_runs", "to_csv", "to_latex", "to_markdown", "write_figures",
           "write_tables"]
