"""The inference forward of every registered merge strategy is traceable (no onnx needed): a trace taken at one
batch size gives the eager outputs at another, so nothing input-dependent is baked into the graph."""
from __future__ import annotations

import pytest
import torch

from fpet.export import TINY, tiny_model
from fpet.merge import MERGE_STRATEGIES
from fpet.merge.bipartite import stripe_split
from fpet.pipeline import session_from_overrides


def tiny_inference_model(merge: str, pet: str = "lora") -> torch.nn.Module:
    model, _ = tiny_model(pet, merge)  # the model --check-all exports: normalisation, then the folded ViT
    return model.eval()


@pytest.mark.parametrize("merge", sorted(MERGE_STRATEGIES))
def test_merge_inference_is_traceable_with_a_dynamic_batch(merge):
    model = tiny_inference_model(merge)
    static = MERGE_STRATEGIES[merge].static_tokens
    example_batch, other_batch = (2, 3) if static else (1, 1)
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(example_batch, 3, 224, 224, generator=gen)
    other = torch.rand(other_batch, 3, 224, 224, generator=gen)
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        expected = model(other)
        got = traced(other)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stripe_split_has_trace_time_sizes():
    """The split is strided ranges, so its sizes are known while tracing (a boolean mask made them data-dependent
    and torch.export refused ToMe / BSM)."""
    for num_prefix in (1, 2, 3):
        a, b = stripe_split(197 + num_prefix - 1, num_prefix)
        positions = torch.arange(num_prefix, 197 + num_prefix - 1)
        assert a.tolist() == positions[positions % 2 == 0].tolist()
        assert b.tolist() == positions[positions % 2 == 1].tolist()


# ---------------------------------------------------------------- export without onnx (torch only)

from fpet import export  # noqa: E402
from fpet.checkpoint import read_task_file, save_task, task_overrides  # noqa: E402


@pytest.fixture
def tiny_task_file(tmp_path):
    """A task file of the tiny backbone with pet=lora merge=fpet (random init, outside any run directory)."""
    session = session_from_overrides([*TINY, "device=cpu", "pet=lora", "merge=fpet", "dataset.normalize=imagenet"])
    path = tmp_path / "task.safetensors"
    save_task(session.model, path, session.task_info())
    return path


def test_a_bare_task_file_composes_the_config_it_records(tiny_task_file):
    info, _ = read_task_file(tiny_task_file)
    overrides = task_overrides(info)
    assert overrides[:3] == ["backbone=vit_micro", "backbone.img_size=224", "dataset=synthetic"]
    assert "pet=lora" in overrides and "merge=fpet" in overrides and "merge.layer=1" in overrides
    source = export.resolve_source(str(tiny_task_file), ["+backbone.kwargs.depth=3", "backbone.merge_layer=1"])
    assert source.task_file == tiny_task_file and source.label.startswith("task file")
    assert (source.cfg.pet.name, source.cfg.merge.name, source.cfg.merge.layer) == ("lora", "fpet", 1)


def test_the_exported_program_reproduces_pytorch_and_a_failing_one_is_not_written(tiny_task_file, monkeypatch):
    source = export.resolve_source(str(tiny_task_file), ["+backbone.kwargs.depth=3", "backbone.merge_layer=1",
                                                         "dataset.normalize=imagenet"])
    deploy, cfg = export.inference_model(source)
    assert deploy.normalize == "imagenet" and export.fixed_batch(deploy) is None
    out = tiny_task_file.parent / "model.pt"
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():  # the normalisation is inside: raw [0, 1] images in, the folded model's logits out
        from fpet.data.transforms import to_float

        torch.testing.assert_close(deploy(images), deploy.model(to_float(images, "imagenet")))
    result = export.export_verified(deploy, "torchscript", out, 224, [("given", images)])
    assert out.is_file() and [c.images for c in result.checks] == [1, 3, 2]
    out.unlink()
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no file can pass: it must not be written
    with pytest.raises(export.ExportError, match="nothing written"):
        export.export_verified(deploy, "torchscript", out, 224, [])
    assert list(tiny_task_file.parent.iterdir()) == [tiny_task_file]


def test_a_recorded_run_config_refuses_group_overrides(tmp_path):
    cfg = export.resolve_source(None, [*TINY]).cfg
    with pytest.raises(export.ExportError, match="pet=adaptformer"):
        export.apply_key_overrides(cfg, ["pet=adaptformer"])
    assert export.apply_key_overrides(cfg, ["paths.data_dir=/elsewhere"]).paths.data_dir == "/elsewhere"


def test_a_random_split_is_refused_before_any_tracing(tmp_path):
    """ToMe's random split differs on every forward: no file can match it, so export says why up front."""
    deploy, _ = tiny_model("lora", "bsm", ["merge.split=random"])
    with pytest.raises(export.ExportError, match="merge.split=random draws set A anew"):
        export.export_verified(deploy, "torchscript", tmp_path / "model.pt", 224, [])
    assert not list(tmp_path.iterdir())


def test_torchscript_is_refused_for_an_input_dependent_token_count(tmp_path):
    """A trace fixes LTMP's kept-token count (and Convpass's branch on it) of the example image: refused up front,
    while ONNX keeps the count in the graph."""
    deploy, _ = tiny_model("lora", "ltmp")
    with pytest.raises(export.ExportError, match="--format torchscript records one trace, and merge=ltmp keeps"):
        export.export_verified(deploy, "torchscript", tmp_path / "model.pt", 224, [])
    assert not list(tmp_path.iterdir())
