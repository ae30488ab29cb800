"""Sparse tuning of selected weight entries: TR-PTS (`pet=trpts`, Fisher-selected, per-block budgets) and GPS
(`pet=gps`, gradient-selected, a fixed count per row). No module is added: the chosen entries of the original
weights train, everything else of the backbone stays as pretrained.

Each candidate weight (`patch_embed.proj`; `qkv`, `proj`, `fc1`, `fc2` of every block) is wrapped in
`SparseTuned`, which keeps the original module as `base_layer` (frozen) and trains only `entries [out, C]`, the
selected entries of each output row (their columns in `index [out, C]`). Its forward uses the weight with the
selected entries replaced, `W.scatter(1, index, entries)`, so this is the masked-gradient update of the original
weights: the gradient of an entry is the weight gradient at its position, every other entry gets none, and since
the frozen entries are not parameters, AdamW's decoupled weight decay cannot move them either (they stay
bit-identical to the pretrained values). For the linear layers `sparse_linear` rebuilds that weight in the backward
pass instead of keeping it for it, so training holds no second copy of the weights (saved-for-backward is that of
the plain linear layer). The layer's biases and the head train in full; norms, position embedding
and class token stay frozen (GPS's convention).

The selection is made after injection, before merges are placed (the record's `select`): the scoring pass of
`fpet.select` over the training split (cached in the run directory), then the allocation. For inference the
entries are written back into the weight (`fold`: exact, a plain ViT). The task file stores per layer the trained
entries, their column indices (int16) and the layer's critical count (`<layer>.entries.values / .index /
.critical`) plus the biases and the head; evaluating a task file adopts its selection (no scoring).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from fpet.fileio import write_text_atomic
from fpet.pet.base import PETLayer, PETMethod
from fpet.pet.fold import linear_with
from fpet.pet.inject import head_module, replace_modules
from fpet.select import (BLOCK_CANDIDATES, PATCH_EMBED, SCORE_KINDS, ScoringInput, block_of,
                         block_weights, cached_scores, connection_budgets, critical_counts, gradient_scores,
                         row_selection, sparse_block_order)

log = logging.getLogger(__name__)

ALLOCATIONS = ("fisher", "fixed")
SELECTION_NAME = "selection.json"


class _SparseLinear(torch.autograd.Function):
    """`F.linear(x, W.scatter(1, index, entries), bias)` saving `x` (not the scattered weight) for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], index: Tensor, entries: Tensor
                ) -> Tensor:
        ctx.save_for_backward(x, weight, index, entries)
        ctx.has_bias = bias is not None
        return F.linear(x, _scattered(weight, index, entries), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, index, entries = ctx.saved_tensors
        dtype = grad.dtype  # under autocast the forward ran in its dtype (bf16 / fp16): so does the backward
        need_x, need_w, need_b, _, need_e = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_e = None
        if need_x:
            grad_x = (grad @ _scattered(weight, index, entries).to(dtype)).to(x.dtype)
        if need_w or need_e:
            full = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dtype)  # [out, in]
            if need_e:
                grad_e = full.gather(1, index).to(entries.dtype)
            if need_w:  # pet.trainable=all: the base weight trains too, except where the entries replace it
                grad_w = full.scatter(1, index, 0.0).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, grad_e


def _scattered(weight: Tensor, index: Tensor, entries: Tensor) -> Tensor:
    """`weight [out, in]` with the entries at `index [out, C]` replaced by `entries [out, C]`."""
    return weight.flatten(1).scatter(1, index, entries.to(weight.dtype)).view_as(weight)


def sparse_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], index: Tensor, entries: Tensor) -> Tensor:
    """`[.., in] -> [.., out]` with `weight [out, in]` whose entries at `index [out, C]` are `entries [out, C]`;
    gradients as if the scattered weight were used, without keeping it for backward."""
    return _SparseLinear.apply(x, weight, bias, index, entries)


