"""The decoded-image cache: exact round trip, atomic writes, detection of truncated / corrupt / stale files."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from fpet.data.cache import HEADER_BYTES, CacheError, ImageCache, cache_key, check_cache, write_cache

SHAPE = (3, 8, 6)


def images(n: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


class Counting:
    """decode(i) that counts its calls (picklable, so DataLoader workers can run it)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.calls = data, 0

    def __call__(self, index: int) -> torch.Tensor:
        self.calls += 1
        return self.data[index].clone()


def built(tmp_path: Path, data: torch.Tensor, key: str = "k") -> ImageCache:
    cache = ImageCache(tmp_path / "c.u8", key, len(data), SHAPE)
    cache.ensure(Counting(data))
    return cache


def test_round_trip_is_exact_and_second_open_decodes_nothing(tmp_path):
    data = images()
    cache = built(tmp_path, data)
    assert all(torch.equal(cache[i], data[i]) for i in range(len(data)))
    assert cache[3].dtype == torch.uint8 and cache[3].shape == SHAPE
    assert (tmp_path / "c.u8").stat().st_size == HEADER_BYTES + data.numel()
    decode = Counting(data)
    again = ImageCache(tmp_path / "c.u8", "k", len(data), SHAPE)
    again.ensure(decode)
    assert decode.calls == 0 and torch.equal(again[9], data[9])


def test_batches_of_any_size_land_in_order(tmp_path):
    data = images(7)
    write_cache(tmp_path / "x.u8", "k", [data[:3], data[3:4], data[4:]], 7, SHAPE)
    check_cache(tmp_path / "x.u8", "k", 7, SHAPE)
    cache = ImageCache(tmp_path / "x.u8", "k", 7, SHAPE)
    assert torch.equal(torch.stack([cache[i] for i in range(7)]), data)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "other_key", "garbage"])
def test_broken_cache_is_reported_and_rebuilt(tmp_path, caplog, damage):
    data = images()
    path = built(tmp_path, data).path
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[:-100])
    elif damage == "flip_byte":
        raw[HEADER_BYTES + 1234] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "garbage":
        path.write_bytes(b"not a cache")
    key = "other" if damage == "other_key" else "k"
    decode = Counting(data)
    with caplog.at_level(logging.WARNING):
        cache = ImageCache(path, key, len(data), SHAPE)
        assert not cache.is_valid()
        cache.ensure(decode)
    assert "rebuilding" in caplog.text and decode.calls == len(data)
    check_cache(path, key, len(data), SHAPE)
    assert torch.equal(cache[1234 // (6 * 8 * 3)], data[1234 // (6 * 8 * 3)])


def test_check_names_the_problem(tmp_path):
    data = images()
    path = built(tmp_path, data).path
    with pytest.raises(CacheError, match="written for count=10, need 11"):
        check_cache(path, "k", 11, SHAPE)
    with pytest.raises(CacheError, match="shape"):
        check_cache(path, "k", 10, (3, 6, 8))


def test_failed_build_leaves_no_file(tmp_path):
    def batches():
        yield images(4)
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_cache(tmp_path / "x.u8", "k", batches(), 10, SHAPE)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CacheError, match="got 4 images, expected 10"):
        write_cache(tmp_path / "x.u8", "k", [images(4)], 10, SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_memory_map_is_opened_lazily_and_never_pickled(tmp_path):
    data = images()
    cache = built(tmp_path, data)
    _ = cache[0]
    assert cache._array is not None
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._array is None and torch.equal(clone[5], data[5])


def test_reads_from_dataloader_workers(tmp_path):
    data = images(12)
    cache = built(tmp_path, data)
    loader = DataLoader(cache, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), data)


def test_building_with_worker_processes(tmp_path):
    data = images(40)
    cache = ImageCache(tmp_path / "w.u8", "k", 40, SHAPE)
    cache.ensure(Counting(data), num_workers=2)
    assert torch.equal(torch.stack([cache[i] for i in range(40)]), data)


def test_key_depends_on_every_part_and_its_boundaries():
    assert cache_key(b"ab", 224) != cache_key(b"ab", 225)
    assert cache_key(b"ab", b"c") != cache_key(b"a", b"bc")
    assert cache_key("x", [1, 2]) == cache_key("x", [1, 2])
