"""How far the 1-bit layers are from the official QLinear formula, and from the old level, on ViT-B/16.

    python scripts/check_one_bit_level.py                 # random init, latent 1-bit weights ~ N(0, 0.02)

For Bi-LoRA and Bi-AdaptFormer (logits of 4 random images) and FPET's refinement adapter (refined keys of random
keys): the max abs difference between this code and every 1-bit weight computed by the official formula
`sign((w - mean) / (std + 1e-5)) * 0.6745 * std + mean`, and between that and the same formula with the
centroid level 0.7979 that versions before task format 2 used. No data, no weights.
"""
import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from fpet.merge import FPETMerge  # noqa: E402
from fpet.pet import BinaryLinear  # noqa: E402
from fpet.pipeline import script_main, session_from_overrides  # noqa: E402

OFFICIAL, OLD = 0.6745, 0.7979


def formula(w: torch.Tensor, level: float) -> torch.Tensor:
    """The official QLinear forward weight with 1-bit level `level`."""
    mean, std = w.mean(), w.std()
    return torch.sign((w - mean) / (std + 1e-5)) * level * std + mean


@contextmanager
def level_formula(level: float):
    """Every `BinaryLinear` computes its weight by `formula(w, level)` inside the block."""
    real = BinaryLinear.quantized_weight
    BinaryLinear.quantized_weight = lambda self: formula(self.weight, level)
    try:
        yield
    finally:
        BinaryLinear.quantized_weight = real


def randomise(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, BinaryLinear):
            m.weight.data.normal_(0.0, 0.02)


@torch.no_grad()
def compare(fn) -> tuple[float, float]:
    """(ours vs official formula, official vs old level): max abs differences of `fn()`."""
    ours = fn()
    with level_formula(OFFICIAL):
        official = fn()
    with level_formula(OLD):
        old = fn()
    return (ours - official).abs().max().item(), (official - old).abs().max().item()


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    images = torch.rand(4, 3, 224, 224)
    for pet in ("bi_lora", "bi_adaptformer"):
        model = session_from_overrides([f"pet={pet}", "dataset.num_classes=10"]).model.eval()
        randomise(model)
        ours_vs_official, official_vs_old = compare(lambda: model(images))
        print(f"{pet:15s} logits: ours vs official {ours_vs_official:.2e}, official vs level 0.7979 "
              f"{official_vs_old:.3e}")
    merge = FPETMerge(64).eval()
    randomise(merge)
    keys = torch.randn(4, 197, 64)
    ours_vs_official, official_vs_old = compare(lambda: merge.refine_keys(keys))
    print(f"{'fpet refinement':15s} keys:   ours vs official {ours_vs_official:.2e}, official vs level 0.7979 "
          f"{official_vs_old:.3e}")


if __name__ == "__main__":
    script_main(main)
