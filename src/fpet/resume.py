"""Rolling checkpoints: re-running the same command continues an interrupted run where it stopped.

After every epoch the run directory gets `last.ckpt` (written to a temporary file, then renamed) holding only what
training changes: the trainable parameters (never the frozen backbone), optimizer and scheduler state, every random
generator (Python, NumPy, torch CPU/CUDA and the train loader's shuffling generator), the epoch and the evaluation
history. Restoring all of it makes a resumed CPU run produce the same numbers as an uninterrupted one. The file is
read with `torch.load(weights_only=True)`, so it can hold tensors and plain Python values but never run code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from fpet.errors import UserError
from fpet.fileio import atomic_open
from fpet.identity import config_changes, config_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
class ResumeError(UserError, RuntimeError):
    """A rolling checkpoint that cannot be used (corrupt, truncated, or from another configuration)."""


@dataclass
class TrainState:
    """Progress of a run: completed epochs, evaluation history and training wall time so far."""

    epoch: int = 0
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def _digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def capture_rng(train_loader: DataLoader) -> dict[str, Any]:
    """Every random generator a training epoch consumes."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(train_loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], train_loader: DataLoader) -> None:
    """Inverse of `capture_rng`."""
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(train_loader, "generator", None)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


class RollingCheckpoint:
    """`last.ckpt` in a run directory, tied to the configuration that wrote it."""

    def __init__(self, path: str | Path, cfg: DictConfig) -> None:
        self.path = Path(path)
        self.fingerprint = config_fingerprint(cfg)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, train_loader: DataLoader,
             state: TrainState) -> None:
        """Write the checkpoint atomically (temporary file + rename)."""
        payload = {
            "format": FORMAT_VERSION,
            "config_digest": _digest(self.fingerprint),
            "config": json.dumps(self.fingerprint, sort_keys=True, default=str),
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng(train_loader),
            "state": asdict(state),
        }
        with atomic_open(self.path, "wb") as f:
            torch.save(payload, f)

    def load(self) -> Optional[dict[str, Any]]:
        """The checkpoint's content, None when there is none; `ResumeError` when it is unusable."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ResumeError(
                f"cannot read the rolling checkpoint {self.path} ({type(err).__name__}: {err}). It is truncated, "
                f"corrupt, or holds objects other than tensors (refused for safety). Delete it to start this run "
                f"from scratch: rm {self.path}") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise ResumeError(f"{self.path} is not a rolling checkpoint of this version; delete it to start over")
        if payload["config_digest"] != _digest(self.fingerprint):
            changes = list(config_changes(json.loads(payload["config"]), self.fingerprint).values())
            raise ResumeError(f"{self.path} was written by a different configuration ({'; '.join(changes[:5])}). "
                              f"Use the original overrides to resume, or another run directory / delete the file "
                              f"to start over.")
        return payload

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                train_loader: DataLoader) -> TrainState:
        """Load trainable parameters, optimizer, scheduler and RNG states; returns the progress (epoch 0 if new)."""
        payload = self.load()
        if payload is None:
            return TrainState()
        params = dict(model.named_parameters())
        missing = sorted(set(payload["trainable"]) ^ {n for n, p in params.items() if p.requires_grad})
        if missing:
            raise ResumeError(f"{self.path} does not match this model's trainable parameters: {missing[:5]}")
        with torch.no_grad():
            for name, value in payload["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], train_loader)
        return TrainState(**payload["state"])
