"""A decoded-image cache: every image of a split as uint8 `[N, 3, H, W]` in one file, memory-mapped when read.

Decoding and resizing a JPEG costs milliseconds; copying 150 KB out of a memory map costs microseconds. The first
epoch (or the dataset's construction) fills the cache, later epochs and runs read it. A file is

    4096-byte header: magic line + JSON {format, key, count, shape, dtype, data_bytes, crc32}, space padded
    data: count * 3 * H * W bytes, image after image

written to a temporary file and renamed, so a killed build never leaves a half file under the final name. On open
the header, the file length and the CRC-32 of the data are checked; a cache that fails is reported (warning),
ignored and rebuilt. The key names what the pixels depend on (list file, image files, size, interpolation), so a
changed input gets a new file instead of stale pixels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fpet.fileio import atomic_open

log = logging.getLogger(__name__)

MAGIC = b"FPET-IMAGE-CACHE\n"
HEADER_BYTES = 4096
FORMAT = 1
_CHUNK = 64 << 20


class CacheError(ValueError):
    """A cache file that cannot be used (truncated, corrupt, written for other inputs)."""


def cache_key(*parts: Any) -> str:
    """SHA-256 over `parts` (bytes as they are, anything else as its JSON): the identity of a cache's inputs."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _crc32_file(path: Path, offset: int, length: int) -> int:
    crc = 0
    with path.open("rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            length -= len(chunk)
    return crc


def read_header(path: Path) -> dict[str, Any]:
    """The header of a cache file; `CacheError` if it is not one."""
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
        raise CacheError(f"{path} has no cache header (truncated or not a cache file)")
    try:
        return json.loads(raw[len(MAGIC):].decode().strip())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path} has a corrupt header: {err}") from err


def check_cache(path: Path, key: str, count: int, shape: tuple[int, ...], verify: bool = True) -> None:
    """Raise `CacheError` unless `path` holds `count` images of `shape` for `key` with intact data."""
    header = read_header(path)
    expected = {"format": FORMAT, "key": key, "count": count, "shape": list(shape), "dtype": "uint8"}
    for name, value in expected.items():
        if header.get(name) != value:
            raise CacheError(f"{path} was written for {name}={header.get(name)!r}, need {value!r}")
    data_bytes = count * int(np.prod(shape))
    size = path.stat().st_size
    if header.get("data_bytes") != data_bytes or size != HEADER_BYTES + data_bytes:
        raise CacheError(f"{path} is {size} bytes, expected {HEADER_BYTES + data_bytes} (truncated or padded)")
    if verify and _crc32_file(path, HEADER_BYTES, data_bytes) != header.get("crc32"):
        raise CacheError(f"{path} fails its CRC-32 check (corrupt data)")


def write_cache(path: Path, key: str, batches: Iterable[Tensor], count: int, shape: tuple[int, ...]) -> None:
    """Write uint8 `batches` (`[b, *shape]` each, `count` images in all) atomically to `path`."""
    crc, written = 0, 0
    with atomic_open(path, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for batch in batches:
            if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != tuple(shape):
                raise CacheError(f"cache batch is {batch.dtype} {tuple(batch.shape)}, need uint8 [b, {shape}]")
            data = np.ascontiguousarray(batch.numpy())
            crc = zlib.crc32(data, crc)
            f.write(data)
            written += len(batch)
        if written != count:
            raise CacheError(f"cache for {path.name} got {written} images, expected {count}")
        header = {"format": FORMAT, "key": key, "count": count, "shape": list(shape), "dtype": "uint8",
                  "data_bytes": count * int(np.prod(shape)), "crc32": crc}
        blob = MAGIC + json.dumps(header).encode()
        f.seek(0)
        f.write(blob + b" " * (HEADER_BYTES - len(blob) - 1) + b"\n")


class _Decode(Dataset):
    def __init__(self, decode: Callable[[int], Tensor], count: int) -> None:
        self.decode, self.count = decode, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        return self.decode(index)


class ImageCache:
    """uint8 images `[count, *shape]` in one memory-mapped file; `cache[i]` is a `[*shape]` tensor (a copy).

    `ensure(decode)` builds the file unless a valid one exists. The memory map opens lazily on the first read, so
    each DataLoader worker maps the file itself (the map is never pickled).
    """

    def __init__(self, path: Path, key: str, count: int, shape: tuple[int, ...]) -> None:
        self.path, self.key, self.count, self.shape = Path(path), key, count, tuple(shape)
        self._array: Optional[np.ndarray] = None

    def is_valid(self, verify: bool = True) -> bool:
        """True if the file exists and passes `check_cache`; a broken file is reported and False."""
        if not self.path.exists():
            return False
        try:
            check_cache(self.path, self.key, self.count, self.shape, verify=verify)
            return True
        except (CacheError, OSError) as err:
            log.warning("image cache unusable, rebuilding it: %s", err)
            return False

    def ensure(self, decode: Callable[[int], Tensor], num_workers: int = 0, desc: str = "cache") -> None:
        """Build the cache from `decode(i) -> uint8 [*shape]` (in `num_workers` processes) unless it is valid."""
        if self.is_valid():
            return
        log.info("decoding %d images once into %s (%.0f MB)", self.count, self.path,
                 self.count * np.prod(self.shape) / 2**20)
        loader = DataLoader(_Decode(decode, self.count), batch_size=32, num_workers=num_workers)
        bar = tqdm(total=self.count, desc=desc, unit="img", disable=None, dynamic_ncols=True)
        with bar:
            write_cache(self.path, self.key, _counted(loader, bar), self.count, self.shape)
        self._array = None

    def _open(self) -> np.ndarray:
        if self._array is None:
            # copy-on-write: tensors can share the mapped pages without a copy and the file is never written
            self._array = np.memmap(self.path, dtype=np.uint8, mode="c", offset=HEADER_BYTES,
                                    shape=(self.count, *self.shape))
        return self._array

    def __len__(self) -> int:
        return self.count

    def view(self, index: int) -> Tensor:
        """Image `index` without a copy: it shares the mapped pages (copy-on-write), so writing into it in place
        would change what this process reads later. For transforms that make a new tensor (like `ToFloat`)."""
        return torch.from_numpy(self._open()[index])

    def __getitem__(self, index: int) -> Tensor:
        return self.view(index).clone()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}


def _counted(batches: Iterable[Tensor], bar: tqdm) -> Iterable[Tensor]:
    for batch in batches:
        bar.update(len(batch))
        yield batch
