"""Device-resident data (`train.loader=device`): a split's decoded uint8 images held on the training device.

A VTAB-1K split is small (1,000 training images are 150 MB at 224x224, the largest test split about 4 GB), so on a
GPU the whole split can live in device memory: each batch is one gather by index on the device, the float
conversion (`Loaders.preprocess`) runs there too, and no worker process or host-to-device copy is left in the
loop. A split that does not fit the budget `train.device_data_gb` stays in (pinned) host memory and each batch is
gathered there and copied asynchronously.

The order is the DataLoader path's by construction: the indices come from a `DataLoader` over `range(N)` with the
same batch size, `shuffle`, `drop_last` and seeded generator as `fpet.data.build_loaders` gives the image loader,
so the generator is consumed identically (the per-epoch base seed and the sampler's permutation) and a resumed run
(`fpet.resume` restores `loader.generator`) continues with the same batches. The training split has no random
augmentation (the official recipe has none), so the gathered batch equals the collated one bit for bit.

| `train.loader` | what | when |
|---|---|---|
| `dataloader` | `torch.utils.data.DataLoader` over the dataset (`dataset.num_workers` processes) | always possible |
| `device` | `DeviceLoader` (this module), images on the run's device | any device (on the CPU: no collation) |
| `auto` (default) | `device` on CUDA, `dataloader` elsewhere | |
"""
from __future__ import annotations

import logging
import multiprocessing
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fpet.validate import LOADERS  # accepted train.loader values, checked torch-free up front

log = logging.getLogger(__name__)


def resolve_loader(choice: str, device: torch.device) -> str:
    """`train.loader` for a run on `device`: `auto` -> `device` on CUDA, `dataloader` elsewhere."""
    if choice not in LOADERS:
        raise ValueError(f"train.loader={choice!r} is not one of {list(LOADERS)}")
    if choice == "auto":
        return "device" if device.type == "cuda" else "dataloader"
    return choice


def worker_context(num_workers: int) -> Optional[str]:
    """The start method of DataLoader workers: the default (None), except inside a joblib (loky) worker of
    hydra/launcher=local, whose default context is loky's and cannot start DataLoader workers ("'Process' object
    has no attribute 'env'"): there `fork` (`spawn` where there is no fork)."""
    if num_workers == 0 or multiprocessing.get_start_method(allow_none=True) != "loky":
        return None
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def materialize(dataset: Dataset, num_workers: int = 0, pin: bool = False,
                chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Every item of `dataset` (uint8 images, no transform) as `(images uint8 [N, 3, H, W], labels int64 [N])`,
    read once in order (in `num_workers` processes); the images in pinned memory when `pin`."""
    images: Optional[Tensor] = None
    labels = torch.empty(len(dataset), dtype=torch.long)
    start = 0
    # an own generator: the loader's per-iteration base seed must not come from (and move) the global torch RNG,
    # which the model's initialisation and drop-path draw from next
    reader = DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0), multiprocessing_context=worker_context(num_workers))
    for batch, batch_labels in reader:
        if batch.dtype != torch.uint8:
            raise TypeError(f"train.loader=device holds uint8 images; the dataset yields {batch.dtype} (a dataset "
                            f"with a float transform needs train.loader=dataloader)")
        if images is None:
            images = torch.empty((len(dataset), *batch.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        images[start:start + len(batch)] = batch
        labels[start:start + len(batch)] = batch_labels
        start += len(batch)
    if images is None:
        raise ValueError("train.loader=device: the split is empty")
    return images, labels


class DeviceLoader:
    """Batches `(uint8 images [B, 3, H, W], int64 labels [B])` gathered by index from tensors held in memory.

    Args:
        dataset: the split (kept as `.dataset`, like a DataLoader's).
        images, labels: `materialize(dataset)`, on `device` or (pinned) on the host.
        batch_size, shuffle, drop_last, generator: as the DataLoader of the same split.
        device: where batches are delivered (host-held images are gathered on the host, then copied).
    """

    def __init__(self, dataset: Dataset, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool,
                 drop_last: bool, generator: Optional[torch.Generator], device: torch.device) -> None:
        self.dataset, self.images, self.device = dataset, images, torch.device(device)
        self.labels = labels.to(images.device)
        self.batch_size = batch_size
        # the DataLoader path's sampler and generator use, on indices instead of images
        self._indices = DataLoader(range(len(images)), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                   generator=generator)

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The shuffling generator (saved and restored by `fpet.resume` as a DataLoader's)."""
        return self._indices.generator

    @property
    def resident(self) -> bool:
        """True when the images live on the delivery device (no copy per batch)."""
        return self.images.device.type == self.device.type

    def __len__(self) -> int:
        return len(self._indices)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index in self._indices:
            if self.resident:
                index = index.to(self.images.device, non_blocking=True)
                yield self.images.index_select(0, index), self.labels.index_select(0, index)
                continue
            pin = self.images.is_pinned()
            batch = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
            torch.index_select(self.images, 0, index, out=batch)
            yield (batch.to(self.device, non_blocking=pin),
                   self.labels.index_select(0, index).to(self.device, non_blocking=False))


def device_loaders(datasets: Sequence[Dataset], batch_sizes: Sequence[int], shuffles: Sequence[bool],
                   drop_lasts: Sequence[bool], generators: Sequence[Optional[torch.Generator]],
                   device: torch.device, budget_gb: float, num_workers: int = 0) -> list[DeviceLoader]:
    """One `DeviceLoader` per split, moved to `device` in order while their images fit `budget_gb` GiB of device
    memory (the training split first); a split that does not fit stays in pinned host memory (CUDA) and streams."""
    device, left = torch.device(device), float(budget_gb) * 2**30
    loaders = []
    for dataset, batch, shuffle, drop_last, gen in zip(datasets, batch_sizes, shuffles, drop_lasts, generators):
        cuda = device.type == "cuda"
        images, labels = materialize(dataset, num_workers, pin=cuda)
        if cuda and images.numel() <= left:
            images, left = images.to(device), left - images.numel()
        elif cuda:
            log.info("train.loader=device: a %.2f GiB split exceeds what is left of train.device_data_gb=%s; it "
                     "stays in pinned host memory and streams batch by batch", images.numel() / 2**30, budget_gb)
        loaders.append(DeviceLoader(dataset, images, labels, batch, shuffle, drop_last, gen, device))
    return loaders
