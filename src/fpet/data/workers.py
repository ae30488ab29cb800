"""How many DataLoader worker processes a run uses (`dataset.num_workers`), chosen from the CPU cores."""
from __future__ import annotations

import os
from typing import Any

AUTO_MAX_WORKERS = 4
"""`dataset.num_workers=auto` uses at most this many workers (the official code's DataLoader setting)."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, as torch's DataLoader counts)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_workers(value: Any) -> int:
    """`dataset.num_workers` -> a worker count: `auto` = min(4, available cores), so a 2-core machine starts 2
    workers (torch warns above its core count); an integer is taken as given."""
    if value == "auto":
        return min(AUTO_MAX_WORKERS, available_cores())
    return int(value or 0)


def worker_problems(value: Any) -> list[str]:
    """The config problem of `dataset.num_workers`, if any."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return []
    return [f"dataset.num_workers={value!r}: accepted auto (min({AUTO_MAX_WORKERS}, CPU cores: "
            f"{available_cores()} here)) or an integer >= 0 (0 loads in the training process)"]
