"""Measurement: FLOPs convention, tokens, parameter groups, saved-for-backward memory, measuring changes nothing."""
from __future__ import annotations

import pytest
import torch

from fpet import build_model
from fpet.profile import count_flops, count_parameters, count_tokens_out, measure_training, profile_model, \
    saved_for_backward_bytes


def test_vit_b16_gflops_in_fvcore_convention_with_fused_attention(make_cfg):
    model = build_model(make_cfg("backbone=vit_b16", "backbone.checkpoint=null", "pet=adaptformer",
                                 "dataset.num_classes=1000"))
    # 17.58 G for the plain ViT-B/16 (docs/differences.md, "Measurement conventions") + 12 * 197 * 2 * 768 * 8 for AdaptFormer's adapters;
    # attention matmuls alone are 12 * 2 * 197^2 * 768 = 0.715 G, so dropping them would fail this.
    assert count_flops(model, 224) == pytest.approx(17.58 + 0.029, abs=0.01)


def test_tokens_and_parameter_groups(make_cfg):
    model = build_model(make_cfg())
    assert count_tokens_out(model, 224) == 197
    params = count_parameters(model)
    assert params["params_head"] == 64 * 6 + 6
    assert params["params_pet"] == 12 * 2 * (64 * 8 + 8 * 64)
    assert params["params_merge"] == 0
    assert params["params_trainable"] == params["params_pet"] + params["params_head"]


def test_saved_for_backward_grows_with_batch(make_cfg):
    model = build_model(make_cfg()).train()
    sizes = []
    for batch in (2, 4):
        x, y = torch.randn(batch, 3, 224, 224), torch.zeros(batch, dtype=torch.long)
        sizes.append(saved_for_backward_bytes(model, lambda: torch.nn.functional.cross_entropy(model(x), y)))
    assert sizes[0] > 0 and sizes[1] == pytest.approx(2 * sizes[0], rel=0.02)


def test_measuring_training_does_not_change_the_model(make_cfg):
    model = build_model(make_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = measure_training(model, batch=2, img_size=224, num_classes=6, repeats=1, warmup=0)
    assert out["train_s_per_iter"] > 0 and out["train_act_mb"] > 0 and out["peak_mem_mb"] is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_profile_skips_disabled_parts(make_cfg):
    cfg = make_cfg("bench.latency=false", "bench.train=false", "bench.flops=false")
    out = profile_model(build_model(cfg), cfg.bench, 224, 6)
    assert out["latency_ms"] is None and out["train_s_per_iter"] is None and out["gflops"] is None
    assert out["tokens_out"] == 197


def test_a_long_measurement_shows_progress_and_a_short_one_prints_nothing(monkeypatch, capsys):
    import fpet.profile as profile

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    profile.measure_latency(model, 2, 8, repeats=2, warmup=1)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(profile, "PROGRESS_DELAY_S", 0.0)  # as if each forward took minutes (ViT-B/16, CPU)
    profile.measure_latency(model, 2, 8, repeats=2, warmup=1)
    err = capsys.readouterr().err
    assert "latency (batch 2)" in err and "/3 [" in err  # warm-up + timed forwards


def test_compare_reparam_prints_a_line_per_measurement(monkeypatch, capsys):
    from fake_vtab import load_script

    script = load_script("compare_reparam")
    monkeypatch.setattr("sys.argv", ["compare_reparam.py", "--rounds", "1", "backbone=vit_micro",
                                     "bench.infer_batch=2", "bench.repeats=1", "bench.warmup=0"])
    script.main()
    assert torch.is_grad_enabled()  # the script leaves this process's grad mode alone
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("round 1/1 ")]
    assert [x.split(":")[0] for x in lines] == [f"round 1/1 {name}" for name in script.VARIANTS]
    assert all("ms/img" in x and "s of timing so far" in x for x in lines)
