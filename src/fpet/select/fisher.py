"""The scoring pass of the parameter-selecting PET methods (TR-PTS, GPS), cached in the run directory.

Before training, the model as built (pretrained backbone, new head, no token reduction) runs over the training
split in eval mode and accumulates, for every candidate weight matrix (`patch_embed.proj` and `qkv`, `proj`,
`fc1`, `fc2` of every block), one score per entry:

- `fisher` (TR-PTS): the diagonal empirical Fisher, the mean over scoring units of the squared gradient of the
  cross-entropy with the true labels, `F_j = (1/T) sum_t (dL_t/dtheta_j)^2`. A unit is a mini-batch (the batch-mean
  loss; default) or, with `per_sample`, one image;
- `gradient` (GPS): the magnitude of the gradient accumulated over the pass, `|sum_t dL_t/dtheta_j|` (GPS sums the
  batch gradients without zeroing them in between and ranks by the absolute value).

Scores are kept in float32 with the weight's shape (`[out, in]` for a linear layer, `[out, 3, p, p]` for the patch
embedding). `cached_scores` writes them to `<run dir>/fisher.safetensors` with the settings that produced them, so a
resumed run reads them back instead of scoring again.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn
from tqdm.auto import tqdm

from fpet.fileio import atomic_open

log = logging.getLogger(__name__)

BLOCK_CANDIDATES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
"""The candidate weight matrices of a block (module names inside `vit.blocks.<i>`)."""
PATCH_EMBED = "patch_embed.proj"
SCORE_KINDS = ("fisher", "gradient")
CACHE_NAME = "fisher.safetensors"


def candidate_names(vit: nn.Module) -> list[str]:
    """Module names (inside the timm ViT) of every candidate weight: the patch embedding, then block by block."""
    return [PATCH_EMBED] + [f"blocks.{i}.{c}" for i in range(len(vit.blocks)) for c in BLOCK_CANDIDATES]


def block_of(name: str) -> Optional[int]:
    """The block index of a candidate name (`blocks.3.mlp.fc1` -> 3), None for the patch embedding."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def candidate_weight(module: nn.Module) -> Tensor:
    """The original weight of a candidate module (a PET layer that wraps it keeps it as `base_layer`)."""
    base = getattr(module, "base_layer", module)
    return base.weight


@dataclass
class ScoringInput:
    """Where the scoring pass runs and what it may reuse.

    Attributes:
        device: the device the model is moved to for scoring (it stays there).
        cache: the score file (`<run dir>/fisher.safetensors`); None scores without caching.
        task_file: a task file whose stored selection is adopted instead of scoring (evaluation of a trained task).
        progress: show a progress bar.
    """

    device: torch.device = torch.device("cpu")
    cache: Optional[Path] = None
    task_file: Optional[Path] = None
    progress: bool = False


def gradient_scores(model: nn.Module, weights: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                    kind: str = "fisher", per_sample: bool = False, limit: Optional[int] = None,
                    preprocess: Optional[Callable[[Tensor], Tensor]] = None, device: torch.device | str = "cpu",
                    progress: bool = False) -> dict[str, Tensor]:
    """Score every entry of `weights` (name -> a weight tensor of `model`) over `batches` of (images, labels).

    `kind` = fisher: mean over units of the squared cross-entropy gradient; gradient: |sum of the gradients|.
    A unit is a batch (batch-mean loss) or, with `per_sample`, one image. At most `limit` batches (None: all).
    The model runs in eval mode (no dropout, no drop-path); its modes and `requires_grad` flags are restored.
    Returns name -> float32 scores with the weight's shape (on `device`).
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r}: accepted {SCORE_KINDS}")
    was_training, flags = model.training, {n: w.requires_grad for n, w in weights.items()}
    params = list(weights.values())
    acc = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in params]
    units = 0
    model.eval()
    try:
        for w in params:
            w.requires_grad_(True)
        total = None if limit is None else limit
        bar = tqdm(batches, total=total, desc="scoring", unit="batch", disable=not progress, dynamic_ncols=True)
        for step, (images, labels) in enumerate(bar):
            if limit is not None and step >= limit:
                break
            images, labels = images.to(device), labels.to(device)
            images = preprocess(images) if preprocess is not None else images
            groups = [(images[i:i + 1], labels[i:i + 1]) for i in range(len(labels))] if per_sample \
                else [(images, labels)]
            for x, y in groups:
                loss = F.cross_entropy(model(x), y)
                grads = torch.autograd.grad(loss, params)
                for a, g in zip(acc, grads):
                    a.add_(g.float().square() if kind == "fisher" else g.float())
                units += 1
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
        model.train(was_training)
    if units == 0:
        raise ValueError("the scoring pass saw no batch: the training split is empty or the limit is 0")
    return {n: (a / units if kind == "fisher" else a.abs()) for n, a in zip(weights, acc)}


def read_cache(path: Path, key: dict[str, Any]) -> Optional[dict[str, Tensor]]:
    """The scores stored at `path` if they were made with `key` (the scoring settings), else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "null"))
            if stored != key:
                log.warning("%s was scored with other settings; scoring again", path)
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # a truncated file is rebuilt, not reported as the user's error
        log.warning("cannot read the cached scores %s (%s: %s); scoring again", path, type(err).__name__, err)
        return None


def write_cache(path: Path, scores: dict[str, Tensor], key: dict[str, Any]) -> None:
    """Write `scores` with their `key` atomically."""
    data = save({n: s.detach().cpu().contiguous() for n, s in scores.items()},
                metadata={"key": json.dumps(key, sort_keys=True)})
    with atomic_open(path, "wb") as f:
        f.write(data)


def cached_scores(compute: Callable[[], dict[str, Tensor]], cache: Optional[Path], key: dict[str, Any]
                  ) -> dict[str, Tensor]:
    """`compute()` unless `cache` holds scores made with `key`; a fresh result is written to `cache`."""
    if cache is not None:
        found = read_cache(Path(cache), key)
        if found is not None:
            log.info("parameter scores read from %s (not recomputed)", cache)
            return found
    scores = compute()
    if cache is not None:
        write_cache(Path(cache), scores, key)
    return scores
