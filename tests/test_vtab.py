"""The VTAB-1K folder reader: both folder spellings, the official preprocessing, the cache, protocols, bad input,
and one training epoch on a tiny fake task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

import fpet.data.vtab as vtab
from conftest import FAST
from fake_vtab import write_fake_task, write_jpeg
from fpet.data import build_dataset, build_loaders
from fpet.data.transforms import ToFloat
from fpet.data.vtab import VTABDataError, VTABFolder, check_task_files, decode_image
from fpet.train import run
from fpet.validate import ConfigError, validate_config

VTAB_FAST = [o for o in FAST if not o.startswith("dataset.num_test")]  # num_test is the synthetic task's key
SMALL = {"train800": 24, "val200": 8, "test": 12}


def vtab_cfg(make_cfg, data_dir: Path, *overrides: str):
    return make_cfg(f"paths.data_dir={data_dir}", "dataset.num_workers=0", *overrides, fast=VTAB_FAST)


@pytest.mark.parametrize("task, folder", [("cifar100", "cifar"), ("cifar100", "cifar100"), ("kitti_dist", "kitti"),
                                          ("kitti_dist", "kitti_dist"), ("oxford_iiit_pet", "oxford_pet")])
def test_reads_every_accepted_folder_spelling(make_cfg, tmp_path, task, folder):
    write_fake_task(tmp_path, task, folder, sizes=SMALL)
    cfg = vtab_cfg(make_cfg, tmp_path, f"dataset={task}", "dataset.cache=false")
    data = build_dataset(cfg.dataset, "test", cfg.paths.data_dir)
    assert len(data) == 12 and data.root.name == folder
    image, label = data[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
    assert label == (3 + 2) % cfg.dataset.num_classes  # fake lists: test line i has label (i + 2) % classes


@pytest.mark.parametrize("normalize", ["none", "imagenet"])
def test_preprocessing_equals_the_official_torchvision_pipeline(tmp_path, normalize):
    path = tmp_path / "a.jpg"
    write_jpeg(path, seed=3, size=(500, 375))
    steps = [transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor()]
    if normalize == "imagenet":
        steps.append(transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    official = transforms.Compose(steps)(Image.open(path).convert("RGB"))
    ours = ToFloat(normalize)(decode_image(path))
    if normalize == "none":
        assert torch.equal(ours, official)
    else:
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-6)


def test_cache_returns_exactly_the_uncached_tensors_and_later_runs_decode_nothing(tmp_path, monkeypatch):
    root = write_fake_task(tmp_path, "dtd", sizes=SMALL)
    plain = VTABFolder(root, "train800val200", 47, transform=ToFloat())
    cached = VTABFolder(root, "train800val200", 47, transform=ToFloat(), cache_dir=tmp_path / "cache")
    assert len(plain) == len(cached) == 32
    for i in range(len(plain)):
        (a, la), (b, lb) = plain[i], cached[i]
        assert torch.equal(a, b) and la == lb
    assert len(list((tmp_path / "cache").glob("train800val200-224-bicubic-*.u8"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a JPEG although the cache is valid")

    expected = plain[31][0]
    monkeypatch.setattr(vtab, "decode_image", no_decoding)
    again = VTABFolder(root, "train800val200", 47, transform=ToFloat(), cache_dir=tmp_path / "cache")
    assert torch.equal(again[31][0], expected)


def test_changed_list_gets_a_new_cache(tmp_path):
    root = write_fake_task(tmp_path, "dtd", sizes=SMALL)
    first = VTABFolder(root, "val200", 47, cache_dir=tmp_path / "cache")
    lines = (root / "val200.txt").read_text().splitlines()
    (root / "val200.txt").write_text("\n".join(reversed(lines)) + "\n")
    second = VTABFolder(root, "val200", 47, cache_dir=tmp_path / "cache")
    assert second.cache.path != first.cache.path
    assert torch.equal(second[0][0], first[7][0]) and second[0][1] == first[7][1]


def test_protocols_pick_the_splits(make_cfg, tmp_path):
    write_fake_task(tmp_path, "kitti_dist", sizes=SMALL)
    loaders = build_loaders(vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", "dataset.protocol=val"))
    assert (loaders.train_split, loaders.eval_split) == ("train800", "val200")
    assert (len(loaders.train.dataset), len(loaders.eval.dataset)) == (24, 8)
    loaders = build_loaders(vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist"))
    assert (loaders.train_split, loaders.eval_split) == ("train800val200", "test")
    assert (len(loaders.train.dataset), len(loaders.eval.dataset)) == (32, 12)


def test_trains_one_epoch_on_a_fake_task_and_records_the_preprocessing(make_cfg, tmp_path):
    write_fake_task(tmp_path, "kitti_dist", "kitti", sizes=SMALL)
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", "dataset.normalize=imagenet", "bench.flops=false",
                   "bench.latency=false", "bench.train=false")
    results = run(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["task"] == results["task"] == "kitti_dist" and on_disk["normalize"] == "imagenet"
    assert on_disk["eval_split"] == "test" and 0 <= on_disk["acc"] <= 100
    assert len(list((tmp_path / "cache" / "kitti_dist").glob("*.u8"))) == 2  # train800val200 and test


# --------------------------------------------------------------------------------------------------- bad input

def test_missing_task_folder_says_where_it_looked_and_how_to_get_data(make_cfg, tmp_path):
    (tmp_path / "vtab-1k").mkdir()
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=cifar100")
    with pytest.raises(VTABDataError) as err:
        build_dataset(cfg.dataset, "test", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "vtab-1k" / "cifar") in message and str(tmp_path / "vtab-1k" / "cifar100") in message
    assert "prepare_vtab.py --tasks cifar100" in message and "NOAH" in message
    with pytest.raises(VTABDataError, match="vtab-1k does not exist"):
        build_dataset(cfg.dataset, "test", tmp_path / "elsewhere")


def test_run_checks_task_folder_and_lists_before_reading_anything(make_cfg, tmp_path):
    root = write_fake_task(tmp_path, "kitti_dist", sizes=SMALL)
    (root / "test.txt").unlink()
    with pytest.raises(ConfigError, match=r"dataset=kitti_dist: .*test\.txt is missing \(dataset\.protocol=test"):
        run(vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist"), tmp_path / "run")
    assert check_task_files(vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", "dataset.protocol=val").dataset,
                            tmp_path) == []  # train800 -> val200 needs no test.txt
    with pytest.raises(ConfigError, match=r"dataset=dtd: VTAB-1K task 'dtd' not found"):
        validate_config(vtab_cfg(make_cfg, tmp_path, "dataset=dtd"))


def test_missing_list_file(tmp_path):
    root = write_fake_task(tmp_path, "dtd", sizes=SMALL)
    (root / "test.txt").unlink()
    with pytest.raises(VTABDataError, match=r"test\.txt: list file test\.txt is missing"):
        VTABFolder(root, "test", 47)


@pytest.mark.parametrize("line, message", [
    ("images/nope.jpg 3", r"test\.txt:3: image images/nope\.jpg does not exist \(looked for .*nope\.jpg\)"),
    ("images/img0.jpg cat", r"test\.txt:3: label 'cat' of images/img0\.jpg is not an integer"),
    ("images/img0.jpg 47", r"test\.txt:3: label 47 of images/img0\.jpg is outside \[0, 47\)"),
    ("images/img0.jpg -1", r"test\.txt:3: label -1 .* outside \[0, 47\)"),
    ("images/img0.jpg", r"test\.txt:3: expected '<relative/path\.jpg> <label>'"),
])
def test_bad_list_line_names_file_and_line(tmp_path, line, message):
    root = write_fake_task(tmp_path, "dtd", sizes=SMALL)
    lines = (root / "test.txt").read_text().splitlines()
    lines[2] = line
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(VTABDataError, match=message):
        VTABFolder(root, "test", 47)


@pytest.mark.parametrize("cache", [False, True])
def test_corrupt_jpeg_names_file_and_line(tmp_path, cache):
    root = write_fake_task(tmp_path, "dtd", sizes=SMALL)
    jpeg = (root / "images" / "img1.jpg").read_bytes()
    (root / "images" / "img1.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    match = r"test\.txt:5: cannot read image .*img1\.jpg \(OSError: "  # first use: line 5
    with pytest.raises(VTABDataError, match=match):
        data = VTABFolder(root, "test", 47, cache_dir=tmp_path / "cache" if cache else None)
        _ = [data[i] for i in range(len(data))]
    if cache:
        assert not list((tmp_path / "cache").glob("*.u8"))  # no half-built cache left behind


def test_bad_settings(tmp_path):
    root = write_fake_task(tmp_path, "dtd", sizes=SMALL)
    with pytest.raises(ValueError, match="split='train'"):
        VTABFolder(root, "train", 47)
    with pytest.raises(ValueError, match="dataset.interpolation='cubic'"):
        VTABFolder(root, "test", 47, interpolation="cubic")
