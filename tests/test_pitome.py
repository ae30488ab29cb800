"""merge=pitome: energy-ordered matching on a hand-made input (both rules), token counts per block, sizes conserved,
prefix tokens first, no proportional attention by default, gradients never reaching the frozen backbone, bad
configs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fpet import build_model
from fpet.merge.pitome import PiToMe
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config


def hand_made(num_prefix: int = 1) -> TokenState:
    """`num_prefix` prefix tokens + 8 tokens. Keys: tokens 0 and 1 equal (e1), tokens 2 and 3 nearly equal (e2 and
    e2 tilted towards e3), tokens 4-7 the loners e3..e6: the two pairs have the highest energy."""
    keys = torch.eye(6)[[0, 0, 1, 1, 2, 3, 4, 5]]
    keys[3] = F.normalize(torch.tensor([0.0, 0.99, 0.14, 0, 0, 0]), dim=0)
    keys = torch.cat([torch.ones(num_prefix, 6), keys])[None]
    x = torch.randn(1, num_prefix + 8, 4, generator=torch.Generator().manual_seed(0))
    return TokenState(x, num_prefix=num_prefix, keys=keys)


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("num_prefix", [1, 3])
def test_the_two_similar_pairs_merge_and_the_loners_stay(bsm, num_prefix):
    state = hand_made(num_prefix)
    out = PiToMe(ratio=0.75, margin=0.0, bsm=bsm)(state)  # r = floor(8 - 6) = 2
    P = num_prefix
    assert out.x.shape == (1, P + 6, 4)
    assert torch.equal(out.x[:, :P], state.x[:, :P]) and torch.equal(out.size[:, :P], torch.ones(1, P, 1))
    twos = out.size[0, P:, 0] == 2
    assert int(twos.sum()) == 2 and out.size.sum() == P + 8
    merged = out.x[0, P:][twos]
    pairs = [(state.x[0, P] + state.x[0, P + 1]) / 2, (state.x[0, P + 2] + state.x[0, P + 3]) / 2]
    assert all(any(torch.allclose(p, m) for m in merged) for p in pairs)
    loners = {tuple(v.tolist()) for v in state.x[0, P + 4:]}
    assert {tuple(v.tolist()) for v in out.x[0, P:][~twos]} == loners
    if not bsm:  # protected tokens first (energy order), then set B
        assert twos.tolist() == [False] * 4 + [True] * 2
    assert not out.prop_attn and out.attention_bias(torch.float32) is None  # sizes weight averages only


def test_later_blocks_merge_only_the_highest_energy_tokens():
    """With r = 1 the later rule pairs the two highest-energy tokens, 3 (0.99 to token 2, 0.14 to token 4) and
    0, however dissimilar; the bipartite rule takes the best edge among all tokens instead (0 and 1, cosine 1)."""
    state = hand_made()
    later = PiToMe(ratio=0.875, margin=0.0, bsm=False)(state)  # r = floor(8 - 7) = 1
    first = PiToMe(ratio=0.875, margin=0.0, bsm=True)(state)
    assert later.x.shape[1] == first.x.shape[1] == 1 + 7
    assert torch.allclose(later.x[0, -1], (state.x[0, 4] + state.x[0, 1]) / 2)
    assert torch.allclose(first.x[0, 1:][first.size[0, 1:, 0] == 2], (state.x[0, 1] + state.x[0, 2]) / 2)


def test_token_counts_follow_the_keep_ratio_at_every_block(make_cfg, images):
    model = build_model(make_cfg("merge=pitome", "merge.ratio=0.95")).eval()
    counts: list[int] = []
    for block in model.vit.blocks:
        block.mlp.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1]))
    with torch.no_grad():
        state = model.forward_tokens(images)
    T = 196
    for count in counts:
        T -= math.floor(T - T * 0.95)
        assert count == 1 + T
    assert state.num_tokens == counts[-1] < 197
    assert torch.allclose(state.size.sum(dim=1), torch.full((2, 1), 197.0))
    assert torch.equal(state.size[:, 0], torch.ones(2, 1))
    margins = [m.margin for m in model.merges.values()]
    assert margins[0] == 0.75 and margins[6] == pytest.approx(0.375)
    assert [m.bsm for m in model.merges.values()] == [True] * 6 + [False] * 6


def test_proportional_attention_is_optional(make_cfg, images):
    plain = build_model(make_cfg("merge=pitome")).eval()
    prop = build_model(make_cfg("merge=pitome", "merge.prop_attn=true")).eval()
    prop.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(images), prop(images))
        assert prop.forward_tokens(images).prop_attn


def test_a_list_gives_each_merging_block_its_ratio(make_cfg):
    model = build_model(make_cfg("merge=pitome", "merge.layer=[2,5]", "merge.ratio=[0.9,0.5]"))
    assert {k: m.ratio for k, m in model.merges.items()} == {"2": 0.9, "5": 0.5}


@pytest.mark.parametrize("overrides, message", [
    (["merge.ratio=0"], r"merge.ratio=0: accepted a keep ratio in \[0.5, 1\]"),
    (["merge.ratio=1.2"], r"merge.ratio=1.2: accepted a keep ratio in \[0.5, 1\]"),
    (["merge.ratio=0.3"], r"merge.ratio=0.3: accepted"),
    (["merge.layer=[2,5]", "merge.ratio=[0.9,0.9,0.9]"], r"merge.ratio=\[0.9, 0.9, 0.9\]: 3 values for 2 merging"),
    (["merge.margin=1.5"], r"merge.margin=1.5: the energy margin .* accepted a number in \[0, 1\]"),
    (["merge.prop_attn=maybe"], r"merge.prop_attn='maybe': accepted true or false"),
])
def test_bad_pitome_configs(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg("merge=pitome", *overrides))
