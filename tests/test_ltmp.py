"""merge=ltmp: threshold masks, the FLOPs-budget loss, merging then pruning on a hand-made input, masked and
removed forms agreeing at batch size 1, gradients reaching the thresholds and never the frozen backbone."""
from __future__ import annotations

import pytest
import torch

from fpet import build_model
from fpet.merge.ltmp import LTMP, relative_flops, threshold_mask
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config
from fpet.vit import training_loss


def test_threshold_mask_is_hard_forward_and_sigmoid_backward():
    values = torch.tensor([0.2, 0.5, 0.9])
    theta = torch.tensor([0.5], requires_grad=True)
    mask = threshold_mask(values, theta, 0.1)
    assert mask.tolist() == [0.0, 0.0, 1.0]
    mask.sum().backward()
    soft = torch.sigmoid((values - 0.5) / 0.1)
    assert torch.allclose(theta.grad, -(soft * (1 - soft) / 0.1).sum())


def test_relative_flops_is_the_official_formula():
    assert relative_flops(((197.0, 197.0),) * 12, 768) == pytest.approx(1.0)
    n, d = 197, 768
    half = (2 * n * d**2 + n**2 * d + 4 * 98 * d**2) / (6 * n * d**2 + n**2 * d)
    assert relative_flops(((197.0, 98.0), (197.0, 197.0)), d) == pytest.approx((half + 1) / 2)


def hand_made(batch: int = 1):
    """Class token + 6 tokens. Keys: token 2 equals token 1 (cosine 1), all others orthogonal. Attention received:
    token 5 gets 0.01, the rest 0.2."""
    x = torch.arange(7 * 4, dtype=torch.float).view(1, 7, 4).repeat(batch, 1, 1)
    keys = torch.eye(7)
    keys[2] = keys[1]
    received = torch.full((batch, 7), 0.2)
    received[:, 5] = 0.01
    return TokenState(x, grid=(2, 3), keys=keys.expand(batch, 7, 7), attn_received=received)


def ltmp(**kwargs) -> LTMP:
    merge = LTMP(merge_init=0.9, prune_init=0.05, **kwargs)
    return merge.eval()


def test_merges_above_the_threshold_then_prunes_low_attention():
    state = hand_made()
    with torch.no_grad():
        masked = ltmp(inference="masked")(state)
        removed = ltmp()(state)
    assert masked.mask[0, :, 0].tolist() == [1, 1, 0, 1, 1, 0, 1]  # 2 merged into 1, 5 pruned
    assert removed.mask is None and removed.x.shape == (1, 5, 4)
    assert torch.equal(removed.x[:, 0], state.x[:, 0])  # class token first and untouched
    assert torch.allclose(removed.x[0, 1], (state.x[0, 1] + state.x[0, 2]) / 2)
    assert torch.equal(removed.x[0, 2:], state.x[0, [3, 4, 6]])
    assert removed.size[0, :, 0].tolist() == [1, 2, 1, 1, 1]
    assert masked.kept_counts().tolist() == [5] and removed.kept_counts().tolist() == [5]


def test_a_larger_batch_stays_masked_in_inference():
    with torch.no_grad():
        out = ltmp()(hand_made(batch=3))
    assert out.x.shape == (3, 7, 4) and out.kept_counts().tolist() == [5, 5, 5]


def test_sizes_are_conserved_by_merging(make_cfg, images):
    model = build_model(make_cfg("merge=ltmp", "merge.merge_init=0.2")).eval()  # prune threshold 0: no pruning
    with torch.no_grad():
        masked = model.forward_tokens(images)
        hard = model.forward_tokens(images[:1])
    kept = masked.mask > 0
    assert (masked.kept_counts() < 197).all()
    assert torch.allclose((masked.size * kept).sum(1), torch.full((2, 1), 197.0))
    assert torch.allclose(hard.size.sum(1), torch.full((1, 1), 197.0))
    assert torch.equal(masked.size[:, 0], torch.ones(2, 1)) and kept[:, 0].all()


def set_thresholds(model, merge: float, prune: float):
    for m in model.merges.values():
        m.merge_threshold.data.fill_(merge)
        m.prune_threshold.data.fill_(prune)
    return model


