"""1-bit layers (Bi-LoRA, Bi-AdaptFormer, FPET's refinement): the official QLinear's two values per matrix in the
forward pass, gradients to the latent weights."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fpet.pet.binary as binary
from fpet import build_model
from fpet.pet import BinaryLinear, binarize
from fpet.pet.binary import ONE_BIT_LEVEL

OFFICIAL_LEVEL = 0.6745
"""The official `QLinear.quantize(bit=1)` code value, written out here: its loop stops at norm.ppf([0.25, 0.75])."""


def official_weight(w: torch.Tensor) -> torch.Tensor:
    """The official QLinear forward weight, from its formula: standardise by the whole matrix's mean and unbiased
    std (+ 1e-5), `sign(z) * 0.6745`, rescale."""
    mean, std = w.mean(), w.std(unbiased=True)
    z = (w - mean) / (std + 1e-5)
    return torch.sign(z) * OFFICIAL_LEVEL * std + mean


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
        expected = official_weight(w).unique()
        assert values.numel() == 2 and torch.allclose(values, expected, rtol=1e-4, atol=1e-8)


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
    zq = torch.where(z >= 0, ONE_BIT_LEVEL, -ONE_BIT_LEVEL).detach()
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


def test_the_level_is_the_median_of_a_half_gaussian_not_its_centroid():
    assert abs(ONE_BIT_LEVEL - OFFICIAL_LEVEL) < 1e-4
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)).abs()
    assert abs(z.median().item() - ONE_BIT_LEVEL) < 2e-3          # median of |z|: the official level
    assert abs(z.mean().item() - ONE_BIT_LEVEL) > 0.1              # the centroid sqrt(2/pi) = 0.7979 is not


@pytest.mark.parametrize("pet, merge", [("bi_lora", "none"), ("bi_adaptformer", "none"), ("lora", "fpet")])
def test_logits_equal_the_official_formula_for_every_1bit_layer(make_cfg, images, monkeypatch, pet, merge):
    """Non-trivial latent weights; the model's logits with our 1-bit layers equal those with every 1-bit weight
    computed by the official formula."""
    model = build_model(make_cfg(f"pet={pet}", f"merge={merge}")).eval()
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert layers
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, 0.05)
        ours = model(images)
        monkeypatch.setattr(BinaryLinear, "quantized_weight", lambda self: official_weight(self.weight))
        official = model(images)
        monkeypatch.setattr(BinaryLinear, "quantized_weight",
                            lambda self: (official_weight(self.weight) - self.weight.mean()) * 0.7979 / OFFICIAL_LEVEL
                            + self.weight.mean())
        centroid = model(images)
    assert torch.allclose(ours, official, atol=1e-5)
    assert not torch.allclose(ours, centroid, atol=1e-4)  # the old level would give another model
