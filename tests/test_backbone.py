"""Backbone weight loading: Google .npz, timm safetensors/.pth, and the errors a user meets."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fpet import build_model
from fpet.backbone import CheckpointError
from npz_export import export_google_npz, perturb


def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.vit.state_dict().items() if not k.startswith("head.") and "lora_" not in k}


def assert_same_backbone(a: nn.Module, b: nn.Module) -> None:
    ta, tb = backbone_tensors(a), backbone_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k


def source_model(make_cfg) -> nn.Module:
    model = build_model(make_cfg())
    perturb(model.vit, seed=1)
    return model


def test_missing_checkpoint_says_what_to_download(make_cfg, tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_model(make_cfg(f"backbone.checkpoint={tmp_path}/ViT-B_16.npz",
                             "backbone.download_url=https://example.org/ViT-B_16.npz"))
    message = str(err.value)
    assert "ViT-B_16.npz' does not exist" in message and "https://example.org/ViT-B_16.npz" in message
    assert "backbone.checkpoint=null" in message


def test_google_npz_round_trip_with_representation_layer(make_cfg, tmp_path, images):
    src = source_model(make_cfg)
    rep = nn.Linear(64, 64)
    perturb(rep, seed=2)
    export_google_npz(src.vit, tmp_path / "w.npz", pre_logits=rep)
    loaded = build_model(make_cfg(f"backbone.checkpoint={tmp_path / 'w.npz'}")).eval()
    assert_same_backbone(src, loaded)
    assert isinstance(loaded.pre_logits, nn.Sequential)
    feats = loaded.vit.forward_head(loaded.forward_tokens(images).x, pre_logits=True)
    with torch.no_grad():
        assert torch.allclose(loaded(images), loaded.vit.head(torch.tanh(rep(feats))), atol=1e-5)
    assert not any(p.requires_grad for p in loaded.pre_logits.parameters())


def test_npz_for_another_depth_is_refused_before_loading(make_cfg, tmp_path):
    src = source_model(make_cfg)
    export_google_npz(src.vit, tmp_path / "w.npz")
    weights = dict(np.load(tmp_path / "w.npz"))
    weights = {k: v for k, v in weights.items() if "encoderblock_11/" not in k}
    np.savez(tmp_path / "short.npz", **weights)
    with pytest.raises(CheckpointError, match="does not fit this backbone"):
        build_model(make_cfg(f"backbone.checkpoint={tmp_path / 'short.npz'}"))


def test_truncated_npz_is_reported(make_cfg, tmp_path):
    export_google_npz(source_model(make_cfg).vit, tmp_path / "w.npz")
    data = (tmp_path / "w.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.npz"):
        build_model(make_cfg(f"backbone.checkpoint={tmp_path / 'cut.npz'}"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_round_trip(make_cfg, tmp_path, suffix):
    src = source_model(make_cfg)
    state = {k: v.contiguous() for k, v in src.vit.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer", ""): v for k, v in state.items()}
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    assert_same_backbone(src, build_model(make_cfg(f"backbone.checkpoint={path}")))


def test_state_dict_of_another_backbone_is_refused(make_cfg, tmp_path):
    other = build_model(make_cfg("backbone.kwargs.embed_dim=32"))
    state = {k.replace(".base_layer", ""): v.contiguous() for k, v in other.vit.state_dict().items()
             if "lora_" not in k}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_model(make_cfg(f"backbone.checkpoint={tmp_path / 'w.safetensors'}"))


class Exploit:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_with_code_is_refused(make_cfg, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Exploit()}))
    with pytest.raises(CheckpointError, match="refused for safety"):
        build_model(make_cfg(f"backbone.checkpoint={path}"))
    assert "this pickle ran code" not in capsys.readouterr().out
