"""The token-state ViT forward: equivalence to timm, the merge slot, attention statistics, proportional attention,
block hooks."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fpet import build_model
from fpet.merge import Reduce, TokenMerge
from fpet.pet import BlockHook
from fpet.state import TokenState
from fpet.vit import TokenViT, attention_forward, block_forward


class PairMerge(TokenMerge):
    """Test strategy: merges patch 2i with patch 2i+1 (prefix kept); records the keys it was given."""

    name = "pair"

    def __init__(self) -> None:
        super().__init__()
        self.seen_keys: list[Tensor] = []

    def match(self, state: TokenState) -> Reduce:
        self.seen_keys.append(state.keys)
        n = state.num_prefix

        def reduce(t: Tensor, mode: str) -> Tensor:
            prefix, patches = t[:, :n], t[:, n:]
            pairs = patches.unflatten(1, (-1, 2))
            merged = pairs.sum(2) if mode == "sum" else pairs.amax(2)
            return torch.cat([prefix, merged], dim=1)

        return reduce


def state_of(x: Tensor, **kw) -> TokenState:
    return TokenState(x, **kw)


@pytest.mark.parametrize("pet", ["lora", "adaptformer"])
def test_zero_init_pet_equals_plain_timm(make_cfg, images, pet):
    model = build_model(make_cfg(f"pet={pet}")).eval()
    with torch.no_grad():
        assert torch.allclose(model(images), model.vit(images), atol=1e-5)


def test_adaptformer_branch_is_a_block_hook_on_the_pre_norm_stream(make_cfg, images):
    model = build_model(make_cfg("pet=adaptformer")).eval()
    block = model.vit.blocks[0]
    torch.nn.init.normal_(block.mlp.adapter.up.weight)
    x = model.embed(images)
    with torch.no_grad():
        out = block_forward(block, state_of(x)).x
        h = x + block.attn(block.norm1(x))
        expected = h + block.mlp.base_layer(block.norm2(h)) + block.mlp.scale * block.mlp.adapter(h)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, block(x), atol=1e-4)  # plain timm ignores the branch: the hook matters


class Recorder(BlockHook):
    """Test hook: records the order of its calls, adds constants through both branches, scales after the block."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def pre_block(self, state):
        self.log.append("pre")
        return state

    def attn_branch(self, x, h, state):
        self.log.append("attn")
        return torch.full_like(x, 1.0)

    def mlp_branch(self, x, h, state):
        self.log.append("mlp")
        return torch.full_like(x, 2.0)

    def post_block(self, state):
        self.log.append("post")
        return state.with_x(state.x * 0.5)


def test_block_hooks_are_found_as_children_and_called_at_their_points(make_cfg, images):
    model = build_model(make_cfg("pet=linear")).eval()
    block = model.vit.blocks[2]
    calls: list[str] = []
    x = model.embed(images)
    with torch.no_grad():
        plain = block_forward(block, state_of(x)).x
        block.add_module("recorder", Recorder(calls))
        hooked = block_forward(block, state_of(x)).x
        a = x + block.attn(block.norm1(x)) + 1.0
        expected = 0.5 * (a + block.mlp(block.norm2(a)) + 2.0)
    assert calls == ["pre", "attn", "mlp", "post"]
    assert torch.allclose(hooked, expected, atol=1e-5) and not torch.allclose(hooked, plain, atol=1e-3)


def test_proportional_attention_with_unit_sizes_equals_no_mask(make_cfg):
    model = build_model(make_cfg()).eval()
    attn = model.vit.blocks[3].attn
    x = torch.randn(2, 197, 64)
    twos = torch.cat([torch.ones(2, 1, 1), 2 * torch.ones(2, 196, 1)], 1)
    with torch.no_grad():
        ref, _ = attention_forward(attn, x, state_of(x))
        ones, _ = attention_forward(attn, x, state_of(x, size=torch.ones(2, 197, 1)))
        doubled, _ = attention_forward(attn, x, state_of(x, size=twos))
        masked, _ = attention_forward(attn, x, state_of(x, mask=torch.ones(2, 197, 1)))
        timm_out = attn(x)
    assert torch.allclose(ref, ones, atol=1e-6) and torch.allclose(ref, timm_out, atol=1e-5)
    assert not torch.allclose(ref, doubled, atol=1e-4)
    assert torch.allclose(masked, ref, atol=1e-6)  # a full keep mask changes nothing


