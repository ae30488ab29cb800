"""The tfds -> folder exporter with a fake tfds source: splits, label and image rules, manifest, resuming, manual
downloads. tensorflow-datasets itself is never needed."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from fake_vtab import FakeSource, kitti_example, load_script, task_with, tiny_image
from fpet.data.tfds_export import ExportError, ManualDownloadRequired, TfdsSource, export_task, is_finished
from fpet.data.vtab_rules import TASKS
from fpet.data.vtab_validate import validate_task

KITTI_SIZES = {"train": 850, "validation": 210, "test": 711}


@pytest.fixture(scope="module")
def prepare_main():
    return load_script("prepare_vtab").main


def factory_of(source):
    calls = []

    def factory(task, manual_dir):
        calls.append(task.name)
        return source

    factory.calls = calls
    return factory


def rows(path):
    return [line.split() for line in path.read_text().splitlines()]


def test_kitti_export_has_vtab_splits_labels_manifest_and_validates(tmp_path):
    source = FakeSource(KITTI_SIZES, kitti_example)
    root = tmp_path / "vtab-1k"
    entry = export_task(TASKS["kitti_dist"], root, factory_of(source), tmp_path / "manual")
    assert source.requested == ["train[:800]", "validation[:200]", "test"]
    task_dir = root / "kitti"
    train, val, both = (rows(task_dir / f"{s}.txt") for s in ("train800", "val200", "train800val200"))
    assert [int(label) for _, label in train] == [i % 4 for i in range(800)]  # the closest-vehicle rule
    assert both == train + val and train[5][0] == "images/train800/000005.jpg"
    image = np.asarray(Image.open(task_dir / train[5][0]))
    assert image.shape == (8, 8, 3) and np.abs(image.astype(int) - kitti_example("train", 5)["image"]).max() <= 3

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["tasks"]["kitti_dist"] == json.loads(json.dumps(entry))
    splits = entry["splits"]
    assert {s: v["count"] for s, v in splits.items()} == {"train800": 800, "val200": 200, "train800val200": 1000,
                                                           "test": 711}
    assert splits["test"]["label_min"] == 0 and splits["test"]["label_max"] == 3 and entry["tfds_version"] == "0.0.fake"
    assert splits["val200"]["tfds_split"] == "validation[:200]"
    assert splits["test"]["list_sha256"] == hashlib.sha256((task_dir / "test.txt").read_bytes()).hexdigest()
    sums = (task_dir / "sha256sums.txt").read_text().splitlines()
    assert len(sums) == 1711 and sums[0].split()[1] == "images/train800/000000.jpg"
    assert sums[0].split()[0] == hashlib.sha256((task_dir / "images/train800/000000.jpg").read_bytes()).hexdigest()

    report = validate_task(tmp_path, TASKS["kitti_dist"])
    assert report.ok, report.problems


def test_binary_images_and_grouped_labels_of_dsprites(tmp_path):
    def make(split, index):
        return {"image": tiny_image(split, index, binary=True), "label_x_position": index % 32,
                "label_orientation": index % 40}

    task = task_with("dsprites_ori", test_size=12)  # a short test split keeps the test fast
    source = FakeSource({"train": 663552 + 12}, make)
    export_task(task, tmp_path, factory_of(source), tmp_path / "manual")
    test = rows(tmp_path / "dsprites_ori" / "test.txt")
    assert [int(label) for _, label in test] == [((663552 + i) % 40) * 16 // 40 for i in range(12)]
    image = np.asarray(Image.open(tmp_path / "dsprites_ori" / test[0][0]))
    expected = np.repeat(tiny_image("train", 663552, binary=True), 3, axis=-1) * 255
    assert image.shape == (8, 8, 3) and np.abs(image.astype(int) - expected).mean() < 20


def test_finished_tasks_are_skipped_and_crashed_ones_resume_at_the_split(tmp_path, prepare_main, capsys):
    crashing = FakeSource(KITTI_SIZES, kitti_example, fail_on="test")
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_task(TASKS["kitti_dist"], tmp_path, factory_of(crashing), tmp_path / "manual")
    assert (tmp_path / "kitti" / "train800.txt").is_file() and not (tmp_path / "kitti" / "test.txt").exists()
    assert not is_finished(tmp_path, TASKS["kitti_dist"])

    source = FakeSource(KITTI_SIZES, kitti_example)
    export_task(TASKS["kitti_dist"], tmp_path, factory_of(source), tmp_path / "manual")
    assert source.requested == ["test"]  # train800 and val200 were complete
    assert is_finished(tmp_path, TASKS["kitti_dist"])

    data_dir = tmp_path / "d"
    fresh = FakeSource(KITTI_SIZES, kitti_example)
    assert prepare_main(["--data-dir", str(data_dir), "--tasks", "kitti"], factory=factory_of(fresh)) == 0
    skip = factory_of(source)
    assert prepare_main(["--data-dir", str(data_dir), "--tasks", "kitti_dist"], factory=skip) == 0
    assert skip.calls == [] and "already finished, skipped" in capsys.readouterr().out


def test_manual_download_tasks_stop_with_instructions_and_the_rest_goes_on(tmp_path, prepare_main, capsys):
    source = FakeSource(KITTI_SIZES, kitti_example)
    code = prepare_main(["--data-dir", str(tmp_path), "--tasks", "resisc45", "diabetic_retinopathy", "kitti_dist"],
                        factory=factory_of(source))
    captured = capsys.readouterr()
    assert code == 2 and (tmp_path / "vtab-1k" / "kitti" / "test.txt").is_file()
    manual = tmp_path / "tfds" / "manual"
    assert f"{manual / 'resisc45'}/NWPU-RESISC45" in captured.err and "NWPU-RESISC45.rar" in captured.err
    assert "kaggle.com/c/diabetic-retinopathy-detection" in captured.err
    assert f"{manual / 'diabetic_retinopathy'}/train" in captured.err


def test_manual_files_present_let_the_export_start(tmp_path):
    (tmp_path / "manual" / "NWPU-RESISC45").mkdir(parents=True)
    task = task_with("resisc45", test_size=5)
    source = FakeSource({"train": 25205}, lambda split, i: {"image": tiny_image(split, i), "label": i % 45})
    export_task(task, tmp_path, factory_of(source), tmp_path / "manual")
    assert len(rows(tmp_path / "resisc45" / "test.txt")) == 5
    with pytest.raises(ManualDownloadRequired, match="Missing: .*trainLabels.csv"):
        export_task(TASKS["diabetic_retinopathy"], tmp_path, factory_of(source), tmp_path / "manual")


def test_wrong_split_sizes_and_labels_are_errors(tmp_path):
    source = FakeSource({"train": 850, "validation": 150, "test": 711}, kitti_example)
    with pytest.raises(ExportError, match=r"version 0\.0\.fake\) gives 150 examples for 'validation\[:200\]'"):
        export_task(TASKS["kitti_dist"], tmp_path, factory_of(source), tmp_path / "manual")

    def bad_label(split, index):
        return {"image": tiny_image(split, index), "label": 47 if index == 7 else 0}

    with pytest.raises(ExportError, match=r"dtd train800 example 7: label 47 .* outside \[0, 47\)"):
        export_task(TASKS["dtd"], tmp_path, factory_of(FakeSource(TASKS["dtd"].source_sizes, bad_label)),
                    tmp_path / "manual")


def test_tfds_is_optional():
    code = "import sys; import fpet.data.tfds_export, fpet.data; print('tensorflow_datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert out.stdout.strip() == "False", out.stderr
    if importlib.util.find_spec("tensorflow_datasets") is None:
        with pytest.raises(ExportError, match="make install-prepare"):
            TfdsSource(TASKS["dtd"], ROOT / "data" / "tfds", ROOT / "data" / "tfds" / "manual")
