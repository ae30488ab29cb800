"""timm ViT creation and pre-trained weight loading.

Weights come from a local file (`backbone.checkpoint`): Google's `.npz` (the paper's ImageNet-21k ViT-B_16.npz),
or a timm state dict as `.safetensors` / `.pth` / `.pt` / `.bin`. `.pth` files are read with
`torch.load(weights_only=True)`, so a checkpoint can not run code. With `checkpoint: null` and a
`pretrained_tag`, timm downloads the weights (needs internet); with neither, the backbone is randomly initialised.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fpet.errors import UserError

log = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class CheckpointError(UserError, RuntimeError):
    """A weight file that is missing, unreadable, or does not fit the model."""


def create_backbone(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Optional[nn.Module]]:
    """Build the timm ViT of `cfg` (= `cfg.backbone`) with a fresh `num_classes` head, weights loaded.

    Returns `(vit, pre_logits)`; `pre_logits` is the frozen representation layer (Linear + Tanh) that Google's
    original in21k `.npz` files carry, or None.
    """
    kwargs = dict(
        pretrained=False,
        num_classes=num_classes,
        img_size=cfg.img_size,
        drop_path_rate=cfg.drop_path_rate,
        **(OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}),
    )
    pre_logits = None
    if cfg.checkpoint:
        vit = timm.create_model(cfg.arch, **kwargs)
        pre_logits = load_backbone_weights(vit, cfg.checkpoint, download_url=cfg.get("download_url"))
    elif cfg.get("pretrained_tag"):
        vit = _create_pretrained_online(cfg, kwargs)
    else:
        vit = timm.create_model(cfg.arch, **kwargs)
    vit.reset_classifier(num_classes)
    return vit, pre_logits


def _create_pretrained_online(cfg: DictConfig, kwargs: dict) -> nn.Module:
    name = f"{cfg.arch}.{cfg.pretrained_tag}"
    try:
        return timm.create_model(name, **{**kwargs, "pretrained": True})
    except Exception as err:  # network errors come in many types
        raise CheckpointError(
            f"could not download timm weights {name!r} ({type(err).__name__}: {err}). Offline? Put a weight file "
            f"on disk and pass backbone.checkpoint=PATH (or backbone.checkpoint=null backbone.pretrained_tag=null "
            f"for random init)."
        ) from err


def load_backbone_weights(vit: nn.Module, path: str | Path, download_url: Optional[str] = None) -> Optional[nn.Module]:
    """Load `path` into `vit` in place (head excluded); returns the `.npz` representation layer, if any."""
    path = Path(path)
    if not path.is_file():
        hint = f"Download it from {download_url} and put it at {path}, or " if download_url else ""
        raise CheckpointError(
            f"backbone.checkpoint={str(path)!r} does not exist. {hint}pass backbone.checkpoint=PATH to another "
            f"weight file (.npz, .safetensors, .pth), or backbone.checkpoint=null for a randomly initialised "
            f"backbone (no pre-training)."
        )
    if path.suffix == ".npz":
        return load_npz(vit, path)
    if path.suffix in STATE_DICT_SUFFIXES:
        load_state_dict_file(vit, path)
        return None
    raise CheckpointError(f"backbone.checkpoint={str(path)!r}: unknown format {path.suffix!r}; "
                          f"use .npz (Google) or one of {STATE_DICT_SUFFIXES} (timm state dict)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth` file, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}. The file is truncated, corrupt, "
                              f"or a pickle with objects other than tensors (refused for safety).") from err
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return state


def load_state_dict_file(vit: nn.Module, path: Path) -> None:
    """Load a timm-format state dict into `vit`; every backbone tensor must be present and of the right shape."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(read_state_dict(path), vit)
    head = {f"head.{k}" for k in ("weight", "bias")} | {f"head_dist.{k}" for k in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in head}
    own = vit.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - head)
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit backbone {type(vit).__name__} (embed_dim={vit.embed_dim}, "
            f"depth={len(vit.blocks)}): {len(wrong)} shape mismatches {wrong[:3]}, {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}. Is it for another backbone=...?"
        )
    vit.load_state_dict(state, strict=False)


def expected_npz_shapes(vit: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes that Google's classic `.npz` layout must have for this timm ViT (a subset, enough to catch a wrong
    file: embedding, class token, every block's attention and MLP, the final norm)."""
    C, depth = vit.embed_dim, len(vit.blocks)
    p = vit.patch_embed.patch_size
    heads = vit.blocks[0].attn.num_heads
    hidden = vit.blocks[0].mlp.fc1.out_features
    shapes = {"embedding/kernel": (p[0], p[1], 3, C), "cls": (1, 1, C), "Transformer/encoder_norm/scale": (C,)}
    for i in range(depth):
        blk = f"Transformer/encoderblock_{i}"
        shapes[f"{blk}/MultiHeadDotProductAttention_1/query/kernel"] = (C, heads, C // heads)
        shapes[f"{blk}/MlpBlock_3/Dense_0/kernel"] = (C, hidden)
    return shapes


def load_npz(vit: nn.Module, path: Path) -> Optional[nn.Module]:
    """Validate and load a Google `.npz`; returns its frozen `pre_logits` representation layer if it has one."""
    try:
        weights = dict(np.load(path))
    except Exception as err:
        raise CheckpointError(f"cannot read {path} as .npz: {type(err).__name__}: {err} (truncated download?)") from err
    if "embedding/kernel" in weights:  # classic layout: check before timm copies anything
        depth = len(vit.blocks)
        bad = [f"{k}: expected {s}, file has {weights[k].shape if k in weights else 'nothing'}"
               for k, s in expected_npz_shapes(vit).items() if k not in weights or weights[k].shape != s]
        if f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in weights:
            bad.append(f"file has more than {depth} blocks")
        if bad:
            raise CheckpointError(f"{path} does not fit this backbone (embed_dim={vit.embed_dim}, depth={depth}): "
                                  f"{len(bad)} problems, e.g. {bad[:3]}. Is it for another backbone=...?")
    try:
        vit.load_pretrained(str(path))
    except Exception as err:
        raise CheckpointError(f"loading {path} failed: {type(err).__name__}: {err}") from err
    if "pre_logits/kernel" not in weights:
        return None
    kernel, bias = weights["pre_logits/kernel"], weights["pre_logits/bias"]
    if kernel.shape != (vit.embed_dim, vit.embed_dim):
        raise CheckpointError(f"{path}: pre_logits kernel {kernel.shape} does not fit embed_dim {vit.embed_dim}")
    fc = nn.Linear(vit.embed_dim, vit.embed_dim)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(kernel.T.copy()))
        fc.bias.copy_(torch.from_numpy(bias))
    log.info("%s has a representation layer (pre_logits %s); kept frozen before the head", path.name, kernel.shape)
    return nn.Sequential(fc, nn.Tanh())
