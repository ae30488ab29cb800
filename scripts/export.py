"""Export a tuned model (folded PET, merge strategy in inference form, input normalisation inside) and check it.

    python scripts/export.py outputs/runs/vit_b16/cifar100/lora/fpet_l6/seed0            # -> <run dir>/model.onnx
    python scripts/export.py path/to/task.safetensors --format torchscript --out lora_fpet.pt
    python scripts/export.py outputs/runs/.../seed0 --bench                 # onnxruntime: this model vs merge=none
    python scripts/export.py --bench backbone=vit_b16 pet=lora merge=fpet   # random init, nothing trained
    python scripts/export.py --check-all --pets lora,vpt_deep     # PET x merge strategies on a 3-block vit_micro

SOURCE is a run directory (its recorded config and task.safetensors), a task file (its run's recorded config
when it lies in a run directory, else its own metadata: backbone, dataset, PET and merge keys), or nothing (a
random-init model of the overrides, as scripts/benchmark.py). Overrides are key=value: on a recorded config only
keys such as paths.data_dir=PATH or backbone.checkpoint=PATH (the frozen backbone's weights are not in the task
file); for a bare task file also what its metadata does not hold (dataset.normalize=imagenet, seed=N for a
random-init backbone).

The file gets input `images`, float32 [B, 3, S, S] in [0, 1] (S = backbone.img_size, the image resized as in
training), output `logits` [B, classes], a dynamic batch dimension unless a merge strategy keeps an
input-dependent number of tokens (then batch 1). Before it is written, the export is run back (onnxruntime, CPU
execution provider, for ONNX) on random images and on --real images of the run's evaluation split and must give
PyTorch's logits within 1e-4 and the same argmax; otherwise nothing is written and the script exits 1.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from fpet.export import (FORMATS, TINY, ExportError, bench_interleaved, check_all, dataset_images,  # noqa: E402
                         default_out, export_verified, inference_model, load_runner, resolve_source,
                         with_merge_strategy)
from fpet.pipeline import script_main  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="SOURCE | key=value",
                        help="a run directory or task file (optional), then key=value overrides")
    parser.add_argument("--format", default="onnx", choices=sorted(FORMATS), help="default: %(default)s")
    parser.add_argument("--out", type=Path, help="output file (default: model.<ext> beside the task file)")
    parser.add_argument("--real", type=int, default=16, help="images of the evaluation split to check (default 16)")
    parser.add_argument("--random-only", action="store_true", help="check on random images only (no dataset)")
    parser.add_argument("--bench", action="store_true",
                        help="time this model against the same PET method without merging (with merge=fpet if "
                             "this one does not merge) in onnxruntime, interleaved, and print the ratio")
    parser.add_argument("--bench-batch", type=int, default=8, help="images per timed call (default 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="onnxruntime intra-op threads (default: torch's, %(default)s)")
    parser.add_argument("--check-all", action="store_true",
                        help="export and check every registered PET method x merge strategy (random init, "
                             f"{' '.join(TINY)}; --format) and print a table")
    parser.add_argument("--pets", help="--check-all: these PET methods only (comma-separated)")
    parser.add_argument("--merges", help="--check-all: these merge strategies only (comma-separated)")
    args = parser.parse_args()
    sources = [a for a in args.args if "=" not in a]
    if len(sources) > 1:
        parser.error(f"one SOURCE at most, got {sources}")
    args.source = sources[0] if sources else None
    args.overrides = [a for a in args.args if "=" in a]
    return args


def print_checks(result) -> None:
    batch = "dynamic" if result.batch is None else str(result.batch)
    print(f"verified ({result.fmt}, batch {batch}, against PyTorch):")
    if result.note:
        print(f"  note: {result.note}")
    for check in result.checks:
        print(check.line())


def main() -> None:
    args = parse_args()
    if args.check_all:
        split = lambda names: names.split(",") if names else None  # noqa: E731
        rows = check_all(args.overrides, args.format, split(args.pets), split(args.merges))
        print("| pet | merge | export |\n|---|---|---|")
        for pet, merge, status in rows:
            print(f"| {pet} | {merge} | {status} |")
        return
    if args.bench and args.format != "onnx":
        raise ExportError("--bench times onnxruntime: use --format onnx (the default)")
    source = resolve_source(args.source, args.overrides)
    deploy, cfg = inference_model(source)
    img = int(cfg.backbone.img_size)
    real = [] if args.random_only else [dataset_images(cfg, args.real)]
    print(f"{source.label}: backbone={cfg.backbone.name} pet={cfg.pet.name} merge={cfg.merge.name} "
          f"normalize={cfg.dataset.get('normalize', 'none')}")
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.out is not None or not args.bench or source.task_file is not None
        out = (args.out or default_out(source, cfg, args.format)) if keep else Path(tmp) / "model.onnx"
        result = export_verified(deploy, args.format, out, img, real)
        print_checks(result)
        print(f"wrote {out}" if keep else "(bench only: no file written; --out PATH keeps it)")
        if not args.bench:
            return
        merged = cfg.merge.name != "none"
        other_name = "none" if merged else "fpet"
        other = with_merge_strategy(deploy, cfg, other_name)
        other_result = export_verified(other, "onnx", Path(tmp) / f"{other_name}.onnx", img, real)
        print_checks(other_result)
        label, other_label = cfg.merge.name, other_name
        runners = {label: load_runner("onnx", out, args.threads), other_label: load_runner("onnx", other_result.path,
                                                                                           args.threads)}
        ms = bench_interleaved(runners, img, args.bench_batch, args.repeats, args.warmup)
    fast, slow = (label, other_label) if merged else (other_label, label)
    summary = {"backbone": cfg.backbone.name, "pet": cfg.pet.name, "merges": [slow, fast],
               f"{slow}_ms": round(ms[slow], 3), f"{fast}_ms": round(ms[fast], 3),
               "ratio": round(ms[fast] / ms[slow], 4), "batch": args.bench_batch, "repeats": args.repeats,
               "threads": args.threads, "runtime": "onnxruntime CPUExecutionProvider"}
    print(f"onnxruntime, batch {args.bench_batch}, {args.threads} threads, median of {args.repeats} interleaved "
          f"calls: {slow} {ms[slow]:.2f} ms/image, {fast} {ms[fast]:.2f} ms/image, ratio {fast}/{slow} "
          f"{ms[fast] / ms[slow]:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    script_main(main)
