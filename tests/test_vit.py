"""The token-state ViT forward: equivalence to timm, the merge slot, proportional attention, AdaptFormer's slot."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fpet import build_model
from fpet.merge import Reduce, TokenMerge
from fpet.vit import TokenViT, attention_forward, block_forward


class PairMerge(TokenMerge):
    """Test strategy: merges patch 2i with patch 2i+1 (class token kept); records the keys it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_keys: list[Tensor] = []

    def match(self, x: Tensor, size: Tensor, keys: Tensor) -> Reduce:
        self.seen_keys.append(keys)

        def reduce(t: Tensor, mode: str) -> Tensor:
            cls, patches = t[:, :1], t[:, 1:]
            pairs = patches.unflatten(1, (-1, 2))
            merged = pairs.sum(2) if mode == "sum" else pairs.amax(2)
            return torch.cat([cls, merged], dim=1)

        return reduce


@pytest.mark.parametrize("pet", ["lora", "adaptformer"])
def test_zero_init_pet_equals_plain_timm(make_cfg, images, pet):
    model = build_model(make_cfg(f"pet={pet}")).eval()
    with torch.no_grad():
        assert torch.allclose(model(images), model.vit(images), atol=1e-5)


def test_adaptformer_branch_is_used_with_pre_norm_input(make_cfg, images):
    model = build_model(make_cfg("pet=adaptformer")).eval()
    block = model.vit.blocks[0]
    torch.nn.init.normal_(block.mlp.adapter.up.weight)
    x = model.embed(images)
    with torch.no_grad():
        out = block_forward(block, x, None).x
        h = x + block.attn(block.norm1(x))
        expected = h + block.mlp.base_layer(block.norm2(h)) + block.mlp.parallel(h)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, block(x), atol=1e-4)  # plain timm ignores the branch: the slot matters


def test_proportional_attention_with_unit_sizes_equals_no_mask(make_cfg, images):
    model = build_model(make_cfg()).eval()
    attn = model.vit.blocks[3].attn
    x = torch.randn(2, 197, 64)
    with torch.no_grad():
        ref, _ = attention_forward(attn, x, None)
        ones, _ = attention_forward(attn, x, torch.ones(2, 197, 1))
        twos, _ = attention_forward(attn, x, torch.cat([torch.ones(2, 1, 1), 2 * torch.ones(2, 196, 1)], 1))
        timm_out = attn(x)
    assert torch.allclose(ref, ones, atol=1e-6) and torch.allclose(ref, timm_out, atol=1e-5)
    assert not torch.allclose(ref, twos, atol=1e-4)


def test_merge_slot_called_once_at_its_layer_with_head_mean_keys(make_cfg, images):
    cfg = make_cfg()
    model = build_model(cfg).eval()
    merge = PairMerge()
    merged = TokenViT(model.vit, {6: merge})
    with torch.no_grad():
        state = merged.forward_tokens(images, track_source=True)
    assert len(merge.seen_keys) == 1
    head_dim = model.vit.blocks[0].attn.head_dim
    assert merge.seen_keys[0].shape == (2, 197, head_dim)
    assert state.x.shape == (2, 99, 64)
    assert state.size.shape == (2, 99, 1)
    assert torch.equal(state.size[:, 0, 0], torch.ones(2))              # class token alone, first
    assert torch.equal(state.size.sum(1).squeeze(-1), torch.full((2,), 197.0))
    assert torch.equal(state.source.sum(-1), state.size.squeeze(-1))     # sources agree with sizes
    assert torch.equal(state.source[:, 0, 0], torch.ones(2))


def test_merging_identical_tokens_returns_that_token():
    merge = PairMerge()
    x = torch.randn(1, 1, 8).expand(2, 197, 8).contiguous()
    out, size = merge(x, None, torch.randn(2, 197, 4))
    assert torch.allclose(out, x[:, :99], atol=1e-6)
    assert torch.equal(size[:, 1:], torch.full((2, 98, 1), 2.0))


def test_merge_layer_outside_depth_is_an_error(make_cfg):
    model = build_model(make_cfg())
    with pytest.raises(ValueError, match=r"outside the model's blocks 0\.\.11"):
        TokenViT(model.vit, {12: PairMerge()})
