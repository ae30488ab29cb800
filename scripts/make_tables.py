"""The paper's tables and figures from the results.json files below RESULTS_DIR.

    python scripts/make_tables.py outputs/multirun                       # -> outputs/multirun/tables/
    python scripts/make_tables.py outputs --out paper_tables --acc acc   # final-epoch accuracy instead

Writes table1, table2, table3, tableA3, tableA4, tableA6, trpts (TR-PTS: the 19-task mean and the mean of the
group means) and trpts_ablation as .md, .tex and .csv (plus tables.md with all of them) and fig1.png, fig3.png,
figA1.png (figures without data are skipped). Missing runs are empty cells, never zeros; the paper's values sit in
the row below ours ("source" column) when the results are ViT-B/16 on VTAB-1K. Runs of one cell (method, task,
seed) with different configs stop the script, named with the differing keys, until --where KEY=VALUE keeps one
config; the `config` column says which config each row used.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fpet.tables import RunFilterError, make_tables  # noqa: E402
from fpet.tables.build import ACC_PROTOCOLS, protocol_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", help="folder searched recursively for results.json files")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/tables)")
    parser.add_argument("--acc", default="acc_best", choices=sorted(ACC_PROTOCOLS),
                        help="accuracy protocol: acc_best = best of the evaluations every 10 epochs, the official "
                             "code's protocol behind the paper's numbers, so ours and the paper's compare like for "
                             "like (default); acc = after the last epoch, no selection on the test set. With --protocol "
                             "paper / selected / both the protocol decides")
    parser.add_argument("--protocol", default="test", choices=("test", "val", "paper", "selected", "both"),
                        help="runs to show: test / val = the paper's recipe on that data protocol with --acc "
                             "(default: %(default)s); paper = recipe, best of test every 10 epochs (the paper's "
                             "code); selected = val-selected hyper-parameters (+hparams runs), final epoch; both = "
                             "paper and selected rows side by side. Each table's protocol column says which.")
    parser.add_argument("--mix-sources", action="store_true",
                        help="allow runs that read different data (NOAH's JPEGs vs a tfds export, or changed "
                             "list files) in one row; refused by default, noted in the tables when allowed")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="use only runs whose recorded config has KEY (a dotted key of the run fingerprint, e.g. "
                             "train.epochs) at VALUE; repeatable. Needed when runs of one cell (method, task, seed) "
                             "differ in config: they are refused, each run and the differing keys named")
    parser.add_argument("--backbone", default=None, help="backbone to show when results hold several")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else Path(args.results_dir) / "tables"
    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunFilterError(f"--where {item!r}: expected KEY=VALUE, e.g. --where train.epochs=100")
        where[key.strip()] = value
    study, written = make_tables(args.results_dir, out, args.acc, args.protocol, args.backbone,
                                 figures=not args.no_figures, allow_mixed_sources=args.mix_sources, where=where)
    tasks = len(study.tasks)
    print(f"{len(study.runs)} runs of {study.backbone} ({args.protocol} protocol) over {tasks} tasks in "
          f"{len(study.summaries)} method rows; accuracy: {protocol_text(study)}")
    for key, summary in sorted(study.summaries.items()):
        average = "n/a" if summary.average is None else f"{summary.average.mean:.2f}"
        print(f"  {key[0]:>15} + {key[1]:<22} {len(summary.tasks):>2}/{tasks} tasks  Average {average}")
    print(f"wrote {len(written)} files to {out}/")


if __name__ == "__main__":
    from fpet.pipeline import script_main

    script_main(main)
