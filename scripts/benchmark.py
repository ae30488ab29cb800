"""Efficiency figures of any backbone / pet / merge, with no data and no weights.

    python scripts/benchmark.py pet=adaptformer merge=fpet merge.layer=4 bench.infer_batch=64

Takes the same overrides as train.py (backbone.checkpoint defaults to null: random init) plus bench.infer_batch,
bench.train_batch, bench.repeats, bench.latency=false, bench.train=false, bench.merge_time=true (time spent in
the merge modules: merge_ms per image, merge_frac of the forward pass). As in a training run, FLOPs and latency
are those of the re-parameterised model (LoRA / Bi-LoRA / RepAdapter folded) unless eval.reparameterize=false;
storage_bytes is the size of the task file a run would write (storage_bytes_no_head without the head).
The config is validated as a run's is (every problem listed before anything is built). Prints a readable block,
then the efficiency keys of results.json as one JSON object on the last stdout line.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # before torch is imported
    sys.exit(print(__doc__))

import torch  # noqa: E402

from fpet.pipeline import script_main, session_from_overrides  # noqa: E402
from fpet.results import describe_device, plain  # noqa: E402


def benchmark(overrides: list[str]) -> dict:
    """Build the model of `overrides` (random init unless a checkpoint is given; validated like a run) and
    profile it: the efficiency keys of results.json, storage included."""
    session = session_from_overrides(overrides)
    cfg = session.cfg
    out = {"backbone": cfg.backbone.name, "pet": cfg.pet.name, "merge": cfg.merge.name,
           "merge_layer": plain(cfg.merge.get("layer")), "merge_r": cfg.merge.get("r"),
           "merge_split": cfg.merge.get("split")}
    out.update(session.profile())
    out.update(session.storage())
    out["device"] = describe_device(session.device)
    return out


def main() -> None:
    out = benchmark(sys.argv[1:])
    for key, value in out.items():
        print(f"{key:>18}: {value}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    script_main(main)