def test_masked_and_removed_forms_agree_at_batch_size_1(make_cfg, images):
    hard_model = set_thresholds(build_model(make_cfg("merge=ltmp")), 0.3, 0.004).eval()
    masked_model = set_thresholds(build_model(make_cfg("merge=ltmp", "merge.inference=masked")), 0.3, 0.004).eval()
    masked_model.load_state_dict(hard_model.state_dict())
    with torch.no_grad():
        batch = masked_model.forward_tokens(images)
        for i in range(2):
            hard = hard_model.forward_tokens(images[i:i + 1])
            single = masked_model.forward_tokens(images[i:i + 1])
            assert hard.x.shape[1] == int(single.kept_counts()) == int(batch.kept_counts()[i]) < 150
            assert torch.allclose(hard_model.forward_head(hard.x), masked_model.forward_head(single.x), atol=1e-4)
            assert torch.allclose(hard_model.forward_head(hard.x), masked_model.forward_head(batch.x[i:i + 1]),
                                  atol=1e-4)


def test_gradients_reach_thresholds_and_pet_never_the_frozen_backbone(make_cfg, images):
    model = set_thresholds(build_model(make_cfg("pet=lora", "merge=ltmp")), 0.3, 0.004).train()
    loss = training_loss(model, images, torch.tensor([0, 1]))
    loss.backward()
    merges = [m for m in model.merges.values()]
    assert all(m.merge_threshold.grad is not None and m.prune_threshold.grad is not None for m in merges)
    assert sum(bool(m.merge_threshold.grad.abs().sum() > 0) for m in merges) >= 6
    assert sum(bool(m.prune_threshold.grad.abs().sum() > 0) for m in merges) >= 6
    frozen = [p for n, p in model.vit.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_flops_loss_reaches_the_thresholds_and_constrain_clamps_them(make_cfg, images):
    model = build_model(make_cfg("merge=ltmp", "merge.reduction_target=0.3", "merge.reg_scale=1000")).train()
    set_thresholds(model, 0.3, 0.004)  # as the official code, only merged tokens carry the merge-mask gradient
    state = model.forward_tokens(images)
    aux = next(iter(model.merges.values())).aux_loss(state)
    assert aux > 0
    aux.backward()
    grads = torch.cat([torch.cat([m.merge_threshold.grad, m.prune_threshold.grad]) for m in model.merges.values()])
    assert torch.isfinite(grads).all() and (grads != 0).sum() >= 12
    for m in model.merges.values():
        m.merge_threshold.data.fill_(1.7)
        m.prune_threshold.data.fill_(-0.2)
    model.constrain_parameters()
    assert all(float(m.merge_threshold) == 1.0 and float(m.prune_threshold) == 0.0 for m in model.merges.values())


def test_aux_loss_only_in_training(make_cfg, images):
    model = build_model(make_cfg("merge=ltmp")).eval()
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert next(iter(model.merges.values())).aux_loss(state) is None


@pytest.mark.parametrize("overrides, message", [
    (["merge.merge_init=1.5"], r"merge.merge_init=1.5: a threshold .* accepted a number in \[0, 1\]"),
    (["merge.prune_init=-0.1"], r"merge.prune_init=-0.1: a threshold"),
    (["merge.tau=0"], r"merge.tau=0: accepted a positive number"),
    (["merge.reduction_target=0"], r"merge.reduction_target=0: the FLOPs ratio to reach; accepted \(0, 1\]"),
    (["merge.inference=hard"], r"merge.inference='hard': accepted \['auto', 'masked'\]"),
])
def test_bad_ltmp_configs(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg("merge=ltmp", *overrides))


def test_a_run_trains_ltmp_and_reports_tokens_kept(make_cfg, tmp_path):
    from fpet.train import run

    results = run(make_cfg("merge=ltmp", "dataset=synthetic", "bench.latency=false", "bench.train=false"),
                  tmp_path / "run")
    kept = results["tokens_kept"]
    assert kept["images"] == 64 and kept["min"] <= kept["mean"] <= kept["max"] <= 197
    assert results["params_merge"] == 24 and results["merge"] == "ltmp"
