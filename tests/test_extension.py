"""The extension points: a toy PET method (a block hook that folds) and a toy merge strategy (reads the class-token
attention row), each one file in tests/toys/ plus one registration line, through build, one training step, fold,
save, load and benchmark."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fpet.checkpoint import load_task, save_task
from fpet.merge import MERGE_STRATEGIES
from fpet.pet import PET_METHODS
from fpet.pipeline import Session, open_session
from toys.toy_keep import ToyKeep
from toys.toy_shift import TOY_SHIFT, ToyShift

TOY = ["pet=linear", "pet.name=toy_shift", "pet.trainable=pet", "merge=fpet", "merge.name=toy_keep",
       "+merge.keep=0.5", "bench.infer_batch=2", "bench.train_batch=2"]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PET_METHODS, "toy_shift", TOY_SHIFT)  # the one line a new method adds
    monkeypatch.setitem(MERGE_STRATEGIES, "toy_keep", ToyKeep)  # the one line a new strategy adds


def session(make_cfg, *overrides: str) -> Session:
    s = open_session(make_cfg(*TOY, *overrides), check_files=False)
    s.build()
    return s


def test_toy_method_and_strategy_build_train_fold_save_load_and_benchmark(registered, make_cfg, images, tmp_path):
    s = session(make_cfg)
    model = s.model
    hooks = [m for m in model.modules() if isinstance(m, ToyShift)]
    assert len(hooks) == 12 and isinstance(model.merges["6"], ToyKeep)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"vit.blocks.{i}.toy_shift.shift" for i in range(12)} | {"vit.head.weight", "vit.head.bias"}

    with torch.no_grad():  # zero-initialised: the plain timm logits without merging
        plain = model.vit.eval()(images)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    assert all(h.shift.grad is not None and h.shift.grad.abs().sum() > 0 for h in hooks)
    optimizer.step()
    model.eval()

    infer, report = s.inference()
    assert report.folded == [f"blocks.{i}.toy_shift" for i in range(12)] and not report.kept
    with torch.no_grad():
        trained = model(images)
        assert torch.allclose(infer(images), trained, atol=1e-5)
        assert model.forward_tokens(images).x.shape[1] == 1 + 98
        assert not torch.allclose(trained, plain, atol=1e-4)

    path = tmp_path / "task.safetensors"
    save_task(model, path, s.task_info())
    fresh = session(make_cfg)
    load_task(fresh.model, path, fresh.task_info())
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(images), trained)

    profile = s.profile()
    assert profile["tokens_out"] == 99 and profile["reparameterized"] is True
    assert profile["params_pet"] == 12 * 64 and profile["gflops"] > 0 and profile["latency_ms"] > 0


def test_toy_strategy_keeps_exactly_the_most_attended_patches(registered, make_cfg, images):
    s = session(make_cfg)
    merge = s.model.merges["6"]
    seen = []
    merge.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        s.model.eval()(images)
    before, after = seen[0]
    scores = before.cls_attn.mean(1)[:, 1:]
    expected = 1 + scores.topk(98, dim=-1).indices.sort(-1).values
    assert torch.equal(after.x[:, 1:], before.x.gather(1, expected[..., None].expand(-1, -1, 64)))


def test_toy_strategy_rules_are_checked_up_front(registered, make_cfg):
    from fpet.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"merge.keep=2.0: accepted \(0, 1\]"):
        validate_config(make_cfg(*TOY, "merge.keep=2.0"), check_files=False)
