"""Build VTAB-1K folders (NOAH's format) from tensorflow-datasets, with VTAB's exact splits and label rules.

    make install-prepare                                       # tensorflow-datasets + backend (once)
    python scripts/prepare_vtab.py --tasks cifar100 dtd        # -> data/vtab-1k/cifar/, data/vtab-1k/dtd/
    python scripts/prepare_vtab.py --tasks all                 # every task (~100 GB of tfds downloads)
    python scripts/prepare_vtab.py --list                      # the tasks, their folders and tfds builders

Resumable: finished tasks (manifest entry + list files) and finished splits are skipped; `--force` redoes a task.
resisc45 and diabetic_retinopathy need a manual download: the script says where to put the files, goes on with
the other tasks and exits 2. tfds downloads and caches under `--tfds-dir` (default `<data-dir>/tfds`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fpet.data.tfds_export import (ExportError, ManualDownloadRequired, SourceFactory, export_task,  # noqa: E402
                                   tfds_source_factory, vtab_root)
from fpet.cliargs import translate_overrides  # noqa: E402
from fpet.data.vtab_rules import TASKS, select_tasks  # noqa: E402

CONFIG_KEYS = {"paths.data_dir": "--data-dir", "dataset": "--tasks"}
"""train.py's spelling of the settings this script shares with a run."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["all"],
                        help=f"tasks, groups (natural, specialized, structured) or all: {', '.join(TASKS)}")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data", help="writes <data-dir>/vtab-1k/<folder>/")
    parser.add_argument("--tfds-dir", type=Path, default=None, help="tfds data_dir (default <data-dir>/tfds)")
    parser.add_argument("--force", action="store_true", help="export again even if a task is finished")
    parser.add_argument("--any-version", action="store_true",
                        help="use tfds' current builder version when VTAB's pinned one is unavailable "
                             "(splits may then differ from NOAH's files; the manifest records the version)")
    parser.add_argument("--list", action="store_true", help="print the tasks and exit")
    return parser.parse_args(translate_overrides(sys.argv[1:] if argv is None else argv, CONFIG_KEYS, parser,
                                                 lists=["--tasks"]))


def print_tasks() -> None:
    print(f"{'task':<22}{'folder':<22}{'group':<13}{'classes':>8}{'test':>7}  tfds builder")
    for t in TASKS.values():
        manual = "  (manual download)" if t.manual else ""
        print(f"{t.name:<22}{t.folder:<22}{t.group:<13}{t.num_classes:>8}{t.test_size:>7}  {t.tfds_name}{manual}")


def main(argv: Optional[list[str]] = None, factory: Optional[SourceFactory] = None) -> int:
    """Export the selected tasks; 0 if all are finished, 2 if some need a manual download, 1 on other errors."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    if args.list:
        print_tasks()
        return 0
    try:
        tasks = select_tasks(args.tasks)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tfds_dir = args.tfds_dir or args.data_dir / "tfds"
    factory = factory or tfds_source_factory(tfds_dir, args.any_version)
    root = vtab_root(args.data_dir)
    manual, failed = [], []
    for task in tasks:
        try:
            entry = export_task(task, root, factory, tfds_dir / "manual" / task.name, force=args.force)
        except ManualDownloadRequired as err:
            manual.append(f"{task.name}: {err}")
            continue
        except ExportError as err:
            failed.append(f"{task.name}: {err}")
            continue
        status = "already finished, skipped" if entry is None else \
            f"exported in {entry['seconds']} s ({entry['splits']['test']['count']} test images)"
        print(f"{task.name}: {status} -> {root / task.folder}", flush=True)
    for line in manual + failed:
        print(f"\n{line}", file=sys.stderr)
    if not manual and not failed:
        print(f"\nall {len(tasks)} tasks ready under {root}; manifest: {root / 'manifest.json'}")
    return 1 if failed else 2 if manual else 0


if __name__ == "__main__":
    sys.exit(main())
