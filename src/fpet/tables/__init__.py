"""results.json files -> the paper's tables (Markdown, LaTeX, CSV) and figures (PNG).

Tables read only results.json files; `scripts/make_tables.py RESULTS_DIR` is the command line:

    from fpet.tables import make_tables
    make_tables("outputs/multirun", "outputs/tables", acc_key="acc_best")
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional

from fpet.tables.build import Study, build_study, layer_table, table1, table2, table3
from fpet.tables.collect import VTAB_TASKS, Method, Run, Stat, Summary, load_runs
from fpet.tables.figures import write_figures
from fpet.tables.render import Column, Table, to_csv, to_latex, to_markdown

TABLES: dict[str, Callable[[Study], Table]] = {
    "table1": table1,
    "table2": table2,
    "table3": table3,
    "tableA3": partial(layer_table, name="tableA3", pet="adaptformer"),
    "tableA4": partial(layer_table, name="tableA4", pet="bi_adaptformer"),
}
RENDERERS = {"md": to_markdown, "tex": to_latex, "csv": to_csv}


def write_tables(study: Study, out_dir: str | Path) -> list[Path]:
    """Every table as `<name>.md`, `.tex` and `.csv` in `out_dir`, plus all Markdown tables in `tables.md`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, markdown = [], []
    for name, build in TABLES.items():
        table = build(study)
        for ext, render in RENDERERS.items():
            path = out_dir / f"{name}.{ext}"
            path.write_text(render(table))
            written.append(path)
        markdown.append(to_markdown(table))
    (out_dir / "tables.md").write_text("\n".join(markdown))
    return [*written, out_dir / "tables.md"]


def make_tables(results_dir: str | Path, out_dir: Optional[str | Path] = None, acc_key: str = "acc_best",
                protocol: str = "test", backbone: Optional[str] = None,
                figures: bool = True) -> tuple[Study, list[Path]]:
    """Read every results.json below `results_dir`; write the tables (and figures) to `out_dir`
    (default `<results_dir>/tables`). Returns the study behind them and the written files."""
    study = build_study(load_runs(results_dir), acc_key, protocol, backbone)
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "tables"
    written = write_tables(study, out_dir)
    if figures:
        written += write_figures(study, out_dir)
    return study, written


__all__ = ["Column", "Method", "Run", "Stat", "Study", "Summary", "TABLES", "Table", "VTAB_TASKS", "build_study",
           "load_runs", "make_tables", "to_csv", "to_latex", "to_markdown", "write_figures", "write_tables"]
