"""`hydra/launcher=local`: Hydra's joblib launcher plus `runs_per_gpu`, the runs one GPU takes at the same time.

The launcher itself only drops the key before joblib sees it; the runs read it from their Hydra config
(`hydra.launcher.runs_per_gpu`) and `fpet.sweep.claim_device` admits that many runs per GPU through the GPU lock.
`n_jobs` defaults to GPUs x runs_per_gpu (configs/hydra/launcher/local.yaml).
"""
from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class LocalLauncher(JoblibLauncher):
    """JoblibLauncher that accepts `runs_per_gpu` (>= 1) beside joblib's own keys."""

    def __init__(self, runs_per_gpu: int = 1, **kwargs: Any) -> None:
        if not isinstance(runs_per_gpu, int) or isinstance(runs_per_gpu, bool) or runs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.runs_per_gpu={runs_per_gpu!r}: must be an integer >= 1")
        super().__init__(**kwargs)
        self.runs_per_gpu = runs_per_gpu
