"""The comparison PET methods (docs/pet.md, "Comparison methods"): parameter counts on ViT-B/16, train rules,
identity at init, prompt tokens under every merge strategy, exact folds, bad values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import merge_overrides
from fpet import build_model
from fpet.config import compose_config
from fpet.merge import MERGE_STRATEGIES
from fpet.pet import PETLayer, inference_model
from fpet.pet.convpass import ConvBypass
from fpet.pet.fact import FacTLinear
from fpet.pet.pack import task_tensors
from fpet.profile import count_flops, count_parameters
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config
from fpet.vit import block_forward

VIT_B16_COUNTS = {
    "bitfit": 12 * (2304 + 768 + 3072 + 768 + 768 + 768) + 768 + 768,     # 102,912: every bias
    "ln_tune": (12 * 2 + 1) * 2 * 768,                                     # 38,400: norm1, norm2, final norm
    "vpt_shallow": 10 * 768,                                               # 7,680 at p = 10
    "vpt_deep": 12 * 10 * 768,                                             # 92,160 at p = 10
    "ssf": 12 * 2 * (768 + 2304 + 768 + 768 + 3072 + 768) + 2 * 2 * 768,  # 205,824
    "fact_tt": 2 * 768 * 8 + 12 * (4 + 4 + 4) * 8 * 8,                    # 21,504 at r = 8
    "fact_tk": 2 * 768 * 8 + 8 * 144 + 8 ** 3,                            # 13,952 at r = 8
    "dora": 12 * (768 * 8 + 8 * 2304 + 2304),                              # 322,560 at r = 8
    "adapter_plus": 12 * (768 * 8 + 8 + 8 * 768 + 768 + 768),             # 165,984 at r = 8
    "convpass": 24 * (768 * 8 + 8 + 8 * 8 * 9 + 8 + 8 * 768 + 768),       # 327,552 at r = 8
}
"""params_pet on ViT-B/16 (head excluded), from the method definitions; the issue's figures are the literals."""


def vit_b16(*overrides: str) -> nn.Module:
    """ViT-B/16 with a PET method, built on the meta device (shapes only: fast, no memory)."""
    cfg = compose_config(["backbone.checkpoint=null", "dataset=synthetic", "dataset.num_classes=1000", *overrides])
    with torch.device("meta"):
        return build_model(cfg)


@pytest.mark.parametrize("pet, count", [("bitfit", 102_912), ("ln_tune", 38_400), ("vpt_shallow", 7_680),
                                        ("vpt_deep", 92_160), ("ssf", 205_824), ("fact_tt", 21_504),
                                        ("fact_tk", 13_952), ("dora", 322_560), ("adapter_plus", 165_984),
                                        ("convpass", 327_552)])
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


