"""The embedded synthetic task and the loader protocol."""
from __future__ import annotations

import pytest
import torch

from fpet.data import build_loaders, protocol_splits
from fpet.data.synthetic import NUM_CLASSES, SyntheticTask
from fpet.data.transforms import ToFloat


def test_split_sizes_and_train800val200_is_train800_then_val200():
    sizes = {s: len(SyntheticTask(s, num_test=123)) for s in ("train800", "val200", "train800val200", "test")}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 123}
    full, train, val = (SyntheticTask(s) for s in ("train800val200", "train800", "val200"))
    for i_full, (part, i_part) in [(0, (train, 0)), (799, (train, 799)), (800, (val, 0)), (999, (val, 199))]:
        assert torch.equal(full[i_full][0], part[i_part][0]) and full[i_full][1] == part[i_part][1]


def test_images_are_deterministic_uint8_and_seeded():
    a, b = SyntheticTask("test"), SyntheticTask("test")
    img, label = a[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 224, 224) and 0 <= label < NUM_CLASSES
    assert torch.equal(img, b[5][0])
    assert not torch.equal(img, SyntheticTask("test", data_seed=99)[5][0])
    assert not torch.equal(SyntheticTask("train800")[5][0], img)  # test and train streams differ


def test_labels_are_balanced():
    labels = [SyntheticTask("train800val200").label(i) for i in range(1000)]
    counts = torch.bincount(torch.tensor(labels), minlength=NUM_CLASSES)
    assert counts.min() >= 1000 // NUM_CLASSES


def test_background_is_plain_so_merging_has_redundancy():
    img = SyntheticTask("test")[0][0].float()
    patches = img.unfold(1, 16, 16).unfold(2, 16, 16).reshape(3, 196, 256)
    std_within = patches.std(-1).mean(0)
    assert (std_within < 10).float().mean() > 0.5  # most patches are nearly flat


def test_normalisation_modes():
    img = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    assert torch.equal(ToFloat("none")(img), torch.ones(3, 2, 2))
    assert torch.allclose(ToFloat("imagenet")(img)[0], torch.full((2, 2), (1 - 0.485) / 0.229))
    with pytest.raises(ValueError, match="dataset.normalize='zscore'"):
        ToFloat("zscore")


def test_protocols(make_cfg):
    assert protocol_splits("test") == ("train800val200", "test")
    assert protocol_splits("val") == ("train800", "val200")
    with pytest.raises(ValueError, match="dataset.protocol='holdout'"):
        protocol_splits("holdout")
    loaders = build_loaders(make_cfg("dataset.protocol=val", "train.batch_size=64"))
    assert (loaders.train_split, loaders.eval_split) == ("train800", "val200")
    assert len(loaders.train) == 800 // 64 and len(loaders.eval.dataset) == 200
    images, labels = next(iter(loaders.train))
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 224, 224)  # converted on the device
    x = loaders.preprocess(images)
    assert x.dtype == torch.float32 and torch.equal(x, torch.stack([ToFloat()(img) for img in images]))
    assert 0 <= x.min() <= x.max() <= 1
