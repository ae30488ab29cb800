"""Merge visualisation: groups from sources, the drawing, a trained task checkpoint, the command end to end."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpet import build_model
from fpet.backbone import CheckpointError
from fpet.checkpoint import save_task, task_metadata
from fpet.visualize import patch_groups, render_groups, trained_model, with_merge

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


def save_trained(make_cfg, path: Path, *overrides: str) -> torch.nn.Module:
    """A model whose trainable parameters are all changed, saved as a task file."""
    cfg = make_cfg(*overrides)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_task(model, path, task_metadata(cfg, model))
    return model


def test_trained_model_takes_merge_settings_from_the_file_and_shares_pet_across_strategies(make_cfg, tmp_path):
    path = tmp_path / "task.safetensors"
    saved = save_trained(make_cfg, path, "merge=fpet", "merge.layer=4", "pet=adaptformer")
    model, cfg = trained_model(["backbone=vit_micro", "pet=adaptformer"], path)
    assert cfg.merge.name == "fpet" and list(model.merges) == ["4"]
    assert torch.equal(model.merges["4"].refinement.up.quantized_weight(),
                       saved.merges["4"].refinement.up.quantized_weight())
    assert torch.equal(model.vit.head.weight, saved.vit.head.weight)
    tome = with_merge(model, make_cfg("merge=tome").merge)
    assert tome.vit is model.vit and len(tome.merges) == 12
    with pytest.raises(CheckpointError, match="pet=adaptformer"):
        trained_model(["backbone=vit_micro", "pet=lora"], path)


def test_visualize_writes_side_by_side_png(make_cfg, tmp_path):
    save_trained(make_cfg, tmp_path / "task.safetensors", "merge=fpet")
    out = visualize(["backbone=vit_micro"], ["tome", "fpet"], str(tmp_path / "merge.png"),
                    checkpoint=str(tmp_path / "task.safetensors"))
    from PIL import Image

    with Image.open(out) as img:
        width, height = img.size
    assert width > 2.5 * height  # three panels: input, ToMe, FPET
