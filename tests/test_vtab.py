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
    """A config on the fake folders; SMALL splits are custom sizes, so the VTAB-1K size check is off unless an
    override turns it on."""
    return make_cfg(f"paths.data_dir={data_dir}", "dataset.num_workers=0", "dataset.check_sizes=false", *overrides,
                    fast=VTAB_FAST)


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


def test_num_workers_auto_follows_the_cores(make_cfg, tmp_path, monkeypatch):
    """`dataset.num_workers=auto` (the VTAB default) starts min(4, cores) workers: 2 on a 2-core machine, where
    the official 4 made torch warn; an integer is taken as given; a bad value is a config error."""
    import fpet.data.workers as workers
    from fpet.config import compose_config
    from fpet.data import dataset_problems

    assert compose_config(["dataset=dtd"]).dataset.num_workers == "auto"
    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    write_fake_task(tmp_path, "dtd", sizes=SMALL)
    loaders = build_loaders(vtab_cfg(make_cfg, tmp_path, "dataset=dtd", "dataset.num_workers=auto",
                                     "dataset.cache=false"))
    assert loaders.train.num_workers == loaders.eval.num_workers == 2
    monkeypatch.setattr(workers, "available_cores", lambda: 64)
    assert workers.resolve_workers("auto") == 4 and workers.resolve_workers(7) == 7
    problems = dataset_problems(vtab_cfg(make_cfg, tmp_path, "dataset=dtd", "dataset.num_workers=-1"))
    assert len(problems) == 1 and problems[0].startswith("dataset.num_workers=-1: accepted auto")


def test_trains_one_epoch_on_a_fake_task_and_records_the_preprocessing(make_cfg, tmp_path):
    write_fake_task(tmp_path, "kitti_dist", "kitti", sizes=SMALL)
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", "dataset.normalize=imagenet", "bench.flops=false",
                   "bench.latency=false", "bench.train=false")
    results = run(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["task"] == results["task"] == "kitti_dist" and on_disk["normalize"] == "imagenet"
    assert on_disk["eval_split"] == "test" and 0 <= on_disk["acc"] <= 100
    assert (on_disk["num_train"], on_disk["num_eval"]) == (32, 12)  # SMALL: 24 + 8 and 12 images
    assert on_disk["sizes_checked"] is False and on_disk["config"]["dataset"]["check_sizes"] is False
    assert len(list((tmp_path / "cache" / "kitti_dist").glob("*.u8"))) == 2  # train800val200 and test


# --------------------------------------------------------------------------------------------------- bad input

def test_run_refuses_a_split_size_other_than_vtab1k_before_reading_images(make_cfg, tmp_path):
    """dtd with a 94-image test split (VTAB-1K's has 1,880) is refused up front, naming split, counts and the
    override; the run folder stays empty and no image is cached."""
    write_fake_task(tmp_path, "dtd", sizes={"test": 94})  # train800 / val200 / train800val200: 800 / 200 / 1000
    with pytest.raises(ConfigError) as err:
        run(vtab_cfg(make_cfg, tmp_path, "dataset=dtd", "dataset.check_sizes=true"), tmp_path / "run")
    message = str(err.value)
    assert "dataset=dtd: split test has 94 images" in message and "test split has 1,880" in message
    assert "dataset.check_sizes=false" in message and "train800" not in message.split("split test")[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    # the val protocol reads train800 and val200 only, whose sizes are VTAB-1K's
    validate_config(vtab_cfg(make_cfg, tmp_path, "dataset=dtd", "dataset.check_sizes=true", "dataset.protocol=val"))


@pytest.mark.parametrize("split, lines", [("train800", 799), ("val200", 201), ("train800val200", 1001)])
def test_every_training_split_size_is_checked(make_cfg, tmp_path, split, lines):
    root = write_fake_task(tmp_path, "kitti_dist")  # VTAB-1K's sizes: accepted as they are
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", "dataset.check_sizes=true", "dataset.protocol=val")
    assert check_task_files(cfg.dataset, tmp_path) == []
    text = (root / f"{split}.txt").read_text().splitlines(keepends=True)
    (root / f"{split}.txt").write_text("".join((text * 2)[:lines]) + "\n\n")  # blank lines are not images
    protocol = "test" if split == "train800val200" else "val"
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", "dataset.check_sizes=true",
                   f"dataset.protocol={protocol}")
    problems = check_task_files(cfg.dataset, tmp_path)
    expected = {"train800": 800, "val200": 200, "train800val200": 1000}[split]
    assert len(problems) == 1 and f"split {split} has {lines:,} images" in problems[0]
    assert f"{split} split has {expected:,}" in problems[0]
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=kitti_dist", f"dataset.protocol={protocol}")  # the override
    assert check_task_files(cfg.dataset, tmp_path) == []


def test_custom_data_without_a_reference_test_size_is_not_checked(make_cfg, tmp_path):
    write_fake_task(tmp_path, "dtd", sizes={"test": 7})
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=dtd", "dataset.check_sizes=true", "dataset.test_size=null")
    assert check_task_files(cfg.dataset, tmp_path) == []
    cfg = vtab_cfg(make_cfg, tmp_path, "dataset=dtd", "dataset.check_sizes=maybe")
    with pytest.raises(ConfigError, match="dataset.check_sizes='maybe': must be true or false"):
        validate_config(cfg)


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
