"""Structural re-parameterisation: fold linear PET branches into the frozen weights for inference.

- LoRA / Bi-LoRA (`LoRAQKV`): `W_q += s * up_q @ down_q`, `W_v += s * up_v @ down_v` (1-bit layers fold with their
  quantised weights).
- RepAdapter (`RepAdapterNorm` on `norm1` / `norm2`): the next linear (`attn.qkv` / `mlp.fc1`) reads
  `y' = (I + s B A) y + s (B a + b)`, so `W' = W + s W B A` and `c' = c + s W (B a + b)` (B's grouped weight as a
  block-diagonal matrix).

The folded layers are plain `nn.Linear` modules and the PET layers are gone: the model is a plain timm ViT (plus its
merge strategies) with the same FLOPs and latency. AdaptFormer's branch has a ReLU and stays. Folding is exact in
eval mode (dropout off); it is done in float64 and cast back.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fpet.pet.base import Bottleneck, PETLayer
from fpet.pet.lora import LoRAQKV
from fpet.pet.repadapter import RepAdapterNorm

log = logging.getLogger(__name__)

FOLDABLE = (LoRAQKV, RepAdapterNorm)


@dataclass
class ReparamReport:
    """What `reparameterize` folded (module names, now plain layers) and which PET layers it left."""

    folded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def reparameterized(self) -> bool:
        return bool(self.folded)


def effective_weight(linear: nn.Linear) -> Tensor:
    """The weight a linear layer's forward pass uses (the two-valued matrix of a 1-bit layer), `[out, in]`."""
    quantized = getattr(linear, "quantized_weight", None)
    return quantized() if quantized is not None else linear.weight


def bottleneck_matrix(branch: Bottleneck) -> Tensor:
    """`up @ down` in float64, `[out, in]`, of a linear bias-free bottleneck (LoRA's)."""
    if not isinstance(branch.act, nn.Identity) or branch.down.bias is not None or branch.up.bias is not None:
        raise ValueError("only a bottleneck without activation and biases folds into one matrix")
    return effective_weight(branch.up).double() @ effective_weight(branch.down).double()


def linear_with(base: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain `nn.Linear` like `base` (device, dtype, frozen or not) holding `weight` and `bias`."""
    w = base.weight
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(weight)
    out.weight.requires_grad_(w.requires_grad)
    if bias is not None:
        out.bias.data.copy_(bias)
        out.bias.requires_grad_(w.requires_grad if base.bias is None else base.bias.requires_grad)
    return out


@torch.no_grad()
def fold_lora(layer: LoRAQKV) -> nn.Linear:
    """The fused `qkv` linear with the q and v deltas of `layer` added: `[B, N, C] -> [B, N, 3C]`."""
    base = layer.base_layer
    c = base.out_features // 3
    weight = base.weight.double().clone()
    weight[:c] += layer.scale * bottleneck_matrix(layer.lora_q)
    weight[2 * c:] += layer.scale * bottleneck_matrix(layer.lora_v)
    return linear_with(base, weight, base.bias)


@torch.no_grad()
def fold_repadapter(norm: RepAdapterNorm, linear: nn.Linear) -> nn.Linear:
    """`linear` reading `norm`'s adapted output, rewritten to read the plain LayerNorm output."""
    adapter, s = norm.adapter, norm.scale
    down_w, down_b = adapter.down.weight.double(), adapter.down.bias.double()          # [d, C], [d]
    up_w, up_b = adapter.up.dense_weight().double(), adapter.up.bias.double()          # [C, d], [C]
    w = linear.weight.double()                                                          # [out, C]
    bias = linear.bias.double() if linear.bias is not None else w.new_zeros(w.shape[0])
    new_w = w + s * (w @ up_w) @ down_w
    new_b = bias + s * w @ (up_w @ down_b + up_b)
    return linear_with(linear, new_w, new_b)


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def reparameterize(model: nn.Module) -> ReparamReport:
    """Fold every LoRA / Bi-LoRA and RepAdapter layer of `model` (a `TokenViT` or timm ViT) in place.

    Returns which modules were folded and which PET layers were kept (AdaptFormer: its ReLU does not fold).
    """
    vit = getattr(model, "vit", model)
    report = ReparamReport()
    for i, block in enumerate(vit.blocks):
        if isinstance(block.attn.qkv, LoRAQKV):
            block.attn.qkv = fold_lora(block.attn.qkv)
            report.folded.append(f"blocks.{i}.attn.qkv")
        for norm_name, owner, attr in (("norm1", block.attn, "qkv"), ("norm2", block.mlp, "fc1")):
            norm, target = getattr(block, norm_name), getattr(owner, attr, None)
            if isinstance(norm, RepAdapterNorm) and _is_plain_linear(target):
                setattr(owner, attr, fold_repadapter(norm, target))
                setattr(block, norm_name, norm.base_layer)
                report.folded.append(f"blocks.{i}.{norm_name}")
    report.kept = [name for name, m in vit.named_modules() if isinstance(m, PETLayer)]
    if report.kept:
        log.info("re-parameterisation left %d PET layers that do not fold (e.g. %s: a nonlinear branch)",
                 len(report.kept), report.kept[0])
    if report.folded:
        log.info("re-parameterised %d PET layers into the backbone's linear layers", len(report.folded))
    return report


def inference_model(model: nn.Module, enabled: bool = True) -> tuple[nn.Module, ReparamReport]:
    """The model to evaluate and time: a folded deep copy when `enabled` and something folds, else `model`.

    The trained `model` is never changed (it keeps its PET layers for saving and further training).
    """
    kept = [name for name, m in model.named_modules() if isinstance(m, PETLayer)]
    if not enabled or not any(isinstance(m, FOLDABLE) for m in model.modules()):
        return model, ReparamReport(kept=kept)
    folded = copy.deepcopy(model)
    return folded, reparameterize(folded)
