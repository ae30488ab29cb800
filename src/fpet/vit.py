"""The one ViT forward with token state (DESIGN section 4).

`TokenViT` wraps a timm `VisionTransformer` without forking it: timm's modules and parameter names stay as they are
(`vit.blocks.N.attn.qkv`, `norm1`, `mlp.fc1`, ...), so timm checkpoints load unchanged. The block loop carries

- `x [B, N, C]`      the tokens,
- `size [B, N, 1]`   how many input patches each token stands for (None before any merge),
- `source [B, N, N0]` which input tokens each token holds (only when tracking, for visualisation),

and calls the merge strategy of a layer, if any, between attention and MLP. No state is stored on the modules.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenState(NamedTuple):
    """Output of the block loop: tokens `[B, N, C]`, sizes `[B, N, 1]` or None, sources `[B, N, N0]` or None."""

    x: Tensor
    size: Optional[Tensor]
    source: Optional[Tensor]


def proportional_attention_mask(size: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Additive attention mask `log(size)` over keys, `[B, 1, 1, N]`; None when no token was merged yet."""
    if size is None:
        return None
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def attention_forward(
    attn: nn.Module, x: Tensor, size: Optional[Tensor], return_keys: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """timm `Attention` with proportional attention; returns `(out [B, N, C], keys [B, N, head_dim] or None)`.

    qkv is computed once (a PET layer wrapping `qkv` adds its branch there); attention runs through
    `F.scaled_dot_product_attention` with `log(size)` as the additive mask after a merge. `keys` are the head-mean
    keys used for matching, returned only when `return_keys`.
    """
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    attn_dim = getattr(attn, "attn_dim", heads * head_dim)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, H, N, head_dim]
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=proportional_attention_mask(size, q.dtype),
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
    )
    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, (k.mean(dim=1) if return_keys else None)


def block_forward(
    block: nn.Module,
    x: Tensor,
    size: Optional[Tensor],
    merge: Optional[nn.Module] = None,
    source: Optional[Tensor] = None,
) -> TokenState:
    """One timm `Block` with the merge slot between attention and MLP, and AdaptFormer's parallel slot.

    `x = x + dp1(ls1(attn(norm1(x))))`; at a merging layer `x, size = merge(x, size, keys)`; then
    `x = x + dp2(ls2(mlp(norm2(x)))) + mlp.parallel(x)` where `mlp.parallel` exists only when a PET layer that
    wraps the MLP provides a branch parallel to it (AdaptFormer).
    """
    h, keys = attention_forward(block.attn, block.norm1(x), size, return_keys=merge is not None)
    x = x + block.drop_path1(block.ls1(h))
    if merge is not None:
        if source is None:
            x, size = merge(x, size, keys)
        else:
            x, size, source = merge.merge_with_source(x, size, keys, source)
    out = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    parallel = getattr(block.mlp, "parallel", None)
    if parallel is not None:
        out = out + parallel(x)
    return TokenState(out, size, source)


class TokenViT(nn.Module):
    """A timm ViT run block by block with token state and merge strategies at chosen layers.

    Args:
        vit: timm `VisionTransformer` (PET layers already injected).
        merges: block index -> merge strategy (`merge(x, size, keys) -> (x, size)`).
        pre_logits: optional frozen representation layer before the head (Google's in21k checkpoints have one).
    """

    def __init__(
        self,
        vit: nn.Module,
        merges: Optional[Mapping[int, nn.Module]] = None,
        pre_logits: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.merges = nn.ModuleDict({str(i): m for i, m in sorted((merges or {}).items())})
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        depth = len(vit.blocks)
        bad = [i for i in (int(k) for k in self.merges) if not 0 <= i < depth]
        if bad:
            raise ValueError(f"merge layer(s) {bad} outside the model's blocks 0..{depth - 1}")

    @property
    def num_prefix_tokens(self) -> int:
        """Class (and distillation / register) tokens in front of the patches; never merged."""
        return int(getattr(self.vit, "num_prefix_tokens", 1))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols), e.g. (14, 14) for 224x224 with 16x16 patches."""
        return tuple(self.vit.patch_embed.grid_size)

    def embed(self, images: Tensor) -> Tensor:
        """Patch + position embedding: `[B, 3, H, W] -> [B, N0, C]`."""
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_tokens(self, images: Tensor, track_source: bool = False) -> TokenState:
        """Embed and run all blocks: `[B, 3, H, W] -> TokenState(x [B, N, C] after the final norm, size, source)`."""
        x = self.embed(images)
        size: Optional[Tensor] = None
        source: Optional[Tensor] = None
        if track_source:
            B, N0, _ = x.shape
            source = torch.eye(N0, device=x.device, dtype=x.dtype).expand(B, N0, N0)
        for i, block in enumerate(self.vit.blocks):
            merge = self.merges[str(i)] if str(i) in self.merges else None
            x, size, source = block_forward(block, x, size, merge, source)
        return TokenState(self.vit.norm(x), size, source)

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool (class token) and classify: `[B, N, C] -> [B, num_classes]`.

        A distilled DeiT has two heads: the logits are the mean of the class-token head and the distillation-token
        head (timm's `VisionTransformerDistilled.forward_head`, which reads tokens 0 and 1).
        """
        if getattr(self.vit, "head_dist", None) is not None:
            return self.vit.forward_head(x)
        feats = self.vit.forward_head(x, pre_logits=True)
        return self.vit.head(self.pre_logits(feats))

    def forward(self, images: Tensor) -> Tensor:
        """`[B, 3, H, W] -> logits [B, num_classes]`."""
        return self.forward_head(self.forward_tokens(images).x)
