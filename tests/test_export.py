"""Export + check of trained vit_micro runs (merge=none and merge=fpet) to ONNX, run back by onnxruntime."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="make install-export")
pytest.importorskip("onnxscript", reason="make install-export")

from fpet.export import (bench_interleaved, dataset_images, export_verified, inference_model,  # noqa: E402
                         load_runner, resolve_source, with_merge_strategy)
from fpet.train import run  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["none", "fpet"])
def test_trained_run_exports_to_onnx_that_reproduces_the_run(make_cfg, tmp_path, merge):
    run_dir = tmp_path / "run"
    results = run(make_cfg(f"merge={merge}", "device=cpu", "dataset.normalize=imagenet"), run_dir)

    source = resolve_source(str(run_dir))
    deploy, cfg = inference_model(source)
    assert cfg.dataset.normalize == "imagenet" and source.task_file == run_dir / "task.safetensors"
    label, images = dataset_images(cfg, 64)  # the whole eval split of the fast config
    out = run_dir / "model.onnx"
    result = export_verified(deploy, "onnx", out, 224, [(label, images)])
    assert out.is_file() and result.batch is None and all(c.ok for c in result.checks)
    assert [c.images for c in result.checks] == [1, 3, 64]

    # the file alone (uint8 -> [0, 1] outside, normalisation inside) reproduces the run's accuracy
    ort_run = load_runner("onnx", out)
    from fpet.data import build_dataset

    data = build_dataset(cfg.dataset, "test", cfg.paths.data_dir)
    labels = torch.tensor([data[i][1] for i in range(len(images))])
    acc = 100.0 * (ort_run(images).argmax(-1) == labels).float().mean().item()
    assert acc == pytest.approx(json.loads((run_dir / "results.json").read_text())["acc"]) == results["acc"]

    # --bench's counterpart: the same folded backbone and head, the other strategy, interleaved timing
    other = with_merge_strategy(deploy, cfg, "fpet" if merge == "none" else "none")
    other_result = export_verified(other, "onnx", tmp_path / "other.onnx", 224, [])
    ms = bench_interleaved({"a": ort_run, "b": load_runner("onnx", other_result.path)}, 224, 2, 2, 0)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())


# ---------------------------------------------------------------- every strategy, and ToMe's stable ranking

from fpet.export import TINY, onnx_translations, tiny_model  # noqa: E402
from fpet.merge import MERGE_STRATEGIES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("pet, merge", [*(("lora", m) for m in sorted(MERGE_STRATEGIES)),
                                        ("adaptformer", "tome"), ("vpt_deep", "bsm")])
def test_every_strategy_exports_to_onnx_that_reproduces_pytorch(tmp_path, pet, merge):
    deploy, cfg = tiny_model(pet, merge)
    result = export_verified(deploy, "onnx", tmp_path / "model.onnx", 224, [])
    assert all(c.ok for c in result.checks)
    assert result.batch == (None if MERGE_STRATEGIES[merge].static_tokens else 1)
    assert (result.note is None) == (result.batch is None)
    if merge != "none":  # the merge is not at the last block: the checked logits depend on it
        plain, _ = tiny_model(pet, "none")
        images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert not torch.allclose(deploy(images), plain(images), atol=1e-4)


class TiedMatching(torch.nn.Module):
    """`bipartite_soft_matching` on one-hot keys (cosine scores exactly 0 or 1: many exact ties) of `x [B, N, C]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fpet.merge.bipartite import bipartite_soft_matching, stripe_split

        keys = torch.nn.functional.one_hot(x[..., 0].mul(4).floor().long().clamp(0, 3), 4).float()
        a, b = stripe_split(x.shape[1], 1)
        return bipartite_soft_matching(keys, 40, a, b, 1)(x, "sum")


@pytest.mark.slow
def test_tome_ranking_breaks_ties_in_onnx_as_in_pytorch(tmp_path):
    """ToMe ranks A tokens with a stable sort; the ONNX translation (TopK) keeps equal scores in sequence order."""
    model, path = TiedMatching(), tmp_path / "tied.onnx"
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 197, 3, generator=gen)
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False, verbose=False,
                      custom_translation_table=onnx_translations())
    run = load_runner("onnx", path)
    x = torch.rand(4, 197, 3, generator=gen)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(run(x), expected)
    # ties decide which tokens merge: many A tokens share the score at the cut (r = 40 of 98)
    keys = torch.nn.functional.one_hot(x[..., 0].mul(4).floor().long().clamp(0, 3), 4).float()
    best = (keys[:, 1::2] @ keys[:, 2::2].mT).amax(-1).sort(-1, descending=True).values
    assert (best[:, 39] == best[:, 40]).all()
