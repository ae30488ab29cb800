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
# ... in the processes the joblib / submitit launchers start for a sweep, too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])

from fpet.config import register_resolvers  # noqa: E402

register_resolvers()  # ${fpet.num_gpus:}, ${fpet.layer_tag:} in the configs


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fpet.errors import UserError
    from fpet.train import main as train_main

    try:
        return train_main(cfg)["acc"]
    except UserError as err:
        if HydraConfig.get().mode != RunMode.RUN:
            raise  # a sweep's launcher records the failed job with its traceback
        # a single run: the message says what is wrong and how to fix it; the traceback adds nothing
        # (HYDRA_FULL_ERROR=1 still shows it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {type(err).__name__}: {err}") from None


if __name__ == "__main__":
    main()
