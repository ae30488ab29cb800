"""Draw which patches each merge strategy put into one token (paper Fig. A3 style), ToMe and FPET side by side.

    python scripts/visualize_merge.py --out merge.png                                  # synthetic image, vit_b16
    python scripts/visualize_merge.py --image photo.jpg backbone=vit_micro --out merge.png
    python scripts/visualize_merge.py --checkpoint outputs/runs/.../task.safetensors \\
        backbone.checkpoint=data/weights/ViT-B_16.npz dataset=synthetic --out merge.png

Overrides are those of train.py; the backbone is randomly initialised unless backbone.checkpoint is given. A task
checkpoint (`task.safetensors` of a run) gives every panel the run's PET and head (and, in the panel of the
strategy it was trained with, its merge parameters and layer); pass the run's backbone/pet/dataset overrides.
Without --image the picture is item --index of the synthetic task's test split.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fpet.config import compose_config, layer_tag  # noqa: E402
from fpet.data import SyntheticTask  # noqa: E402
from fpet.data.transforms import ToFloat  # noqa: E402
from fpet.pipeline import script_main, seed_everything, session_from_overrides  # noqa: E402
from fpet.visualize import merge_groups, render_groups, save_panels, trained_model, with_merge  # noqa: E402


def load_image(path: str | None, cfg, index: int) -> torch.Tensor:
    """uint8 `[3, S, S]` at the backbone's input size: the file at `path` (bicubic resize) or a synthetic image."""
    size = cfg.backbone.img_size
    if path is None:
        return SyntheticTask("test", img_size=size, num_test=index + 1, data_seed=cfg.dataset.get("data_seed", 1234)
                             ).image(index)
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def visualize(overrides: list[str], merges: list[str], out: str, image_path: str | None = None,
              checkpoint: str | None = None, index: int = 0, seed: int = 0) -> Path:
    """One model per merge strategy (sharing a trained checkpoint's PET and head if given), sources tracked for
    one image, the panels written to `out`."""
    base = ["backbone.checkpoint=null", "logger=none", *overrides]
    image = load_image(image_path, compose_config(base), index)
    panels = [("input", image.permute(1, 2, 0).numpy())]
    trained = trained_model(base, checkpoint) if checkpoint else None
    for merge in merges:
        cfg = compose_config([*base, f"merge={merge}"])
        seed_everything(int(cfg.seed))
        if trained is None:
            session = session_from_overrides([*base, f"merge={merge}"], random_init=False)
            model, cfg = session.model, session.cfg
        elif trained[1].merge.name == merge:  # the strategy it was trained with: its trained merge parameters
            model, cfg = trained
        else:
            model = with_merge(trained[0], cfg.merge)
        groups, tokens = merge_groups(model, ToFloat(cfg.dataset.get("normalize", "none"))(image))
        where = "every block" if cfg.merge.layer is None else f"block {layer_tag(cfg.merge.layer)}"
        panels.append((f"{merge} ({where}): {tokens} tokens", render_groups(panels[0][1], groups, seed=seed)))
    return save_panels(panels, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="an image file (default: a synthetic-task image)")
    parser.add_argument("--index", type=int, default=0, help="synthetic test image index (default: 0)")
    parser.add_argument("--checkpoint", help="a run's task.safetensors (default: random init of PET and merge)")
    parser.add_argument("--merges", default="tome,fpet", help="strategies side by side (default: %(default)s)")
    parser.add_argument("--out", default="merge.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the outline colours")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. backbone=vit_micro pet=adaptformer")
    args = parser.parse_args()
    path = visualize(args.overrides, args.merges.split(","), args.out, args.image, args.checkpoint, args.index,
                     args.seed)
    print(path)


if __name__ == "__main__":
    script_main(main)
