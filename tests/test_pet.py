"""PET layers: what they change, what trains, how many parameters, bad settings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fpet import build_model
from fpet.pet import Bottleneck, LoRAQKV, PETLayer, replace_modules, set_trainable


def test_lora_changes_q_and_v_only():
    base = nn.Linear(16, 48)
    lora = LoRAQKV(base, dim=4, scale=2.0, dropout=0.0)
    for bottleneck in (lora.lora_q, lora.lora_v):
        nn.init.normal_(bottleneck.up.weight)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        delta = lora(x) - base(x)
        q, k, v = delta.chunk(3, dim=-1)
        assert torch.allclose(q, 2.0 * lora.lora_q(x), atol=1e-5)
        assert torch.allclose(v, 2.0 * lora.lora_v(x), atol=1e-5)
    assert torch.count_nonzero(k) == 0 and q.abs().sum() > 0 and v.abs().sum() > 0


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("pet, fragment, per_block", [("lora", ".attn.qkv.lora_", 4), ("adaptformer", ".mlp.adapter.", 2)])
def test_pet_mode_trains_branches_and_head_only(make_cfg, pet, fragment, per_block):
    model = build_model(make_cfg(f"pet={pet}"))
    names = trainable_names(model)
    assert {"vit.head.weight", "vit.head.bias"} <= names
    rest = names - {"vit.head.weight", "vit.head.bias"}
    assert rest and all(fragment in n and "base_layer" not in n for n in rest)
    assert len([n for n in rest if n.startswith("vit.blocks.11.")]) == per_block  # down + up per branch


def test_all_and_head_modes(make_cfg):
    model = build_model(make_cfg())
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    set_trainable(model, "head")
    assert trainable_names(model) == {"vit.head.weight", "vit.head.bias"}
    with pytest.raises(ValueError, match="pet.trainable='everything'"):
        set_trainable(model, "everything")


@pytest.mark.parametrize("pet, expected", [("lora", 294_912), ("adaptformer", 147_456)])
def test_vit_b16_pet_parameter_counts(make_cfg, pet, expected):
    model = build_model(make_cfg("backbone=vit_b16", "backbone.checkpoint=null", f"pet={pet}"))
    pet_params = sum(p.numel() for m in model.modules() if isinstance(m, PETLayer) for p in m.pet_parameters())
    assert pet_params == expected


def test_injection_needs_a_match_and_a_positive_dim():
    with pytest.raises(ValueError, match="matches 'blocks.*.nothing'"):
        replace_modules(nn.Sequential(nn.Linear(2, 2)), "blocks.*.nothing", lambda m: m)
    with pytest.raises(ValueError, match="pet.dim"):
        Bottleneck(8, 0, 8)


def test_unknown_pet_method_is_an_error(make_cfg):
    with pytest.raises(ValueError, match="pet='nope': accepted"):
        build_model(make_cfg("pet.name=nope"))
