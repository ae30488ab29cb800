"""Export VTAB-1K tasks from tensorflow-datasets into NOAH's folder format (`scripts/prepare_vtab.py`).

For each task: read the exact VTAB split strings (`TaskSpec.splits`) from tfds in file order, apply the task's
label rule and image rule (grayscale tiled to 3 channels, dSprites x 255), save JPEGs (Pillow, quality 75 as
NOAH's exporter), write `<split>.txt` lists atomically, then record the task in `vtab-1k/manifest.json` (counts,
label ranges, list and image hashes). `train800val200.txt` lists train800's images followed by val200's (the same
pixels NOAH encodes a second time). A split whose list file exists is complete and is not exported again; a task
with a manifest entry and all four lists is skipped.

tfds is imported only inside `TfdsSource`; anything with `split_sizes()` and `examples(spec)` can stand in for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fpet.data.vtab import VTAB_SUBDIR
from fpet.data.vtab_rules import LABEL_RULES, SPLITS, TaskSpec, split_size, vtab_image
from fpet.fileio import write_text_atomic

log = logging.getLogger(__name__)

JPEG_QUALITY = 75  # Pillow's default, which NOAH's exporter uses
MANIFEST = "manifest.json"
SUMS = "sha256sums.txt"
EXPORTED_SPLITS = ("train800", "val200", "test")


class ExportError(RuntimeError):
    """A task cannot be exported as VTAB-1K defines it."""


class ManualDownloadRequired(ExportError):
    """The task's source files must be downloaded by hand first; the message says where to put them."""


class ExampleSource(Protocol):
    """What the exporter reads: a tfds builder or a fake of one."""

    version: str

    def split_sizes(self) -> Mapping[str, int]:
        """Examples per source split, e.g. {"train": 50000, "test": 10000}."""

    def examples(self, spec: str) -> Iterable[Mapping[str, Any]]:
        """Examples (dicts of numpy values) of a tfds split string, in file order."""


SourceFactory = Callable[[TaskSpec, Path], ExampleSource]
"""(task, manual_dir) -> source."""


class TfdsSource:
    """A tfds builder, downloaded and prepared under `tfds_dir` (needs `make install-prepare`)."""

    def __init__(self, task: TaskSpec, tfds_dir: Path, manual_dir: Path, any_version: bool = False) -> None:
        try:
            import tensorflow_datasets as tfds
        except ImportError as err:
            raise ExportError("tensorflow-datasets is not installed: run `make install-prepare` "
                              "(pip install -r requirements-prepare.txt)") from err
        self._tfds = tfds
        name = task.tfds_name.split(":")[0] if any_version else task.tfds_name
        self.builder = tfds.builder(name, data_dir=str(tfds_dir))
        self.version = str(self.builder.version)
        config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        self.builder.download_and_prepare(download_dir=str(Path(tfds_dir) / "downloads"), download_config=config)

    def split_sizes(self) -> Mapping[str, int]:
        return {name: info.num_examples for name, info in self.builder.info.splits.items()}

    def examples(self, spec: str) -> Iterable[Mapping[str, Any]]:
        return self._tfds.as_numpy(self.builder.as_dataset(split=spec, shuffle_files=False))


def tfds_source_factory(tfds_dir: Path, any_version: bool = False) -> SourceFactory:
    return lambda task, manual_dir: TfdsSource(task, tfds_dir, manual_dir, any_version)


def check_manual_files(task: TaskSpec, manual_dir: Path) -> None:
    """Raise `ManualDownloadRequired` with the instructions if a manual task's files are not in `manual_dir`."""
    missing = [name for name in task.manual_files if not (manual_dir / name).exists()]
    if task.manual and missing:
        raise ManualDownloadRequired(f"{task.manual.format(manual_dir=manual_dir)} Missing: "
                                     f"{', '.join(str(manual_dir / m) for m in missing)}")


