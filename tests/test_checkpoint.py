"""Task checkpoints: what is saved, packed 1-bit weights, identical logits after loading, strict errors, eval_only."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import FAST, ROOT
from fpet import build_model
from fpet.backbone import CheckpointError
from fpet.checkpoint import load_task, save_task, task_metadata, task_storage_bytes
from fpet.pet.pack import pack_bits, task_tensors, unpack_bits
from fpet.config import compose_config
from fpet.pet import BinaryLinear
from fpet.results import load_complete_results
from fpet.tables.collect import load_runs
import fpet.pet.reparam
from fpet.train import run
from fpet.validate import ConfigError
from fpet.vit import TokenViT
from test_pet_methods import PETS, SCORING, SELECTING
from test_vit import PairMerge


def build_pair(cfg) -> tuple[nn.Module, nn.Module]:
    """Two models with the same backbone: one to 'train' (randomised trainable weights), one fresh to load into."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg))
    with torch.no_grad():
        for p in models[0].parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return models[0].eval(), models[1].eval()


@pytest.mark.parametrize("n", [1, 8, 13, 64 * 32])
def test_pack_unpack_bits_round_trip(n):
    bits = torch.rand(n) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(packed, bits.shape), bits)


@pytest.mark.parametrize("pet", PETS)
def test_save_load_gives_identical_logits(make_cfg, images, tmp_path, pet):
    cfg = make_cfg(f"pet={pet}", *(SCORING if pet in SELECTING else []))  # TR-PTS / GPS: one scoring batch
    trained, fresh = build_pair(cfg)
    path = tmp_path / "task.safetensors"
    size = save_task(trained, path, task_metadata(cfg, trained))
    assert size == path.stat().st_size
    with torch.no_grad():
        expected = trained(images)
        assert not torch.equal(fresh(images), expected)
        load_task(fresh, path, task_metadata(cfg, fresh))
        assert torch.equal(fresh(images), expected)


