"""Datasets and loaders. A dataset kind maps `(cfg.dataset, split, data_dir, transform)` to a torch Dataset of
`(image [3, H, W], label)`; the VTAB-1K folder reader registers itself here beside the synthetic task.

The loaders yield uint8 batches (`transform=None`); `Loaders.preprocess` turns a batch into float model input on
the device it is moved to (see `fpet.data.transforms`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from fpet.data.synthetic import SyntheticTask
from fpet.data.transforms import NORMALIZE_MODES, ToFloat
from fpet.data.vtab import build_vtab, check_task_files
from fpet.data.vtab_rules import SPLIT_SIZES, SPLITS
from fpet.data.workers import resolve_workers, worker_problems

PROTOCOLS = {"test": ("train800val200", "test"), "val": ("train800", "val200")}
"""dataset.protocol -> (training split, evaluation split). `test` is the paper's; `val` is for choosing
hyper-parameters without touching the test set."""

DatasetBuilder = Callable[[DictConfig, str, Path, Optional[Callable]], Dataset]


def _synthetic(cfg: DictConfig, split: str, data_dir: Path, transform: Optional[Callable]) -> Dataset:
    return SyntheticTask(split, img_size=cfg.img_size, num_test=cfg.num_test, data_seed=cfg.data_seed,
                         transform=transform)


DATASET_KINDS: dict[str, DatasetBuilder] = {"synthetic": _synthetic, "vtab": build_vtab}


class Loaders(NamedTuple):
    train: Iterable
    eval: Iterable
    train_split: str
    eval_split: str
    preprocess: ToFloat
    """uint8 batch `[B, 3, H, W]` -> float model input, applied after moving the batch to its device."""


def protocol_splits(protocol: str) -> tuple[str, str]:
    """(train split, eval split) of `dataset.protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"dataset.protocol={protocol!r} is not one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def build_dataset(cfg: DictConfig, split: str, data_dir: str | Path,
                  transform: Optional[Callable] = None) -> Dataset:
    """One split of `cfg` (= `cfg.dataset`); uint8 images unless a `transform` (e.g. `ToFloat`) is given."""
    if cfg.kind not in DATASET_KINDS:
        raise ValueError(f"dataset.kind={cfg.kind!r} is not one of {sorted(DATASET_KINDS)}")
    return DATASET_KINDS[cfg.kind](cfg, split, Path(data_dir), transform)


def build_loaders(cfg: DictConfig, device: Optional[torch.device] = None) -> Loaders:
    """Train loader (shuffled by `seed`, drop_last as the official code) and eval loader of the protocol: DataLoaders,
    or with `train.loader` resolving to `device` on `device` (default CPU) the same batches held in memory
    (`fpet.data.device`)."""
    from fpet.data.device import device_loaders, resolve_loader, worker_context

    device = torch.device("cpu") if device is None else torch.device(device)
    train_split, eval_split = protocol_splits(cfg.dataset.protocol)
    train_set = build_dataset(cfg.dataset, train_split, cfg.paths.data_dir)
    eval_set = build_dataset(cfg.dataset, eval_split, cfg.paths.data_dir)
    workers = resolve_workers(cfg.dataset.get("num_workers", 0))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    preprocess = ToFloat(cfg.dataset.get("normalize", "none"))
    if resolve_loader(str(cfg.train.get("loader", "dataloader")), device) == "device":
        train, evaluation = device_loaders(
            [train_set, eval_set], [cfg.train.batch_size, cfg.train.eval_batch_size], [True, False], [True, False],
            [generator, None], device, float(cfg.train.get("device_data_gb", 8)), workers)
        return Loaders(train, evaluation, train_split, eval_split, preprocess)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                  multiprocessing_context=worker_context(workers))
    train = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                       generator=generator, **common)
    evaluation = DataLoader(eval_set, batch_size=cfg.train.eval_batch_size, shuffle=False, **common)
    return Loaders(train, evaluation, train_split, eval_split, preprocess)


def split_record(cfg: DictConfig, loaders: Loaders, trained: bool = True) -> dict[str, Optional[int | bool]]:
    """results.json: `num_train` / `num_eval` images the run read (`num_train` null when nothing trained) and
    `sizes_checked`: whether the split sizes were checked against VTAB-1K's (false: `dataset.check_sizes=false`;
    null: a dataset kind without reference sizes, e.g. the synthetic task)."""
    checked = cfg.dataset.get("check_sizes") if cfg.dataset.get("kind") in DATASET_FILE_CHECKS else None
    return {"num_train": len(loaders.train.dataset) if trained else None, "num_eval": len(loaders.eval.dataset),
            "sizes_checked": checked}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def dataset_problems(cfg: DictConfig) -> list[str]:
    """Every problem of `cfg.dataset` before any file is read: kind, protocol, normalisation, class count, image
    size (the backbone's), a batch size the training split can fill."""
    ds, problems = cfg.dataset, []
    if ds.get("kind") not in DATASET_KINDS:
        problems.append(f"dataset.kind={ds.get('kind')!r}: accepted {sorted(DATASET_KINDS)}")
    if ds.get("protocol") not in PROTOCOLS:
        problems.append(f"dataset.protocol={ds.get('protocol')!r}: accepted {sorted(PROTOCOLS)} "
                        f"(test: train800val200 -> test, val: train800 -> val200)")
    elif _positive_int(cfg.train.get("batch_size")):
        train_split = PROTOCOLS[ds.protocol][0]
        if cfg.train.batch_size > SPLIT_SIZES[train_split]:
            problems.append(f"train.batch_size={cfg.train.batch_size}: larger than the {train_split} split "
                            f"({SPLIT_SIZES[train_split]} images); with drop_last no batch would train")
    problems += worker_problems(ds.get("num_workers", 0))
    if ds.get("normalize", "none") not in NORMALIZE_MODES:
        problems.append(f"dataset.normalize={ds.get('normalize')!r}: accepted {list(NORMALIZE_MODES)}")
    if not _positive_int(ds.get("num_classes")) or ds.num_classes < 2:
        problems.append(f"dataset.num_classes={ds.get('num_classes')!r}: must be an integer >= 2")
    if ds.get("img_size") != cfg.backbone.get("img_size"):
        problems.append(f"dataset.img_size={ds.get('img_size')!r} differs from backbone.img_size="
                        f"{cfg.backbone.get('img_size')!r}: the images must have the model's input size. Set "
                        f"backbone.img_size (dataset.img_size follows it)")
    return problems


def dataset_file_problems(cfg: DictConfig) -> list[str]:
    """The files the run will read exist (a registered check per dataset kind; nothing is decoded)."""
    check = DATASET_FILE_CHECKS.get(cfg.dataset.get("kind"))
    return check(cfg.dataset, Path(cfg.paths.data_dir)) if check is not None else []


DATASET_FILE_CHECKS: dict[str, Callable[[DictConfig, Path], list[str]]] = {"vtab": check_task_files}
"""dataset.kind -> up-front check of its files (returns messages)."""


__all__ = ["DATASET_KINDS", "dataset_file_problems", "dataset_problems", "Loaders", "PROTOCOLS", "SPLITS", "SPLIT_SIZES", "SyntheticTask", "build_dataset",
           "build_loaders", "protocol_splits", "split_record"]
