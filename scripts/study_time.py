"""Projected time of the Table 2 study (5 PET methods x {none, fpet} x 19 VTAB-1K tasks = 190 runs of 100 epochs,
evaluation every 10 epochs) from the per-image costs of measured runs.

    python scripts/study_time.py --run bf16/none=RUN_DIR --run bf16/fpet=RUN_DIR \\
        --run official/none=RUN_DIR --run official/fpet=RUN_DIR [--shared bf16/none=RUN_DIR ... --runs-per-gpu 2]

Each `--run SETTING/MERGE=DIR` is a run directory (finished or cut short) of train.py: its metrics.jsonl holds each
epoch's `train_seconds` and, for evaluated epochs, `eval_seconds`; its .hydra/config.yaml gives the batch size and
the evaluation split's size; an optional file `wall_seconds` (written by scripts/gpu_check.sh) the run's wall time.
Per image: training = median epoch time (the first epoch left out: warm-up, cuDNN autotuning) / images per
epoch; evaluation = median evaluation time (the first left out when there are more) / images per pass. The run's
overhead (start, data, model build, profile) is wall time minus all epoch and evaluation time.

A study run of task t then takes 100 x (1,000 // 64) x 64 x train cost + 10 x test_size(t) x eval cost + overhead,
with the 19 tasks' test sizes of `fpet.data.vtab_rules.TASKS` (387,904 images a pass); every PET method costs as
the measured one (LoRA). `--shared` runs trained at the same time, `--runs-per-gpu` of them on one GPU: their cost
per image against the same setting alone gives the speed-up of runs_per_gpu. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fpet.data.vtab_rules import SPLIT_SIZES, TASKS  # noqa: E402

PET_METHODS = 5
STUDY_EPOCHS, STUDY_EVAL_EVERY, STUDY_BATCH = 100, 10, 64
TARGET_HOURS = 4.0
OFFICIAL_ESTIMATE_HOURS = (15.0, 20.0)
"""Issue 15: the study in at most 4 hours of one H200, against an estimated 15-20 hours for the official recipe."""


def _median(values: list[float], skip_first: bool = True) -> Optional[float]:
    values = values[1:] if skip_first and len(values) > 1 else values
    return statistics.median(values) if values else None


def measure(run_dir: Path) -> dict[str, Any]:
    """Per-image costs of one run directory (see the module docstring)."""
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_split = {"test": "train800val200", "val": "train800"}[cfg["dataset"]["protocol"]]
    batch = int(cfg["train"]["batch_size"])
    batches = SPLIT_SIZES[train_split] // batch
    if cfg["train"].get("limit_batches"):
        batches = min(batches, int(cfg["train"]["limit_batches"]))
    eval_images = SPLIT_SIZES.get("val200") if cfg["dataset"]["protocol"] == "val" else cfg["dataset"]["num_test"]
    train_s = [r["train_seconds"] for r in rows if "train_seconds" in r]
    eval_s = [r["eval_seconds"] for r in rows if "eval_seconds" in r]
    epoch_s, pass_s = _median(train_s), _median(eval_s)
    wall_file = run_dir / "wall_seconds"
    wall = float(wall_file.read_text()) if wall_file.is_file() else None
    results = run_dir / "results.json"
    return {
        "dir": str(run_dir), "epochs": len(rows), "epochs_planned": int(cfg["train"]["epochs"]),
        "finished": results.is_file(), "precision": cfg["train"].get("precision", "fp32"),
        "loader": cfg["train"].get("loader", "dataloader"), "acc": rows[-1].get("acc") if rows else None,
        "acc_by_epoch": {int(r["epoch"]): r["acc"] for r in rows if "acc" in r},
        "train_images_per_epoch": batches * batch, "eval_images_per_pass": int(eval_images),
        "train_img_s": None if not epoch_s else batches * batch / epoch_s,
        "eval_img_s": None if not pass_s else eval_images / pass_s,
        "wall_s": wall,
        "overhead_s": None if wall is None else max(0.0, wall - sum(train_s) - sum(eval_s)),
    }


def study_run_seconds(m: dict[str, Any], test_size: int) -> Optional[float]:
    """One study run (100 epochs of 1,000 images at batch 64, 10 evaluations of `test_size` images) at `m`'s costs."""
    if not m["train_img_s"] or not m["eval_img_s"]:
        return None
    train_images = STUDY_EPOCHS * (SPLIT_SIZES["train800val200"] // STUDY_BATCH) * STUDY_BATCH
    evals = STUDY_EPOCHS // STUDY_EVAL_EVERY
    return train_images / m["train_img_s"] + evals * test_size / m["eval_img_s"] + (m["overhead_s"] or 0.0)


def project(runs: dict[str, dict[str, Any]], speedup: dict[str, float]) -> dict[str, Any]:
    """Study hours per setting (sum over merge and task, x 5 PET methods), optionally / the runs_per_gpu speed-up."""
    sizes = [task.test_size for task in TASKS.values()]
    out: dict[str, Any] = {}
    for setting in sorted({label.split("/")[0] for label in runs}):
        merges = {label.split("/")[1]: m for label, m in runs.items() if label.startswith(setting + "/")}
        per_merge = {}
        for merge, m in merges.items():
            seconds = [study_run_seconds(m, size) for size in sizes]
            per_merge[merge] = None if None in seconds else PET_METHODS * sum(seconds) / 3600
        total = None if None in per_merge.values() else sum(per_merge.values())
        out[setting] = {"hours_per_merge": per_merge, "hours": total,
                        "hours_with_runs_per_gpu": (total / speedup[setting]) if total and setting in speedup
                        else None}
    return out


def accuracy_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """bf16 against the other settings at the first epoch both evaluated (same seed, same batches; during the
    warm-up epochs the learning rate does not depend on the run's length, so runs of different length compare)."""
    lines = []
    for label, m in sorted(runs.items()):
        setting, merge = label.split("/")
        if setting == "bf16":
            continue
        low = runs.get(f"bf16/{merge}")
        shared = sorted(set(m["acc_by_epoch"]) & set(low["acc_by_epoch"])) if low else []
        if shared:
            epoch = shared[0]
            a, b = low["acc_by_epoch"][epoch], m["acc_by_epoch"][epoch]
            lines.append(f"accuracy at epoch {epoch}, merge={merge}: bf16 {a:.2f} % vs {setting} "
                         f"({m['precision']}) {b:.2f} % (bf16 - {setting}: {a - b:+.2f} points)")
    return lines


PAPER_TABLE1 = Path(__file__).resolve().parents[1] / "reference" / "paper" / "table1_efficiency.csv"


def efficiency_lines(files: dict[str, Path]) -> list[str]:
    """FPET against merge=none per PET method from scripts/compare.py outputs (`DTYPE=FILE`, the JSON on the last
    line): latency per image and peak training memory, their ratios, and the paper's ratios (Table 1, A6000)."""
    import csv

    paper = {row["method"]: row for row in csv.DictReader(PAPER_TABLE1.open())}
    lines = ["| dtype | pet | none ms/img | fpet ms/img | ratio (paper) | none peak MB | fpet peak MB "
             "| ratio (paper) |", "|---|---|---|---|---|---|---|---|"]
    for dtype, path in files.items():
        text = path.read_text().strip().splitlines() if path.is_file() else []
        if not text or not text[-1].startswith("["):
            lines.append(f"| {dtype} | (no compare.py output in {path}) |||||||")
            continue
        rows = {r["variant"]: r for r in json.loads(text[-1])}
        for pet in sorted({v.split()[0].split("=")[1] for v in rows}):
            none, fpet = rows.get(f"pet={pet} merge=none"), rows.get(f"pet={pet} merge=fpet")
            if not none or not fpet:
                continue
            ratio = {k: fpet[k] / none[k] if fpet.get(k) and none.get(k) else None
                     for k in ("latency_ms", "peak_mem_mb")}
            base, fast = paper.get(pet), paper.get(f"fpet_{pet}")
            paper_t = float(fast["time_ms_per_img"]) / float(base["time_ms_per_img"]) if base and fast else None
            paper_m = float(fast["train_mem_gb"]) / float(base["train_mem_gb"]) if base and fast else None
            lines.append(f"| {dtype} | {pet} | {_fmt(none['latency_ms'], '.3f')} | {_fmt(fpet['latency_ms'], '.3f')} "
                         f"| {_fmt(ratio['latency_ms'], '.3f')} ({_fmt(paper_t, '.2f')}) "
                         f"| {_fmt(none['peak_mem_mb'], '.0f')} | {_fmt(fpet['peak_mem_mb'], '.0f')} "
                         f"| {_fmt(ratio['peak_mem_mb'], '.3f')} ({_fmt(paper_m, '.2f')}) |")
    return lines


def _parse(entries: list[str]) -> dict[str, Path]:
    parsed = {}
    for entry in entries:
        label, _, folder = entry.partition("=")
        if "/" not in label or not folder:
            raise SystemExit(f"--run/--shared {entry!r}: expected SETTING/MERGE=RUN_DIR, e.g. bf16/fpet=outputs/x")
        parsed[label] = Path(folder)
    return parsed


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="SETTING/MERGE=RUN_DIR (repeat)")
    parser.add_argument("--shared", action="append", default=[],
                        help="SETTING/MERGE=RUN_DIR of a run that shared its GPU with --runs-per-gpu - 1 others")
    parser.add_argument("--runs-per-gpu", type=int, default=1)
    parser.add_argument("--efficiency", action="append", default=[],
                        help="DTYPE=FILE: scripts/compare.py output with pet=P merge=none / merge=fpet variants")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON object here")
    args = parser.parse_args()
    runs = {label: measure(path) for label, path in _parse(args.run).items() if (path / "metrics.jsonl").is_file()}
    missing = sorted(set(_parse(args.run)) - set(runs))
    shared = {label: measure(path) for label, path in _parse(args.shared).items()
              if (path / "metrics.jsonl").is_file()}
    speedups: dict[str, list[float]] = {}
    for label, m in shared.items():
        alone = runs.get(label)
        if alone and alone["train_img_s"] and m["train_img_s"]:
            speedups.setdefault(label.split("/")[0], []).append(args.runs_per_gpu * m["train_img_s"]
                                                                / alone["train_img_s"])
    speedup = {setting: statistics.mean(v) for setting, v in speedups.items()}
    if args.efficiency:
        files = {dtype: Path(path) for dtype, _, path in (e.partition("=") for e in args.efficiency)}
        print("\n".join(efficiency_lines(files)))
        print()
    print("| run | precision | loader | epochs | train img/s | eval img/s | wall s | overhead s | last acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, m in {**runs, **{f"{k} (shared x{args.runs_per_gpu})": v for k, v in shared.items()}}.items():
        print(f"| {label} | {m['precision']} | {m['loader']} | {m['epochs']}/{m['epochs_planned']} "
              f"| {_fmt(m['train_img_s'], '.0f')} | {_fmt(m['eval_img_s'], '.0f')} | {_fmt(m['wall_s'], '.0f')} "
              f"| {_fmt(m['overhead_s'], '.0f')} | {_fmt(m['acc'], '.2f')} |")
    if missing:
        print(f"\nno metrics for {', '.join(missing)} (the run did not start or finish an epoch)")
    for line in accuracy_lines(runs):
        print(line)
    study = project(runs, speedup)
    print(f"\nProjected Table 2 study ({PET_METHODS} PET x {{none, fpet}} x {len(TASKS)} tasks = "
          f"{PET_METHODS * 2 * len(TASKS)} runs; {STUDY_EPOCHS} epochs, evaluation every {STUDY_EVAL_EVERY}; "
          f"{sum(t.test_size for t in TASKS.values()):,} test images a pass), one run at a time:")
    for setting, s in study.items():
        parts = ", ".join(f"{merge} {_fmt(h, '.2f')} h" for merge, h in s["hours_per_merge"].items())
        line = f"  {setting}: {_fmt(s['hours'], '.2f')} h ({parts})"
        if s["hours"] is not None:
            line += f"; target {TARGET_HOURS:g} h: {'met' if s['hours'] <= TARGET_HOURS else 'missed'}"
        if s["hours_with_runs_per_gpu"] is not None:
            line += (f"; with runs_per_gpu={args.runs_per_gpu} (measured speed-up x{speedup[setting]:.2f}): "
                     f"{s['hours_with_runs_per_gpu']:.2f} h")
        print(line)
    record = {"runs": runs, "shared": shared, "runs_per_gpu": args.runs_per_gpu, "speedup": speedup,
              "study": study, "target_hours": TARGET_HOURS, "official_estimate_hours": OFFICIAL_ESTIMATE_HOURS}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
