"""ToMe's schedules (`merge.r=[r, inflection]`) and its k-th / random bipartite splits (`merge.split=kth|random`)."""
from __future__ import annotations

import pytest
import torch

from fpet import build_model
from fpet.merge import BipartiteSoftMatching
from fpet.merge.bipartite import kth_split, random_split, tome_schedule
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config


def test_schedule_is_tomes_parse_r():
    assert tome_schedule(8, 12) == [8] * 12
    assert tome_schedule(None, 3) == [None] * 3
    # ToMe's (16, -1): lo = 32, hi = 0, r_l = int(32 - l * 32 / 11)
    assert tome_schedule([16, -1], 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert tome_schedule([16, 1], 12) == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]
    assert tome_schedule([10, 0.5], 3) == [5, 10, 15]
    assert tome_schedule([10, -1], 1) == [20]


def test_decreasing_schedule_in_the_model_clips_to_set_a(make_cfg, images):
    model = build_model(make_cfg("merge=tome", "merge.r=[16,-1]")).eval()
    assert [m.r for m in model.merges.values()] == tome_schedule([16, -1], 12)
    expected = 197
    for r in tome_schedule([16, -1], 12):
        expected -= min(r, (expected - 1 + 1) // 2)  # stripe: A = the even positions among 1 .. N - 1
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert state.x.shape[1] == expected and torch.equal(state.size.sum(1), torch.full((2, 1), 197.0))
    assert torch.equal(state.size[:, 0], torch.ones(2, 1))


def test_schedule_over_listed_layers(make_cfg):
    model = build_model(make_cfg("merge=tome", "merge.r=[10,-1]", "merge.layer=[2,5,8]"))
    assert {k: m.r for k, m in model.merges.items()} == {"2": 20, "5": 10, "8": 0}


def test_kth_split_layout():
    a, b = kth_split(10, 1, 3)  # class token + 9 patches
    assert b.tolist() == [3, 6, 9] and a.tolist() == [1, 2, 4, 5, 7, 8]


def test_kth_merges_all_of_a_into_every_kth_token():
    x, keys = torch.randn(2, 10, 8), torch.randn(2, 10, 4)
    merge = BipartiteSoftMatching(r=None, split="kth", k=3)
    out = merge(TokenState(x, keys=keys, grid=(3, 3)))
    assert out.x.shape == (2, 4, 8) and torch.equal(out.x[:, 0], x[:, 0])
    assert torch.equal(out.size.sum(1), torch.full((2, 1), 10.0))
    # each B token's value is the mean of itself and the A tokens whose best B match it is
    k = keys / keys.norm(dim=-1, keepdim=True)
    a, b = kth_split(10, 1, 3)
    best = (k[:, a] @ k[:, b].mT).argmax(-1)
    for i in range(2):
        for j, pos in enumerate(b.tolist()):
            members = [pos] + [a[m].item() for m in range(len(a)) if best[i, m] == j]
            assert torch.allclose(out.x[i, 1 + j], x[i, members].mean(0), atol=1e-6)
            assert out.size[i, 1 + j, 0] == len(members)


def test_random_split_differs_per_image_and_keeps_the_prefix():
    torch.manual_seed(0)
    a, b = random_split(4, 17, 1, 5)
    assert a.shape == (4, 5) and b.shape == (4, 11)
    for i in range(4):
        assert sorted(a[i].tolist() + b[i].tolist()) == list(range(1, 17))
    assert len({tuple(sorted(row.tolist())) for row in a}) > 1
    x = torch.randn(4, 17, 8)
    out = BipartiteSoftMatching(r=5, split="random")(TokenState(x, keys=torch.randn(4, 17, 4), grid=(4, 4)))
    assert out.x.shape == (4, 12, 8) and torch.equal(out.x[:, 0], x[:, 0])
    assert torch.equal(out.size.sum(1), torch.full((4, 1), 17.0))


@pytest.mark.parametrize("split, tokens", [("kth", 197 - 6 * 12), ("random", 197 - 6 * 12)])
def test_splits_in_the_model(make_cfg, images, split, tokens):
    model = build_model(make_cfg("merge=tome", "merge.r=6", f"merge.split={split}", "merge.k=3")).eval()
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert state.x.shape[1] == tokens and torch.equal(state.size.sum(1), torch.full((2, 1), 197.0))


def test_run_tags_name_schedule_and_split(make_cfg):
    assert make_cfg("merge=tome").merge.tag == "tome_r8"
    assert make_cfg("merge=tome", "merge.r=[16,-1]").merge.tag == "tome_r16i-1"
    assert make_cfg("merge=tome", "merge.split=kth", "merge.k=4").merge.tag == "tome_r8_kth4"
    assert make_cfg("merge=bsm").merge.tag == "bsm_l6_stripe"
    assert make_cfg("merge=bsm", "merge.split=random").merge.tag == "bsm_l6_random"


@pytest.mark.parametrize("overrides, message", [
    (["merge=tome", "merge.r=[16,2]"], r"merge.r=\[16, 2\]: ToMe's schedule \[r, inflection\] .* \[-1, 1\]"),
    (["merge=tome", "merge.r=[0,-1]"], r"merge.r=\[0, -1\]: ToMe's schedule"),
    (["merge=tome", "merge.r=[1,2,3]"], r"merge.r=\[1, 2, 3\]: accepted 1\.\.98 or null .* or ToMe's schedule \[r, inflection\]"),
    (["merge=tome", "merge.split=kth", "merge.k=1"], r"merge.k=1: merge.split=kth .* accepted an integer 2\.\.196"),
    (["merge=fpet", "merge.split=random"], r"merge.split='random': accepted \['stripe', 'checkerboard'\]"),
])
def test_bad_schedule_and_split_configs(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg(*overrides))
