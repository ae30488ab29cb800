"""Export a tuned model for deployment: ONNX (run by onnxruntime), TorchScript or a `torch.export` program.

The exported graph is the model a run evaluates, rebuilt through `fpet.pipeline`: the run's config (or a task
file's metadata) -> `open_session` -> `Session.build` -> the task file loaded -> `Session.inference` (the PET
method's record folds what folds) -> merge strategies in their inference form (no gradient: FPET's hard
matching, ToMe / BSM, pooling) -> the run's input normalisation in front. Its input is `images`, float32
`[B, 3, S, S]` in [0, 1] (`ToTensor()` output of the image resized to `S = backbone.img_size`); its output is
`logits [B, num_classes]`.

The batch dimension is dynamic when every merge strategy of the model leaves a token count that depends on the
input's shape only (`TokenMerge.static_tokens`); otherwise the graph is exported for batch size 1. A written file
has passed `verify`: the file itself, run back (onnxruntime's CPU execution provider for ONNX), gives PyTorch's
logits within `TOLERANCE` and the same argmax on random images and on images of the run's dataset; a file that
fails is never written.

onnx, onnxscript and onnxruntime are an optional extra (`make install-export`); TorchScript and `exported` need
torch only.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fpet.errors import UserError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
"""`--format` -> file suffix."""
TOLERANCE = 1e-4
"""Largest accepted |logit difference| between an export run back and PyTorch."""
EXTRA = "make install-export (onnx, onnxscript, onnxruntime)"


class ExportError(UserError):
    """The model cannot be exported or its export does not reproduce PyTorch; nothing was written."""


class DeployModel(nn.Module):
    """`images [B, 3, S, S]` float in [0, 1] -> `logits [B, classes]`: the run's normalisation, then `model`."""

    def __init__(self, model: nn.Module, normalize: str = "none") -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images: Tensor) -> Tensor:
        from fpet.data.transforms import to_float

        return self.model(to_float(images, self.normalize))


# ---------------------------------------------------------------- what to export


@dataclass
class Source:
    """A model to export: its config, the task file with its trained tensors (None: random init), a label."""

    cfg: DictConfig
    task_file: Optional[Path]
    label: str


def recorded_config(run_dir: Path) -> Optional[DictConfig]:
    """The resolved config a run recorded: `results.json`'s `config`, else `.hydra/config.yaml`; None if neither."""
    results = run_dir / "results.json"
    if results.is_file():
        config = json.loads(results.read_text()).get("config")
        if config:
            return OmegaConf.create(config)
    hydra = run_dir / ".hydra" / "config.yaml"
    if hydra.is_file():
        from fpet.config import register_resolvers

        register_resolvers()
        return OmegaConf.load(hydra)
    return None


def apply_key_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """`key=value` overrides on a recorded config (`paths.data_dir=...`, `backbone.checkpoint=...`); a config
    group (`pet=lora`) cannot change a trained run and is refused."""
    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0].lstrip("+")
              and isinstance(cfg.get(o.split("=", 1)[0].lstrip("+")), DictConfig)]
    if groups:
        raise ExportError(f"{' '.join(groups)}: a trained run's config groups are fixed by its recorded config; "
                          f"accepted overrides here are keys such as paths.data_dir=PATH or backbone.checkpoint=PATH")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))


def resolve_source(source: Optional[str], overrides: Sequence[str] = ()) -> Source:
    """The config and task file of `source`: a run directory, a task file (its run's recorded config when it lies
    in one, else the file's metadata), or None (a random-init model of `overrides`, as scripts/benchmark.py)."""
    from fpet.checkpoint import read_task_file, task_overrides
    from fpet.config import compose_config
    from fpet.pipeline import RANDOM_INIT

    if source is None:
        return Source(compose_config([*RANDOM_INIT, *overrides]), None, "random init")
    path = Path(source)
    if path.is_dir():
        task_file = path / "task.safetensors"
        if not task_file.is_file():
            raise ExportError(f"{path} holds no task.safetensors: pass a finished run's directory (train.save_task"
                              f"=true) or a task file")
    elif path.is_file():
        task_file = path
    else:
        raise ExportError(f"{source}: no such run directory or task file")
    cfg = recorded_config(task_file.parent)
    if cfg is not None:
        return Source(apply_key_overrides(cfg, overrides), task_file, f"run {task_file.parent}")
    info, _ = read_task_file(task_file)
    return Source(compose_config([*task_overrides(info), *overrides]), task_file, f"task file {task_file}")


