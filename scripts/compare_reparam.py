"""Re-parameterised LoRA / Bi-LoRA / RepAdapter against the plain ViT, in one process: GFLOPs and latency.

    python scripts/compare_reparam.py                                  # ViT-B/16, random init, batch 256
    python scripts/compare_reparam.py --rounds 5 bench.infer_batch=16 bench.repeats=5 device=cpu

Every variant is built from the same overrides (random init; PET branches get random non-zero weights so folding
really changes the backbone's weights), then timed in `--rounds` interleaved rounds (the order rotates each
round) and the median per variant is kept, so machine noise hits all variants alike. Prints a Markdown table and,
on the last stdout line, a JSON object with per-variant GFLOPs / latency and the ratios to the plain ViT.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fpet.pet import PETLayer  # noqa: E402
from fpet.pipeline import script_main, session_from_overrides  # noqa: E402
from fpet.profile import count_flops, measure_latency  # noqa: E402
from fpet.results import describe_device  # noqa: E402

VARIANTS = {  # name -> (pet, fold)
    "plain": ("linear", False),
    "lora": ("lora", False),
    "lora_folded": ("lora", True),
    "bi_lora_folded": ("bi_lora", True),
    "repadapter": ("repadapter", False),
    "repadapter_folded": ("repadapter", True),
}


@torch.no_grad()
def build_variant(name: str, pet: str, fold: bool, overrides: list[str]) -> tuple[nn.Module, object]:
    """`(model, session)`: the model of `pet` with random non-zero branches, folded by the pipeline when `fold`,
    in eval mode on the session's device."""
    session = session_from_overrides([f"pet={pet}", f"eval.reparameterize={str(fold).lower()}", *overrides])
    for layer in session.model.modules():
        if isinstance(layer, PETLayer):
            for p in layer.pet_parameters():
                p.normal_(0.0, 0.02)
    model, report = session.inference()
    if fold and (not report.reparameterized or report.kept):
        raise RuntimeError(f"{name}: expected pet={pet} to fold completely, got {report}")
    print(f"built {name}", file=sys.stderr, flush=True)
    return model.eval(), session


def compare(overrides: list[str], rounds: int) -> dict:
    """GFLOPs and the median latency over `rounds` of every variant, with ratios to `plain`."""
    built = {name: build_variant(name, pet, fold, overrides) for name, (pet, fold) in VARIANTS.items()}
    models = {name: model for name, (model, _) in built.items()}
    cfg, device = built["plain"][1].cfg, built["plain"][1].device
    img = cfg.backbone.img_size
    print(f"counting GFLOPs, then {rounds} rounds x {len(models)} variants x ({cfg.bench.warmup} + "
          f"{cfg.bench.repeats}) forwards at batch {cfg.bench.infer_batch}", file=sys.stderr, flush=True)
    out = {name: {"gflops": count_flops(m, img, device), "latency_ms": []} for name, m in models.items()}
    names = list(models)
    start = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            lat = measure_latency(models[name], cfg.bench.infer_batch, img, cfg.bench.repeats, cfg.bench.warmup,
                                  cfg.bench.dtype)
            out[name]["latency_ms"].append(lat["latency_ms"])
            print(f"round {r + 1}/{rounds} {name}: {lat['latency_ms']:.3f} ms/img "
                  f"({time.perf_counter() - start:.0f} s of timing so far)", file=sys.stderr, flush=True)
    for row in out.values():
        row["latency_ms"] = statistics.median(row["latency_ms"])
    base = out["plain"]
    for row in out.values():
        row["latency_ratio"] = row["latency_ms"] / base["latency_ms"]
        row["gflops_ratio"] = row["gflops"] / base["gflops"]
    return {"backbone": cfg.backbone.name, "infer_batch": cfg.bench.infer_batch, "repeats": cfg.bench.repeats,
            "rounds": rounds, "dtype": cfg.bench.dtype, "device": describe_device(device), "variants": out}


def table(result: dict) -> str:
    lines = ["| variant | GFLOPs | latency ms/img | latency / plain |", "|---|---|---|---|"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | {row['gflops']:.3f} | {row['latency_ms']:.3f} | {row['latency_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median kept)")
    args, overrides = parser.parse_known_args()
    with torch.no_grad():  # not set_grad_enabled(False): a caller's grad mode is left as it was
        result = compare(overrides, args.rounds)
    print(f"{result['backbone']}, batch {result['infer_batch']}, {result['rounds']} rounds x {result['repeats']} "
          f"repeats, {result['dtype']}, on {result['device']}", file=sys.stderr)
    print(table(result), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    script_main(main)
