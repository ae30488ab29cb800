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
    parser.add_argument("--bench-merges", metavar="NAMES",
                        help="--bench: also these merge strategies (comma-separated) on the same folded backbone, "
                             "timed in the same interleaved loop, each as a ratio to merge=none")
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
    from fpet.merge import MERGE_STRATEGIES

    unknown = [m for m in (args.bench_merges or "").split(",") if m and m not in MERGE_STRATEGIES]
    if unknown or (args.bench_merges and not args.bench):
        raise ExportError(f"--bench-merges {args.bench_merges}: comma-separated merge strategies "
                          f"({','.join(MERGE_STRATEGIES)}) timed with --bench")
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
        names = [cfg.merge.name, *(["none"] if cfg.merge.name != "none" else ["fpet"])]
        names += [m for m in (args.bench_merges.split(",") if args.bench_merges else []) if m not in names]
        results = {cfg.merge.name: result}
        for name in names[1:]:
            results[name] = export_verified(with_merge_strategy(deploy, cfg, name), "onnx",
                                            Path(tmp) / f"{name}.onnx", img, real)
            print(f"merge={name}:", end=" ")
            print_checks(results[name])
        runners = {name: one_at_a_time(load_runner("onnx", r.path, args.threads), r.batch)
                   for name, r in results.items()}
        ms = bench_interleaved(runners, img, args.bench_batch, args.repeats, args.warmup)
    ratios = {name: ms[name] / ms["none"] for name in names if name != "none"}
    summary = {"backbone": cfg.backbone.name, "pet": cfg.pet.name, "merges": ["none", *ratios],
               **{f"{name}_ms": round(ms[name], 3) for name in ["none", *ratios]},
               "ratio": round(ratios[names[0] if names[0] != "none" else names[1]], 4),
               "ratios": {name: round(r, 4) for name, r in ratios.items()}, "batch": args.bench_batch,
               "repeats": args.repeats, "threads": args.threads, "runtime": "onnxruntime CPUExecutionProvider"}
    print(f"onnxruntime, batch {args.bench_batch}, {args.threads} threads, median of {args.repeats} interleaved "
          f"calls: none {ms['none']:.2f} ms/image, " + ", ".join(
              f"{name} {ms[name]:.2f} ms/image (ratio {name}/none {r:.3f})" for name, r in ratios.items()))
    print(json.dumps(summary))


def one_at_a_time(run, batch):
    """A runner for a file of fixed batch size 1 (an input-dependent token count) fed one image per call."""
    if batch is None:
        return run
    return lambda images: torch.cat([run(image[None]) for image in images])

if __name__ == "__main__":
    script_main(main)