def inference_model(source: Source) -> tuple[nn.Module, DictConfig]:
    """`(DeployModel in eval mode, cfg)` of `source` on the CPU, through the pipeline (validate, seed, build, load
    the task file, fold)."""
    from fpet.checkpoint import load_task
    from fpet.pipeline import open_session

    cfg = source.cfg.copy()
    cfg.device = "cpu"
    pipeline_log = logging.getLogger("fpet.pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.ERROR)  # its warnings are about training (e.g. short warm-up)
    try:
        session = open_session(cfg, check_files=False)
    finally:
        pipeline_log.setLevel(level)
    model = session.build(task_file=source.task_file)  # TR-PTS / GPS: the file's selection, no scoring pass
    if source.task_file is not None:
        load_task(model, source.task_file, session.task_info())
    infer, _ = session.inference()
    return DeployModel(infer, cfg.dataset.get("normalize", "none")).eval(), cfg


def input_dependent_merges(deploy: DeployModel) -> list[str]:
    """Names of the model's merge strategies whose token count depends on the input (not `static_tokens`)."""
    return sorted({type(m).name for m in getattr(deploy.model, "merges", {}).values() if not type(m).static_tokens})


def fixed_batch(deploy: DeployModel) -> Optional[int]:
    """None (dynamic batch) when every merge strategy of the model has `static_tokens`, else 1."""
    return 1 if input_dependent_merges(deploy) else None


def with_merge_strategy(deploy: DeployModel, cfg: DictConfig, name: str) -> DeployModel:
    """The same folded backbone, PET parts and head with `merge=<name>` (its configs/merge/<name>.yaml defaults,
    resolved against `cfg`): the counterpart `--bench` compares with."""
    from fpet.config import CONFIG_DIR, register_resolvers
    from fpet.visualize import with_merge

    register_resolvers()
    other = cfg.copy()
    other.merge = OmegaConf.load(CONFIG_DIR / "merge" / f"{name}.yaml")
    return DeployModel(with_merge(deploy.model, other.merge), deploy.normalize).eval()


# ---------------------------------------------------------------- writing and reading back


def require_onnx() -> None:
    """Raise a clear error when the optional export extra is missing."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: run {EXTRA}, or export --format "
                          f"torchscript / exported (torch only)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def onnx_translations() -> dict:
    """ONNX translations of aten ops that torch's exporter lacks (its `custom_translation_table`).

    `aten.sort.stable` (`Tensor.sort(stable=True)`: ToMe / BSM rank the A tokens by their best similarity with a
    stable sort, so equal scores keep sequence order) -> ONNX `TopK` over the whole axis, which the ONNX spec
    defines to break ties by the lower index first: the same order. torch's exporter translates only the
    unstable `aten.sort.default` (the same `TopK`)."""
    from onnxscript import opset18 as op

    def sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
        size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, size, axis=dim, largest=descending, sorted=True)

    return {torch.ops.aten.sort.stable: sort_stable}


def write_export(deploy: DeployModel, fmt: str, path: Path, img_size: int) -> None:
    """Trace `deploy` and write it to `path` in format `fmt` (dynamic batch unless `fixed_batch`)."""
    batch = fixed_batch(deploy)
    example = torch.rand(batch or 2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                torch.onnx.export(deploy, (example,), str(path), dynamo=True, input_names=["images"],
                                  output_names=["logits"], dynamic_shapes=dynamic, external_data=False,
                                  verbose=False, custom_translation_table=onnx_translations())
            elif fmt == "torchscript":
                torch.jit.trace(deploy, (example,), check_trace=False).save(str(path))
            elif fmt == "exported":
                torch.export.save(torch.export.export(deploy, (example,), dynamic_shapes=dynamic), str(path))
            else:
                raise ExportError(f"--format {fmt}: accepted {sorted(FORMATS)}")
    except UserError:
        raise
    except Exception as err:  # the exporters raise many types; the innermost cause names the op / the guard
        raise ExportError(f"--format {fmt}: tracing the model failed ({failure_reason(err)}); merge strategies "
                          f"{merge_names(deploy)}") from err


def failure_reason(err: BaseException) -> str:
    """One line from an exporter's error: its innermost cause (the op without an ONNX translation, the guard on a
    data-dependent size and the source line asking for it), ANSI colours and advice removed."""
    import re

    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(err).split()))
    text = text.split(" For more information")[0].split(" consider using data-dependent")[0]
    cause = re.search(r"Caused by: \(\S*?(fpet/\S+ in \w+)\)", str(err))
    if "data-dependent" in text:
        text = (f"{text.split(' (unhinted')[0]} at {cause.group(1) if cause else '?'}: a shape or branch depends on "
                f"the token count an input-dependent strategy kept")
    return f"{type(err).__name__}: {text[:300]}"


def merge_names(deploy: DeployModel) -> list[str]:
    return sorted({type(m).name for m in getattr(deploy.model, "merges", {}).values()}) or ["none"]


def load_runner(fmt: str, path: Path, threads: Optional[int] = None) -> Callable[[Tensor], Tensor]:
    """`images [B, 3, S, S] -> logits` of the file at `path`: onnxruntime's CPU execution provider for ONNX,
    torch for the others."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return module(images)

    return run


