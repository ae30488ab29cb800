"""Every PET method: what trains, how many parameters, per-task scales, one training step with every merge."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import ROOT, SELECTING_PETS, merge_overrides
from fpet import build_model
from fpet.config import compose_config
from fpet.data.vtab_rules import TASKS
from fpet.merge import MERGE_STRATEGIES
from fpet.pet import PET_METHODS, PETLayer, RepAdapterNorm, set_trainable
from fpet.pet.repadapter import GroupedLinear
from fpet.vit import TokenViT
from test_vit import PairMerge

TABLE_PETS = ["lora", "adaptformer", "repadapter", "bi_lora", "bi_adaptformer", "full", "linear"]
COMPARISON_PETS = ["bitfit", "ln_tune", "vpt_shallow", "vpt_deep", "ssf", "fact_tt", "fact_tk", "dora", "adapter_plus",
                   "convpass"]
"""The comparison methods (tests/test_pet_comparison.py checks their train rules and counts)."""
SELECTING = set(SELECTING_PETS)  # score their weights on data: one scoring batch in tests
SCORING = ["pet.batches=1", "pet.batch_size=4"]
PETS = [*TABLE_PETS, *COMPARISON_PETS, *SELECTING_PETS]
HEAD = {"vit.head.weight", "vit.head.bias"}


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(pet: str, model: nn.Module) -> set[str]:
    """The trainable set each method is specified to have (docs/pet.md), built from the block structure."""
    depth = len(model.vit.blocks)
    per_block = {
        "lora": [f"attn.qkv.lora_{x}.{p}.weight" for x in "qv" for p in ("down", "up")],
        "adaptformer": [f"mlp.adapter.{p}.weight" for p in ("down", "up")],
        "repadapter": [f"norm{i}.adapter.{p}.{w}" for i in (1, 2) for p in ("down", "up") for w in ("weight", "bias")],
        "linear": [],
    }
    per_block["bi_lora"], per_block["bi_adaptformer"] = per_block["lora"], per_block["adaptformer"]
    if pet == "full":
        return {n for n, _ in model.named_parameters()}
    if pet in SELECTING:
        layers = ["patch_embed.proj"] + [f"blocks.{i}.{m}" for i in range(depth)
                                         for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        return HEAD | {f"vit.{n}.{p}" for n in layers for p in ("entries", "base_layer.bias")}
    return HEAD | {f"vit.blocks.{i}.{name}" for i in range(depth) for name in per_block[pet]}


def test_registry_has_every_method_and_a_config_each():
    assert set(PET_METHODS) == set(PETS)
    assert {p.stem for p in (ROOT / "configs" / "pet").glob("*.yaml")} == set(PETS)


@pytest.mark.parametrize("pet", TABLE_PETS)
def test_trainable_set_is_exactly_as_specified(make_cfg, pet):
    model = build_model(make_cfg(f"pet={pet}", *(SCORING if pet in SELECTING else [])))
    assert trainable_names(model) == expected_trainable(pet, model)
    frozen_pet = [n for m in model.modules() if isinstance(m, PETLayer) for n, p in m.named_parameters()
                  if n.startswith("base_layer.") and p.requires_grad]
    assert not frozen_pet or (pet in SELECTING and all(n == "base_layer.bias" for n in frozen_pet))  # GPS: biases


@pytest.fixture(scope="module")
def vit_b16_counts() -> dict[str, int]:
    """params_pet of every method on ViT-B/16 (1000 classes), built once on the meta device (shapes only)."""
    counts = {}
    for pet in TABLE_PETS:
        cfg = compose_config(["backbone.checkpoint=null", f"pet={pet}", "dataset.num_classes=1000"])
        with torch.device("meta"):
            model = build_model(cfg)
        head = {id(p) for p in model.vit.head.parameters()}
        counts[pet] = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head)
    return counts


def test_vit_b16_parameter_counts_head_excluded(vit_b16_counts):
    c, d, blocks = 768, 8, 12
    assert vit_b16_counts["lora"] == 294_912
    assert vit_b16_counts["adaptformer"] == 147_456
    # two adapters per block: A (c*d + d) and grouped B (c*d/2 + c)
    assert vit_b16_counts["repadapter"] == blocks * 2 * (c * d + d + c * d // 2 + c) == 239_808
    assert vit_b16_counts["bi_lora"] == 1_179_648
    assert vit_b16_counts["bi_adaptformer"] == 589_824
    assert vit_b16_counts["full"] == 85_798_656  # timm vit_base_patch16_224 without its head
    assert vit_b16_counts["linear"] == 0


def test_repadapter_is_identity_at_init_and_its_up_projection_is_grouped(make_cfg):
    model = build_model(make_cfg("pet=repadapter")).eval()
    norms = [m for m in model.modules() if isinstance(m, RepAdapterNorm)]
    assert len(norms) == 2 * len(model.vit.blocks)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert all(torch.equal(norm(x), norm.base_layer(x)) for norm in norms)
    up = norms[0].adapter.up
    nn.init.normal_(up.weight)
    dense = up.dense_weight()                      # [C, d] block-diagonal, groups = 2
    c, d = dense.shape
    assert torch.count_nonzero(dense[: c // 2, d // 2:]) == 0 and torch.count_nonzero(dense[c // 2:, : d // 2]) == 0
    conv = nn.Conv1d(d, c, 1, groups=2)
    conv.weight.data.copy_(up.weight.unsqueeze(-1))
    conv.bias.data.copy_(up.bias)
    h = torch.randn(3, 5, d)
    assert torch.allclose(up(h), conv(h.transpose(1, 2)).transpose(1, 2), atol=1e-5)


def test_grouped_linear_rejects_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="pet.groups=3"):
        GroupedLinear(8, 64, groups=3)


@pytest.mark.parametrize("pet, task, scale", [
    ("repadapter", "cifar100", 0.1), ("repadapter", "svhn", 10.0), ("bi_lora", "dtd", 0.01),
    ("bi_adaptformer", "caltech101", 10.0), ("bi_lora", "synthetic", 1.0), ("lora", "cifar100", 1.0),
])
def test_scale_is_chosen_from_task_and_method(make_cfg, pet, task, scale):
    cfg = make_cfg(f"pet={pet}", f"dataset.name={task}")
    assert cfg.pet.scale == scale
    layers = [m for m in build_model(cfg).modules() if isinstance(m, PETLayer)]
    assert layers and all(m.scale == scale for m in layers)


@pytest.mark.parametrize("pet, scale", [("repadapter", 0.1), ("bi_lora", 0.1), ("bi_adaptformer", 0.1)])
def test_scale_follows_the_real_task_config(pet, scale):
    assert compose_config([f"pet={pet}", "dataset=cifar100"]).pet.scale == scale


def test_explicit_scale_overrides_the_task_table(make_cfg):
    cfg = make_cfg("pet=repadapter", "dataset.name=cifar100", "pet.scale=0.5")
    assert all(m.scale == 0.5 for m in build_model(cfg).modules() if isinstance(m, PETLayer))


@pytest.mark.parametrize("pet", ["repadapter", "bi_lora", "bi_adaptformer"])
def test_scale_tables_name_exactly_the_19_vtab_tasks(pet):
    scales = yaml.safe_load(Path(ROOT / "configs" / "pet" / f"{pet}.yaml").read_text())["scales"]
    assert set(scales) == set(TASKS)  # a misspelt task would silently fall back to 1.0
    assert all(isinstance(v, float) and v > 0 for v in scales.values())


def one_step(model: nn.Module, images: torch.Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss = F.cross_entropy(model(images), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("merge", ["pair", *sorted(MERGE_STRATEGIES)])
@pytest.mark.parametrize("pet", PETS)
def test_every_pet_and_merge_builds_and_trains_one_step(make_cfg, images, pet, merge):
    if merge == "pair":  # a test-only strategy at block 6 (197 -> 99 tokens)
        cfg = make_cfg(f"pet={pet}", *(SCORING if pet in SELECTING else []))
        built = build_model(cfg)
        model = TokenViT(built.vit, {6: PairMerge()}, pet_method=built.pet_method)
        set_trainable(model, cfg.pet.trainable)
    else:  # every registered strategy, by its config
        extra = SCORING if pet in SELECTING else merge_overrides(merge, pet)
        cfg = make_cfg(f"pet={pet}", f"merge={merge}", *extra)
        model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert torch.isfinite(torch.tensor(one_step(model.train(), images)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable_names(model)
    assert "vit.head.weight" in changed
