"""Check VTAB-1K folders before training: split sizes (800 / 200 / 1000 / test N), labels, unreadable images.

    python scripts/validate_vtab.py                            # all 19 tasks under data/vtab-1k/
    python scripts/validate_vtab.py --data-dir /big/data --tasks cifar100 kitti_dist --no-images
    python scripts/validate_vtab.py paths.data_dir=/big/data dataset=cifar100,kitti_dist   # train.py's spelling

Prints one row per task and then every problem (file:line: what); exits 1 if there is any problem.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fpet.cliargs import translate_overrides  # noqa: E402
from fpet.data.vtab_rules import TASKS, select_tasks  # noqa: E402

CONFIG_KEYS = {"paths.data_dir": "--data-dir", "dataset": "--tasks"}
"""train.py's spelling of the settings this script shares with a run."""
from fpet.data.vtab_validate import format_reports, validate_task  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="directory that holds vtab-1k/ (the training config's paths.data_dir)")
    parser.add_argument("--tasks", nargs="+", default=["all"],
                        help=f"tasks, groups (natural, specialized, structured) or all: {', '.join(TASKS)}")
    parser.add_argument("--no-images", action="store_true", help="skip decoding the images (lists and files only)")
    parser.add_argument("--workers", type=int, default=4, help="threads that decode images")
    parser.add_argument("--max-problems", type=int, default=50, help="problems listed per task (0 = all)")
    return parser.parse_args(translate_overrides(sys.argv[1:] if argv is None else argv, CONFIG_KEYS, parser,
                                                 lists=["--tasks"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = select_tasks(args.tasks)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reports = [validate_task(args.data_dir, task, images=not args.no_images, workers=args.workers)
               for task in tasks]
    print(format_reports(reports, args.max_problems))
    bad = [r.task for r in reports if not r.ok]
    summary = f"{len(reports) - len(bad)}/{len(reports)} tasks ok"
    print(f"\n{summary}" + (f"; problems in {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
