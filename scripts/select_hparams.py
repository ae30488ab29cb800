"""Select hyper-parameters from a validation search and write the table the final runs read.

    python train.py -m experiment=tune pet=lora dataset=cifar100,dtd        # the search (train800 -> val200)
    python scripts/select_hparams.py outputs/tune                           # -> configs/hparams/tune.yaml
    python scripts/select_hparams.py outputs/tune --name lora_val --seeds 0,1,2,3,4

Per task x (PET method, merge strategy): the setting with the best final-epoch val200 accuracy (mean over search
seeds); ties go to the smaller optim.optimizer.lr, then the smaller weight decay, then the other searched keys in
name order (smaller first). The file records, for every entry, the run directories, the validation accuracy, the
search size and the data it read. The last line printed is the final sweep command: train800val200 -> test with the
selected values, 3 seeds (`+hparams=<name>`).
"""
import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fpet.pipeline import script_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", help="folder searched recursively for the search runs' results.json files")
    parser.add_argument("--name", default="tune", help="table name: configs/hparams/<name>.yaml, used as "
                                                       "+hparams=<name> (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "configs"),
                        help="config folder: the table goes to OUT/hparams/<name>.yaml (default: this checkout's "
                             "configs/; another folder is added to the final command as hydra.searchpath)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the final runs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing table of that name")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from fpet.hparams import HparamsError, TIE_RULE, final_commands, hparams_yaml, load_trials, select

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.name.replace("_", "").replace("-", "").isalnum():
        raise HparamsError(f"--name {args.name!r}: use letters, digits, '-' and '_' (it becomes a config name)")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    trials, skipped = load_trials(args.results_dir)
    selection = select(trials)
    config_dir = Path(args.out).resolve()
    out = config_dir / "hparams" / f"{args.name}.yaml"
    if config_dir != (ROOT / "configs").resolve():
        selection.common_overrides.append(f"hydra.searchpath=[file://{config_dir}]")
    if out.exists() and not args.force:
        raise HparamsError(f"{out} exists; pass --force to overwrite it or --name to write another table")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(hparams_yaml(selection, args.name, args.results_dir))
    print(f"{len(trials)} search runs of {selection.backbone} in {args.results_dir}"
          + "".join(f"; left out {n} ({why})" for why, n in skipped.items()))
    print(f"rule: {TIE_RULE}")
    for (task, pet, merge), choice in selection.choices.items():
        values = ", ".join(f"{k}={choice.values.get(k)}" for k in selection.keys)
        ties = f", {choice.tied} tied: the tie rule chose" if choice.tied > 1 else ""
        print(f"  {task:>20} {pet:>14} {merge:<8} val {choice.val_acc:6.2f}%  of {choice.search_size} settings"
              f"{ties}  {values}")
    print(f"wrote {out}")
    print("final runs (train800val200 -> test, final epoch, selected values):")
    for command in final_commands(selection, args.name, seeds):
        print(command)


if __name__ == "__main__":
    script_main(main)