class SparseTuned(PETLayer):
    """A linear or conv layer (`base_layer`) whose selected entries train: `[.., in] -> [.., out]` as the base.

    `entries [out, C]` (parameter) are the trained values of the entries at columns `index [out, C]` (long) of the
    row-flattened weight `[out, in * k * k]`; `critical` counts the layer's entries in the global top-M% (TR-PTS's
    sparse insertion ranks blocks by it after the selected count). Before `select` the layer trains nothing
    (C = 0) and computes the base layer.
    """

    PACKED = ("entries",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"sparse tuning wraps nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")
        weight = base_layer.weight
        self.register_buffer("index", torch.zeros(weight.shape[0], 0, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.entries = nn.Parameter(weight.new_zeros(weight.shape[0], 0))
        self.critical = 0

    @property
    def selected_count(self) -> int:
        """Trained weight entries (biases excluded)."""
        return int(self.entries.numel())

    @property
    def row_inputs(self) -> int:
        """Input connections per output row (`in`, or `in * k * k` for a conv)."""
        return int(self.base_layer.weight[0].numel())

    @torch.no_grad()
    def select(self, index: Tensor, critical: int = 0) -> None:
        """Train the entries at `index [out, C]` (columns of the row-flattened weight), from their current values."""
        weight = self.base_layer.weight
        index = index.to(device=weight.device, dtype=torch.long)
        if index.dim() != 2 or index.shape[0] != weight.shape[0] or (index.numel() and (
                index.min() < 0 or index.max() >= self.row_inputs)):
            raise ValueError(f"selection index of shape {tuple(index.shape)} does not fit a weight "
                             f"{tuple(weight.shape)}")
        self.index = index
        self.entries = nn.Parameter(weight.detach().flatten(1).gather(1, index).clone())
        self.critical = int(critical)

    def effective_weight(self) -> Tensor:
        """The weight the forward uses: the base weight with the trained entries in place (same shape)."""
        weight = self.base_layer.weight
        if not self.entries.numel():
            return weight
        return weight.flatten(1).scatter(1, self.index, self.entries.to(weight.dtype)).view_as(weight)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.base_layer.bias
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, self.effective_weight(), bias)
        if not self.entries.numel():
            return F.linear(x, self.base_layer.weight, bias)
        return sparse_linear(x, self.base_layer.weight, bias, self.index, self.entries)

    def packed_tensors(self) -> dict[str, Tensor]:
        """`entries.values [out, C]` (float32), `entries.index [out, C]` (int16, int32 above 32767 inputs) and
        `entries.critical [1]` (int64)."""
        dtype = torch.int16 if self.row_inputs <= torch.iinfo(torch.int16).max else torch.int32
        return {"entries.values": self.entries.detach().cpu().contiguous(),
                "entries.index": self.index.to(dtype).cpu().contiguous(),
                "entries.critical": torch.tensor([self.critical], dtype=torch.int64)}

    @torch.no_grad()
    def load_packed(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `packed_tensors`: the stored selection and values."""
        index = tensors["entries.index"].long()
        if index.shape != self.index.shape or not torch.equal(index.to(self.index.device), self.index):
            self.select(index, int(tensors["entries.critical"][0]))
        self.critical = int(tensors["entries.critical"][0])
        self.entries.copy_(tensors["entries.values"])


def sparse_layers(root: nn.Module) -> dict[str, SparseTuned]:
    """Name (inside `root`) -> every `SparseTuned` layer of `root`."""
    return {name: m for name, m in root.named_modules() if isinstance(m, SparseTuned)}


def inject_sparse(vit: nn.Module, cfg: DictConfig) -> list[str]:
    """Wrap the candidate weights of a timm ViT (patch embedding; qkv, proj, fc1, fc2 of every block)."""
    names = replace_modules(vit, PATCH_EMBED, SparseTuned)
    for candidate in BLOCK_CANDIDATES:
        names += replace_modules(vit, f"blocks.*.{candidate}", SparseTuned)
    return names


def sparse_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The train rule: the selected entries and the bias of every wrapped layer (the head trains anyway)."""
    for layer in sparse_layers(model).values():
        yield layer.entries
        if layer.base_layer.bias is not None:
            yield layer.base_layer.bias


def check_sparse(cfg: DictConfig) -> list[str]:
    """Config rules of `pet=trpts|gps`."""
    problems = []

    def positive_int(key: str, allow_null: bool = False) -> None:
        value = cfg.get(key)
        if (value is None and allow_null) or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return
        problems.append(f"pet.{key}={value!r}: accepted a positive integer" + (" or null" if allow_null else ""))

    if cfg.get("score") not in SCORE_KINDS:
        problems.append(f"pet.score={cfg.get('score')!r}: accepted {list(SCORE_KINDS)} (fisher: TR-PTS's squared "
                        f"gradients, gradient: GPS's gradient magnitude)")
    if cfg.get("allocation") not in ALLOCATIONS:
        problems.append(f"pet.allocation={cfg.get('allocation')!r}: accepted {list(ALLOCATIONS)} (fisher: "
                        f"per-block C_l from the top-M% density, fixed: C_min in every layer)")
    percent = cfg.get("top_percent")
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
        problems.append(f"pet.top_percent={percent!r}: accepted a percentage in (0, 100] (M of TR-PTS)")
    positive_int("c_min")
    positive_int("batch_size")
    positive_int("batches", allow_null=True)
    if not isinstance(cfg.get("per_sample"), bool):
        problems.append(f"pet.per_sample={cfg.get('per_sample')!r}: accepted true or false")
    return problems


def scoring_key(cfg: DictConfig) -> dict[str, Any]:
    """What decides the scores (the cache is reused only for the same values)."""
    pick = {"pet": ("score", "per_sample", "batches", "batch_size"),
            "dataset": ("name", "protocol", "normalize", "num_classes", "img_size", "data_seed"),
            "backbone": ("name", "arch", "checkpoint", "kwargs")}
    key = {f"{group}.{k}": OmegaConf.to_container(cfg[group], resolve=True).get(k)
           for group, keys in pick.items() for k in keys}
    key["seed"] = int(cfg.seed)
    return key


def scoring_loader(cfg: DictConfig) -> tuple[DataLoader, Any]:
    """The training split of the run's protocol, unshuffled, in `pet.batch_size` batches; and its preprocessing."""
    from fpet.data import build_dataset, protocol_splits
    from fpet.data.transforms import ToFloat
    from fpet.data.workers import resolve_workers

    split = protocol_splits(cfg.dataset.protocol)[0]
    dataset = build_dataset(cfg.dataset, split, cfg.paths.data_dir)
    loader = DataLoader(dataset, batch_size=int(cfg.pet.batch_size), shuffle=False,
                        num_workers=resolve_workers(cfg.dataset.get("num_workers", 0)))
    return loader, ToFloat(cfg.dataset.get("normalize", "none"))


def allocate(scores: dict[str, Tensor], cfg: DictConfig) -> tuple[dict[str, int], dict[str, int], dict[int, float]]:
    """Connections per row of every candidate (`name -> C`), critical counts and block weights from the scores."""
    critical = critical_counts(scores, float(cfg.top_percent))
    weights = block_weights(critical, scores)
    c_min = int(cfg.c_min)
    budgets = connection_budgets(weights, c_min) if cfg.allocation == "fisher" else {b: c_min for b in weights}
    per_layer = {n: c_min if block_of(n) is None else budgets[block_of(n)] for n in scores}
    return per_layer, critical, weights


def select_sparse(model: nn.Module, cfg: DictConfig, source: ScoringInput) -> dict[str, Any]:
    """The record's `select`: score and choose the trained entries of every `SparseTuned` layer of `model.vit`
    (or adopt the selection of `source.task_file`); returns the selection summary (also written next to the cache
    as selection.json)."""
    layers = sparse_layers(model.vit)
    model.to(source.device)
    if source.task_file is not None:
        adopt_selection(model, source.task_file)
        return selection_summary(model)
    weights = {n: layer.base_layer.weight for n, layer in layers.items()}

    def compute() -> dict[str, Tensor]:
        loader, preprocess = scoring_loader(cfg)
        return gradient_scores(model, weights, loader, cfg.pet.score, bool(cfg.pet.per_sample), cfg.pet.batches,
                               preprocess, source.device, source.progress)

    scores = cached_scores(compute, source.cache, scoring_key(cfg))
    per_layer, critical, block_w = allocate(scores, cfg.pet)
    for name, layer in layers.items():
        layer.select(row_selection(scores[name].to(source.device), per_layer[name]), critical[name])
    summary = selection_summary(model)
    summary["block_weights"] = {str(b): w for b, w in block_w.items()}
    log.info("%s: %d weight entries selected (%.3f%% of the parameters tuned with biases and head); C_l per block %s",
             cfg.pet.name, summary["selected_weights"], summary["tuned_percent"], summary["connections"])
    if source.cache is not None:
        write_text_atomic(Path(source.cache).with_name(SELECTION_NAME), json.dumps(summary, indent=1) + "\n")
    return summary


def adopt_selection(model: nn.Module, path: str | Path) -> None:
    """Set every layer's selection from a task file (`<layer>.entries.index`, `.critical`); values load later."""
    from fpet.backbone import CheckpointError
    from fpet.checkpoint import read_task_file

    _, tensors = read_task_file(path)
    for name, layer in sparse_layers(model).items():
        index, critical = tensors.get(f"{name}.entries.index"), tensors.get(f"{name}.entries.critical")
        if index is None or critical is None:
            raise CheckpointError(f"{path} holds no selection for {name} ({name}.entries.index); was it written by "
                                  f"another pet method?")
        layer.select(index.long(), int(critical[0]))


def selection_summary(model: nn.Module) -> dict[str, Any]:
    """Trained entries, connections per row of every block, the tuned fraction (selected entries + biases of the
    wrapped layers + head over every parameter of the model, the entries counted once) and the block order of
    sparse insertion."""
    layers = sparse_layers(model.vit)
    entries = sum(layer.selected_count for layer in layers.values())
    biases = sum(layer.base_layer.bias.numel() for layer in layers.values() if layer.base_layer.bias is not None)
    head = sum(p.numel() for p in head_module(model).parameters())
    total = sum(p.numel() for p in model.parameters()) - entries
    connections: dict[str, int] = {}
    for name, layer in layers.items():
        block = block_of(name)
        connections["patch_embed" if block is None else str(block)] = layer.entries.shape[1]
    order = sparse_block_order(model.vit)
    return {"selected_weights": entries, "biases": biases, "head": head, "params_total": total,
            "tuned_percent": 100.0 * (entries + biases + head) / total, "connections": connections,
            "sparse_order": list(order) if order is not None else None}


@torch.no_grad()
def fold_sparse(vit: nn.Module) -> list[str]:
    """Write the trained entries into the weights and unwrap every `SparseTuned` (exact: a copy of values)."""
    folded = []
    for name, layer in sparse_layers(vit).items():
        base, weight = layer.base_layer, layer.effective_weight().detach()
        if isinstance(base, nn.Linear):
            plain = linear_with(base, weight, base.bias)
        else:
            plain = copy.deepcopy(base)
            plain.weight.copy_(weight)
        parent_name, _, attr = name.rpartition(".")
        setattr(vit.get_submodule(parent_name) if parent_name else vit, attr, plain)
        folded.append(name)
    return folded


TRPTS = PETMethod("trpts", "TR-PTS", inject_sparse, trainable=sparse_parameters, fold=fold_sparse,
                  check=check_sparse, select=select_sparse)
GPS = PETMethod("gps", "GPS", inject_sparse, trainable=sparse_parameters, fold=fold_sparse, check=check_sparse,
                select=select_sparse)
