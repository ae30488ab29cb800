"""Merge strategies: splits, ToMe's matching against a brute-force reference, FPET's differentiable matching and its
gradients, pooling, token counts / sizes / class-token position in the full model, bad configurations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fpet import build_model
from fpet.merge import (AvgPool, BipartiteSoftMatching, FPETMerge, MaxPool, MergeConfigError,
                        bipartite_differentiable_matching, bipartite_soft_matching, checkerboard_split, stripe_split)
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config

STRATEGIES = ("tome", "bsm", "fpet", "avgpool", "maxpool")
POOLS = {"avg": AvgPool, "max": MaxPool}


def st(x: torch.Tensor, keys=None, size=None, grid=(14, 14), num_prefix: int = 1) -> TokenState:
    """A token state for calling a strategy directly."""
    return TokenState(x, num_prefix=num_prefix, grid=grid, size=size, keys=keys)


def zero_refinement(merge: FPETMerge) -> FPETMerge:
    """Make the refinement adapter output 0 (a zero latent 1-bit weight quantises to 0): refined keys = keys."""
    torch.nn.init.zeros_(merge.refinement.up.weight)
    return merge


# ---------------------------------------------------------------- splits

def test_stripe_split_is_tomes_alternating_split_without_the_class_token():
    a, b = stripe_split(197, num_prefix=1)
    assert a.tolist() == list(range(2, 197, 2)) and b.tolist() == list(range(1, 197, 2))
    a, b = stripe_split(198, num_prefix=2)  # DeiT distilled: class and distillation tokens in neither set
    assert a.min() == 2 and b.min() == 3 and len(a) == len(b) == 98


@pytest.mark.parametrize("grid, sizes", [((14, 14), (98, 98)), ((7, 7), (25, 24)), ((3, 4), (6, 6))])
def test_checkerboard_split_layout(grid, sizes):
    rows, cols = grid
    a, b = checkerboard_split(grid, num_prefix=1)
    assert (len(a), len(b)) == sizes
    assert sorted(a.tolist() + b.tolist()) == list(range(1, 1 + rows * cols))
    row, col = lambda p: (p - 1) // cols, lambda p: (p - 1) % cols
    assert all((row(p) + col(p)) % 2 == 0 for p in a.tolist())
    if grid == (14, 14):  # official order: (even, even) raster then (odd, odd); B: (odd, even) then (even, odd)
        assert [(row(p), col(p)) for p in a[:2].tolist() + a[49:50].tolist()] == [(0, 0), (0, 2), (1, 1)]
        assert [(row(p), col(p)) for p in b[:2].tolist() + b[49:50].tolist()] == [(1, 0), (1, 2), (0, 1)]


# ---------------------------------------------------------------- ToMe / BSM

def brute_force_tome(x: torch.Tensor, keys: torch.Tensor, r: int, a_idx: list[int], b_idx: list[int],
                     prefix: int) -> torch.Tensor:
    """Reference: one sample, loops; sum-merge of the r A tokens with the highest best-match similarity."""
    k = F.normalize(keys, dim=-1)
    best = {i: max(b_idx, key=lambda j: float(k[i] @ k[j])) for i in a_idx}
    score = {i: float(k[i] @ k[best[i]]) for i in a_idx}
    moved = sorted(a_idx, key=lambda i: -score[i])[:r]
    out_b = {j: x[j].clone() for j in b_idx}
    for i in moved:
        out_b[best[i]] += x[i]
    kept = [x[i] for i in a_idx if i not in moved]
    return torch.stack([x[i] for i in range(prefix)] + kept + [out_b[j] for j in b_idx])


@pytest.mark.parametrize("r", [1, 5, 12])
def test_bipartite_soft_matching_equals_brute_force(r):
    gen = torch.Generator().manual_seed(r)
    x, keys = torch.randn(2, 25, 3, generator=gen), torch.randn(2, 25, 8, generator=gen)
    a, b = stripe_split(25, 1)
    out = bipartite_soft_matching(keys, r, a, b, num_prefix=1)(x, "sum")
    assert out.shape == (2, 25 - r, 3)
    for n in range(2):
        expected = brute_force_tome(x[n], keys[n], r, a.tolist(), b.tolist(), 1)
        assert torch.allclose(out[n], expected, atol=1e-6)


def test_tome_protects_the_class_token_even_when_it_is_the_best_match():
    keys = torch.randn(1, 9, 4)
    keys[:, 0] = keys[:, 1]  # class token identical to a B token and to ...
    keys[:, 2] = keys[:, 1]  # ... an A token
    merge = BipartiteSoftMatching(r=4, split="stripe")
    x = torch.randn(1, 9, 3)
    out = merge(st(x, keys, grid=(2, 4)))
    assert torch.equal(out.x[:, 0], x[:, 0]) and out.size[0, 0, 0] == 1 and out.size.sum() == 9


def test_matching_has_no_gradient():
    keys = torch.randn(2, 17, 8, requires_grad=True)
    x = torch.randn(2, 17, 4, requires_grad=True)
    out = BipartiteSoftMatching(r=4, split="checkerboard")(st(x, keys, grid=(4, 4))).x
    out.sum().backward()
    assert keys.grad is None and x.grad is not None


# ---------------------------------------------------------------- FPET

def test_hard_matrix_is_one_hot_and_equals_the_official_threshold_without_ties():
    scores = torch.randn(3, 20, 21)
    hard = bipartite_differentiable_matching(scores)
    top2 = scores.topk(2, dim=-1).values.mean(-1, keepdim=True)
    assert torch.equal(hard, (torch.sigmoid(scores - top2) > 0.5).float())  # official rule
    assert torch.equal(hard.sum(-1), torch.ones(3, 20)) and set(hard.unique().tolist()) == {0.0, 1.0}
    tied = torch.zeros(1, 4, 5)  # every score tied: the official threshold selects nothing, ours one column
    assert torch.equal(bipartite_differentiable_matching(tied).sum(-1), torch.ones(1, 4))


def test_straight_through_gradient_is_the_soft_matrix_gradient():
    scores = torch.randn(2, 6, 7, requires_grad=True)
    weight = torch.randn(2, 6, 7)
    (grad_ste,) = torch.autograd.grad((bipartite_differentiable_matching(scores) * weight).sum(), scores)
    top2 = scores.topk(2, dim=-1).values.mean(-1, keepdim=True)
    (grad_soft,) = torch.autograd.grad((torch.sigmoid(scores - top2) * weight).sum(), scores)
    assert torch.allclose(grad_ste, grad_soft) and grad_ste.abs().sum() > 0


def test_fpet_merges_every_a_token_into_its_b_match_size_weighted():
    # 1 class token + 2x2 grid: A = cells (0,0), (1,1) at positions 1, 4; B = (1,0), (0,1) at positions 3, 2
    merge = zero_refinement(FPETMerge(head_dim=2)).eval()
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    keys = torch.stack([e1, e1, e2, e1, e2])[None]  # class key equals A token 1's key: must still not be chosen
    x = torch.arange(5.0)[None, :, None].expand(1, 5, 2)
    size = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0])[None, :, None]
    out = merge(st(x, keys, size, grid=(2, 2)))
    out, new_size = out.x, out.size
    # B order: position 3 (key e1) gets A position 1; position 2 (key e2, size 3) gets A position 4
    assert new_size.flatten().tolist() == [1.0, 2.0, 4.0]
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, (3 + 1) / 2, (2 * 3 + 4) / 4]))


def test_fpet_hard_matrix_never_selects_prefix_tokens(make_cfg, images):
    model = build_model(make_cfg("merge=fpet")).eval()
    merge = model.merges["6"]
    x, keys = torch.randn(2, 197, 64), torch.randn(2, 197, 32)
    keys[:, 0] = keys[:, 1] * 5  # class key parallel to A token (0, 0)'s key: its best match if it were allowed
    x[:, 0] = 1e3
    with torch.no_grad():
        merged = merge(st(x, keys))
    out, size = merged.x, merged.size
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(size[:, 0], torch.ones(2, 1))
    assert out[:, 1:].abs().max() < 1e2  # no A token went into the class token either


def test_fpet_gradient_reaches_refinement_but_not_the_keys():
    x = torch.randn(2, 17, 8)
    target = torch.randn(2, 9, 8)
    for stop_grad in (True, False):
        merge = FPETMerge(head_dim=8, stop_grad=stop_grad)
        keys = torch.randn(2, 17, 8, requires_grad=True)
        out = merge(st(x, keys, grid=(4, 4))).x
        loss = ((out - target) ** 2).sum()
        grads = torch.autograd.grad(loss, [keys, *merge.refinement.parameters()], allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads[1:])  # down and up both learn
        assert (grads[0] is None) == stop_grad  # the stop: nothing flows back into the backbone keys


def test_fpet_in_the_model_trains_refinement_and_keeps_fused_attention_mask_gradient_free(make_cfg, images):
    model = build_model(make_cfg("merge=fpet", "pet=lora")).train()
    refinement = model.merges["6"].refinement
    assert all(p.requires_grad for p in refinement.parameters())
    sizes = []
    hook = model.merges["6"].register_forward_hook(lambda m, i, o: sizes.append(o.size))
    model(images).logsumexp(-1).sum().backward()
    hook.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refinement.parameters())
    assert not sizes[0].requires_grad  # size_grad=false: the proportional-attention mask keeps the fused path


def test_fpet_stop_grad_keeps_backbone_key_path_out_of_the_graph(make_cfg, images):
    """With stop_grad the keys' only consumer is detached: d loss / d keys of the merging layer is None (the keys
    carry a graph: LoRA in the blocks before makes the block input depend on trainable parameters)."""
    for stop_grad, expect_none in (("true", True), ("false", False)):
        model = build_model(make_cfg("merge=fpet", f"merge.stop_grad={stop_grad}")).train()
        keys = []
        merge = model.merges["6"]
        hook = merge.register_forward_pre_hook(lambda m, args: keys.append(args[0].keys))
        loss = model(images).logsumexp(-1).sum()
        hook.remove()
        (grad,) = torch.autograd.grad(loss, keys[0], allow_unused=True)
        assert (grad is None) == expect_none


def test_fpet_refinement_adapter_shape_and_init():
    merge = FPETMerge(head_dim=64)
    assert sum(p.numel() for p in merge.parameters()) == 4096  # 64 -> 32 -> 64, no biases
    up = merge.refinement.up.weight
    assert up.abs().max() <= 0.002 and up.std() < 0.0015
    assert len(set(merge.refinement.up.quantized_weight().unique().tolist())) == 2  # 1-bit in the forward
    full = FPETMerge(head_dim=64, refine_bits=32)
    assert torch.count_nonzero(full.refinement.up.weight) == 0
    with pytest.raises(ValueError, match="merge.refine_bits=4"):
        FPETMerge(head_dim=64, refine_bits=4)
    with pytest.raises(ValueError, match="merge.refine_dim=0"):
        FPETMerge(head_dim=64, refine_dim=0)
    assert FPETMerge(head_dim=64, refine_dim=8).refinement.down.out_features == 8


# ---------------------------------------------------------------- pooling

@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pooling_merges_right_hand_neighbours(mode):
    x = torch.arange(1.0, 8.0)[None, :, None]  # class token 1, then a 2x3 grid 2..7 (odd width)
    size = torch.tensor([1.0, 1, 2, 1, 1, 1, 3])[None, :, None]
    merged = POOLS[mode]()(st(x, size=size, grid=(2, 3)))
    out, new_size = merged.x, merged.size
    assert new_size.flatten().tolist() == [1, 3, 1, 2, 3]  # pairs (2,3), (4), (5,6), (7); last column alone
    if mode == "avg":
        expected = [1, (2 + 3 * 2) / 3, 4, (5 + 6) / 2, 7]
    else:
        expected = [1.0, 3.0, 4.0, 6.0, 7.0]
    assert torch.allclose(out.flatten(), torch.tensor(expected))


# ---------------------------------------------------------------- in the model

TOKENS_OUT = {"tome": 101, "bsm": 99, "fpet": 99, "avgpool": 99, "maxpool": 99, "tome@11": 189}


@pytest.mark.parametrize("merge, layer", [(m, layer) for m in STRATEGIES if m != "tome" for layer in (0, 6, 11)]
                         + [("tome", None), ("tome", 11)])
def test_token_counts_sizes_sources_and_class_token(make_cfg, images, merge, layer):
    model = build_model(make_cfg(f"merge={merge}", f"merge.layer={'null' if layer is None else layer}")).eval()
    module = next(iter(model.merges.values()))
    seen = []
    hook = module.register_forward_hook(lambda m, args, out: seen.append((args[0].x, out.x)))
    with torch.no_grad():
        state = model.forward_tokens(images, track_source=True)
        plain = model(images)
    hook.remove()
    assert state.x.shape[1] == TOKENS_OUT[merge if layer is None or merge != "tome" else f"tome@{layer}"]
    assert torch.equal(state.size.sum(1), torch.full((2, 1), 197.0))  # every input token accounted for once
    assert torch.equal(state.source.sum(1), torch.ones(2, 197))
    assert torch.equal(state.source.sum(-1, keepdim=True), state.size)
    assert torch.equal(state.source[:, 0, 0], torch.ones(2)) and torch.equal(state.size[:, 0], torch.ones(2, 1))
    assert torch.equal(seen[0][1][:, 0], seen[0][0][:, 0])  # the class token passes through the merge untouched
    assert torch.allclose(model.forward_head(state.x), plain, atol=1e-5)  # tracking changes nothing


@pytest.mark.parametrize("merge", STRATEGIES)
def test_merging_identical_tokens_returns_that_token(make_cfg, merge):
    model = build_model(make_cfg(f"merge={merge}")).eval()
    module = next(iter(model.merges.values()))
    x = torch.randn(1, 1, 64).expand(2, 197, 64).contiguous()
    keys = torch.randn(2, 197, 32)
    with torch.no_grad():
        merged = module(st(x, keys, torch.ones(2, 197, 1)))
    assert torch.allclose(merged.x, x[:, : merged.x.shape[1]], atol=1e-5)
    assert merged.size.sum() == 2 * 197


# ---------------------------------------------------------------- other grids and bad input

@pytest.mark.parametrize("merge, tokens", [("fpet", 25), ("avgpool", 29), ("tome", 2), ("bsm", 26)])
def test_odd_7x7_grid_works(make_cfg, merge, tokens):
    extra = ["merge.r=null"] if merge == "bsm" else []
    model = build_model(make_cfg("backbone.img_size=112", f"merge={merge}", *extra)).eval()
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 112, 112))
    assert state.x.shape[1] == tokens and torch.equal(state.size.sum(1), torch.full((2, 1), 50.0))


@pytest.mark.parametrize("overrides, message", [
    (["merge=fpet", "merge.layer=12"], r"merge.layer=12: outside the backbone's 12 blocks; accepted an index 0\.\.11"),
    (["merge=fpet", "merge.layer=[2,12]"], r"merge.layer=\[2, 12\]: outside"),
    (["merge=bsm", "merge.layer=[]"], r"merge.layer=\[\]: an empty list"),
    (["merge=bsm", "merge.layer=-1"], r"merge.layer=-1: outside"),
    (["merge=tome", "merge.layer=3.5"], r"merge.layer=3.5: .* null merges at every block"),
    (["merge=bsm", "merge.r=99"], r"merge.r=99: accepted 1\.\.98 or null .* half of the 196 patch tokens"),
    (["merge=tome", "merge.r=0"], r"merge.r=0: accepted 1\.\.98"),
    (["merge=bsm", "backbone.img_size=112"], r"merge.r=98: accepted 1\.\.24 .* 49 patch tokens of a 7x7 grid"),
    (["merge=fpet", "backbone.img_size=16"], r"1x1 patch grid .* only 0 token"),
    (["merge=fpet", "merge.r=8"], r"merge.r=8: merge=fpet merges every token of set A"),
    (["merge=fpet", "merge.layer=null"], r"merge.layer=null: merge=fpet merges at chosen blocks"),
    (["merge=tome", "merge.split=checkerboard"], r"checkerboard needs the full patch grid"),
    (["merge=fpet", "merge.layer=[2,6]"], r"checkerboard needs the full patch grid"),
    (["merge=avgpool", "merge.layer=null"], r"merge.layer=null: merge=avgpool merges at chosen blocks"),
    (["merge=avgpool", "merge.layer=[2,6]"], r"merge=avgpool sits at most at 1 block"),
    (["merge=bsm", "merge.split=diagonal"], r"merge.split='diagonal': accepted \['stripe', 'checkerboard', 'kth', 'random'\]"),
])
def test_bad_merge_configs_are_clear_errors(make_cfg, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(make_cfg(*overrides))
    with pytest.raises(ConfigError, match=message):  # the same rule, reported before anything is built
        validate_config(make_cfg(*overrides))


def test_every_merge_problem_is_listed_at_once(make_cfg):
    with pytest.raises(MergeConfigError) as err:
        build_model(make_cfg("merge=tome", "merge.layer=12", "merge.r=0", "merge.split=diagonal"))
    assert [p.split(":")[0] for p in err.value.problems] == ["merge.layer=12", "merge.r=0", "merge.split='diagonal'"]


def test_grid_split_after_an_earlier_merge_is_a_clear_error():
    merge = BipartiteSoftMatching(r=2, split="checkerboard")
    with pytest.raises(ValueError, match=r"full 4x4 patch grid \(17 tokens\) but got 15 tokens"):
        merge(st(torch.randn(1, 15, 4), torch.randn(1, 15, 4), grid=(4, 4)))
    with pytest.raises(ValueError, match="merge=avgpool needs the full"):
        AvgPool()(st(torch.randn(1, 15, 4), grid=(4, 4)))


@pytest.mark.parametrize("merge, layers, tokens", [("tome", "[2,5,8]", 197 - 3 * 8), ("bsm", "[3,7]", 197 - 98 - 49),
                                                   ("fpet", "[2,9]", 50)])
def test_a_list_of_merge_layers_merges_at_each(make_cfg, images, merge, layers, tokens):
    extra = ["merge.split=stripe"] if merge == "fpet" else []
    model = build_model(make_cfg(f"merge={merge}", f"merge.layer={layers}", *extra)).eval()
    assert sorted(int(k) for k in model.merges) == [int(v) for v in layers.strip("[]").split(",")]
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert state.x.shape[1] == tokens and torch.equal(state.size.sum(1), torch.full((2, 1), 197.0))


def test_strategies_ask_only_for_the_statistics_they_use(make_cfg, images, monkeypatch):
    import fpet.vit

    asked = []
    real = fpet.vit.attention_stats
    monkeypatch.setattr(fpet.vit, "attention_stats", lambda q, k, b, needs, *rest: asked.append(needs) or real(q, k, b, needs, *rest))
    for merge in ("avgpool", "fpet"):
        asked.clear()
        with torch.no_grad():
            build_model(make_cfg(f"merge={merge}")).eval()(images)
        assert [n for n in asked if n] == ([] if merge == "avgpool" else [frozenset({"keys"})])