def export_split(task: TaskSpec, source: ExampleSource, split: str, task_dir: Path) -> list[tuple[str, int]]:
    """Write the images of one split and its list file; returns `(relative path, label)` per image."""
    spec = task.split_spec(split)
    expected = task.expected_size(split)
    got = split_size(spec, source.split_sizes())
    if got != expected:
        raise ExportError(f"{task.name}: tfds {task.tfds_name} (version {source.version}) gives {got} examples "
                          f"for {spec!r}, VTAB-1K's {split} has {expected}; use VTAB's tfds version")
    rule = LABEL_RULES[task.label]
    (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(source.examples(spec), total=expected, desc=f"{task.name}/{split}", unit="img", disable=None)
    for index, example in enumerate(bar):
        label = rule(example)
        if not 0 <= label < task.num_classes:
            raise ExportError(f"{task.name} {split} example {index}: label {label} from rule {task.label!r} is "
                              f"outside [0, {task.num_classes})")
        rel = f"images/{split}/{index:06d}.jpg"
        Image.fromarray(vtab_image(example["image"], task.image)).save(task_dir / rel, quality=JPEG_QUALITY)
        rows.append((rel, label))
    if len(rows) != expected:
        raise ExportError(f"{task.name}: {spec!r} yielded {len(rows)} examples, expected {expected}")
    write_text_atomic(task_dir / f"{split}.txt", "".join(f"{rel} {label}\n" for rel, label in rows))
    return rows


def read_rows(list_path: Path) -> list[tuple[str, int]]:
    """`(relative path, label)` rows of a list file this exporter wrote."""
    return [(rel, int(label)) for rel, label in (line.rsplit(None, 1) for line in list_path.read_text().splitlines()
                                                 if line.strip())]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_task(task: TaskSpec, task_dir: Path, rows: Mapping[str, list[tuple[str, int]]]) -> dict[str, Any]:
    """The manifest entry of an exported task; also writes `sha256sums.txt` (one line per image)."""
    images = dict.fromkeys(rel for split in EXPORTED_SPLITS for rel, _ in rows[split])
    write_text_atomic(task_dir / SUMS, "".join(f"{_sha256(task_dir / rel)}  {rel}\n" for rel in images))
    splits = {}
    for split in SPLITS:
        labels = np.array([label for _, label in rows[split]])
        splits[split] = {"tfds_split": task.split_spec(split), "count": len(labels), "label_min": int(labels.min()),
                         "label_max": int(labels.max()), "classes_present": int(len(np.unique(labels))),
                         "list_sha256": _sha256(task_dir / f"{split}.txt")}
    return {"folder": task_dir.name, "num_classes": task.num_classes, "group": task.group,
            "tfds": task.tfds_name, "label_rule": task.label, "splits": splits,
            "images_sha256": _sha256(task_dir / SUMS), "jpeg_quality": JPEG_QUALITY}


def load_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"format": 1, "tasks": {}}


def is_finished(root: Path, task: TaskSpec) -> bool:
    """A task is finished when the manifest has it and its folder has all four list files."""
    entry = load_manifest(root)["tasks"].get(task.name)
    return entry is not None and all((root / entry["folder"] / f"{s}.txt").is_file() for s in SPLITS)


def export_task(task: TaskSpec, root: Path, factory: SourceFactory, manual_dir: Path,
                force: bool = False) -> Optional[dict[str, Any]]:
    """Export one task into `root/<folder>/` and record it in `root/manifest.json`; None if already finished."""
    task_dir = root / task.folder
    if force and task_dir.exists():
        shutil.rmtree(task_dir)
    elif is_finished(root, task):
        return None
    check_manual_files(task, manual_dir)
    start = time.perf_counter()
    source: Optional[ExampleSource] = None
    rows: dict[str, list[tuple[str, int]]] = {}
    for split in EXPORTED_SPLITS:
        list_path = task_dir / f"{split}.txt"
        if list_path.is_file():
            rows[split] = read_rows(list_path)
            continue
        if source is None:
            source = factory(task, manual_dir)
            _warn_sizes(task, source)
        rows[split] = export_split(task, source, split, task_dir)
    rows["train800val200"] = rows["train800"] + rows["val200"]
    write_text_atomic(task_dir / "train800val200.txt", "".join(f"{r} {lab}\n" for r, lab in rows["train800val200"]))
    entry = describe_task(task, task_dir, rows)
    entry.update(tfds_version=source.version if source else None, seconds=round(time.perf_counter() - start, 1),
                 exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest = load_manifest(root)
    manifest["tasks"][task.name] = entry
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return entry


def _warn_sizes(task: TaskSpec, source: ExampleSource) -> None:
    sizes = source.split_sizes()
    for name, size in task.source_sizes.items():
        if sizes.get(name) != size:
            log.warning("%s: tfds split %r has %s examples, VTAB's pinned version had %d; splits may differ from "
                        "NOAH's files", task.name, name, sizes.get(name), size)


def vtab_root(data_dir: Path) -> Path:
    return Path(data_dir) / VTAB_SUBDIR
