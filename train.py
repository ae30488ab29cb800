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
    # light imports only: a skipped run, `--help` and a bad override answer before torch and timm are imported
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fpet.errors import UserError, user_message
    from fpet.launch import main as run_main
    from fpet.validate import check_appended_keys

    try:
        check_appended_keys(HydraConfig.get().overrides.task, cfg)
        return run_main(cfg)["acc"]
    except (UserError, KeyboardInterrupt) as err:
        if HydraConfig.get().mode != RunMode.RUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a sweep's launcher records the failed job with its traceback
        # a single run: the message says what is wrong and how to fix it; the traceback adds nothing
        if isinstance(err, KeyboardInterrupt):
            print(f"\n{err}", file=sys.stderr)
            raise SystemExit(130) from None
        raise SystemExit(f"error: {type(err).__name__}: {user_message(err)}") from None


if __name__ == "__main__":
    main()
