"""merge=diffrate: sort by class attention, prune, merge on a hand-made input; the published schedule's token counts;
prefix tokens first; gradients never reaching the frozen backbone; the rate search (FLOPs count, fewer tokens for a
lower target, schedule written to the run directory and reused); bad configs."""
from __future__ import annotations

import json

import pytest
import torch

from fpet import build_model
from fpet.merge import diffrate_search as search_module
from fpet.merge.diffrate import SCHEDULE_NAME, DiffRate, ScheduleMissingError
from fpet.merge.diffrate_search import DiffRateSearch, search_flops, search_schedule
from fpet.merge.schedule import geometry
from fpet.profile import count_flops
from fpet.select import ScoringInput
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config


def hand_made(num_prefix: int = 1) -> TokenState:
    """`num_prefix` prefix tokens + 6 patches. Class attention (per patch, both heads) 0.1, 0.3, 0.02, 0.25, 0.2,
    0.13: order 1, 3, 4, 5, 0, 2. Features: patch 4 equals patch 1, patch 5 is twice patch 3 (cosine 1 each)."""
    e = torch.eye(4)
    patches = torch.stack([e[2], e[0], e[3], e[1], e[0], 2 * e[1]])
    x = torch.cat([torch.full((num_prefix, 4), 0.5), patches])[None]
    attention = torch.tensor([0.1, 0.3, 0.02, 0.25, 0.2, 0.13])
    cls_attn = torch.cat([torch.full((num_prefix,), 0.1), attention])[None, None].expand(1, 2, -1)
    return TokenState(x, num_prefix=num_prefix, cls_attn=cls_attn)


@pytest.mark.parametrize("num_prefix", [1, 3])
def test_prunes_the_least_attended_then_merges_into_the_most_similar(num_prefix):
    state = hand_made(num_prefix)
    out = DiffRate(prune_kept=5, merge_kept=3)(state)  # class + 4 patches after pruning, class + 2 after merging
    P = num_prefix
    assert out.x.shape == (1, P + 2, 4)
    assert torch.equal(out.x[:, :P], state.x[:, :P]) and torch.equal(out.size[:, :P], torch.ones(1, P, 1))
    assert torch.allclose(out.x[0, P], state.x[0, P + 1])                      # (p1 + p4) / 2 = p1
    assert torch.allclose(out.x[0, P + 1], 1.5 * state.x[0, P + 3])            # (p3 + p5) / 2, a plain mean
    assert out.size[0, P:, 0].tolist() == [2.0, 2.0]                          # similarity 1: sizes add up
    pruned_only = DiffRate(prune_kept=5, merge_kept=5)(state)
    assert torch.equal(pruned_only.x[0, P:], state.x[0, [P + 1, P + 3, P + 4, P + 5]])


def test_source_sizes_are_scaled_by_their_match_similarity():
    state = hand_made()
    x = state.x.clone()
    x[0, 5] = torch.tensor([0.6, 0.8, 0.0, 0.0])  # patch 4: cosine 0.6 to p1 (e0), 0.8 to p3 (e1)
    out = DiffRate(prune_kept=4, merge_kept=3)(state.replace(x=x, cls_attn=state.cls_attn))
    assert out.size[0, 1:, 0].tolist() == pytest.approx([1.0, 1.8])


def test_token_counts_follow_the_published_schedule(make_cfg, images):
    cfg = make_cfg("merge=diffrate")
    model = build_model(cfg).eval()
    counts: list[int] = []
    for block in model.vit.blocks:
        block.mlp.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1]))
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert counts == [min(p, m) for p, m in zip(cfg.merge.prune_kept, cfg.merge.merge_kept)]
    assert state.num_tokens == 3 and torch.equal(state.size[:, 0], torch.ones(2, 1))


