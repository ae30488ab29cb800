"""What a run needs to be one cell of a sweep: skip it when it already finished, give it a GPU of its own.

Hydra's launchers do the scheduling (joblib on one machine, submitit on SLURM); this module only decides, inside a
run, (1) whether the run dir already holds a finished run of the same config and (2) which GPU a run takes when
several runs share a machine with several GPUs.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from fpet.config import num_gpus, register_resolvers  # noqa: F401  (re-exported)
from fpet.errors import UserError

from fpet.results import load_complete_results
from fpet.identity import config_changes, config_fingerprint, location_keys

log = logging.getLogger(__name__)


def config_differences(stored: dict[str, Any], cfg: DictConfig) -> list[str]:
    """`key: stored -> current` for every value of the run fingerprint (fpet.identity.config_fingerprint: what
    decides a run's numbers, so not devices, paths, logging or measurement settings) that differs.

    Keys only one side has are not differences, so a config key added by a newer version of the code does not make
    finished runs look stale; file locations (values interpolated from `paths`) do not count either.
    """
    changes = config_changes(config_fingerprint(OmegaConf.create(stored)), config_fingerprint(cfg), shared_only=True)
    locations = location_keys(OmegaConf.to_container(cfg, resolve=False))
    return [text for key, text in changes.items() if key not in locations]


class RunDirConflict(UserError, RuntimeError):
    """The run directory holds a finished run of another configuration; nothing is overwritten silently."""


def finished_results(cfg: DictConfig, run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The stored results of `run_dir` when it holds a complete run of the same config; None when it holds none.

    A complete results.json made with a different config (e.g. a 1-epoch smoke test in the same output folder) is
    neither reused nor overwritten: `RunDirConflict` names the differences and the two ways forward.
    """
    results = load_complete_results(run_dir)
    if results is None:
        return None
    differences = config_differences(results.get("config", {}), cfg)
    if differences:
        raise RunDirConflict(
            f"{Path(run_dir) / 'results.json'} holds a finished run of another config ({'; '.join(differences[:5])}). "
            f"Pass train.skip_finished=false to train again and overwrite it, or write elsewhere "
            f"(hydra.run.dir=... / paths.output_dir=...).")
    return results


def _multirun_job_num() -> Optional[int]:
    """`hydra.job.num` inside a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None


def _lock_name(index: int, slot: int = 0) -> str:
    """Lock file of slot `slot` of visible GPU `index`, named by its physical id so sweeps with other
    CUDA_VISIBLE_DEVICES agree (slot 0 keeps the name of a one-run-per-GPU lock: `gpu-<id>.lock`)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    name = "gpu-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in physical)
    return f"{name}.lock" if slot == 0 else f"{name}.slot{slot}.lock"


def _lock(path: Path, wait: bool) -> Optional[int]:
    """An open file descriptor holding an exclusive `flock` on `path`, or None if another holder has it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _try_slots(preferred: int, count: int, lock_dir: Path, runs_per_gpu: int) -> tuple[int, Optional[int]]:
    """(GPU index, descriptor) of the first free slot, the slots of `preferred` first; (preferred, None) if none."""
    for candidate in [(preferred + i) % count for i in range(count)]:
        for slot in range(max(1, runs_per_gpu)):
            fd = _lock(lock_dir / _lock_name(candidate, slot), wait=False)
            if fd is not None:
                return candidate, fd
    return preferred, None


@contextmanager
def acquire_gpu(preferred: int, count: int, lock_dir: str | Path, runs_per_gpu: int = 1,
                poll_seconds: float = 1.0) -> Iterator[int]:
    """Hold one of `runs_per_gpu` slots of one of `count` GPUs for the duration of the block; yields the GPU index.

    Tries the slots of `preferred` first, then those of the other GPUs in order; when every slot is taken (more
    jobs than GPUs x runs_per_gpu) tries again every `poll_seconds` until one frees. A slot is an exclusive `flock`
    on its own file, released by the OS even when the process dies.
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    index, fd = _try_slots(preferred, count, lock_dir, runs_per_gpu)
    while fd is None:
        time.sleep(poll_seconds)
        index, fd = _try_slots(preferred, count, lock_dir, runs_per_gpu)
    try:
        yield index
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def default_lock_dir() -> Path:
    """Machine-wide folder of the GPU lock files (one per user)."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"fpet-gpu-locks-{uid}"


def runs_per_gpu() -> int:
    """`hydra.launcher.runs_per_gpu` of the running Hydra job (the local launcher's key), else 1."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    return int(HydraConfig.get().launcher.get("runs_per_gpu", 1) or 1)


@contextmanager
def claim_device(cfg: DictConfig) -> Iterator[str]:
    """The device this run uses: `cfg.device`, except for `device=auto` in a Hydra multirun on a machine with a
    GPU, where job `i` takes a free slot of a GPU (GPU `i % n` first; `hydra.launcher.runs_per_gpu` slots per GPU)
    and holds it until the block ends."""
    count = num_gpus() if cfg.device == "auto" else 0
    job = _multirun_job_num() if count >= 1 else None
    if job is None:
        yield str(cfg.device)
        return
    import torch

    per_gpu = runs_per_gpu()
    with acquire_gpu(job % count, count, default_lock_dir(), per_gpu) as index:
        torch.cuda.set_device(index)
        log.info("multirun job %d runs on cuda:%d (%d GPUs visible, %d runs per GPU)", job, index, count, per_gpu)
        yield f"cuda:{index}"
