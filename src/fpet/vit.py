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
    A mask that needs a gradient (LTMP's soft masks in training) takes the explicit path instead,
    `masked_softmax`: the mask multiplies the exponentials, so its gradient is finite where it is 0 (log(0) is not).
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
    probs = None
    if state.mask is not None and state.mask.requires_grad:
        size_bias = None if state.size is None or not state.prop_attn else \
            state.size.log().to(q.dtype).transpose(1, 2).unsqueeze(1)
        logits = (q * head_dim ** -0.5) @ k.mT + (0.0 if size_bias is None else size_bias)
        probs = masked_softmax(logits, state.mask, attn.training)
        bias = None  # the statistics are read from `probs`
        out = attn.attn_drop(probs) @ v
    else:
        bias = state.attention_bias(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, attention_stats(q, k, bias, needs, probs, state.mask)


def masked_softmax(logits: Tensor, mask: Tensor, training: bool, eps: float = 1e-5) -> Tensor:
    """Attention probabilities `[B, H, N, N]` with keys weighted by `mask [B, N, 1]`: `exp(l - max) * mask`,
    normalised (LTMP's `softmax_with_mask`; in training `eps` keeps fully masked rows finite, as the official
    code). Equals `softmax(l + log mask)` in value; its gradient reaches masked-out keys."""
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask.to(logits.dtype).transpose(1, 2).unsqueeze(1)
    if training:
        return (weights + eps / logits.shape[-1]) / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights / weights.sum(dim=-1, keepdim=True)


def attention_stats(q: Tensor, k: Tensor, bias: Optional[Tensor], needs: frozenset[str],
                    probs: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The statistics in `needs` from queries and keys `[B, H, N, d]` and the additive bias `[B, 1, 1, N]` (or the
    attention probabilities `[B, H, N, N]` when the explicit path computed them). With a token `mask [B, N, 1]`,
    `attn_received` averages over the kept queries only (mask-weighted), so a masked sequence gives the values of
    the same sequence with the masked tokens removed."""
    stats: dict[str, Tensor] = {}
    if "keys" in needs:
        stats["keys"] = k.mean(dim=1)
    if probs is not None:
        if "cls_attn" in needs:
            stats["cls_attn"] = probs[:, :, 0]
        if "attn_received" in needs:
            stats["attn_received"] = _mean_over_queries(probs, mask)
        return stats
    scale = q.shape[-1] ** -0.5
    if "cls_attn" in needs:
        logits = (q[:, :, :1] * scale) @ k.mT  # [B, H, 1, N]
        stats["cls_attn"] = (logits if bias is None else logits + bias).softmax(dim=-1).squeeze(2)
    if "attn_received" in needs:
        logits = (q * scale) @ k.mT  # [B, H, N, N]
        stats["attn_received"] = _mean_over_queries((logits if bias is None else logits + bias).softmax(dim=-1), mask)
    return stats


def _mean_over_queries(probs: Tensor, mask: Optional[Tensor]) -> Tensor:
    """`[B, H, N, N] -> [B, N]`: mean over heads and (mask-weighted) queries of the attention each key receives."""
    per_query = probs.mean(dim=1)  # [B, N, N]
    if mask is None:
        return per_query.mean(dim=1)
    weights = mask.detach().to(probs.dtype)  # [B, N, 1]
    return (per_query * weights).sum(dim=1) / weights.sum(dim=1)


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
    n_attention = state.effective_tokens()
    x = state.x
    h = block.norm1(x)
    out, stats = attention_forward(block.attn, h, state, merge.needs if merge is not None else frozenset())
    extra = _branches([hook.attn_branch(x, h, state) for hook in hooks])
    x = x + block.drop_path1(block.ls1(out))
    state = state.replace(x=x if extra is None else x + extra, **stats)
    if merge is not None:
        state = merge(state)
    state = state.traced(n_attention, state.effective_tokens())
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
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        self.pet_method = pet_method
        self.place_merges(merges or {})

    def place_merges(self, merges: Mapping[int, nn.Module]) -> None:
        """Set the merge schedule (block index -> strategy), replacing any earlier one (a PET method that selects
        weights from data places its merges after the selection: `fpet.model.build_model`)."""
        depth = len(self.vit.blocks)
        bad = [i for i in merges if not 0 <= int(i) < depth]
        if bad:
            raise ValueError(f"merge layer(s) {bad} outside the model's blocks 0..{depth - 1}")
        self.merges = nn.ModuleDict({str(i): m for i, m in sorted(merges.items())})

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

    def constrain_parameters(self) -> None:
        """After an optimiser step: let each merge module put its parameters back in range (LTMP's thresholds)."""
        for merge in self.merges.values():
            merge.constrain()


def training_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The training objective: cross-entropy plus the auxiliary losses of the merge strategies (`aux_loss`, e.g.
    LTMP's FLOPs budget), each strategy once, read from the final token state."""
    if not isinstance(model, TokenViT):
        return F.cross_entropy(model(images), labels)
    state = model.forward_tokens(images)
    loss = F.cross_entropy(model.forward_head(state.x), labels)
    seen: set[type] = set()
    for merge in model.merges.values():
        if type(merge) in seen:
            continue
        seen.add(type(merge))
        extra = merge.aux_loss(state)
        if extra is not None:
            loss = loss + extra
    return loss
