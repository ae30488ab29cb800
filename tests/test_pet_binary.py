"""1-bit layers (Bi-LoRA, Bi-AdaptFormer): two values per matrix in the forward pass, gradients to latent weights."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fpet.pet.binary as binary
from fpet import build_model
from fpet.pet import BinaryLinear, binarize
from fpet.pet.binary import GAUSS_1BIT_LEVEL


@pytest.mark.parametrize("pet, per_block", [("bi_lora", 4), ("bi_adaptformer", 2)])
def test_every_1bit_matrix_takes_exactly_two_values_in_the_forward_pass(make_cfg, images, monkeypatch, pet,
                                                                         per_block):
    model = build_model(make_cfg(f"pet={pet}")).eval()
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert len(layers) == per_block * len(model.vit.blocks)
    seen = []

    def recording_linear(x, weight, bias=None):
        seen.append(weight.detach())
        return F.linear(x, weight, bias)

    monkeypatch.setattr(binary, "F", SimpleNamespace(linear=recording_linear))  # what BinaryLinear.forward uses
    with torch.no_grad():
        model(images)
    assert len(seen) == len(layers)
    for weight, layer in zip(seen, layers):
        values = weight.unique()
        w = layer.weight.detach()
        expected = torch.stack([w.mean() - GAUSS_1BIT_LEVEL * w.std(), w.mean() + GAUSS_1BIT_LEVEL * w.std()])
        assert values.numel() == 2 and torch.allclose(values, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("pet", ["bi_lora", "bi_adaptformer"])
def test_gradients_reach_every_latent_fp32_weight(make_cfg, images, pet):
    model = build_model(make_cfg(f"pet={pet}")).eval()  # no drop-path: a dropped branch would get no gradient
    F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert all(m.weight.dtype == torch.float32 and m.weight.requires_grad for m in layers)
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)


def test_straight_through_gradient_matches_the_official_formulation():
    """Official QLinear: `weight = (q(z).data + z - z.data) * std + mean` with z standardised: the gradient is
    that of `zq * std(w) + mean(w) + std * z(w)` with zq and the outer std held constant."""
    w = (torch.randn(16, 8) * 0.1).requires_grad_()
    g = torch.randn(16, 8)
    (binarize(w) * g).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    mean, std = w2.mean(), w2.std()
    z = (w2 - mean) / (std + 1e-5)
    zq = torch.where(z >= 0, GAUSS_1BIT_LEVEL, -GAUSS_1BIT_LEVEL).detach()
    ((zq * std + mean + std.detach() * z) * g).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-6) and w.grad.abs().sum() > 0


def test_up_projection_starts_near_zero_but_not_at_zero(make_cfg):
    model = build_model(make_cfg("pet=bi_adaptformer"))
    up = model.vit.blocks[0].mlp.adapter.up
    assert up.weight.abs().max() <= 0.002 and up.weight.std() > 0
    assert up.quantized_weight().abs().max() < 0.002


def test_loaded_1bit_weights_reproduce_the_forward_pass_bit_for_bit():
    layer = BinaryLinear(64, 32)
    x = torch.randn(5, 64)
    loaded = BinaryLinear(64, 32)
    loaded.load_quantized(*layer.quantize())
    assert torch.equal(loaded(x), layer(x))
    assert torch.equal(loaded.weight, binarize(layer.weight))
    with pytest.raises(ValueError, match="does not fit"):
        BinaryLinear(32, 64).load_quantized(*layer.quantize())
