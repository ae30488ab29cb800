"""Parameter selection before training (TR-PTS, GPS): the scoring pass (`fisher`) and the budget allocation
(`allocation`). The PET methods that use it live in `fpet.pet.sparse`."""
from __future__ import annotations

from fpet.select.allocation import (block_weights, connection_budgets, critical_counts, round_half_up,
                                    row_selection, sparse_block_order)
from fpet.select.fisher import (BLOCK_CANDIDATES, CACHE_NAME, PATCH_EMBED, SCORE_KINDS, ScoringInput, block_of,
                                cached_scores, candidate_names, candidate_weight, gradient_scores, read_cache,
                                write_cache)

__all__ = [
    "BLOCK_CANDIDATES", "CACHE_NAME", "PATCH_EMBED", "SCORE_KINDS", "ScoringInput", "block_of", "block_weights",
    "cached_scores", "candidate_names", "candidate_weight", "connection_budgets", "critical_counts",
    "gradient_scores", "read_cache", "round_half_up", "row_selection", "sparse_block_order", "write_cache",
]
