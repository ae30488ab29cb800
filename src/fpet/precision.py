"""Numeric precision of a run (`train.precision`) and the optional `torch.compile` of its forward (`train.compile`).

| `train.precision` | matmuls / convolutions | autocast |
|---|---|---|
| `fp32` | IEEE float32 (TF32 off for matmuls and cuDNN) | off |
| `tf32` | float32 tensors, TF32 tensor-core matmuls and convolutions on CUDA (no effect on the CPU) | off |
| `bf16` | bfloat16 autocast for training and evaluation, on CUDA and on the CPU; parameters, optimizer state, 1-bit mean / std and the loss stay float32 | bfloat16 |

`configure_precision` sets the process-wide TF32 flags (every value sets them, so a `tf32` run never leaks into a
later `fp32` run of the same worker process); `autocast` is the context of every forward the loop runs.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from fpet.validate import PRECISIONS, precision_problems  # noqa: F401  (torch-free, checked up front)

log = logging.getLogger(__name__)

"""Accepted values of `train.precision`."""


def configure_precision(precision: str) -> None:
    """Set the TF32 flags of `precision` for this process (`tf32` on, `fp32` and `bf16` off)."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a forward pass: bfloat16 for `bf16` (CUDA and CPU), disabled otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def compiled_forward(model: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """`model` (a module's forward, or a function of it such as the training loss), through `torch.compile`
    when `enabled` (`train.compile`).

    Merge shapes are static per config (every merge removes a fixed number of tokens), so the graph is compiled
    with `dynamic=False`; a new batch size (the last evaluation batch) or train/eval mode compiles once more.
    Compilation happens on the first call; if it fails there (no compiler toolchain, an unsupported op), a
    warning names the error and this and every later call run the eager model.
    """
    if not enabled:
        return model
    try:
        compiled = torch.compile(model, dynamic=False)
    except Exception as err:  # torch.compile itself refused (e.g. an unsupported Python version)
        log.warning("train.compile=true: torch.compile is unavailable (%s: %s); running eagerly",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return model
    state = {"fn": compiled}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if state["fn"] is model:
            return model(*args, **kwargs)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as err:
            log.warning("train.compile=true: torch.compile failed (%s: %s); falling back to the eager model for "
                        "the rest of the run", type(err).__name__, (str(err).splitlines() or [""])[0][:300])
            state["fn"] = model
            return model(*args, **kwargs)

    return forward
