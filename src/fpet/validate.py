"""Config validation up front: every problem of a composed config, before any data is read or model built.

Each rule lives with the code that enforces it and is only collected here: the recipe's below, the dataset's in
`fpet.data.dataset_problems`, the backbone's, PET method's and merge strategy's in `fpet.model.model_problems`
(the builders run on the meta device: no memory, no weights), the files' in `file_problems`. Each message names the
key, the bad value and what is accepted. `config_warnings` names settings that run but are probably not meant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fpet.errors import UserError


class ConfigError(UserError, ValueError):
    """One or more invalid config values; the message lists each with the accepted values."""


PRECISIONS = ("fp32", "tf32", "bf16")
LOADERS = ("dataloader", "device", "auto")
"""Accepted values of `train.loader` (fpet.data.device)."""


def precision_problems(precision: Any) -> list[str]:
    """The config problem of `train.precision`, if any."""
    if precision not in PRECISIONS:
        return [f"train.precision={precision!r}: accepted {list(PRECISIONS)} (fp32: IEEE float32; tf32: float32 "
                f"with TF32 tensor-core matmuls on CUDA; bf16: bfloat16 autocast)"]
    return []


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def recipe_problems(cfg: DictConfig) -> list[str]:
    """Recipe keys: epochs, batch sizes, evaluation period, learning rate, seed."""
    problems = []
    for key in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
        value = cfg.train.get(key)
        if not _positive_int(value):
            problems.append(f"train.{key}={value!r}: must be a positive integer")
    problems += precision_problems(cfg.train.get("precision", "fp32"))
    if not isinstance(cfg.train.get("compile", False), bool):
        problems.append(f"train.compile={cfg.train.get('compile')!r}: must be true or false")
    if cfg.train.get("loader", "dataloader") not in LOADERS:
        problems.append(f"train.loader={cfg.train.get('loader')!r}: accepted {list(LOADERS)} (dataloader: "
                        f"torch DataLoader; device: splits held on the run's device; auto: device on CUDA)")
    budget = cfg.train.get("device_data_gb", 8)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget < 0:
        problems.append(f"train.device_data_gb={budget!r}: must be a number of GiB >= 0")
    limit = cfg.train.get("limit_batches")
    if limit is not None and not _positive_int(limit):
        problems.append(f"train.limit_batches={limit!r}: must be a positive integer or null")
    lr = cfg.optim.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        problems.append(f"optim.optimizer.lr={lr!r}: must be a positive number")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        problems.append(f"seed={cfg.seed!r}: must be a non-negative integer")
    return problems


def file_problems(cfg: DictConfig) -> list[str]:
    """Weight file, data folders and task checkpoint that the run will read exist."""
    from fpet.data import dataset_file_problems

    problems = []
    ckpt = cfg.backbone.get("checkpoint")
    if ckpt and not Path(ckpt).is_file():
        url = cfg.backbone.get("download_url")
        problems.append(f"backbone.checkpoint={ckpt!r}: no such file" + (f" (download: {url})" if url else "") +
                        "; or backbone.checkpoint=null for random init")
    problems += dataset_file_problems(cfg)
    if cfg.get("eval_only") and not cfg.get("checkpoint"):
        problems.append("checkpoint=None: eval_only=true needs checkpoint=PATH (the task.safetensors a training run "
                        "wrote)")
    elif cfg.get("eval_only") and not Path(cfg.checkpoint).is_file():
        problems.append(f"checkpoint={cfg.checkpoint!r}: no such task checkpoint")
    return problems


def config_warnings(cfg: DictConfig) -> list[str]:
    """Settings that run but are probably not meant (logged, not refused)."""
    warnings = []
    warmup = cfg.optim.scheduler.get("warmup_t") or 0
    epochs = cfg.train.get("epochs")
    if _positive_int(epochs) and not cfg.get("eval_only") and epochs <= warmup:
        start = cfg.optim.scheduler.get("warmup_lr_init")
        warnings.append(
            f"train.epochs={epochs} is not longer than the {warmup} warm-up epochs (optim.scheduler.warmup_t): every "
            f"epoch trains at a warm-up learning rate (from {start}), far below optim.optimizer.lr="
            f"{cfg.optim.optimizer.lr}, and the run will end near chance. For a short run add "
            f"optim.scheduler.warmup_t=0 (or fewer warm-up epochs than train.epochs).")
    return warnings


def validate_config(cfg: DictConfig, check_files: bool = True) -> None:
    """Raise `ConfigError` listing every invalid value of `cfg` (nothing has been read or built yet)."""
    from fpet.data import dataset_problems
    from fpet.hparams import check_hparams
    from fpet.model import model_problems

    check_hparams(cfg)  # +hparams=<name>: the table must hold this run before any selected value is read
    problems = recipe_problems(cfg) + dataset_problems(cfg) + model_problems(cfg)
    if check_files:
        problems += file_problems(cfg)
    raise_problems(problems)


def raise_problems(problems: list[str]) -> None:
    """Raise one `ConfigError` listing every problem (nothing when the list is empty)."""
    if problems:
        raise ConfigError("invalid config (nothing was run):\n  - " + "\n  - ".join(problems))


APPENDABLE = ("backbone.kwargs.", "pet.", "merge.", "hydra.")
"""Where `+key=value` may add a key the config does not have: timm's model kwargs, a PET method's or merge
strategy's own keys (an extension without its config file), Hydra's settings. Appending a config group
(`+ablation=fpet`) or a key of `APPENDABLE_KEYS` is always accepted; any other appended key is a typo Hydra would
silently add."""
APPENDABLE_KEYS = ("hparams",)
"""Top-level keys meant to be added with `+` (`+hparams=<name>`, fpet.hparams)."""


def appended_key_problems(overrides: list[str] | tuple[str, ...], cfg: DictConfig) -> list[str]:
    """`+key=value` overrides outside `APPENDABLE` and the config groups, each with the nearest existing key."""
    import difflib

    from fpet.config import CONFIG_DIR
    from fpet.identity import flatten
    from omegaconf import OmegaConf

    known = [k for k in flatten(OmegaConf.to_container(cfg, resolve=False)) if not k.startswith("hydra.")]
    problems = []
    for override in overrides:
        if not override.startswith("+") or override.startswith("++") or "=" not in override:
            continue  # `++key=value` (add or override) is taken as meant
        key = override[1:].split("=", 1)[0].split("@", 1)[0]
        if (CONFIG_DIR / key).is_dir() or key.startswith(APPENDABLE) or key in APPENDABLE_KEYS:
            continue
        others = [k for k in known if k != key and not k.startswith(key + ".")]
        near = difflib.get_close_matches(key, others, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}={override.split('=', 1)[1]}?" if near else "no such key in the config"
        places = ", ".join([*(p.rstrip(".") for p in APPENDABLE), *APPENDABLE_KEYS])
        problems.append(f"{override}: adds the key {key!r}, which nothing reads ({hint}); `+` may add keys only "
                        f"under {places} or select a config group")
    return problems


def check_appended_keys(overrides: list[str] | tuple[str, ...], cfg: DictConfig) -> None:
    """Raise `ConfigError` for `+key=value` overrides that add a key nothing reads (`appended_key_problems`)."""
    raise_problems(appended_key_problems(overrides, cfg))