def prompt_inputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The token sequence entering each block's attention (`norm1`'s input), eval mode."""
    seen: list[torch.Tensor] = []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in model.vit.blocks]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    return seen


def test_vpt_deep_replaces_the_prompts_before_every_block(make_cfg, images):
    model = build_model(make_cfg("pet=vpt_deep", "pet.prompts=3"))
    seen = prompt_inputs(model, images)
    assert all(x.shape[1] == 197 + 3 for x in seen)
    for block, x in zip(model.vit.blocks, seen):
        assert torch.equal(x[:, 1:4], block.prompt.prompts.expand(2, -1, -1))   # the block's own prompts
    assert not torch.equal(seen[1][:, 4:], seen[0][:, 4:])


def test_vpt_shallow_inserts_once_and_the_prompts_propagate(make_cfg, images):
    model = build_model(make_cfg("pet=vpt_shallow", "pet.prompts=3"))
    assert [n for n, m in model.named_modules() if n.endswith(".prompt")] == ["vit.blocks.0.prompt"]
    seen = prompt_inputs(model, images)
    prompts = model.vit.blocks[0].prompt.prompts.expand(2, -1, -1)
    assert torch.equal(seen[0][:, 1:4], prompts)
    assert all(x.shape[1] == 200 for x in seen) and not torch.allclose(seen[1][:, 1:4], prompts)


def test_vpt_init_range_is_vpts():
    model = vit_b16("pet=vpt_deep", "pet.prompts=10")
    assert model.vit.blocks[5].prompt.prompts.shape == (1, 10, 768)
    cfg = compose_config(["backbone=vit_micro", "pet=vpt_deep", "pet.prompts=50"])
    prompts = torch.cat([b.prompt.prompts for b in build_model(cfg).vit.blocks])
    bound = (6 / (3 * 16 * 16 + 64)) ** 0.5
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.9 * bound


@pytest.mark.parametrize("merge", sorted(MERGE_STRATEGIES))
@pytest.mark.parametrize("pet", ["vpt_shallow", "vpt_deep"])
def test_prompts_are_protected_prefix_tokens_under_every_merge(make_cfg, images, pet, merge):
    p, image = 10, images[:1]
    plain = build_model(make_cfg("pet=linear", f"merge={merge}", *merge_overrides(merge, "linear"))).eval()
    model = build_model(make_cfg(f"pet={pet}", f"pet.prompts={p}", f"merge={merge}",
                                 *merge_overrides(merge, pet))).eval()
    last = model.vit.blocks[-1]
    seen: list[torch.Tensor] = []
    hook = last.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        state, plain_state = model.forward_tokens(image), plain.forward_tokens(image)
    hook.remove()
    assert state.num_prefix == 1 + p
    assert state.num_tokens == plain_state.num_tokens + p           # the patches reduce as without prompts
    if state.size is not None:
        assert torch.equal(state.size[:, :1 + p], torch.ones(1, 1 + p, 1))
    if merge == "fpet":
        assert state.num_tokens == 1 + 10 + 98 == 109              # the ViT-B/16 figure (same grid)
    if pet == "vpt_deep":                                          # after merging, still the block's own prompts
        assert torch.equal(seen[0][:, 1:1 + p], last.prompt.prompts)


@pytest.mark.parametrize("pet", ["vpt_shallow", "vpt_deep"])
@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_bad_prompt_count_is_a_config_error(make_cfg, pet, value):
    with pytest.raises(ConfigError, match=rf"pet.prompts={value}: must be a positive integer"):
        validate_config(make_cfg(f"pet={pet}", f"pet.prompts={value}"), check_files=False)


def test_vpt_deep_prompt_count_is_per_task():
    assert compose_config(["pet=vpt_deep", "dataset=svhn"]).pet.prompts == 50
    assert compose_config(["pet=vpt_deep", "dataset=synthetic"]).pet.prompts == 10
    assert compose_config(["pet=vpt_deep", "dataset=svhn", "pet.prompts=7"]).pet.prompts == 7


FOLDABLE = ["ssf", "fact_tt", "fact_tk", "dora"]


@torch.no_grad()
def randomize_trained(model: nn.Module, std: float = 0.05) -> None:
    """Move every trained PET parameter away from its init, as training would (the head too)."""
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("merge", ["none", "fpet"])
@pytest.mark.parametrize("pet", FOLDABLE)
def test_fold_is_exact_and_gives_the_plain_vit(make_cfg, images, pet, merge):
    model = build_model(make_cfg(f"pet={pet}", f"merge={merge}")).eval()
    plain = build_model(make_cfg("pet=linear", f"merge={merge}")).eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    randomize_trained(model)
    folded, report = inference_model(model)
    assert report.reparameterized and not report.kept
    assert not any(isinstance(m, PETLayer) for m in folded.modules())
    assert [type(m) for m in folded.vit.modules()] == [type(m) for m in plain.vit.modules()]
    with torch.no_grad():
        out, folded_out = model(images), folded(images)
        model.load_state_dict(before)
        fresh = model(images)
    assert (out - folded_out).abs().max() < 1e-4
    assert (out - fresh).abs().max() > 1e-2                       # the trained parameters matter
    assert count_flops(folded, 224) == count_flops(plain, 224)


@pytest.mark.parametrize("pet", ["fact_tt", "fact_tk", "dora", "convpass"])
def test_zero_initialised_methods_give_plain_timm_logits(make_cfg, images, pet):
    model = build_model(make_cfg(f"pet={pet}")).eval()
    with torch.no_grad():
        assert torch.allclose(model(images), model.vit(images), atol=1e-5)
        layer = next((m for m in model.modules() if isinstance(m, PETLayer)), None)
        if layer is None:                                          # a block hook: its branch adds zeros
            return
        x = torch.randn(3, 5, layer.base_layer.in_features)
        assert torch.allclose(layer(x), layer.base_layer(x), atol=1e-6)


def test_ssf_init_and_placement(make_cfg):
    model = build_model(make_cfg("pet=ssf"))
    wrapped = sorted(n for n, m in model.vit.named_modules() if isinstance(m, PETLayer))
    assert wrapped[:3] == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1"]
    assert {"patch_embed.proj", "norm"} <= set(wrapped) and len(wrapped) == 6 * len(model.vit.blocks) + 2
    scales = torch.cat([m.scale for m in model.modules() if isinstance(m, PETLayer)])
    shifts = torch.cat([m.shift for m in model.modules() if isinstance(m, PETLayer)])
    assert abs(scales.mean() - 1) < 0.005 and abs(scales.std() - 0.02) < 0.003
    assert abs(shifts.mean()) < 0.005 and abs(shifts.std() - 0.02) < 0.003


@pytest.mark.parametrize("pet", ["fact_tt", "fact_tk"])
def test_fact_factors_are_shared_and_stored_once(make_cfg, pet):
    model = build_model(make_cfg(f"pet={pet}", "pet.dim=4"))
    layers = [m for m in model.modules() if isinstance(m, FacTLinear)]
    assert len(layers) == 4 * len(model.vit.blocks) and len({id(m.factors) for m in layers}) == 1
    names = [n for n in task_tensors(model) if n.endswith(("u.weight", "v.weight"))]
    assert len(names) == 2
    if pet == "fact_tk":
        assert layers[0].factors.p.shape == (4, 12 * len(model.vit.blocks))
        assert not any(hasattr(m, "cores") for m in layers)


def test_fact_tk_block_matrices_follow_the_core_and_factor(make_cfg):
    model = build_model(make_cfg("pet=fact_tk", "pet.dim=4"))
    fc2 = model.vit.blocks[2].mlp.fc2
    f = fc2.factors
    (m,) = fc2.matrices()                                          # [4r, r]: block 2's MLP columns 4..11 of P
    cp = torch.einsum("abc,cj->abj", f.core, f.p[:, 2 * 12 + 8:2 * 12 + 12])
    assert m.shape == (16, 4) and torch.allclose(m, cp.reshape(4, 16).t())


@pytest.mark.parametrize("pet", ["fact_tt", "fact_tk", "dora"])
@pytest.mark.parametrize("value", [0, 65])
def test_rank_outside_the_width_is_a_config_error(make_cfg, pet, value):
    with pytest.raises(ConfigError, match=rf"pet.dim={value}: the rank must be an integer in 1..64"):
        validate_config(make_cfg(f"pet={pet}", f"pet.dim={value}"), check_files=False)


@pytest.mark.parametrize("pet, task, rank, scale", [("fact_tt", "svhn", 16, 100.0), ("fact_tt", "dtd", 8, 0.01),
                                                    ("fact_tk", "cifar100", 32, 0.1), ("fact_tk", "synthetic", 8, 1.0)])
def test_fact_rank_and_scale_are_per_task(pet, task, rank, scale):
    cfg = compose_config([f"pet={pet}", f"dataset={task}"]).pet
    assert (cfg.dim, cfg.scale) == (rank, scale)


def test_adapter_plus_acts_after_the_block_with_a_channel_scale(make_cfg, images):
    model = build_model(make_cfg("pet=adapter_plus")).eval()
    block = model.vit.blocks[0]
    hook = block.adapter_plus
    w = hook.adapter.down.weight
    assert w.abs().max() <= 0.02 and 0.007 < w.std() < 0.01            # trunc_normal(0.01, +-0.02)
    with torch.no_grad():
        hook.scaling.copy_(torch.linspace(0.5, 2.0, hook.scaling.numel()))
        x = model.embed(images)
        y = block(x)                                                     # plain timm block: no adapter
        out = block_forward(block, TokenState(x)).x
    assert torch.allclose(out, y + hook.scaling * hook.adapter(y), atol=1e-5)
    assert not torch.allclose(out, y, atol=1e-4)


def test_convpass_convolves_the_patch_grid_and_the_class_token_as_1x1(make_cfg):
    bypass = ConvBypass(16, 4, xavier_init=True, dropout=0.0).eval()
    torch.nn.init.normal_(bypass.up.weight)
    h = torch.randn(1, 1 + 36, 16)
    bumped = h.clone()
    bumped[0, 1 + 2 * 6 + 3] += 1.0                                    # patch (2, 3) of a 6 x 6 grid
    with torch.no_grad():
        diff = (bypass(bumped, 1, (6, 6)) - bypass(h, 1, (6, 6))).abs().sum(-1)[0]
    changed = {(int(i) - 1) // 6 * 10 + (int(i) - 1) % 6 for i in torch.nonzero(diff > 1e-6)}
    assert changed == {r * 10 + c for r in (1, 2, 3) for c in (2, 3, 4)}     # its 3 x 3 neighbourhood
    identity = ConvBypass(16, 4, xavier_init=False, dropout=0.0).eval()
    torch.nn.init.normal_(identity.up.weight)
    with torch.no_grad():                                               # centre-identity conv: a token-wise map
        expected = identity.up(identity.act(identity.act(identity.down(h))))
        assert torch.allclose(identity(h, 1, (6, 6)), expected, atol=1e-6)


def test_convpass_with_a_merge_acts_and_trains_only_on_the_full_grid(make_cfg, images):
    model = build_model(make_cfg("pet=convpass", "merge=fpet")).eval()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "convpass" in n}
    assert {n.split(".")[2] for n in trained} == {str(i) for i in range(7)}
    assert not any(n.startswith("vit.blocks.6.convpass.mlp_bypass") for n in trained)
    assert any(n.startswith("vit.blocks.6.convpass.attn_bypass") for n in trained)
    with torch.no_grad():
        base = model(images)
        torch.nn.init.normal_(model.vit.blocks[8].convpass.attn_bypass.up.weight)
        torch.nn.init.normal_(model.vit.blocks[6].convpass.mlp_bypass.up.weight)
        assert torch.equal(model(images), base)                         # after the merge: no grid, no bypass
        torch.nn.init.normal_(model.vit.blocks[6].convpass.attn_bypass.up.weight)
        assert not torch.allclose(model(images), base, atol=1e-4)
    assert count_parameters(vit_b16("pet=convpass", "merge=fpet"))["params_pet"] == 13 * 13_648


def test_comparison_rows_sit_beside_the_papers_in_tables_1_and_2(tmp_path):
    from fpet.tables import build_study, load_runs
    from fpet.tables.build import table1, table2
    from test_tables import write_vtab

    for pet in ("vpt_deep", "bitfit", "ssf", "fact_tt", "dora"):
        write_vtab(tmp_path / "res", pet, gflops=17.58)
    study = build_study(load_runs(tmp_path / "res"))
    t2 = {(r[0], r[1]): r for r in table2(study).rows}
    assert [t2[(label, "paper")][3] for label in ("VPT-Deep", "BitFit", "SSF", "FacT-TT")] == [72.0, 65.2, 75.7, 75.3]
    assert ("DoRA", "ours") in t2 and ("DoRA", "paper") not in t2          # not in the paper: our row only
    assert t2[("SSF", "ours")][3].mean == pytest.approx((61.0 + 81.0 + 41.0) / 3)   # mean of group means (best)
    t1 = table1(study)
    gflops = t1.columns.index(next(c for c in t1.columns if "GFLOPs" in str(c)))
    paper = {r[0]: r[gflops] for r in t1.rows if r[1] == "paper"}
    assert paper["VPT-Deep"] == 18.5 and paper["FacT-TT"] == 17.8


def test_table_presets_sweep_the_comparison_rows_into_their_own_run_dirs():
    from test_presets import compose_cell, sweep_cells

    cells = sweep_cells("table1", "pet=vpt_deep,bitfit,ssf,fact_tt", "merge=none", "dataset=dtd")
    cfgs = [compose_cell("experiment=table1", *cell) for cell in cells]
    assert sorted(c.pet.name for c in cfgs) == ["bitfit", "fact_tt", "ssf", "vpt_deep"]
    assert len({c.hydra.sweep.subdir for c in cfgs}) == 4
    assert {c.pet.name: c.pet.get("dim") for c in cfgs}["fact_tt"] == 8           # dtd's FacT-TT rank


@pytest.mark.parametrize("pet", ["bitfit", "ln_tune", "vpt_shallow", "vpt_deep", "ssf", "fact_tt", "fact_tk",
                                 "adapter_plus", "dora", "convpass"])
def test_task_file_holds_exactly_what_trains(make_cfg, pet):
    model = build_model(make_cfg(f"pet={pet}"))
    tensors = task_tensors(model, include_head=False)
    assert sum(t.numel() for t in tensors.values()) == count_parameters(model)["params_pet"]
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_convpass_task_file_with_a_merge_skips_the_bypasses_that_cannot_act(make_cfg):
    model = build_model(make_cfg("pet=convpass", "merge=fpet"))
    names = [n for n in task_tensors(model, include_head=False) if "convpass" in n]
    assert names and all(int(n.split(".")[2]) <= 6 for n in names)
    assert not any(n.startswith("vit.blocks.6.convpass.mlp_bypass") for n in names)
