"""Properties every registered merge strategy must have, whatever its algorithm: each image of a batch is reduced on
its own, and training reaches the PET parameters but never the frozen backbone."""
from __future__ import annotations

import pytest
import torch

from conftest import merge_overrides
from fpet.merge import MERGE_STRATEGIES
from fpet.model import build_model
from fpet.vit import training_loss

STRATEGIES = sorted(set(MERGE_STRATEGIES) - {"none"})


@pytest.mark.parametrize("merge", STRATEGIES)
def test_batch_members_are_reduced_independently(make_cfg, images, merge):
    model = build_model(make_cfg(f"merge={merge}", *merge_overrides(merge, "lora"))).eval()
    with torch.no_grad():
        both = model(images)
        single = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(both, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merge", STRATEGIES)
def test_gradients_reach_the_pet_parameters_and_never_the_frozen_backbone(make_cfg, images, merge):
    model = build_model(make_cfg("pet=lora", f"merge={merge}", *merge_overrides(merge, "lora"))).train()
    training_loss(model, images, torch.tensor([0, 1])).backward()
    frozen = [p for p in model.vit.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)