class RefinedPairMerge(PairMerge):
    """PairMerge that owns a 1-bit key adapter, as FPET's merge does: packing must find it under `merges.`."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.refine = BinaryLinear(head_dim, head_dim)


def test_1bit_weights_inside_a_merge_strategy_are_packed_and_restored(make_cfg, tmp_path):
    cfg = make_cfg("pet=bi_lora")
    models = []
    for _ in range(2):
        model = build_model(cfg)
        models.append(TokenViT(model.vit, {6: RefinedPairMerge(model.vit.blocks[0].attn.head_dim)},
                               pet_method=model.pet_method))
    trained, fresh = models
    assert trained.merges["6"].refine.weight.requires_grad  # merge parameters train with the PET
    pairs = [(trained.merges["6"].refine, fresh.merges["6"].refine),
             (trained.vit.blocks[3].attn.qkv.lora_v.up, fresh.vit.blocks[3].attn.qkv.lora_v.up)]
    assert not any(torch.equal(a.quantized_weight(), b.quantized_weight()) for a, b in pairs)
    save_task(trained, tmp_path / "task.safetensors", task_metadata(cfg, trained))
    assert "merges.6.refine.weight.bits" in load_file(str(tmp_path / "task.safetensors"))
    load_task(fresh, tmp_path / "task.safetensors", task_metadata(cfg, fresh))
    assert all(torch.equal(a.quantized_weight(), b.quantized_weight()) for a, b in pairs)


def test_only_trained_tensors_are_saved_and_1bit_weights_are_packed(make_cfg):
    cfg = make_cfg("pet=bi_adaptformer")
    model = build_model(cfg)
    tensors = task_tensors(model)
    name = "vit.blocks.0.mlp.adapter.down.weight"
    assert name not in tensors
    assert tensors[f"{name}.bits"].dtype == torch.uint8 and tensors[f"{name}.bits"].numel() == 64 * 32 // 8
    assert tensors[f"{name}.mean"].dtype == torch.float32 and tensors[f"{name}.std"].shape == ()
    assert {k for k in tensors if not k.endswith((".bits", ".mean", ".std"))} == {"vit.head.weight", "vit.head.bias"}
    assert not any("head" in k for k in task_tensors(model, include_head=False))


def test_a_bi_adaptformer_task_is_at_most_one_25th_of_its_fp32_size():
    cfg = compose_config(["backbone.checkpoint=null", "pet=bi_adaptformer", "dataset.num_classes=100"])
    model = build_model(cfg)
    fp32_bytes = 4 * sum(m.weight.numel() for m in model.modules() if isinstance(m, BinaryLinear))
    assert fp32_bytes == 4 * 589_824
    assert 25 * task_storage_bytes(model, include_head=False, info=task_metadata(cfg, model)) <= fp32_bytes


@pytest.fixture
def lora_task(make_cfg, tmp_path) -> Path:
    cfg = make_cfg("pet=lora")
    model = build_model(cfg)
    path = tmp_path / "lora.safetensors"
    save_task(model, path, task_metadata(cfg, model))
    return path


@pytest.mark.parametrize("overrides, match", [
    (["pet=adaptformer"], "pet=lora"),
    (["pet.dim=4"], "pet.dim=8"),
    (["pet.scale=0.5"], "pet.scale=1.0"),
    (["merge=fpet"], "merge=none"),
    (["dataset.num_classes=10"], "dataset.num_classes=6"),
    (["backbone=vit_b16", "backbone.checkpoint=null"], "backbone=vit_micro"),
])
def test_a_checkpoint_for_another_model_is_refused(make_cfg, lora_task, overrides, match):
    cfg = make_cfg(*overrides)
    model = build_model(cfg)
    with pytest.raises(CheckpointError, match=match):
        load_task(model, lora_task, task_metadata(cfg, model))


def test_missing_and_unexpected_tensors_are_refused(make_cfg, lora_task, tmp_path):
    tensors = load_file(str(lora_task))
    with safe_open(str(lora_task), "pt") as f:
        meta = f.metadata()
    tensors.pop("vit.head.bias")
    tensors["vit.blocks.0.attn.qkv.base_layer.weight"] = torch.zeros(192, 64)
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    model = build_model(make_cfg())
    with pytest.raises(CheckpointError, match=r"1 missing \['vit.head.bias'\], 1 unexpected"):
        load_task(model, edited)


def test_truncated_foreign_and_pickled_files_are_refused(make_cfg, lora_task, tmp_path):
    model = build_model(make_cfg())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora_task.read_bytes()[: lora_task.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_task(model, truncated)
    foreign = tmp_path / "backbone.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an fpet task checkpoint"):
        load_task(model, foreign)
    pickled = tmp_path / "task.safetensors"
    pickled.write_bytes(pickle.dumps({"vit.head.weight": torch.zeros(6, 64)}))
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_task(model, pickled)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_task(model, tmp_path / "nothing.safetensors")


def test_run_saves_the_task_and_eval_only_cli_reproduces_its_accuracy(make_cfg, tmp_path, monkeypatch):
    fast = ["pet=bi_lora", "bench.latency=false", "bench.train=false"]
    train_dir = tmp_path / "run"
    folds, real_fold = [], fpet.pet.reparam.inference_model
    monkeypatch.setattr(fpet.pet.reparam, "inference_model",
                        lambda m, enabled: folds.append(m) or real_fold(m, enabled))
    trained = run(make_cfg(*fast), train_dir)
    assert len(folds) == 1  # one folded copy serves the final evaluation and the profile
    task = train_dir / "task.safetensors"
    assert trained["storage_bytes"] == task.stat().st_size > trained["storage_bytes_no_head"]
    assert trained["reparameterized"] is True and trained["pet_scale"] == 1.0
    cmd = [sys.executable, str(ROOT / "train.py"), *FAST, *fast, "eval_only=true", f"checkpoint={task}",
           f"hydra.run.dir={train_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((train_dir / "results.json").read_text()).get("eval_only") is None  # not overwritten
    evaluated = json.loads((train_dir / "eval" / "results.json").read_text())
    assert evaluated["eval_only"] is True and evaluated["acc"] == trained["acc"]
    assert evaluated["reparameterized"] is True and evaluated["gflops"] == trained["gflops"]
    assert (evaluated["storage_bytes"], evaluated["storage_bytes_no_head"]) == \
        (trained["storage_bytes"], trained["storage_bytes_no_head"])
    assert [run.path for run in load_runs(tmp_path)] == [str(train_dir / "results.json")]  # tables skip it
    assert load_complete_results(train_dir / "eval") is None  # and a training run there is not skipped


def test_eval_only_needs_a_checkpoint(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="eval_only=true needs checkpoint=PATH"):  # before anything is built
        run(make_cfg("eval_only=true"), tmp_path)
    assert not list(tmp_path.iterdir())


def _rewrite(path: Path, out: Path, **meta: str) -> Path:
    """`path` with its safetensors metadata changed (e.g. to an older format version)."""
    with safe_open(str(path), "pt") as f:
        old = f.metadata()
    save_file(load_file(str(path)), str(out), metadata={**old, **meta})
    return out


def test_version_1_files_with_1bit_weights_are_refused_and_others_still_load(make_cfg, tmp_path):
    """Version 1 stored 1-bit weights for the level 0.7979; read with 0.6745 they would be another model."""
    cfg = make_cfg("pet=bi_lora")
    model = build_model(cfg)
    path = tmp_path / "bi.safetensors"
    save_task(model, path, task_metadata(cfg, model))
    old = _rewrite(path, tmp_path / "bi_v1.safetensors", format_version="1")
    with pytest.raises(CheckpointError, match="level 0.7979.*Train the task again"):
        load_task(model, old)
    cfg = make_cfg("pet=lora")
    trained, fresh = build_pair(cfg)
    path = tmp_path / "lora.safetensors"
    save_task(trained, path)
    v1_info = {"backbone": "vit_micro", "embed_dim": 64, "depth": 12, "pet": "lora", "pet_dim": 8, "pet_scale": 1.0,
               "merge": "none", "merge_layer": None, "merge_r": None, "merge_split": None, "num_classes": 6}
    old = _rewrite(path, tmp_path / "lora_v1.safetensors", format_version="1", fpet=json.dumps(v1_info))
    load_task(fresh, old, task_metadata(cfg, fresh))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(images), trained(images))
    wrong = make_cfg("pet=lora", "pet.dim=4")
    with pytest.raises(CheckpointError, match="pet.dim=8"):
        load_task(build_model(wrong), old, task_metadata(wrong, build_model(wrong)))


def test_task_files_get_the_users_umask_not_0600(make_cfg, tmp_path):
    cfg = make_cfg("pet=lora")
    model = build_model(cfg)
    import os

    old = os.umask(0o022)
    try:
        save_task(model, tmp_path / "task.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "task.safetensors").stat().st_mode & 0o777 == 0o644
