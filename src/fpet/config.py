"""Compose the Hydra config outside `train.py` (scripts, tests, notebooks), and the config's resolvers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"


def num_gpus(minimum: Any = 0, per_gpu: Any = 1) -> int:
    """Visible CUDA devices (at least `minimum`) times `per_gpu`: the `${fpet.num_gpus:1,${.runs_per_gpu}}`
    resolver of the local launcher preset (runs at the same time)."""
    import torch

    return max(int(minimum), torch.cuda.device_count()) * int(per_gpu)


def layer_tag(layer: Any, prefix: str = "") -> str:
    """`merge.layer` in a run directory name: `6` -> "6", `[2, 6]` -> "2-6", null -> "" (every block); `prefix`
    goes in front of a non-empty tag (the `${fpet.layer_tag:...}` resolver of the merge configs)."""
    if layer is None:
        return ""
    values = list(layer) if isinstance(layer, (list, tuple, ListConfig)) else [layer]
    return prefix + "-".join(str(v) for v in values)


def r_tag(r: Any) -> str:
    """`merge.r` in a run directory name: `8` -> "8", ToMe's schedule `[16, -1]` -> "16i-1" (r, inflection)."""
    if isinstance(r, (list, tuple, ListConfig)):
        return "i".join(str(v) for v in r)
    return str(r)


def split_tag(split: Any, k: Any = None, prefix: str = "", default: Any = None) -> str:
    """`merge.split` in a run directory name: "" when it is `default`, else `prefix` + the split (`kth3` names k)."""
    if split == default:
        return ""
    return prefix + (f"kth{k}" if split == "kth" else str(split))


def eval_subdir(eval_only: Any) -> str:
    """`/eval` for an `eval_only=true` run (its folder inside the training run's), else "" (the
    `${fpet.eval_subdir:${eval_only}}` resolver of configs/hydra/default.yaml)."""
    return "/eval" if eval_only else ""


def register_resolvers() -> None:
    """Register `${fpet.num_gpus:N}`, `${fpet.layer_tag:...}`, `${fpet.r_tag:...}`, `${fpet.split_tag:...}`,
    `${fpet.search_tag:}`, `${fpet.hparam:KEY}` (fpet.hparams) and `${fpet.eval_subdir:...}` (idempotent); before
    any composition."""
    from fpet.hparams import hparam_value, search_tag_resolver

    for name, fn in (("fpet.num_gpus", num_gpus), ("fpet.layer_tag", layer_tag), ("fpet.r_tag", r_tag),
                     ("fpet.split_tag", split_tag), ("fpet.search_tag", search_tag_resolver),
                     ("fpet.hparam", hparam_value), ("fpet.eval_subdir", eval_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The composed train config with command-line style `overrides` (e.g. `["pet=adaptformer"]`)."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
