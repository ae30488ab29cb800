"""The token state carried through the block loop (`fpet.vit`), read and returned by merge strategies and
block-level PET hooks.

One `TokenState` holds everything a block, a merge strategy or a PET hook may need about the current sequence:

- `x [B, N, C]`: the tokens; the first `num_prefix` are protected (class, distillation, prompt tokens): they are
  never merged, keep size 1 and stay first;
- `size [B, N, 1]`: how many input patches each token stands for (None until a merge; proportional attention adds
  `log(size)` over keys from then on, unless `prop_attn` is False: a strategy whose official code keeps sizes only
  for its weighted averages, as PiToMe's, sets it);
- `mask [B, N, 1]`: soft keep weights in (0, 1] (None = every token fully kept); attention adds `log(mask)` over keys,
  so a strategy can drop tokens softly while the batch keeps its shape;
- `source [B, N, N0]`: which input tokens each token holds (only when tracking, for visualisation);
- `grid`: the patch grid (rows, cols) of the input; `has_full_grid` says whether no patch was merged yet;
- `trace`: per block so far, the effective token counts `(n_attention, n_mlp)` (batch means of `mask.sum` when
  masked, else the sequence length), what FLOPs-budget losses read (LTMP's, `fpet.merge.flops`);
- attention statistics of the block's attention, computed only when the layer's merge strategy declares it
  needs them (`TokenMerge.needs`): `keys [B, N, d]` (head-mean keys), `cls_attn [B, H, N]` (the class token's
  attention row, `softmax(q_cls k^T / sqrt(d) + log size)`), `attn_received [B, N]` (attention each token receives,
  mean over heads and queries). They describe the tokens as they entered the block's attention and are cleared by
  any change of the sequence.

No state is stored on modules: the forward pass creates a state from the embedded patches and passes it on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

ATTENTION_STATS = ("keys", "cls_attn", "attn_received")
"""What a merge strategy may ask the attention of its block for (`TokenMerge.needs`)."""


@dataclass
class TokenState:
    """Tokens and what is known about them between two steps of the block loop (see the module docstring)."""

    x: Tensor
    num_prefix: int = 1
    grid: tuple[int, int] = (14, 14)
    size: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    source: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    cls_attn: Optional[Tensor] = None
    attn_received: Optional[Tensor] = None
    prop_attn: bool = True
    trace: tuple[tuple[Tensor | float, Tensor | float], ...] = ()

    def replace(self, **changes) -> "TokenState":
        """A copy with `changes`; attention statistics are dropped unless given (they describe the old tokens)."""
        stats = {name: None for name in ATTENTION_STATS if name not in changes}
        return dataclasses.replace(self, **stats, **changes)

    def with_x(self, x: Tensor) -> "TokenState":
        """The same sequence with new token values `x [B, N, C]` (a residual update): statistics are kept."""
        return dataclasses.replace(self, x=x)

    @property
    def num_tokens(self) -> int:
        """N; a SymInt, not forced to an int, while torch.export traces a data-dependent length (LTMP)."""
        return self.x.shape[1]

    @property
    def has_full_grid(self) -> bool:
        """True while the sequence still holds every patch of the grid (nothing merged or dropped yet)."""
        return self.num_tokens == self.num_prefix + self.grid[0] * self.grid[1]

    def effective_tokens(self) -> Tensor | float:
        """Tokens that count for compute: the batch mean of `mask.sum` over tokens (soft masks count their weight),
        or the sequence length when nothing is masked."""
        if self.mask is None:
            n = self.num_tokens
            return float(n) if isinstance(n, int) else n  # a SymInt while exporting a data-dependent length
        return self.mask.sum(dim=(1, 2)).mean()

    def kept_counts(self) -> Tensor:
        """Tokens each image keeps `[B]`: its unmasked tokens (mask > 0), or the sequence length."""
        if self.mask is None:
            return torch.full((self.x.shape[0],), self.num_tokens, device=self.x.device)
        return (self.mask[..., 0] > 0).sum(dim=1)

    def traced(self, n_attention: Tensor | float, n_mlp: Tensor | float) -> "TokenState":
        """The same state with one more block in `trace`."""
        return dataclasses.replace(self, trace=self.trace + ((n_attention, n_mlp),))

    def sizes(self) -> Tensor:
        """`size`, or ones `[B, N, 1]` before any merge."""
        return self.size if self.size is not None else self.x.new_ones(self.x.shape[0], self.num_tokens, 1)

    def attention_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive attention mask over keys, `[B, 1, 1, N]`: `log(size) + log(mask)` (`log(size)` only with
        `prop_attn`); None when both are None."""
        bias = None
        for weights in (self.size if self.prop_attn else None, self.mask):
            if weights is not None:
                term = weights.log()
                bias = term if bias is None else bias + term
        return None if bias is None else bias.to(dtype).transpose(1, 2).unsqueeze(1)

    def insert_prefix(self, tokens: Tensor) -> "TokenState":
        """Insert protected tokens `[B, P, C]` after the current prefix (prompt tokens go after the class token).

        Sizes and masks of the new tokens are 1, their sources empty; `num_prefix` grows by P.
        """
        B, P = self.x.shape[0], tokens.shape[1]
        tokens = tokens.expand(B, -1, -1)
        n = self.num_prefix

        def insert(t: Optional[Tensor], new: Tensor) -> Optional[Tensor]:
            return None if t is None else torch.cat([t[:, :n], new, t[:, n:]], dim=1)

        ones = tokens.new_ones(B, P, 1)
        source = None if self.source is None else self.source.new_zeros(B, P, self.source.shape[-1])
        return self.replace(x=insert(self.x, tokens),
                            size=insert(self.size, ones), mask=insert(self.mask, ones),
                            source=insert(self.source, source), num_prefix=n + P)

    def set_prefix(self, start: int, tokens: Tensor) -> "TokenState":
        """Replace the prefix tokens `start .. start + P` by `tokens [B or 1, P, C]` (VPT-deep's new prompts)."""
        P = tokens.shape[1]
        if start + P > self.num_prefix:
            raise ValueError(f"tokens {start}..{start + P} are not all prefix tokens (num_prefix={self.num_prefix})")
        x = torch.cat([self.x[:, :start], tokens.expand(self.x.shape[0], -1, -1), self.x[:, start + P:]], dim=1)
        return self.with_x(x)
