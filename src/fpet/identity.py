"""A run's identity, in one place.

- `run_id(cfg)`: what a run is, `<backbone>/<task>/<pet>/<merge tag>/seed<seed>` (the config key `run_id`): the
  run directory below `outputs/runs/` or the sweep folder, the wandb run name, the `run_id` of results.json.
- `config_fingerprint(cfg)`: the parts of the config that decide a run's numbers; two configs with the same
  fingerprint are the same run. Resuming (`fpet.resume`), skipping finished runs (`fpet.sweep`) and the tables
  compare fingerprints, and name the differing keys (`config_changes`).
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

FINGERPRINT_IGNORES = {
    "train": ("progress", "save_task", "eval_batch_size", "keep_last_ckpt", "skip_finished", "compile",
              "loader", "device_data_gb"),
    "dataset": ("num_workers", "check_sizes"),
}
"""Config keys that may change between an interrupted run and its resumption (they do not change the result)."""
FINGERPRINT_GROUPS = ("seed", "backbone", "pet", "merge", "dataset", "optim", "train")


def run_id(cfg: DictConfig) -> str:
    """`<backbone>/<task>/<pet>/<merge tag>/seed<seed>` (the config's `run_id`)."""
    return str(cfg.run_id)


def config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the resolved config that decide a run's numbers (paths, logging and devices excluded)."""
    full = OmegaConf.to_container(cfg, resolve=True)
    out = {k: full.get(k) for k in FINGERPRINT_GROUPS}
    for group, keys in FINGERPRINT_IGNORES.items():
        for key in keys:
            (out.get(group) or {}).pop(key, None)
    return out


def location_keys(raw: dict[str, Any]) -> set[str]:
    """Dotted keys of an unresolved config container whose value is interpolated from `paths` or the environment
    (e.g. `backbone.checkpoint`): where files are, not what a run computes, so no config difference."""
    return {key for key, value in flatten(raw).items()
            if isinstance(value, str) and ("${paths." in value or "${oc.env:" in value)}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys: `{"pet": {"dim": 8}} -> {"pet.dim": 8}`."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any], shared_only: bool = False) -> dict[str, str]:
    """`{dotted key: "key: old -> new"}` for every value that differs between two nested configs, sorted by key;
    `shared_only` ignores keys that only one side has."""
    a, b = flatten(old), flatten(new)
    keys = a.keys() & b.keys() if shared_only else a.keys() | b.keys()
    return {k: f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(keys) if a.get(k) != b.get(k)}
