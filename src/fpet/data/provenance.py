"""Which data a run read (results.json `data`), so tables never put runs of different data in one row.

- A VTAB-1K folder exported by this repository (`scripts/prepare_vtab.py`, from tfds) is identified by its entry in
  `vtab-1k/manifest.json` when the folder's list files still match it: `source: tfds_export`, `hash` = SHA-256 of the
  manifest entry (list hashes, image hashes, tfds builder and version).
- Any other folder in NOAH's format (NOAH's JPEG export, which most PET papers' numbers come from, or a copy of it):
  `source: noah_format`, `hash` = SHA-256 of the four list files and the byte size of every image they name. NOAH's
  JPEGs and a tfds export are known to differ (about 10 points on CIFAR-100 in reported results), so they are
  different sources.
- The synthetic task: `source: synthetic`, `hash` of its generator settings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from fpet.data.vtab_rules import SPLITS

SOURCES = {
    "tfds_export": "exported from tfds by scripts/prepare_vtab.py (hash: its manifest entry)",
    "noah_format": "a folder in NOAH's format without our manifest, e.g. NOAH's JPEG export (hash: list files + "
                   "image sizes)",
    "synthetic": "the generated demo task (hash: generator settings)",
    "unknown": "a results.json written before runs recorded their data",
}
"""`data.source` values and what each means."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lists_hash(task_dir: Path) -> str:
    """SHA-256 over the four list files of a task folder and the byte size of every image they name (in list
    order; a missing list or image counts as such)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        path = task_dir / f"{split}.txt"
        digest.update(f"\n{split}\n".encode())
        if not path.is_file():
            digest.update(b"<missing>")
            continue
        text = path.read_bytes()
        digest.update(text)
        for line in text.decode(errors="replace").splitlines():
            parts = line.strip().rsplit(None, 1)
            if len(parts) == 2:
                image = task_dir / parts[0]
                digest.update(f"{image.stat().st_size if image.is_file() else -1}\n".encode())
    return digest.hexdigest()


def manifest_entry(task_dir: Path, task: str) -> Optional[dict[str, Any]]:
    """The exporter's manifest entry of `task` when `task_dir`'s list files are the ones it wrote, else None."""
    manifest = task_dir.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        entry = json.loads(manifest.read_text()).get("tasks", {}).get(task)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("folder") != task_dir.name:
        return None
    for split in SPLITS:
        path = task_dir / f"{split}.txt"
        recorded = (entry.get("splits") or {}).get(split, {}).get("list_sha256")
        if not path.is_file() or recorded != _sha256(path.read_bytes()):
            return None
    return entry


def vtab_provenance(task_dir: Path, task: str) -> dict[str, Any]:
    """`data` of a run on the VTAB-1K folder `task_dir`."""
    entry = manifest_entry(task_dir, task)
    if entry is not None:
        return {"source": "tfds_export", "hash": _sha256(json.dumps(entry, sort_keys=True).encode()),
                "hashed": "manifest entry", "folder": str(task_dir), "tfds": entry.get("tfds"),
                "tfds_version": entry.get("tfds_version")}
    return {"source": "noah_format", "hash": lists_hash(task_dir), "hashed": "list files + image sizes",
            "folder": str(task_dir)}


def data_provenance(cfg: DictConfig) -> dict[str, Any]:
    """`data` of results.json for the run of `cfg`: source, hash, what was hashed, the folder."""
    ds = cfg.dataset
    if ds.get("kind") == "vtab":
        from fpet.data.vtab import find_task_dir

        task_dir = find_task_dir(cfg.paths.data_dir, ds.name, [ds.folder, *ds.get("aliases", []), ds.name])
        return vtab_provenance(task_dir, ds.name)
    if ds.get("kind") == "synthetic":
        settings = {k: ds.get(k) for k in ("name", "data_seed", "num_test", "img_size")}
        return {"source": "synthetic", "hash": _sha256(json.dumps(settings, sort_keys=True).encode()),
                "hashed": "generator settings"}
    return {"source": str(ds.get("kind")), "hash": None, "hashed": None}
