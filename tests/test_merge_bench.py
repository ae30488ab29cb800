"""Merge measurement: the merge-time hooks and the one-process comparison script (tiny model, tiny batches)."""
from __future__ import annotations

import sys
from pathlib import Path

from fpet import build_model
from fpet.merge.timing import measure_merge_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from compare import compare, markdown  # noqa: E402


def test_merge_time_is_a_share_of_the_forward_and_leaves_no_hooks(make_cfg):
    model = build_model(make_cfg("merge=tome"))
    out = measure_merge_time(model, batch=2, img_size=224, repeats=2, warmup=0)
    assert out["merge_ms"] > 0 and 0 < out["merge_frac"] < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.merges.values())
    assert model.training  # mode restored
    assert measure_merge_time(build_model(make_cfg()), batch=2, img_size=224) == {"merge_ms": None, "merge_frac": None}


def test_compare_reports_ratios_against_the_first_variant(make_cfg):
    common = ["backbone=vit_micro", "bench.infer_batch=2", "bench.train_batch=2", "bench.repeats=1",
              "bench.warmup=0", "logger=none"]
    rows = compare(["merge=none", "merge=fpet"], common, rounds=2)
    none, fpet = rows
    assert none["latency_ms_ratio"] == 1.0 and none["merge_ms"] is None
    assert fpet["tokens_out"] == 99 and 0.7 < fpet["gflops_ratio"] < 0.8
    assert fpet["train_act_mb_ratio"] < 0.9 and fpet["merge_frac"] > 0  # deterministic memory saving
    assert markdown(rows).count("\n") == 3
