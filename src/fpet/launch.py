"""What happens around one run in its run directory (the entry of `train.py`; the loop is `fpet.train.run`).

- A folder that holds a finished run of the same config is skipped (its stored results are returned) and one of
  another config is refused (`fpet.sweep.RunDirConflict`), before torch or timm are imported and without touching
  the folder: Hydra does not write `.hydra/` itself (`hydra.output_subdir: null`, configs/hydra/default.yaml) and
  the log file stays closed during the check; `write_hydra_record` writes `.hydra/` once the run goes ahead, so a
  finished run's config always matches its results.json.
- A run that fails writes the error (with the traceback for an unexpected one) into its train.log.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from fpet.errors import UserError, user_message

log = logging.getLogger("fpet.train")


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


@contextmanager
def log_file_closed() -> Iterator[None]:
    """Keep the run's log file (Hydra's file handler, train.log) out of the block: a skipped or refused re-run
    writes nothing into the finished run's folder; console logging goes on."""
    root, handlers = logging.getLogger(), _file_handlers()
    for handler in handlers:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.addHandler(handler)


@contextmanager
def log_file_in(folder: Path) -> Iterator[None]:
    """Send the run's log file lines to `folder/train.log` for the block (an eval_only run whose results go into
    the training run's `eval/` folder keeps the training run's train.log as it was)."""
    handlers = [h for h in _file_handlers() if Path(h.baseFilename).parent != folder.resolve()]
    if not handlers:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)  # the run goes ahead: its folder may not exist yet (no Hydra job)
    moved = logging.FileHandler(folder / "train.log", delay=True)
    moved.setFormatter(handlers[0].formatter)
    moved.setLevel(handlers[0].level)
    with log_file_closed():
        root = logging.getLogger()
        root.addHandler(moved)
        try:
            yield
        finally:
            root.removeHandler(moved)
            moved.close()


def eval_output_dir(run_dir: str | Path) -> Path:
    """Where an eval_only run writes (results.json, .hydra/, train.log): `run_dir`, or `run_dir/eval/` when
    `run_dir` holds a training run's results (never overwritten)."""
    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    try:
        trained = results.is_file() and not json.loads(results.read_text()).get("eval_only")
    except (OSError, ValueError):
        trained = True  # unreadable: leave it alone too
    return run_dir / "eval" if trained else run_dir


def log_failure(err: BaseException) -> None:
    """Write `err` into the run's log file only (the console shows it once, as train.py prints it)."""
    text = user_message(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    exc_info = None if isinstance(err, (UserError, KeyboardInterrupt)) else (type(err), err, err.__traceback__)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s", (text,), exc_info)
    for handler in _file_handlers():
        handler.handle(record)


def interrupted_message(run_dir: str | Path) -> str:
    """What an interrupted run (Ctrl-C) tells the user: where it stopped and how to resume."""
    ckpt = Path(run_dir) / "last.ckpt"
    if ckpt.is_file():
        return (f"interrupted; the last finished epoch is saved in {ckpt}: run the same command again to resume "
                f"from it")
    return "interrupted before the first epoch finished (nothing to resume); run the same command again to start"


def write_hydra_record(cfg: DictConfig, run_dir: str | Path) -> None:
    """`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml` in `run_dir`, as Hydra would write them at job start
    (only inside a Hydra job; nothing otherwise)."""
    from hydra.core.hydra_config import HydraConfig

    from fpet.fileio import write_text_atomic

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", OmegaConf.create(list(hydra_cfg.overrides.task)))):
        write_text_atomic(folder / name, OmegaConf.to_yaml(node))


def main(cfg: DictConfig, run_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """One run in `run_dir` (the Hydra run dir unless given): skip it when it already finished, else train it.

    A run dir that already holds a finished run of the same config is not trained again (`train.skip_finished`,
    default true): its stored results are returned, so a re-launched sweep resumes where it stopped. In a multirun
    on a machine with several GPUs, `device=auto` gives each run a GPU of its own (fpet.sweep.claim_device).
    """
    from fpet.hparams import check_hparams
    from fpet.sweep import finished_results

    check_hparams(cfg)  # +hparams=<name> without an entry for this task and method stops here, with the fix
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    if cfg.train.get("skip_finished", True) and not cfg.get("eval_only", False):
        with log_file_closed():
            done = finished_results(cfg, run_dir)
            if done is not None:
                log.info("skipping finished run: %s (train.skip_finished=false trains it again)",
                         Path(run_dir) / "results.json")
                return done
    record_dir = eval_output_dir(run_dir) if cfg.get("eval_only", False) else Path(run_dir)
    write_hydra_record(cfg, record_dir)
    with log_file_in(record_dir):
        try:
            return _run(cfg, run_dir)
        except BaseException as err:
            log_failure(err)
            if isinstance(err, KeyboardInterrupt):
                raise KeyboardInterrupt(interrupted_message(run_dir)) from None
            raise


def _run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    import fpet.train
    from fpet.sweep import claim_device

    with claim_device(cfg) as device:
        cfg.device = device
        return fpet.train.run(cfg, run_dir)
