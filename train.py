"""Train one PET x merge x task run: `python train.py pet=lora merge=fpet dataset=cifar100`.

Sweeps: `python train.py -m dataset=cifar100,dtd pet=lora,adaptformer`. Everything else lives in configs/ and
src/fpet/train.py; results land in the run directory as results.json.
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's code, even beside another editable install
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from fpet.train import main as train_main

    return train_main(cfg)["acc"]


if __name__ == "__main__":
    main()
