"""Merge visualisation: groups from sources, the drawing, task-checkpoint loading, the command end to end."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpet import build_model
from fpet.backbone import CheckpointError
from fpet.checkpoint import save_task
from fpet.visualize import load_task_parameters, patch_groups, render_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from visualize_merge import visualize  # noqa: E402


def test_groups_follow_sources_and_drawing_averages_each_group():
    # class token, then a 2x2 grid: patches 0 and 3 merged into token 2, patches 1 and 2 alone
    source = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.float)
    groups = patch_groups(source, num_prefix=1, grid=(2, 2))
    assert groups[0, 0] == groups[1, 1] and len(np.unique(groups)) == 3
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:4, :4] = 200  # patch 0 bright, patch 3 dark: their group's mean is 100
    out = render_groups(image, groups, border=1)
    assert (out[1:3, 1:3] == 100).all() and (out[5:7, 5:7] == 100).all()  # interiors: the group mean
    assert (out[1:3, 5:7] == 0).all()  # a patch alone keeps its colour
    assert not (out[0, 4:8] == 0).all()  # outlines are drawn where groups meet
    with pytest.raises(ValueError, match="not a whole number of 2x2 patches"):
        render_groups(np.zeros((7, 8, 3), dtype=np.uint8), groups)


def test_task_checkpoint_loads_into_fpet_and_skips_foreign_merge_parameters(make_cfg, tmp_path):
    trained = build_model(make_cfg("merge=fpet", "pet=adaptformer"))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    path = tmp_path / "task.safetensors"
    save_task(trained, path)
    fpet = build_model(make_cfg("merge=fpet", "pet=adaptformer"))
    loaded = load_task_parameters(fpet, path)
    assert any(n.startswith("merges.6.refinement") for n in loaded)
    assert all(torch.equal(fpet.get_parameter(n), trained.get_parameter(n)) for n in loaded)
    tome = build_model(make_cfg("merge=tome", "pet=adaptformer"))
    assert not any(n.startswith("merges.") for n in load_task_parameters(tome, path))
    with pytest.raises(CheckpointError, match="same backbone=/pet=/dataset= overrides"):
        load_task_parameters(build_model(make_cfg("merge=fpet", "pet=lora")), path)


def test_visualize_writes_side_by_side_png(make_cfg, tmp_path):
    trained = build_model(make_cfg("merge=fpet"))
    save_task(trained, tmp_path / "task.safetensors")
    out = visualize(["backbone=vit_micro"], ["tome", "fpet"], str(tmp_path / "merge.png"),
                    checkpoint=str(tmp_path / "task.safetensors"))
    from PIL import Image

    with Image.open(out) as img:
        width, height = img.size
    assert width > 2.5 * height  # three panels: input, ToMe, FPET
