"""`make demo`: the whole pipeline on the embedded default, side by side for each merge strategy.

    python scripts/demo.py                      # merge=none and merge=fpet (when available), vit_micro, synthetic
    python scripts/demo.py --merges none -- train.epochs=4

Each run is a full `fpet.train.run` (train, evaluate, measure, results.json) under outputs/demo/<merge>/; the script
ends with a comparison table (accuracy, GFLOPs, latency, ratios against merge=none).
"""
import argparse
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fpet.config import compose_config  # noqa: E402
from fpet.merge import MERGE_STRATEGIES  # noqa: E402
from fpet.results import fmt  # noqa: E402
from fpet.train import run  # noqa: E402
from fpet.pipeline import script_main  # noqa: E402

DEFAULT_MERGES = ("none", "fpet")


def compare(rows: list[dict]) -> str:
    """A Markdown table of the demo runs, with ratios against the first (merge=none) run."""
    base = rows[0]
    lines = ["| merge | acc final % | acc best % | GFLOPs | tokens out | latency ms/img | latency ratio "
             "| train s/it | saved-for-backward MB |", "|" + "---|" * 9]
    for r in rows:
        ratio = r["latency_ms"] / base["latency_ms"] if r["latency_ms"] and base["latency_ms"] else None
        lines.append(
            f"| {r['merge']} | {fmt(r['acc'], '.1f')} | {fmt(r['acc_best'], '.1f')} | {fmt(r['gflops'], '.3f')} "
            f"| {r['tokens_out']} | {fmt(r['latency_ms'], '.3f')} | {fmt(ratio, '.2f')} "
            f"| {fmt(r['train_s_per_iter'], '.3f')} | {fmt(r['train_act_mb'], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merges", default=",".join(m for m in DEFAULT_MERGES if m in MERGE_STRATEGIES),
                        help="comma-separated merge strategies to run side by side (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="where the run directories go")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. train.epochs=4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    rows = []
    for merge in args.merges.split(","):
        cfg = compose_config(["experiment=demo", f"merge={merge}", *args.overrides])
        run_dir = Path(args.out) / merge
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains afresh
        rows.append(run(cfg, run_dir))
    chance = 100.0 / cfg.dataset.num_classes
    print(f"\nDemo: {cfg.backbone.name} + {cfg.pet.name} on the synthetic task ({cfg.dataset.num_classes} classes, "
          f"chance {chance:.1f}%), {cfg.train.epochs} epochs, CPU-friendly settings\n")
    print(compare(rows))
    print(f"\nresults.json files under {args.out}/<merge>/ ; scripts/benchmark.py measures any other combination.")


if __name__ == "__main__":
    script_main(main)
