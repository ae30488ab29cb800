#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a lent GPU machine, into .whl/ (ignored by git; the device tool's
# `carry` takes it along). That machine has Python 3.12, PyTorch, torchvision, numpy, PyYAML, tqdm, Pillow,
# tabulate, portalocker, joblib, safetensors and timm, but no network and none of the packages below.
# Versions: requirements.txt's pins, and for their dependencies the versions tested with them. All are pure Python
# (py3-none-any), so wheels built here with any Python 3 serve 3.12 there; `pip wheel` also builds the three that
# PyPI ships only as source (fvcore, iopath 0.1.10, antlr4-python3-runtime 4.9.3), which `pip download
# --only-binary` cannot fetch. timm is carried at the pinned version too (the image's may differ).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
mapfile -t PINNED < <(grep -oE '^(hydra-core|omegaconf|hydra-joblib-launcher|fvcore|timm)==[^ ]+' requirements.txt)
DEPENDENCIES=(antlr4-python3-runtime==4.9.3 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0)
(( ${#PINNED[@]} == 5 )) || { echo "requirements.txt lost a pin: ${PINNED[*]}" >&2; exit 1; }
rm -rf .whl
mkdir .whl
"$PY" -m pip wheel -q --no-deps -w .whl "${PINNED[@]}" "${DEPENDENCIES[@]}"
for wheel in .whl/*.whl; do
  case "$wheel" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
    *) echo "$wheel is not pure Python: the GPU machine's Python (3.12) may not load it" >&2; exit 1 ;;
  esac
done
ls -1 .whl
du -sh .whl
