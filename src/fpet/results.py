"""results.json (the keys outside tools rely on: README "What a run writes") and the run loggers (console, metrics.jsonl, wandb)."""
from __future__ import annotations

import json
import logging
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from fpet.fileio import atomic_open, write_text_atomic
from fpet.identity import run_id

if TYPE_CHECKING:  # torch is imported where it is used: skipping a finished run needs none of it
    import torch

log = logging.getLogger(__name__)

RESULT_KEYS = (
    "task", "backbone", "pet", "merge", "seed", "epochs", "acc", "acc_best", "gflops", "tokens_out",
    "params_pet", "params_head", "params_merge", "storage_bytes", "latency_ms", "throughput",
    "train_s_per_iter", "train_act_mb", "peak_mem_mb", "device", "dtype", "protocol",
)
"""Keys every results.json has (null where not measured); outside checks rely on them."""


def plain(value: Any) -> Any:
    """A config value as plain Python (lists and dicts instead of OmegaConf containers), for JSON."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename: a kill never leaves half a file."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill


def load_complete_results(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The results record in `run_dir` when that run finished, else None.

    Finished = `results.json` parses, says `"complete": true` and has every key of RESULT_KEYS; a missing,
    truncated or partial file means the run must be (re-)trained, and so does an `eval_only` record (it evaluated
    a task file; nothing was trained there).
    """
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable %s (%s); the run will be trained again", path, err)
        return None
    if not isinstance(results, dict) or results.get("complete") is not True or not set(RESULT_KEYS) <= results.keys():
        return None
    if results.get("eval_only"):
        return None
    return results


def describe_device(device: torch.device) -> str:
    """Human-readable hardware name, e.g. 'NVIDIA H200' or 'cpu: AMD EPYC 7763 (2 threads)'."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


def build_results(cfg: DictConfig, fit: dict[str, Any], efficiency: dict[str, Any], storage_bytes: Optional[int],
                  device: torch.device, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The results record of one run: the contract keys first, then details (and `extra`) and the resolved
    config."""
    import timm
    import torch

    from fpet import __version__

    results = {
        "task": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "pet": cfg.pet.name,
        "merge": cfg.merge.name,
        "seed": int(cfg.seed),
        "epochs": int(cfg.train.epochs),
        "acc": fit.get("acc"),
        "acc_best": fit.get("acc_best"),
        **{k: efficiency.get(k) for k in RESULT_KEYS if k in efficiency},
        "storage_bytes": storage_bytes,
        "device": describe_device(device),
        "protocol": cfg.dataset.protocol,
    }
    results.update({k: None for k in RESULT_KEYS if k not in results})
    results.update({
        "run_id": run_id(cfg),
        "merge_layer": plain(cfg.merge.get("layer")),
        "merge_r": plain(cfg.merge.get("r")),
        "merge_split": cfg.merge.get("split"),
        "pet_dim": cfg.pet.get("dim"),
        "pet_scale": cfg.pet.get("scale"),
        "normalize": cfg.dataset.get("normalize", "none"),
        "precision": cfg.train.get("precision", "fp32"),
        "compile": bool(cfg.train.get("compile", False)),
        "train_split": fit.get("train_split"),
        "eval_split": fit.get("eval_split"),
        "acc_protocols": {"acc": "final: after the last epoch",
                          "acc_best": f"best_{fit.get('eval_split')}: best of the evaluations every "
                                      f"{cfg.train.eval_every} epochs (official FPET code)"},
        "evals": fit.get("evals", []),
        "train_seconds": fit.get("train_seconds"),
        "resumed_from_epoch": fit.get("resumed_from_epoch", 0),
        "efficiency": efficiency,
        **(extra or {}),
        "versions": {"fpet": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    return results


class RunLogger:
    """Per-epoch metrics to `metrics.jsonl` (always) and to Weights & Biases (`logger.mode` offline | online)."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = self._init_wandb(cfg, Path(run_dir))

    @staticmethod
    def _init_wandb(cfg: DictConfig, run_dir: Path) -> Any:
        mode = cfg.logger.get("mode", "disabled")
        if cfg.logger.get("name") != "wandb" or mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            log.warning("logger=wandb but wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            return None
        name = run_id(cfg).replace("/", "-")
        return wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"), group=cfg.logger.get("group"),
                          name=name, mode=mode, dir=str(run_dir), reinit="finish_previous",
                          config=OmegaConf.to_container(cfg, resolve=True))

    def truncate(self, last_step: int) -> None:
        """Drop records after `last_step` (a resumed run re-runs the epoch that was interrupted)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= last_step]
        write_text_atomic(self.path, "".join(f"{line}\n" for line in keep))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self, summary: Optional[dict[str, Any]] = None) -> None:
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if k in RESULT_KEYS})
            self.wandb.finish()
            self.wandb = None


def fmt(value: Any, spec: str) -> str:
    """`value` formatted by `spec`, or 'n/a' when it was not measured (None)."""
    return "n/a" if value is None else format(value, spec)


BENCH_SWITCHES = (("gflops", "GFLOPs", "flops"), ("latency_ms", "latency", "latency"),
                  ("train_s_per_iter", "train s/it and saved-for-backward", "train"))
"""(results key, name in the summary, the `bench.<switch>` that turns its measurement on)."""


def not_measured(results: dict[str, Any]) -> list[str]:
    """Why each 'n/a' of the summary is missing, with the key that measures it."""
    bench = (results.get("config") or {}).get("bench") or {}
    reasons = []
    if results.get("acc_best") is None:
        reasons.append("best: eval_only=true evaluates once (the training run's results.json has it)"
                       if results.get("eval_only") else "best: no periodic evaluation ran")
    for key, name, switch in BENCH_SWITCHES:
        if results.get(key) is None:
            reasons.append(f"{name}: bench.{switch}=false (bench.{switch}=true measures it)"
                           if bench.get(switch) is False else f"{name}: not measured")
    return reasons


def format_summary(results: dict[str, Any], run_dir: Path) -> str:
    """A few lines for the console at the end of a run; each 'n/a' is explained (`not_measured`)."""
    reasons = not_measured(results)
    return "\n".join([
        f"== {results['task']} | {results['backbone']} | pet={results['pet']} | merge={results['merge']} "
        f"| seed={results['seed']}",
        f"   accuracy  final {fmt(results['acc'], '.2f')} %   best {fmt(results['acc_best'], '.2f')} % "
        f"({results['eval_split']} split)",
        f"   GFLOPs {fmt(results['gflops'], '.3f')}   tokens out {results['tokens_out']}   "
        f"latency {fmt(results['latency_ms'], '.3f')} ms/img   train {fmt(results['train_s_per_iter'], '.3f')} s/it "
        f"  saved-for-backward {fmt(results['train_act_mb'], '.1f')} MB",
        f"   params: PET {results['params_pet']:,}  head {results['params_head']:,}  merge "
        f"{results['params_merge']:,}   on {results['device']}",
        *([f"   n/a = not measured: {'; '.join(reasons)}"] if reasons else []),
        f"   results: {run_dir / 'results.json'}",
    ])
