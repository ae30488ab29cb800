"""train.precision (fp32 | tf32 | bf16), train.compile with its fallback, fused AdamW, evaluation without a host
sync per batch. Everything here runs on the CPU (bf16 autocast exists there too)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import merge_overrides
from fpet.merge import MERGE_STRATEGIES
from fpet.pipeline import session_from_overrides
from fpet.precision import autocast, compiled_forward, configure_precision
from fpet.train import build_optimization, evaluate, fused_kwargs, run
from fpet.validate import ConfigError, validate_config

NO_BENCH = ("bench.flops=false", "bench.latency=false", "bench.train=false")


def test_bad_precision_and_compile_values_are_refused_with_the_key(make_cfg):
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg("train.precision=fp16", "train.compile=maybe"), check_files=False)
    assert "train.precision='fp16'" in str(err.value) and "bf16" in str(err.value)
    assert "train.compile='maybe'" in str(err.value)


def test_configure_precision_sets_and_clears_tf32():
    try:
        configure_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_precision("fp32")  # a later fp32 run in the same process gets IEEE float32 back
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_precision("bf16")
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        configure_precision("fp32")


FAST_CELLS = [("bi_lora", "fpet"), ("lora", "tome")]
SLOW_CELLS = [(pet, merge) for pet in ("lora", "bi_lora", "bi_adaptformer")
              for merge in ("none", "tome", "bsm", "fpet", "avgpool", "maxpool") if (pet, merge) not in FAST_CELLS]


@pytest.mark.parametrize("pet,merge", FAST_CELLS + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CELLS])
def test_bf16_autocast_training_step_is_stable_and_close_to_fp32(pet, merge):
    """1-bit layers (bi_*) and every merge strategy under CPU bf16 autocast: same tokens out, logits near the fp32
    ones, finite non-zero gradients on every trainable parameter, float32 parameters."""
    session = session_from_overrides(["backbone=vit_micro", f"pet={pet}", f"merge={merge}", "device=cpu"])
    model = session.model.eval()  # no dropout / drop-path: the two passes see the same function
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(images)
        tokens_ref = model.forward_tokens(images).x.shape[1]
    device = torch.device("cpu")
    with autocast(device, "bf16"):
        logits = model(images)
        tokens = model.forward_tokens(images).x.shape[1]
        loss = F.cross_entropy(logits.float(), labels)
    assert logits.dtype == torch.bfloat16 and tokens == tokens_ref
    torch.testing.assert_close(logits.float(), ref, atol=0.1, rtol=0.05)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if "head" not in n)


@pytest.mark.parametrize("merge", sorted(MERGE_STRATEGIES))
def test_every_strategy_evaluates_under_bf16_autocast(merge):
    """Inference (eval mode, no gradient) of every registered strategy under CPU bf16 autocast: the fp32 token count,
    finite logits near the fp32 ones (LTMP once mixed a bf16 source into a float32 scatter_reduce here)."""
    session = session_from_overrides(["backbone=vit_micro", "pet=lora", f"merge={merge}", "device=cpu",
                                      *merge_overrides(merge, "lora")])
    model = session.model.eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, tokens_ref = model(images), model.forward_tokens(images).x.shape[1]
        with autocast(torch.device("cpu"), "bf16"):
            low, tokens = model(images).float(), model.forward_tokens(images).x.shape[1]
    assert tokens == tokens_ref and torch.isfinite(low).all()
    torch.testing.assert_close(low, ref, atol=0.1, rtol=0.05)


def test_bf16_folded_inference_matches_the_trained_model():
    """The re-parameterised (folded) 1-bit model evaluated under bf16 agrees with the unfolded one."""
    session = session_from_overrides(["backbone=vit_micro", "pet=bi_lora", "merge=fpet", "device=cpu"])
    model = session.model.eval()
    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        trained, folded = model(images).float(), session.inference()[0](images).float()
    torch.testing.assert_close(folded, trained, atol=0.05, rtol=0.05)


def test_bf16_run_records_its_precision(make_cfg, tmp_path):
    bf16 = run(make_cfg("train.precision=bf16", "train.limit_batches=1", *NO_BENCH), tmp_path / "bf16")
    stored = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert stored["precision"] == bf16["precision"] == "bf16" and stored["compile"] is False


@pytest.mark.slow
def test_bf16_run_differs_from_fp32_by_little(make_cfg, tmp_path):
    fp32 = run(make_cfg(*NO_BENCH), tmp_path / "fp32")
    bf16 = run(make_cfg("train.precision=bf16", *NO_BENCH), tmp_path / "bf16")
    stored = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert stored["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert stored["config"]["train"]["precision"] == "bf16"
    loss = [json.loads(x)["loss"] for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    loss32 = [json.loads(x)["loss"] for x in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()]
    assert loss != loss32 and loss == pytest.approx(loss32, rel=0.05)  # autocast was on, and harmless


def test_evaluate_syncs_with_the_host_once_not_per_batch(monkeypatch):
    session = session_from_overrides(["backbone=vit_micro", "pet=lora", "device=cpu"])
    images = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    labels = torch.randint(0, 6, (5,))
    batches = [(images[i:i + 2], labels[i:i + 2]) for i in range(0, 5, 2)]  # 3 batches, the last one short
    with torch.no_grad():
        expected = 100.0 * (session.model.eval()(images.float() / 255).argmax(-1) == labels).sum().item() / 5
    calls = {"item": 0}
    original = torch.Tensor.item

    def counting_item(self):
        calls["item"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    acc = evaluate(session.model, batches, torch.device("cpu"), "fp32", lambda x: x.float() / 255)
    assert acc == pytest.approx(expected) and calls["item"] == 1


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    session = session_from_overrides(["backbone=vit_micro", "pet=lora", "device=cpu"])
    model = session.model.eval()

    def broken_compile(module, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    forward = compiled_forward(model, True)
    images = torch.rand(2, 3, 224, 224)
    with caplog.at_level(logging.WARNING, logger="fpet.precision"), torch.no_grad():
        out = forward(images)
        again = forward(images)
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text
    assert caplog.text.count("torch.compile failed") == 1  # decided once, then eager for the rest of the run
    with torch.no_grad():
        torch.testing.assert_close(out, model(images))
    torch.testing.assert_close(again, out)
    assert compiled_forward(model, False) is model


@pytest.mark.slow
def test_run_with_compile_fallback_equals_the_eager_run(make_cfg, tmp_path, monkeypatch):
    eager = run(make_cfg(*NO_BENCH), tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", lambda module, **kw: (_ for _ in ()).throw(RuntimeError("no backend")))
    fallback = run(make_cfg("train.compile=true", *NO_BENCH), tmp_path / "compiled")
    assert fallback["compile"] is True and fallback["acc"] == eager["acc"]
    assert fallback["evals"] == eager["evals"]


def test_a_compiled_run_trains_on_the_whole_loss_aux_losses_included(make_cfg, tmp_path, monkeypatch):
    """train.compile compiles the training loss, not only the logits: LTMP's FLOPs-budget loss stays in it."""
    ltmp = ("merge=ltmp", "train.epochs=1", *NO_BENCH)
    eager = run(make_cfg(*ltmp), tmp_path / "eager")
    compiled: list = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)  # a compiler that changes nothing
    again = run(make_cfg(*ltmp, "train.compile=true"), tmp_path / "compiled")

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert compiled and again["compile"] is True
    assert losses(tmp_path / "compiled") == losses(tmp_path / "eager") and again["acc"] == eager["acc"]


@pytest.mark.slow
def test_real_torch_compile_on_the_cpu_matches_eager():
    session = session_from_overrides(["backbone=vit_micro", "pet=lora", "merge=fpet", "device=cpu"])
    model = session.model.eval()
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(compiled_forward(model, True)(images), model(images), atol=1e-4, rtol=1e-4)


def test_adamw_is_fused_only_for_cuda_parameters(make_cfg):
    session = session_from_overrides(["backbone=vit_micro", "pet=lora", "device=cpu"])
    optimizer, _ = build_optimization(session.cfg, session.model)
    assert not optimizer.param_groups[0].get("fused")  # CPU keeps the default implementation
    params = [p for p in session.model.parameters() if p.requires_grad]
    factory = torch.optim.AdamW
    assert fused_kwargs(factory, params) == {}
