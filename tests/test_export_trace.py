"""The inference forward of every registered merge strategy is traceable (no onnx needed): a trace taken at one
batch size gives the eager outputs at another, so nothing input-dependent is baked into the graph."""
from __future__ import annotations

import pytest
import torch

from fpet.merge import MERGE_STRATEGIES
from fpet.merge.bipartite import stripe_split
from fpet.pipeline import session_from_overrides
from fpet.validate import ConfigError

TINY = ["backbone=vit_micro", "+backbone.kwargs.depth=2", "backbone.merge_layer=1", "logger=none", "device=cpu"]
"""Two blocks of vit_micro (ViT-B/16's 197 tokens), merging at block 1."""


def tiny_inference_model(merge: str, pet: str = "lora") -> torch.nn.Module:
    try:
        session = session_from_overrides([*TINY, f"pet={pet}", f"merge={merge}"])
    except ConfigError as err:  # a strategy that needs another PET method or keys of its own
        pytest.skip(f"merge={merge} needs more than its defaults on the tiny backbone: {err}")
    model, _ = session.inference()
    return model.eval()


@pytest.mark.parametrize("merge", sorted(MERGE_STRATEGIES))
def test_merge_inference_is_traceable_with_a_dynamic_batch(merge):
    model = tiny_inference_model(merge)
    static = MERGE_STRATEGIES[merge].static_tokens
    example_batch, other_batch = (2, 3) if static else (1, 1)
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(example_batch, 3, 224, 224, generator=gen)
    other = torch.rand(other_batch, 3, 224, 224, generator=gen)
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        expected = model(other)
        got = traced(other)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stripe_split_has_trace_time_sizes():
    """The split is strided ranges, so its sizes are known while tracing (a boolean mask made them data-dependent
    and torch.export refused ToMe / BSM)."""
    for num_prefix in (1, 2, 3):
        a, b = stripe_split(197 + num_prefix - 1, num_prefix)
        positions = torch.arange(num_prefix, 197 + num_prefix - 1)
        assert a.tolist() == positions[positions % 2 == 0].tolist()
        assert b.tolist() == positions[positions % 2 == 1].tolist()
