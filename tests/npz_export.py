"""Write a timm ViT in Google's classic `.npz` layout (the inverse of timm's loader), for loader tests."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn


def export_google_npz(vit: nn.Module, path: Path, pre_logits: Optional[nn.Linear] = None) -> None:
    """Save `vit` (timm VisionTransformer) as a ViT-B_16.npz-style file."""
    n = lambda t: t.detach().cpu().numpy()  # noqa: E731
    w = {
        "embedding/kernel": n(vit.patch_embed.proj.weight).transpose(2, 3, 1, 0),
        "embedding/bias": n(vit.patch_embed.proj.bias),
        "cls": n(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": n(vit.pos_embed),
        "Transformer/encoder_norm/scale": n(vit.norm.weight),
        "Transformer/encoder_norm/bias": n(vit.norm.bias),
        "head/kernel": n(vit.head.weight).T,
        "head/bias": n(vit.head.bias),
    }
    for i, blk in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        heads, head_dim, c = blk.attn.num_heads, blk.attn.head_dim, vit.embed_dim
        qkv = getattr(blk.attn.qkv, "base_layer", blk.attn.qkv)  # unwrap a PET layer
        mlp = getattr(blk.mlp, "base_layer", blk.mlp)
        for name, weight, bias in zip(("query", "key", "value"), qkv.weight.chunk(3), qkv.bias.chunk(3)):
            w[f"{p}MultiHeadDotProductAttention_1/{name}/kernel"] = n(weight).T.reshape(c, heads, head_dim)
            w[f"{p}MultiHeadDotProductAttention_1/{name}/bias"] = n(bias).reshape(heads, head_dim)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = n(blk.attn.proj.weight).reshape(c, heads, head_dim).transpose(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = n(blk.attn.proj.bias)
        for ln, norm in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = n(norm.weight), n(norm.bias)
        for r, fc in enumerate((mlp.fc1, mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = n(fc.weight).T, n(fc.bias)
    if pre_logits is not None:
        w["pre_logits/kernel"], w["pre_logits/bias"] = n(pre_logits.weight).T, n(pre_logits.bias)
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in w.items()})


def perturb(module: nn.Module, seed: int = 0) -> None:
    """Fill every parameter with seeded noise (so a load that silently skipped a tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
