"""Shared fixtures: composed configs on the tiny random-init ViT, fast settings, temporary output dirs."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

SYSTEM_TMP = tempfile.gettempdir()
"""The temp dir of this process (pytest's tmp_path lives below it, as usual)."""
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(SYSTEM_TMP, "torchinductor_fpet_tests"))
SESSION_TMP = tempfile.mkdtemp(prefix="fpet-tests-tmp-")
"""TMPDIR of every process the tests start (runs, scripts, xdist workers), removed when the session ends: a child
that is killed (the SIGKILL resume test) or ends with os._exit leaves its temp files there, e.g. the wandb-media /
wandb-artifacts folders that `import timm.utils` (-> wandb) creates, not in the system temp dir."""
os.environ["TMPDIR"] = SESSION_TMP

# pytest-xdist (`make test` runs `-n 2`): the cores are shared among the workers, their child processes included
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

torch.set_num_threads(min(THREADS, torch.get_num_threads()))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)

from fpet.config import compose_config, register_resolvers  # noqa: E402

register_resolvers()  # ${fpet.*} in the configs, also for tests that compose with Hydra directly

FAST = [
    "backbone=vit_micro", "logger=none", "train.progress=false", "train.epochs=1", "train.eval_every=1",
    "train.limit_batches=2", "train.batch_size=8",
    "dataset.num_test=64", "bench.infer_batch=4", "bench.train_batch=4", "bench.repeats=1", "bench.warmup=0",
]
"""Overrides that make a run take seconds on a CPU."""

from fpet.pet import PET_METHODS  # noqa: E402

SELECTING_PETS = tuple(name for name, record in PET_METHODS.items() if record.select is not None)
"""PET methods that select weights from data (their record's `select`), the only ones TR-PTS's sparse insertion
(`merge=trpts merge.layer=null`) can read."""


def merge_overrides(merge: str, pet: str) -> list[str]:
    """What `merge=<merge>` needs beside `pet=<pet>` on vit_micro: explicit blocks for TR-PTS's token selection
    when the PET method selects no weights (its default sparse insertion would be refused)."""
    return ["merge.layer=[3,6,9]"] if merge == "trpts" and pet not in SELECTING_PETS else []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests are skipped on a machine without a CUDA GPU, unless FPET_CUDA_TESTS_DEVICE=cpu
    asks to dry-run their logic on the CPU (tests/test_cuda.py; scripts/gpu_check.sh --cpu-smoke)."""
    if torch.cuda.is_available() or os.environ.get("FPET_CUDA_TESTS_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on a lent machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """`make_cfg("pet=adaptformer", ...)`: the composed train config with FAST settings and tmp output dirs."""

    def _make(*overrides: str, fast: Sequence[str] = FAST) -> DictConfig:
        return compose_config([*fast, f"paths.output_dir={tmp_path / 'outputs'}", *overrides])

    return _make


@pytest.fixture
def images() -> torch.Tensor:
    """Two random 224x224 images `[2, 3, 224, 224]`."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
