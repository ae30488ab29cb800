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
