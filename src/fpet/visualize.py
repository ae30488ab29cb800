"""Which patches ended up in one token: source tracking drawn in the style of the paper's Fig. A3.

Every group of patches that a model merged into one token is painted in the group's mean colour and outlined in a
random colour per group. `scripts/visualize_merge.py` is the command line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.checkpoint import load_task, read_task_file, task_metadata, task_overrides
from fpet.config import compose_config
from fpet.merge import build_merges
from fpet.model import build_model
from fpet.select import ScoringInput
from fpet.vit import TokenViT


def patch_groups(source: Tensor, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """Group id of every patch, `[rows, cols]` ints in 0..G-1, from one image's `source [N, N0]`.

    Patch j belongs to the output token that holds it; ids are renumbered in order of first appearance.
    """
    owner = source.argmax(dim=0)[num_prefix:].cpu().numpy()  # output token of each patch
    _, ids = np.unique(owner, return_inverse=True)
    return ids.reshape(grid)


def render_groups(image: np.ndarray, groups: np.ndarray, seed: int = 0, border: int = 2) -> np.ndarray:
    """`image [H, W, 3]` (uint8) with each patch group in its mean colour and a random-colour outline.

    Args:
        groups: `[rows, cols]` group ids from `patch_groups`; H and W must be multiples of rows and cols.
        border: outline width in pixels.
    """
    H, W, _ = image.shape
    rows, cols = groups.shape
    if H % rows or W % cols:
        raise ValueError(f"image {H}x{W} is not a whole number of {rows}x{cols} patches")
    labels = np.kron(groups, np.ones((H // rows, W // cols), dtype=groups.dtype))  # [H, W]
    count = groups.max() + 1
    pixels = image.reshape(-1, 3).astype(np.float64)
    sums = np.stack([np.bincount(labels.ravel(), weights=pixels[:, c], minlength=count) for c in range(3)], 1)
    mean = sums / np.bincount(labels.ravel(), minlength=count)[:, None]
    out = mean[labels]
    outline = np.random.default_rng(seed).uniform(0, 255, size=(count, 3))
    edge = boundary_mask(labels, border)
    out[edge] = outline[labels[edge]]
    return out.round().clip(0, 255).astype(np.uint8)


def boundary_mask(labels: np.ndarray, width: int) -> np.ndarray:
    """`[H, W]` True where a pixel is within `width` pixels of a pixel with another label (inside its own group)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for shift in range(1, width + 1):
        down = labels[shift:] != labels[:-shift]
        right = labels[:, shift:] != labels[:, :-shift]
        edge[shift:] |= down
        edge[:-shift] |= down
        edge[:, shift:] |= right
        edge[:, :-shift] |= right
    return edge


def trained_model(overrides: Sequence[str], checkpoint: str | Path) -> tuple[TokenViT, DictConfig]:
    """`(model, cfg)`: the model a task checkpoint (a run's `task.safetensors`) was trained as, loaded strictly.

    `overrides` give backbone, PET and dataset as for the training run; the merge strategy and its layer / r /
    split come from the file. Loading goes through `fpet.checkpoint.load_task`, so a file for another backbone,
    PET method or class count is refused with the override that fixes it.
    """
    info, _ = read_task_file(checkpoint)
    cfg = compose_config([*overrides, *task_overrides(info, ("merge",))])
    model = build_model(cfg, ScoringInput(task_file=Path(checkpoint)))  # TR-PTS / GPS: the file's selection
    load_task(model, checkpoint, task_metadata(cfg, model))
    return model, cfg


def with_merge(model: TokenViT, merge_cfg: DictConfig) -> TokenViT:
    """`model`'s backbone, PET layers and head (shared, not copied) with the merge schedule of `merge_cfg`."""
    return TokenViT(model.vit, build_merges(merge_cfg, model.vit), pre_logits=model.pre_logits,
                    pet_method=model.pet_method)


@torch.no_grad()
def merge_groups(model: nn.Module, image: Tensor) -> tuple[np.ndarray, int]:
    """`(groups [rows, cols], tokens out)` of one normalised image `[3, H, W]` through a `TokenViT`."""
    was_training = model.training
    model.eval()
    try:
        state = model.forward_tokens(image[None].to(next(model.parameters()).device), track_source=True)
    finally:
        model.train(was_training)
    return patch_groups(state.source[0], state.num_prefix, state.grid), int(state.x.shape[1])


def save_panels(panels: Sequence[tuple[str, np.ndarray]], out: str | Path, dpi: int = 150) -> Path:
    """Write `(title, image [H, W, 3])` panels side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, img) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
