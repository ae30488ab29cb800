"""Efficiency figures of any backbone / pet / merge, with no data and no weights.

    python scripts/benchmark.py pet=adaptformer merge=fpet merge.layer=4 bench.infer_batch=64

Takes the same overrides as train.py (backbone.checkpoint defaults to null: random init) plus bench.infer_batch,
bench.train_batch, bench.repeats, bench.latency=false, bench.train=false, bench.merge_time=true (time spent in
the merge modules: merge_ms per image, merge_frac of the forward pass). As in a training run, FLOPs and latency
are those of the re-parameterised model (LoRA / Bi-LoRA / RepAdapter folded) unless eval.reparameterize=false.
Prints a readable block, then the efficiency keys of results.json as one JSON object on the last stdout line.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from fpet.config import compose_config  # noqa: E402
from fpet.merge.timing import measure_merge_time  # noqa: E402
from fpet.model import build_model  # noqa: E402
from fpet.pet.reparam import inference_model  # noqa: E402
from fpet.profile import profile_model  # noqa: E402
from fpet.results import describe_device  # noqa: E402
from fpet.train import reparameterize_enabled, resolve_device, seed_everything  # noqa: E402


def benchmark(overrides: list[str]) -> dict:
    """Build the model of `overrides` (random init unless a checkpoint is given) and profile it."""
    cfg = compose_config(["backbone.checkpoint=null", *overrides])
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    model = build_model(cfg).to(device)
    out = {"backbone": cfg.backbone.name, "pet": cfg.pet.name, "merge": cfg.merge.name,
           "merge_layer": cfg.merge.get("layer"), "merge_r": cfg.merge.get("r"),
           "merge_split": cfg.merge.get("split")}
    infer, reparam = inference_model(model, reparameterize_enabled(cfg))
    out.update(profile_model(model, cfg.bench, cfg.backbone.img_size, cfg.dataset.num_classes, infer))
    out["reparameterized"] = reparam.reparameterized
    if cfg.bench.get("merge_time"):  # time inside the merge modules, share of the forward pass
        out.update(measure_merge_time(infer, cfg.bench.infer_batch, cfg.backbone.img_size, cfg.bench.repeats,
                                      cfg.bench.warmup))
    out["device"] = describe_device(device)
    return out


def main() -> None:
    out = benchmark(sys.argv[1:])
    for key, value in out.items():
        print(f"{key:>18}: {value}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