# ---------------------------------------------------------------- verification


@dataclass
class Check:
    """One verification batch: its label, images, max |logit difference|, argmax agreement."""

    label: str
    images: int
    max_diff: float
    same_argmax: bool

    @property
    def ok(self) -> bool:
        return self.max_diff <= TOLERANCE and self.same_argmax

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"  {self.label:<40} {self.images:>3} images  max |diff| {self.max_diff:.2e}  "
                f"argmax {'equal' if self.same_argmax else 'differs'}  {verdict}")


def random_images(img_size: int, batch: Optional[int], seed: int = 1) -> list[tuple[str, Tensor]]:
    """Random `[0, 1]` batches: sizes 1 and 3 with a dynamic batch, three of size 1 otherwise."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (1, 3) if batch is None else (1, 1, 1)
    return [(f"random, batch {n}", torch.rand(n, 3, img_size, img_size, generator=gen)) for n in sizes]


def dataset_images(cfg: DictConfig, count: int) -> tuple[str, Tensor]:
    """`(label, images [count, 3, S, S] in [0, 1])`: the first `count` images of the run's evaluation split."""
    from fpet.data import build_dataset, dataset_file_problems, protocol_splits

    problems = dataset_file_problems(cfg)
    if problems:
        raise ExportError(f"the check on real images of dataset={cfg.dataset.name} cannot read them: "
                          f"{problems[0]}. Set paths.data_dir=PATH, or --random-only to check on random images only")
    split = protocol_splits(cfg.dataset.protocol)[1]
    data = build_dataset(cfg.dataset, split, cfg.paths.data_dir)
    count = min(count, len(data))
    images = torch.stack([data[i][0] for i in range(count)]).float().div_(255.0)
    return f"{cfg.dataset.name} {split}", images


def verify(reference: nn.Module, run: Callable[[Tensor], Tensor], batches: Sequence[tuple[str, Tensor]],
           batch: Optional[int]) -> list[Check]:
    """Compare `run` (the file read back) with `reference` (PyTorch) on each labelled batch; with a fixed batch
    size the images go one at a time."""
    checks = []
    for label, images in batches:
        chunks = [images] if batch is None else list(images.split(batch))
        with torch.no_grad():
            expected = torch.cat([reference(c) for c in chunks])
        got = torch.cat([run(c) for c in chunks])
        if got.shape != expected.shape:
            checks.append(Check(f"{label} (shape {tuple(got.shape)} vs {tuple(expected.shape)})", len(images),
                                float("inf"), False))
            continue
        checks.append(Check(label, len(images), float((got - expected).abs().max()),
                            bool((got.argmax(-1) == expected.argmax(-1)).all())))
    return checks


# ---------------------------------------------------------------- the whole export


@dataclass
class ExportResult:
    path: Path
    fmt: str
    batch: Optional[int]
    checks: list[Check] = field(default_factory=list)
    note: Optional[str] = None
    """Why the batch size is fixed (`batch_note`)."""


def export_verified(deploy: DeployModel, fmt: str, out: Path, img_size: int,
                    batches: Sequence[tuple[str, Tensor]]) -> ExportResult:
    """Write `deploy` to `out` in `fmt` only if the written file passes `verify` on `batches` (plus the random
    ones); a failing file is removed and `ExportError` lists the checks."""
    if fmt == "onnx":
        require_onnx()
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: accepted {sorted(FORMATS)}")
    problems = sorted({p for m in getattr(deploy.model, "merges", {}).values() if (p := m.export_problem())})
    dependent = input_dependent_merges(deploy)
    if fmt == "torchscript" and dependent:
        problems.append(f"--format torchscript records one trace, and merge={','.join(dependent)} keeps an "
                        f"input-dependent number of tokens: a trace fixes the count (and any branch on it) of its "
                        f"example image; use --format onnx or exported, which keep the count in the graph")
    if problems:
        raise ExportError("; ".join(problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}{FORMATS[fmt]}")
    batch = fixed_batch(deploy)
    try:
        write_export(deploy, fmt, tmp, img_size)
        checks = verify(deploy, load_runner(fmt, tmp), [*random_images(img_size, batch), *batches], batch)
        if not all(c.ok for c in checks):
            raise ExportError(f"the {fmt} export does not reproduce PyTorch (tolerance {TOLERANCE:g}, same argmax); "
                              f"nothing written:\n" + "\n".join(c.line() for c in checks))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, batch, checks, batch_note(deploy))


