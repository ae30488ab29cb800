"""The one merge signature: `merge(x, size, keys) -> (x, size)` (DESIGN section 5).

A strategy subclasses `TokenMerge` and implements `match`, which decides which tokens go together and returns a
`Reduce`: a function that maps any per-token tensor `[B, N, D]` to the merged tokens `[B, N', D]` by summing (or
taking the max over) the members of each group. The base class turns that into the size-weighted average of
the tokens (`merge_wavg`), the new sizes, and, when tracking, the new sources, so every strategy gets all three
from one matching.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

Reduce = Callable[[Tensor, str], Tensor]
"""`reduce(t [B, N, D], mode) -> [B, N', D]`; mode is "sum" or "amax"."""


def merge_wavg(reduce: Reduce, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average of each group: `x [B, N, C], size [B, N, 1] -> (x [B, N', C], size [B, N', 1])`."""
    x = reduce(x * size, "sum")
    size = reduce(size, "sum")
    return x / size, size


class TokenMerge(nn.Module):
    """Base class of merge strategies; may own parameters (they train with the PET parameters).

    Attributes:
        weighted: True averages the members of a group weighted by size; False takes their elementwise max.
    """

    weighted: bool = True

    def match(self, x: Tensor, size: Tensor, keys: Tensor) -> Reduce:
        """Decide the groups from tokens `[B, N, C]`, sizes `[B, N, 1]` and head-mean keys `[B, N, d]`."""
        raise NotImplementedError

    def forward(self, x: Tensor, size: Optional[Tensor], keys: Tensor) -> tuple[Tensor, Tensor]:
        """`x [B, N, C], size [B, N, 1] or None, keys [B, N, d] -> (x [B, N', C], size [B, N', 1])`."""
        x, size, _ = self.merge_with_source(x, size, keys, None)
        return x, size

    def merge_with_source(
        self, x: Tensor, size: Optional[Tensor], keys: Tensor, source: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """As `forward`, also merging `source [B, N, N0]` (which input tokens each token holds)."""
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        reduce = self.match(x, size, keys)
        if self.weighted:
            x, new_size = merge_wavg(reduce, x, size)
        else:
            x, new_size = reduce(x, "amax"), reduce(size, "sum")
        if source is not None:
            source = reduce(source, "sum")
        return x, new_size, source
