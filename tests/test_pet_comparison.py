"""The comparison PET methods (docs/pet.md, "Comparison methods"): parameter counts on ViT-B/16, train rules,
identity at init, prompt tokens under every merge strategy, exact folds, bad values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fpet import build_model
from fpet.config import compose_config
from fpet.profile import count_parameters

VIT_B16_COUNTS = {
    "bitfit": 12 * (2304 + 768 + 3072 + 768 + 768 + 768) + 768 + 768,     # 102,912: every bias
    "ln_tune": (12 * 2 + 1) * 2 * 768,                                     # 38,400: norm1, norm2, final norm
}
"""params_pet on ViT-B/16 (head excluded), from the method definitions; the issue's figures are the literals."""


def vit_b16(*overrides: str) -> nn.Module:
    """ViT-B/16 with a PET method, built on the meta device (shapes only: fast, no memory)."""
    cfg = compose_config(["backbone.checkpoint=null", "dataset=synthetic", "dataset.num_classes=1000", *overrides])
    with torch.device("meta"):
        return build_model(cfg)


@pytest.mark.parametrize("pet, count", [("bitfit", 102_912), ("ln_tune", 38_400)])
def test_vit_b16_parameter_counts_head_excluded(pet, count):
    assert VIT_B16_COUNTS[pet] == count
    assert count_parameters(vit_b16(f"pet={pet}"))["params_pet"] == count


def test_bitfit_trains_every_backbone_bias_and_nothing_else(make_cfg):
    model = build_model(make_cfg("pet=bitfit"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n, _ in model.vit.named_parameters() if n.endswith(".bias")}
    assert trained == {f"vit.{n}" for n in biases} | {"vit.head.weight"}
    assert {"vit.patch_embed.proj.bias", "vit.norm.bias", "vit.blocks.3.attn.qkv.bias",
            "vit.blocks.3.mlp.fc1.bias", "vit.blocks.3.norm2.bias"} <= trained


def test_ln_tune_trains_the_layernorms_only(make_cfg):
    model = build_model(make_cfg("pet=ln_tune"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad} - {"vit.head.weight", "vit.head.bias"}
    norms = {f"vit.{m}.{w}" for m, mod in model.vit.named_modules() if isinstance(mod, nn.LayerNorm)
             for w in ("weight", "bias")}
    assert trained == norms and len(norms) == 2 * (2 * len(model.vit.blocks) + 1)
