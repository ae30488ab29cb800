"""Check VTAB-1K task folders: split sizes, labels, unreadable images. Collects every problem instead of stopping
at the first; `scripts/validate_vtab.py` is the command line."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from tqdm.auto import tqdm

from fpet.data.vtab import Entry, Problem, VTABDataError, check_image, find_task_dir, parse_list
from fpet.data.vtab_rules import SPLITS, TaskSpec


@dataclass
class TaskReport:
    """What `validate_task` found for one task."""

    task: str
    folder: Optional[Path]
    counts: dict[str, int] = field(default_factory=dict)  # split -> lines in its list file
    labels: Optional[tuple[int, int]] = None  # (min, max) over all splits
    images_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_split(task: TaskSpec, root: Path, split: str, report: TaskReport) -> list[Entry]:
    list_path = root / f"{split}.txt"
    entries, problems = parse_list(list_path, root, task.num_classes)
    report.problems.extend(problems)
    if list_path.is_file():
        count = len(entries) + sum(p.line is not None for p in problems)
        report.counts[split] = count
        if count != task.expected_size(split):
            report.problems.append(Problem(list_path, None, f"lists {count} images; VTAB-1K {split} of "
                                                            f"{task.name} has {task.expected_size(split)}"))
    return entries


def _check_concatenation(root: Path, entries: dict[str, list[Entry]], report: TaskReport) -> None:
    joined = [e.label for e in entries["train800"] + entries["val200"]]
    if len(joined) == len(entries["train800val200"]) == 1000 and \
            joined != [e.label for e in entries["train800val200"]]:
        report.problems.append(Problem(root / "train800val200.txt", None,
                                       "labels are not train800's followed by val200's"))


def _check_images(list_paths: dict[str, Path], entries: dict[str, list[Entry]], report: TaskReport,
                  workers: int) -> None:
    unique: dict[Path, tuple[Path, Entry]] = {}
    for split, split_entries in entries.items():
        for entry in split_entries:
            unique.setdefault(entry.path, (list_paths[split], entry))
    todo = list(unique.values())
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(check_image, (entry.path for _, entry in todo))
        bar = tqdm(results, total=len(todo), desc=f"checking {report.task}", unit="img", disable=None)
        for (list_path, entry), error in zip(todo, bar):
            if error is not None:
                report.problems.append(Problem(list_path, entry.line, f"unreadable image {entry.path}: {error}"))
    report.images_checked = len(todo)


def validate_task(data_dir: str | Path, task: TaskSpec, images: bool = True, workers: int = 4) -> TaskReport:
    """Every problem of `task` under `data_dir/vtab-1k/`: missing folder or list files, malformed lines, labels
    outside [0, num_classes), missing images, split sizes other than VTAB-1K's, and (`images=True`) images that do
    not decode."""
    try:
        root = find_task_dir(data_dir, task.name, task.folders)
    except VTABDataError as err:
        return TaskReport(task.name, None, problems=[Problem(Path(data_dir), None, str(err))])
    report = TaskReport(task.name, root)
    entries = {split: _check_split(task, root, split, report) for split in SPLITS}
    _check_concatenation(root, entries, report)
    labels = [e.label for split_entries in entries.values() for e in split_entries]
    report.labels = (min(labels), max(labels)) if labels else None
    if images:
        _check_images({s: root / f"{s}.txt" for s in SPLITS}, entries, report, workers)
    return report


def format_reports(reports: Iterable[TaskReport], max_problems: int = 50) -> str:
    """A table (one row per task), then the problems of each task (at most `max_problems` each; 0 = all)."""
    reports = list(reports)
    widths = {s: max(len(s), 6) + 2 for s in SPLITS}
    head = f"{'task':<22}{'folder':<19}" + "".join(f"{s:>{widths[s]}}" for s in SPLITS)
    head += f"{'labels':>10}{'images':>9}  status"
    lines = [head, "-" * len(head)]
    for r in reports:
        counts = "".join(f"{r.counts.get(s, '-'):>{widths[s]}}" for s in SPLITS)
        labels = f"{r.labels[0]}..{r.labels[1]}" if r.labels else "-"
        status = "ok" if r.ok else f"{len(r.problems)} problem{'s' * (len(r.problems) > 1)}"
        folder = r.folder.name if r.folder else "(missing)"
        lines.append(f"{r.task:<22}{folder:<19}{counts}{labels:>10}{r.images_checked:>9}  {status}")
    for r in reports:
        if r.problems:
            lines += ["", f"{r.task}:"]
            shown = r.problems if max_problems <= 0 else r.problems[:max_problems]
            lines += [f"  {p}" for p in shown]
            if len(shown) < len(r.problems):
                lines.append(f"  ... {len(r.problems) - len(shown)} more (--max-problems 0 lists all)")
    return "\n".join(lines)