def explicit_attention(attn, x: Tensor, bias: Tensor | None) -> Tensor:
    """The attention probabilities `[B, H, N, N]` written out (the formula the statistics must follow)."""
    B, N, C = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (logits if bias is None else logits + bias).softmax(-1)


@pytest.mark.parametrize("with_sizes", [False, True])
def test_attention_statistics_equal_the_explicit_attention_matrix(make_cfg, with_sizes):
    model = build_model(make_cfg()).eval()
    attn = model.vit.blocks[5].attn
    x = torch.randn(2, 197, 64)
    size = torch.randint(1, 4, (2, 197, 1)).float() if with_sizes else None
    state = state_of(x, size=size)
    with torch.no_grad():
        out, stats = attention_forward(attn, x, state, frozenset({"keys", "cls_attn", "attn_received"}))
        _, none = attention_forward(attn, x, state)
        probs = explicit_attention(attn, x, None if size is None else size.log().transpose(1, 2)[:, None])
        keys = attn.qkv(x).reshape(2, 197, 3, attn.num_heads, -1)[:, :, 1].mean(2)
    assert none == {}  # nothing is computed that was not asked for
    assert torch.allclose(stats["cls_attn"], probs[:, :, 0], atol=1e-6)
    assert stats["cls_attn"].shape == (2, attn.num_heads, 197)
    assert torch.allclose(stats["attn_received"], probs.mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(stats["keys"], keys, atol=1e-6)


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
    assert state.keys is None  # statistics describe the tokens before the merge: cleared
    assert torch.equal(state.size[:, 0, 0], torch.ones(2))              # class token alone, first
    assert torch.equal(state.size.sum(1).squeeze(-1), torch.full((2,), 197.0))
    assert torch.equal(state.source.sum(-1), state.size.squeeze(-1))     # sources agree with sizes
    assert torch.equal(state.source[:, 0, 0], torch.ones(2))


def test_merging_identical_tokens_returns_that_token():
    merge = PairMerge()
    x = torch.randn(1, 1, 8).expand(2, 197, 8).contiguous()
    out = merge(state_of(x, keys=torch.randn(2, 197, 4)))
    assert torch.allclose(out.x, x[:, :99], atol=1e-6)
    assert torch.equal(out.size[:, 1:], torch.full((2, 98, 1), 2.0))


def test_inserted_prefix_tokens_are_protected_and_kept_first():
    x = torch.randn(2, 197, 8)
    prompts = torch.randn(1, 3, 8)
    state = state_of(x, size=torch.ones(2, 197, 1), source=torch.eye(197).expand(2, 197, 197)).insert_prefix(prompts)
    assert state.num_prefix == 4 and state.x.shape == (2, 200, 8)
    assert torch.equal(state.x[:, 1:4], prompts.expand(2, -1, -1)) and torch.equal(state.x[:, 4:], x[:, 1:])
    assert torch.equal(state.size[:, 1:4], torch.ones(2, 3, 1)) and state.source[:, 1:4].sum() == 0
    out = PairMerge()(state.replace(keys=torch.randn(2, 200, 4)))
    assert out.x.shape == (2, 4 + 98, 8) and torch.equal(out.x[:, :4], state.x[:, :4])
    with pytest.raises(ValueError, match="not all prefix tokens"):
        state.set_prefix(2, torch.randn(1, 3, 8))


def test_merge_layer_outside_depth_is_an_error(make_cfg):
    model = build_model(make_cfg())
    with pytest.raises(ValueError, match=r"outside the model's blocks 0\.\.11"):
        TokenViT(model.vit, {12: PairMerge()})
