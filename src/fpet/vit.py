"""The one ViT forward with token state.

`TokenViT` wraps a timm `VisionTransformer` without forking it: timm's modules and parameter names stay as they are
(`vit.blocks.N.attn.qkv`, `norm1`, `mlp.fc1`, ...), so timm checkpoints load unchanged. The block loop carries one
`fpet.state.TokenState` (tokens, sizes, masks, protected prefix, optional sources and attention statistics) and
gives it, between attention and MLP, to the merge strategy of that block, if any. Block-level PET parts
(`fpet.pet.base.BlockHook`: prompts before a block, branches beside attention or MLP, adapters after a block) are
the block's child modules of that type; the loop calls them at their points and knows no method by name. No state
is stored on the modules.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpet.pet.base import BlockHook
from fpet.state import TokenState


def attention_forward(attn: nn.Module, h: Tensor, state: TokenState, needs: frozenset[str] = frozenset()
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """timm `Attention` on `h [B, N, C]` (the block's normalised input) with proportional attention and masks.

    qkv is computed once (a PET layer wrapping `qkv` adds its branch there); attention runs through
    `F.scaled_dot_product_attention` with `state.attention_bias` (`log(size) + log(mask)`) as the additive mask.
    Returns `(out [B, N, C], stats)` where `stats` holds the statistics named in `needs` (see `fpet.state`):
    `keys [B, N, d]`, `cls_attn [B, H, N]` (exact, from the class token's query only: no N x N matrix) and
    `attn_received [B, N]` (materialises the attention matrix of this block only).
    """
    B, N, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    attn_dim = getattr(attn, "attn_dim", heads * head_dim)
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(h).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = state.attention_bias(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, attention_stats(q, k, bias, needs)


def attention_stats(q: Tensor, k: Tensor, bias: Optional[Tensor], needs: frozenset[str]) -> dict[str, Tensor]:
    """The statistics in `needs` from queries and keys `[B, H, N, d]` and the additive bias `[B, 1, 1, N]`."""
    stats: dict[str, Tensor] = {}
    if "keys" in needs:
        stats["keys"] = k.mean(dim=1)
    scale = q.shape[-1] ** -0.5
    if "cls_attn" in needs:
        logits = (q[:, :, :1] * scale) @ k.mT  # [B, H, 1, N]
        stats["cls_attn"] = (logits if bias is None else logits + bias).softmax(dim=-1).squeeze(2)
    if "attn_received" in needs:
        logits = (q * scale) @ k.mT  # [B, H, N, N]
        stats["attn_received"] = (logits if bias is None else logits + bias).softmax(dim=-1).mean(dim=(1, 2))
    return stats


def block_hooks(block: nn.Module) -> list[BlockHook]:
    """The block-level PET parts of a block: its direct children that are `BlockHook`s (in registration order)."""
    return [m for m in block.children() if isinstance(m, BlockHook)]


def _branches(parts: list[Optional[Tensor]]) -> Optional[Tensor]:
    parts = [p for p in parts if p is not None]
    return sum(parts[1:], parts[0]) if parts else None


def block_forward(block: nn.Module, state: TokenState, merge: Optional[nn.Module] = None) -> TokenState:
    """One timm `Block` on a token state, with the merge slot between attention and MLP and the PET hooks.

    `hook.pre_block`; `x = x + dp1(ls1(attn(norm1(x)))) + attn branches`; at a merging block `state = merge(state)`
    (with the attention statistics it `needs`); `x = x + dp2(ls2(mlp(norm2(x)))) + mlp branches`;
    `hook.post_block`. Branches (`BlockHook.attn_branch / mlp_branch`) get the residual stream `x` and the
    normalised input `h` of their sub-layer and are added outside drop-path and layer scale.
    """
    hooks = block_hooks(block)
    for hook in hooks:
        state = hook.pre_block(state)
    x = state.x
    h = block.norm1(x)
    out, stats = attention_forward(block.attn, h, state, merge.needs if merge is not None else frozenset())
    extra = _branches([hook.attn_branch(x, h, state) for hook in hooks])
    x = x + block.drop_path1(block.ls1(out))
    state = state.replace(x=x if extra is None else x + extra, **stats)
    if merge is not None:
        state = merge(state)
    x = state.x
    h = block.norm2(x)
    extra = _branches([hook.mlp_branch(x, h, state) for hook in hooks])
    x = x + block.drop_path2(block.ls2(block.mlp(h)))
    state = state.replace(x=x if extra is None else x + extra)
    for hook in hooks:
        state = hook.post_block(state)
    return state


class TokenViT(nn.Module):
    """A timm ViT run block by block with token state and merge strategies at chosen blocks.

    Args:
        vit: timm `VisionTransformer` (PET layers already injected).
        merges: block index -> merge strategy (`merge(state) -> state`).
        pre_logits: optional frozen representation layer before the head (Google's in21k checkpoints have one).
        pet_method: the registry record of the PET method injected into `vit` (`fpet.pet.PETMethod`): how the
            model's trained parameters are chosen, folded and packed. None for a bare model.
    """

    def __init__(self, vit: nn.Module, merges: Optional[Mapping[int, nn.Module]] = None,
                 pre_logits: Optional[nn.Module] = None, pet_method: Optional[object] = None) -> None:
        super().__init__()
        self.vit = vit
        self.merges = nn.ModuleDict({str(i): m for i, m in sorted((merges or {}).items())})
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        self.pet_method = pet_method
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
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    def embed(self, images: Tensor) -> Tensor:
        """Patch + position embedding: `[B, 3, H, W] -> [B, N0, C]`."""
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def initial_state(self, images: Tensor, track_source: bool = False) -> TokenState:
        """The token state of the embedded images: `x [B, N0, C]`, no sizes yet, sources if tracking."""
        x = self.embed(images)
        source = None
        if track_source:
            B, N0, _ = x.shape
            source = torch.eye(N0, device=x.device, dtype=x.dtype).expand(B, N0, N0)
        return TokenState(x, num_prefix=self.num_prefix_tokens, grid=self.grid_size, source=source)

    def forward_tokens(self, images: Tensor, track_source: bool = False) -> TokenState:
        """Embed and run all blocks: `[B, 3, H, W] -> TokenState` whose `x [B, N, C]` is after the final norm."""
        state = self.initial_state(images, track_source)
        for i, block in enumerate(self.vit.blocks):
            state = block_forward(block, state, self.merges[str(i)] if str(i) in self.merges else None)
        return state.with_x(self.vit.norm(state.x))

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
