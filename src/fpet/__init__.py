"""FPET: faster parameter-efficient tuning of Vision Transformers by token merging.

`build_model`, `TokenState` and `TokenViT` are imported on first use (PEP 562), so `import fpet.<light module>`
(the config resolvers train.py registers before `--help`, validation messages) does not pay torch's and timm's
import time.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TokenState", "TokenViT", "build_model", "__version__"]

_LAZY = {"build_model": "fpet.model", "TokenState": "fpet.state", "TokenViT": "fpet.vit"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fpet' has no attribute {name!r}")
