"""The paper's reported values (reference/paper/*.csv at the repository root), looked up by method and table."""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Optional

PAPER_DIR = Path(__file__).resolve().parents[3] / "reference" / "paper"
"""CSV transcriptions of the paper's tables (Tables 1, 2, 3, A3, A4, the others in table_misc.csv) and of TR-PTS's
reported numbers (trpts_*.csv)."""

FILES = {
    "table1": "table1_efficiency.csv",
    "table2": "table2_vtab_accuracy.csv",
    "table3": "table3_token_reduction_ablation.csv",
    "tableA3": "tableA3_layer_tradeoff_adaptformer.csv",
    "tableA4": "tableA4_layer_tradeoff_bi_adaptformer.csv",
    "misc": "table_misc.csv",
    "trpts": "trpts_vtab_accuracy.csv",
    "trpts_ablations": "trpts_ablations.csv",
}


def number(text: Optional[str]) -> Optional[float]:
    """'76.2' -> 76.2, '+0.01' -> 0.01, '' -> None."""
    text = (text or "").strip()
    return float(text) if text else None


@lru_cache(maxsize=None)
def _rows(table: str, paper_dir: str) -> tuple[dict[str, str], ...]:
    path = Path(paper_dir) / FILES[table]
    if not path.exists():
        raise FileNotFoundError(f"paper values {path} are missing; they ship with the repository under "
                                f"reference/paper/ (restore them with git checkout reference/)")
    with path.open(newline="") as f:
        return tuple(csv.DictReader(f))


def paper_row(table: str, /, paper_dir: str | Path = PAPER_DIR, **match: str) -> Optional[dict[str, str]]:
    """The row of paper table `table` whose columns equal `match` (e.g. `method="fpet_lora"`), or None."""
    for row in _rows(table, str(paper_dir)):
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def paper_method(pet: str, variant: str) -> Optional[str]:
    """Name of a Table 1 / Table 2 row in the paper's CSVs: `lora`, `fpet_lora`, ...; None if not reported."""
    if variant == "none":
        return pet
    if variant == "fpet":
        return f"fpet_{pet}"
    return None
