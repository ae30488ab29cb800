"""The one pipeline every entry point runs: compose -> validate -> seed -> device -> build -> fold -> profile.

Training (`fpet.train.run`), evaluation of a task file (`eval_only=true`), `scripts/benchmark.py`,
`benchmark_grid.py`, `compare.py`, `compare_reparam.py` and `demo.py` all go through `open_session` (validation,
determinism, seeds, device) and a `Session` (the model, its folded inference copy, its efficiency profile), so a
config is checked, built, folded and measured the same way everywhere.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fpet.precision import configure_precision
from fpet.vit import TokenViT

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available else cpu; otherwise the named device (checked)."""
    from fpet.validate import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r}: {err}; accepted auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return device


def configure_determinism(cfg: DictConfig) -> None:
    """`train.deterministic=true` asks torch for deterministic kernels (CUDA runs repeat exactly, a bit slower);
    CPU runs with the same seed repeat exactly either way."""
    if cfg.train.get("deterministic", False):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def reparameterize_enabled(cfg: DictConfig) -> bool:
    """`eval.reparameterize` (default true): evaluate and time the folded model."""
    return bool(OmegaConf.select(cfg, "eval.reparameterize", default=True))


@dataclass
class Session:
    """One validated config on its device: builds the model, folds it once for inference, profiles it."""

    cfg: DictConfig
    device: torch.device
    model: Optional[TokenViT] = None
    _inference: Optional[tuple[nn.Module, Any]] = field(default=None, repr=False)

    def build(self, score_cache: Optional[str | Path] = None, task_file: Optional[str | Path] = None) -> TokenViT:
        """The model of the config (`fpet.model.build_model`) on the session's device.

        A PET method that selects weights from data scores them there; `score_cache` is the run's score file
        (reused when present), `task_file` a task file whose selection is adopted instead of scoring.
        """
        from fpet.model import build_model
        from fpet.select import ScoringInput

        scoring = ScoringInput(self.device, None if score_cache is None else Path(score_cache),
                               None if task_file is None else Path(task_file),
                               progress=bool(self.cfg.train.get("progress", False)))
        self.model = build_model(self.cfg, scoring).to(self.device)
        self._inference = None
        return self.model

    def inference(self) -> tuple[nn.Module, Any]:
        """`(model, report)` to evaluate and time: the re-parameterised copy (`eval.reparameterize`), made once, on
        the first call (after training); `report` is a `fpet.pet.ReparamReport`."""
        from fpet.pet.reparam import inference_model

        if self._inference is None:
            self._inference = inference_model(self._built(), reparameterize_enabled(self.cfg))
        return self._inference

    def _built(self) -> TokenViT:
        if self.model is None:
            raise RuntimeError("Session.build() first")
        return self.model

    def task_info(self) -> dict[str, Any]:
        """The task-file metadata of this config and model (`fpet.checkpoint.task_metadata`)."""
        from fpet.checkpoint import task_metadata

        return task_metadata(self.cfg, self._built())

    def storage(self) -> dict[str, int]:
        """`storage_bytes` (the task file with head) and `storage_bytes_no_head` (Table 2's convention), counted
        from the bytes `save_task` writes."""
        from fpet.checkpoint import task_storage_bytes

        info = self.task_info()
        return {"storage_bytes": task_storage_bytes(self._built(), True, info),
                "storage_bytes_no_head": task_storage_bytes(self._built(), False, info)}

    def profile(self, bench: Optional[DictConfig] = None) -> dict[str, Any]:
        """Every efficiency key of results.json (`fpet.profile.profile_model`): parameters and training on the
        model as trained, tokens, FLOPs and latency on the inference copy; `bench` defaults to `cfg.bench`.
        `bench.merge_time=true` adds the time inside the merge modules."""
        from fpet.merge.timing import measure_merge_time
        from fpet.profile import profile_model

        bench = self.cfg.bench if bench is None else bench
        infer, report = self.inference()
        img = int(self.cfg.backbone.img_size)
        out = profile_model(self._built(), bench, img, int(self.cfg.dataset.num_classes), infer)
        out["reparameterized"] = report.reparameterized
        if bench.get("merge_time"):
            out.update(measure_merge_time(infer, bench.infer_batch, img, bench.repeats, bench.warmup))
        return out


def open_session(cfg: DictConfig, check_files: bool = True) -> Session:
    """Validate `cfg` (every problem at once, `ConfigError`), log its warnings, set determinism and seeds, pick the
    device. Nothing is read or built yet."""
    from fpet.validate import config_warnings, validate_config

    validate_config(cfg, check_files=check_files)
    for warning in config_warnings(cfg):
        log.warning(warning)
    configure_determinism(cfg)
    configure_precision(str(cfg.train.get("precision", "fp32")))
    seed_everything(int(cfg.seed))
    return Session(cfg, resolve_device(cfg.device))


RANDOM_INIT = ("backbone.checkpoint=null",)
"""Overrides of the scripts that need no weights (efficiency does not depend on them)."""


def session_from_overrides(overrides: Sequence[str], random_init: bool = True, check_files: bool = False) -> Session:
    """Compose `overrides` (as on train.py's command line), open a session and build the model: the scripts'
    entry (random init and no data files by default)."""
    from hydra.errors import HydraException

    from fpet.config import compose_config
    from fpet.validate import ConfigError, check_appended_keys

    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ConfigError(f"{flags[0]}: not an option of this script (--help lists them); the rest of its command "
                          f"line is train.py's overrides, key=value")
    try:
        cfg = compose_config([*(RANDOM_INIT if random_init else ()), *overrides])
    except HydraException as err:  # a missing config option (pet=lorax) or an override Hydra cannot parse
        raise ConfigError(str(err)) from None
    check_appended_keys(list(overrides), cfg)
    session = open_session(cfg, check_files=check_files)
    session.build()
    return session


def script_main(main: Any) -> None:
    """Run a script's `main()`: bad input (`UserError`: a config, data or file problem) ends with its message
    and exit status 1, no traceback (`HYDRA_FULL_ERROR=1` shows it), as train.py does."""
    import sys

    from fpet.errors import UserError, user_message

    torch.set_grad_enabled(True)
    try:
        main()
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {type(err).__name__}: {user_message(err)}")