def test_the_search_flops_count_matches_fvcore_and_vit_b_without_reduction(make_cfg):
    """Nothing removed: the official count is fvcore's (vit_micro: within the norms and softmaxes it leaves out) and
    ViT-B/16's 17.58 G multiply-adds (FPET paper)."""
    model = build_model(make_cfg("merge=none"))
    geo = geometry(model.vit)
    with torch.no_grad():
        micro = float(search_flops({3: DiffRateSearch(196, 197)}, geo, 16, 6)) / 1e9  # one candidate: all kept
        vit_b = float(search_flops({3: DiffRateSearch(196, 197)}, geo._replace(embed_dim=768), 16, 1000)) / 1e9
    assert micro == pytest.approx(count_flops(model, 224), rel=0.05)
    assert vit_b == pytest.approx(17.58, rel=0.005)


SEARCH = ["merge=diffrate", "merge.search.steps=4", "merge.search.batch_size=2", "merge.search.arch_lr=0.5",
          "merge.search.flops_weight=10000", "merge.search.target_gflops=0.03"]


def test_the_search_lowers_the_counts_towards_the_target_and_leaves_the_model_alone(make_cfg):
    cfg = make_cfg(*SEARCH, "merge.search.model_lr=0")
    model = build_model(make_cfg("merge=diffrate"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.rand(2, 3, 224, 224, generator=gen), torch.tensor([0, 1])

    record = search_schedule(model, cfg, list(range(12)), batches)
    assert record["prune_kept"][0] == record["merge_kept"][0] == 197               # block 0 never compressed
    assert all(p < 101 and m < 101 for p, m in zip(record["prune_kept"][1:], record["merge_kept"][1:]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_run_directory_keeps_the_searched_schedule_and_a_resume_reuses_it(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*SEARCH)
    cache = tmp_path / "run" / "fisher.safetensors"
    cache.parent.mkdir()
    model = build_model(cfg, ScoringInput(cache=cache))
    stored = json.loads((tmp_path / "run" / SCHEDULE_NAME).read_text())
    assert [m.merge_kept for m in model.merges.values()] == stored["merge_kept"]
    assert stored["merge_kept"] != list(cfg.merge.merge_kept)

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(search_module, "search_schedule", no_search)
    again = build_model(cfg, ScoringInput(cache=cache))
    assert [m.prune_kept for m in again.merges.values()] == stored["prune_kept"]
    evaluated = build_model(cfg, ScoringInput(task_file=tmp_path / "run" / "task.safetensors"))
    assert [m.merge_kept for m in evaluated.merges.values()] == stored["merge_kept"]
    with pytest.raises(ScheduleMissingError, match="diffrate_schedule.json is not next to the task file"):
        build_model(cfg, ScoringInput(task_file=tmp_path / "elsewhere" / "task.safetensors"))


@pytest.mark.parametrize("overrides, message", [
    (["merge.layer=[3,6]"], r"merge.prune_kept=\[197, .*\]: 12 counts for 2 merging block\(s\)"),
    (["merge.layer=[3,6]", "merge.prune_kept=[150,100]", "merge.merge_kept=[1,100]"],
     r"merge.merge_kept=\[1, 100\]: accepted a list of 2 token counts .* 2..197"),
    (["merge.layer=6", "merge.prune_kept=[300]", "merge.merge_kept=[100]"], r"merge.prune_kept=\[300\]"),
    (["merge.search.steps=-1"], r"merge.search.steps=-1: accepted an integer >= 0"),
    (["merge.search.target_gflops=0"], r"merge.search.target_gflops=0: accepted a positive number"),
    (["merge.search.granularity=0"], r"merge.search.granularity=0: accepted a positive integer"),
])
def test_bad_diffrate_configs(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg("merge=diffrate", *overrides))


@pytest.mark.slow
def test_a_run_searches_once_trains_and_writes_the_schedule_into_its_directory(make_cfg, tmp_path):
    from fpet.train import run

    cfg = make_cfg(*SEARCH[:-1], "merge.search.steps=2", "merge.search.target_gflops=0.1", "dataset=synthetic",
                   "bench.latency=false", "bench.train=false", "train.save_task=true")
    results = run(cfg, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / SCHEDULE_NAME).read_text())
    assert results["merge"] == "diffrate" and stored["steps"] == 2
    assert results["tokens_out"] == min(stored["prune_kept"] + stored["merge_kept"])  # counts only ever fall
