"""Structural re-parameterisation: the folded model is a plain ViT that computes the adapter model's logits."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fpet import build_model
from fpet.config import compose_config
from fpet.pet import PETLayer, inference_model, reparameterize
from fpet.profile import count_flops
from fpet.vit import TokenViT
from test_vit import PairMerge

FOLDABLE = ["repadapter", "lora", "bi_lora"]


@torch.no_grad()
def randomize_pet(model: nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Give every PET branch (and the head) non-trivial weights, as training would."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, PETLayer):
            for p in layer.pet_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def with_merge(model: nn.Module, merge: str) -> nn.Module:
    return TokenViT(model.vit, {6: PairMerge()}, pet_method=model.pet_method) if merge == "pair" else model


def max_logit_gap(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return (a.eval()(images) - b.eval()(images)).abs().max().item()


@pytest.mark.parametrize("merge", ["none", "pair"])
@pytest.mark.parametrize("pet", FOLDABLE)
def test_folded_vit_micro_equals_adapter_model(make_cfg, images, pet, merge):
    model = with_merge(build_model(make_cfg(f"pet={pet}")), merge)
    randomize_pet(model)
    branches_off = copy.deepcopy(model)
    for layer in branches_off.modules():
        if isinstance(layer, PETLayer):
            layer.scale = 0.0
    folded, report = inference_model(model)
    assert report.reparameterized and not report.kept
    assert not any(isinstance(m, PETLayer) for m in folded.modules())
    assert {type(b.attn.qkv) for b in folded.vit.blocks} == {nn.Linear}
    assert max_logit_gap(folded, model, images) < 1e-4
    assert max_logit_gap(model, branches_off, images) > 1e-2  # the branches matter: the fold did something


@pytest.fixture(scope="module")
def vit_b16_images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.mark.slow  # 24-32 s each (2 shared cores); test_folded_vit_micro_equals_adapter_model covers every method
@pytest.mark.parametrize("pet", ["repadapter", "lora"])
def test_folded_random_vit_b16_equals_adapter_model_with_and_without_merging(vit_b16_images, pet):
    model = build_model(compose_config(["backbone.checkpoint=null", f"pet={pet}", "dataset.num_classes=10"]))
    randomize_pet(model, std=0.02)
    for merge in ("none", "pair"):
        unfolded = with_merge(model, merge)
        folded, _ = inference_model(unfolded)
        assert max_logit_gap(folded, unfolded, vit_b16_images) < 1e-4


def test_fold_is_exact_for_1bit_lora_and_uses_the_quantized_weights(make_cfg, images):
    model = build_model(make_cfg("pet=bi_lora"))
    randomize_pet(model, std=0.5)  # latent weights far from their 1-bit values: folding them would be wrong
    folded, _ = inference_model(model)
    assert max_logit_gap(folded, model, images) < 1e-4


def test_folded_model_has_plain_vit_flops(make_cfg):
    plain = count_flops(build_model(make_cfg("pet=linear")), 224)
    for pet in ("repadapter", "lora"):
        model = build_model(make_cfg(f"pet={pet}"))
        assert count_flops(model, 224) > plain
        assert count_flops(inference_model(model)[0], 224) == plain


def test_adaptformer_is_kept_and_the_trained_model_is_never_changed(make_cfg):
    model = build_model(make_cfg("pet=adaptformer"))
    same, report = inference_model(model)
    assert same is model and not report.reparameterized and len(report.kept) == 12
    lora = build_model(make_cfg("pet=lora"))
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    folded, _ = inference_model(lora)
    assert folded is not lora and any(isinstance(m, PETLayer) for m in lora.modules())
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in state.items())
    assert inference_model(lora, enabled=False)[0] is lora


def test_reparameterize_folds_in_place_and_reports(make_cfg):
    model = build_model(make_cfg("pet=repadapter"))
    report = reparameterize(model)
    assert len(report.folded) == 24 and report.folded[:2] == ["blocks.0.norm1", "blocks.0.norm2"]
    assert isinstance(model.vit.blocks[0].norm1, nn.LayerNorm)
    assert model.vit.blocks[0].mlp.fc1.bias is not None
    assert not reparameterize(model).folded  # nothing left to fold
