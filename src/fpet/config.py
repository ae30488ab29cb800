"""Compose the Hydra config outside `train.py` (scripts, tests, notebooks)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The composed train config with command-line style `overrides` (e.g. `["pet=adaptformer"]`)."""
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
