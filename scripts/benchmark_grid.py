"""Table 1's efficiency columns for this machine, without data: every PET x merge cell, random init.

    python scripts/benchmark_grid.py                                   # ViT-B/16, the paper's Table 1 rows
    python scripts/benchmark_grid.py --merges none,fpet,tome --out outputs/benchmark/h100
    python scripts/benchmark_grid.py --pets lora,adaptformer -- backbone=vit_micro bench.infer_batch=32

Cells: full fine-tuning and linear probing without merging, then each of --pets with each of --merges. Each cell
builds the model (backbone.checkpoint=null) and measures it as a training run's results.json reports it
(scripts/benchmark.py, the same pipeline): GFLOPs and inference time at bench.infer_batch of the re-parameterised
model (LoRA / RepAdapter folded), a training step at bench.train_batch (time, CUDA peak memory, saved-for-backward
memory) and the task file's size. A cell whose config does not exist or fails is a gap with the
reason. Writes efficiency.json (cells + hardware) and efficiency.md / .tex / .csv to --out.
"""
import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from fpet.config import compose_config  # noqa: E402
from fpet.pipeline import resolve_device, script_main, session_from_overrides  # noqa: E402
from fpet.results import describe_device, plain  # noqa: E402
from fpet.tables.render import to_csv, to_latex, to_markdown  # noqa: E402
from fpet.tables.build import efficiency_table  # noqa: E402

PAPER_PETS = "repadapter,lora,adaptformer,bi_lora,bi_adaptformer"


def measure_cell(pet: str, merge: str, overrides: list[str]) -> dict:
    """Efficiency keys of results.json for one PET x merge cell, or `error` naming why it has none."""
    cell = {"pet": pet, "merge": merge}
    try:
        session = session_from_overrides([f"pet={pet}", f"merge={merge}", *overrides])
        cell.update(session.profile())  # FLOPs and latency of the folded model, as a run reports them
        cell.update(session.storage())
        cell.update(backbone=session.cfg.backbone.name, merge_layer=plain(session.cfg.merge.get("layer")))
    except Exception as err:  # a missing config or a failing cell is a gap, the grid goes on
        cell["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return cell


def hardware(overrides: list[str]) -> dict:
    """What the figures were measured on."""
    cfg = compose_config(overrides)
    device = resolve_device(cfg.device)
    return {"device": describe_device(device), "host": describe_device(torch.device("cpu")),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "platform": platform.platform(), "infer_batch": cfg.bench.infer_batch, "train_batch": cfg.bench.train_batch,
            "dtype": cfg.bench.dtype, "repeats": cfg.bench.repeats, "backbone": cfg.backbone.name,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pets", default=PAPER_PETS, help="PET methods crossed with --merges (default: %(default)s)")
    parser.add_argument("--merges", default="none,fpet", help="merge strategies (default: %(default)s)")
    parser.add_argument("--no-baselines", action="store_true", help="skip full fine-tuning and linear probing")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/benchmark/<backbone>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell, e.g. bench.infer_batch=64")
    args = parser.parse_args(argv)
    cells = [] if args.no_baselines else [("full", "none"), ("linear", "none")]
    cells += [(pet, merge) for merge in args.merges.split(",") for pet in args.pets.split(",")]
    info = hardware(args.overrides)
    results = []
    for pet, merge in cells:
        results.append(measure_cell(pet, merge, args.overrides))
        print(f"{pet:>15} + {merge:<8} {results[-1].get('error') or 'measured'}", file=sys.stderr, flush=True)
    out = Path(args.out) if args.out else ROOT / "outputs" / "benchmark" / info["backbone"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps({"hardware": info, "cells": results}, indent=2, default=str))
    table = efficiency_table(results, info["device"], paper=info["backbone"] == "vit_b16")
    table.notes.insert(0, "Hardware: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".")
    for ext, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
        (out / f"efficiency.{ext}").write_text(render(table))
    print(to_markdown(table))
    print(f"wrote efficiency.json / .md / .tex / .csv to {out}/")


if __name__ == "__main__":
    script_main(main)