def default_out(source: Source, cfg: DictConfig, fmt: str) -> Path:
    """`model<suffix>` beside the task file; for a random-init model `outputs/export/<run_id>/model<suffix>`."""
    name = f"model{FORMATS[fmt]}"
    if source.task_file is not None:
        return source.task_file.parent / name
    return Path(cfg.paths.output_dir) / "export" / str(cfg.run_id) / name


# ---------------------------------------------------------------- latency outside PyTorch


def bench_interleaved(runners: dict[str, Callable[[Tensor], Tensor]], img_size: int, batch: int, repeats: int,
                      warmup: int) -> dict[str, float]:
    """Median ms per image of each runner on the same random batch, the runners taking turns (the order flips every
    round) so that load on the machine reaches them alike."""
    images = torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name](images)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runners[name](images)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) / batch for name, t in times.items()}


# ---------------------------------------------------------------- what exports


TINY = ("backbone=vit_micro", "+backbone.kwargs.depth=3", "backbone.merge_layer=1", "logger=none")
"""Three blocks of vit_micro (ViT-B/16's 197 tokens), merging at block 1, so that block 2 and the logits see the
merged sequence (a merge at the last block leaves the class token, hence the logits, unchanged)."""


TINY_SCHEDULES = {"diffrate": ("merge.prune_kept=[150]", "merge.merge_kept=[100]")}
"""Per-block counts for the one merge block of TINY, for strategies whose default schedule names 12 blocks."""


def tiny_model(pet: str, merge: str, overrides: Sequence[str] = ()) -> tuple[DeployModel, DictConfig]:
    """`(DeployModel, cfg)` of `pet` x `merge` on the TINY backbone (random init) plus `overrides`; with
    `merge.layer=[1]` (and `TINY_SCHEDULES`) when the strategy's default blocks do not fit it (EViT's 3/6/9;
    DiffRate's 12 counts; TR-PTS's sparse insertion, which needs a parameter-selecting PET method)."""
    from fpet.validate import ConfigError

    base = [*TINY, f"pet={pet}", f"merge={merge}", *overrides]
    try:
        return inference_model(resolve_source(None, base))
    except ConfigError:
        if any(o.startswith("merge.layer=") for o in overrides):
            raise
        return inference_model(resolve_source(None, [*base, "merge.layer=[1]", *TINY_SCHEDULES.get(merge, ())]))


def batch_note(deploy: DeployModel) -> Optional[str]:
    """Why the export has a fixed batch size, or None (dynamic batch)."""
    names = input_dependent_merges(deploy)
    if not names:
        return None
    return (f"merge={','.join(names)} keeps an input-dependent number of tokens (static_tokens=False): an image's "
            f"tokens are removed by a data-dependent count, which a batched graph cannot hold (rows of different "
            f"lengths), so the file takes batch size 1: run it one image at a time")


def check_all(overrides: Sequence[str] = (), fmt: str = "onnx", pets: Optional[Sequence[str]] = None,
              merges: Optional[Sequence[str]] = None) -> list[tuple[str, str, str]]:
    """`(pet, merge, status)` for the registered PET methods x merge strategies (`pets` / `merges`: a subset),
    each exported (random init, `tiny_model`) and verified on random images. A status is `dynamic batch`,
    `batch 1 (...)`, `config: ...` (needs keys of its own) or `cannot export: ...`."""
    from fpet.merge import MERGE_STRATEGIES
    from fpet.pet import PET_METHODS
    from fpet.validate import ConfigError

    for kind, names, known in (("pet", pets, PET_METHODS), ("merge", merges, MERGE_STRATEGIES)):
        unknown = sorted(set(names or ()) - set(known))
        if unknown:
            raise ExportError(f"--check-all {kind} {','.join(unknown)}: accepted {','.join(known)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pet in pets or PET_METHODS:
            for merge in merges or MERGE_STRATEGIES:
                try:
                    deploy, cfg = tiny_model(pet, merge, overrides)
                    result = export_verified(deploy, fmt, Path(tmp) / f"{pet}_{merge}{FORMATS[fmt]}",
                                             int(cfg.backbone.img_size), [])
                    status = "dynamic batch" if result.batch is None else \
                        f"batch {result.batch} (input-dependent token count)"
                except ConfigError as err:
                    status = "config: " + " ".join(str(err).split("\n")[1:]).strip(" -")[:200]
                except ExportError as err:
                    status = "cannot export: " + " ".join(str(err).split())[:300]
                rows.append((pet, merge, status))
    return rows
