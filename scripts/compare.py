"""Merge variants side by side in one process, with ratios against the first one (merge=none by default).

    python scripts/compare.py backbone=vit_b16 pet=adaptformer bench.infer_batch=32 bench.train_batch=32
    python scripts/compare.py --variant merge=none --variant merge=fpet --variant "merge=fpet merge.layer=4" \\
        -- pet=lora bench.train=false

Every variant is built once (random init, same seed, no data); as in a training run, FLOPs, latency and merge
time are those of the re-parameterised model (LoRA / Bi-LoRA / RepAdapter folded; `eval.reparameterize=false`
measures the unfolded one), training that of the model as trained. Latency, training step and (with
bench.merge_time=true, the default here) the time inside the merge modules are measured in `--rounds`
interleaved rounds: each part for every variant back to back, the variant order rotated each round. A figure is
the median over rounds, a ratio the median of the per-round ratios against the first variant, so drift on a
shared machine cancels. FLOPs and tokens are measured once. Prints a Markdown table, then one JSON object on the
last stdout line.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fpet.merge.timing import measure_merge_time  # noqa: E402
from fpet.pipeline import script_main, session_from_overrides  # noqa: E402
from fpet.profile import count_flops, count_tokens_out, measure_latency, measure_training  # noqa: E402
from fpet.results import describe_device, fmt  # noqa: E402

DEFAULT_VARIANTS = ("merge=none", "merge=tome", "merge=bsm", "merge=fpet")
TIMED = ("latency_ms", "train_s_per_iter", "train_act_mb", "peak_mem_mb", "merge_ms", "merge_frac")
RATIOS = ("gflops", "latency_ms", "train_s_per_iter", "train_act_mb", "peak_mem_mb")


PARTS = ("latency", "train", "merge_time")


class Variant(NamedTuple):
    """A built variant: the trained-form model, its inference form (PET folded), config, fixed figures, samples."""

    model: torch.nn.Module
    infer: torch.nn.Module
    cfg: DictConfig
    row: dict
    samples: list


def build_variant(variant: str, common: list[str]) -> Variant:
    """Build one variant (random init) and measure what does not change: tokens and FLOPs of its inference form."""
    session = session_from_overrides(["bench.merge_time=true", *common, *variant.split()])
    cfg, device, model = session.cfg, session.device, session.model
    infer, _ = session.inference()
    img = cfg.backbone.img_size
    row = {"variant": variant, "merge": cfg.merge.name, "tokens_out": count_tokens_out(infer, img, device),
           "gflops": count_flops(infer, img, device), "device": describe_device(device)}
    print(f"built {variant}: {row['gflops']:.3f} GFLOPs, {row['tokens_out']} tokens", file=sys.stderr, flush=True)
    return Variant(model, infer, cfg, row, [])


def measure_part(v: Variant, part: str) -> dict:
    """One timed part (`latency`, `train` or `merge_time`) of a variant under its `cfg.bench`; {} when off.

    Latency and merge time are those of the inference form (as in a training run), training that of the model.
    """
    bench, img = v.cfg.bench, v.cfg.backbone.img_size
    if not bench[part]:
        return {}
    if part == "latency":
        return measure_latency(v.infer, bench.infer_batch, img, bench.repeats, bench.warmup, bench.dtype)
    if part == "train":
        return measure_training(v.model, bench.train_batch, img, v.cfg.dataset.num_classes, bench.repeats,
                                bench.warmup, bench.dtype)
    return measure_merge_time(v.infer, bench.infer_batch, img, bench.repeats, bench.warmup)


def compare(variants: list[str], common: list[str], rounds: int) -> list[dict]:
    """Build every variant, measure them in rotated rounds; returns one row per variant with medians and ratios."""
    built = [build_variant(variant, common) for variant in variants]
    for r in range(rounds):  # each part of every variant back to back, the variant order rotated per round
        for v in built:
            v.samples.append({})
        for part in PARTS:
            for v in built[r % len(built):] + built[: r % len(built)]:
                v.samples[-1].update(measure_part(v, part))
        for v in built:
            print(f"round {r + 1}/{rounds} {v.row['variant']}: {v.samples[-1]}", file=sys.stderr, flush=True)
    base = built[0]
    for v in built:
        for key in TIMED:
            v.row[key] = _median([s.get(key) for s in v.samples])
        for key in RATIOS:  # per-round ratios against the base variant, then their median
            v.row[f"{key}_ratio"] = _median([s[key] / b[key] if s.get(key) and b.get(key) else None
                                             for s, b in zip(v.samples, base.samples)])
        v.row["gflops_ratio"] = v.row["gflops"] / base.row["gflops"]
    return [v.row for v in built]


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown(rows: list[dict]) -> str:
    """The comparison as a Markdown table (ratios against the first row)."""
    lines = ["| variant | tokens | GFLOPs | ratio | latency ms/img | ratio | train s/it | ratio "
             "| saved-for-backward MB | ratio | peak MB (CUDA) | ratio | merge ms/img | merge % of forward |",
             "|" + "---|" * 14]
    for r in rows:
        share = None if r["merge_frac"] is None else 100 * r["merge_frac"]
        lines.append(
            f"| {r['variant']} | {r['tokens_out']} | {r['gflops']:.2f} | {fmt(r['gflops_ratio'], '.3f')} "
            f"| {fmt(r['latency_ms'], '.2f')} | {fmt(r['latency_ms_ratio'], '.3f')} "
            f"| {fmt(r['train_s_per_iter'], '.2f')} | {fmt(r['train_s_per_iter_ratio'], '.3f')} "
            f"| {fmt(r['train_act_mb'], '.0f')} | {fmt(r['train_act_mb_ratio'], '.3f')} "
            f"| {fmt(r['peak_mem_mb'], '.0f')} | {fmt(r['peak_mem_mb_ratio'], '.3f')} "
            f"| {fmt(r['merge_ms'], '.3f')} | {fmt(share, '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=None,
                        help="overrides of one variant (repeat the flag); default: " + ", ".join(DEFAULT_VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (default: 3)")
    parser.add_argument("overrides", nargs="*", help="overrides shared by every variant, e.g. pet=adaptformer")
    args = parser.parse_args()
    rows = compare(args.variant or list(DEFAULT_VARIANTS), args.overrides, args.rounds)
    print(f"\n{rows[0]['device']}; shared overrides: {' '.join(args.overrides) or '(none)'}; "
          f"medians of {args.rounds} rounds; ratios: medians of per-round ratios against {rows[0]['variant']}\n")
    print(markdown(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    script_main(main)
