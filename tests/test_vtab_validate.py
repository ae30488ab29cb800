"""The VTAB-1K validator: a good folder passes; a broken one has every problem reported, with a non-zero exit."""
from __future__ import annotations

import pytest

from fake_vtab import load_script, write_fake_task
from fpet.data.vtab_rules import TASKS
from fpet.data.vtab_validate import format_reports, validate_task


@pytest.fixture(scope="module")
def validate_main():
    return load_script("validate_vtab").main


def test_good_folders_in_both_spellings_pass(tmp_path, validate_main, capsys):
    write_fake_task(tmp_path, "kitti_dist", "kitti")
    write_fake_task(tmp_path, "cifar100", "cifar100")
    report = validate_task(tmp_path, TASKS["kitti_dist"])
    assert report.ok, report.problems
    assert report.counts == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 711}
    assert report.labels == (0, 3) and report.images_checked == 5
    assert validate_main(["--data-dir", str(tmp_path), "--tasks", "kitti_dist,cifar100"]) == 0
    out = capsys.readouterr().out
    assert "2/2 tasks ok" in out and "kitti" in out and "10000" in out


def test_takes_train_py_spelling_of_data_dir_and_tasks(tmp_path, validate_main, capsys):
    write_fake_task(tmp_path, "kitti_dist", "kitti")
    assert validate_main([f"paths.data_dir={tmp_path}", "dataset=kitti_dist", "--no-images"]) == 0
    assert "1/1 tasks ok" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        validate_main([f"paths.data_dir={tmp_path}", "train.epochs=3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'train.epochs=3'" in err and "paths.data_dir=... (= --data-dir)" in err and "dataset=... (= --tasks)" in err


def test_every_problem_is_reported_not_just_the_first(tmp_path, validate_main, capsys):
    root = write_fake_task(tmp_path, "kitti_dist", "kitti")
    lines = (root / "train800.txt").read_text().splitlines()
    lines[9] = "images/missing.jpg 1"
    lines[19] = "images/img0.jpg two"
    lines[29] = "images/img0.jpg 4"
    (root / "train800.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("".join(f"images/img{i % 5}.jpg 0\n" for i in range(700)))  # 11 short
    jpeg = (root / "images" / "img2.jpg").read_bytes()
    (root / "images" / "img2.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # truncated
    (root / "val200.txt").unlink()

    report = validate_task(tmp_path, TASKS["kitti_dist"])
    text = "\n".join(str(p) for p in report.problems)
    assert "train800.txt:10: image images/missing.jpg does not exist" in text
    assert "train800.txt:20: label 'two' of images/img0.jpg is not an integer" in text
    assert "train800.txt:30: label 4 of images/img0.jpg is outside [0, 4)" in text
    assert "test.txt: lists 700 images; VTAB-1K test of kitti_dist has 711" in text
    assert "val200.txt: list file val200.txt is missing" in text
    assert "train800.txt:3: unreadable image" in text and "img2.jpg: OSError" in text
    assert report.counts["train800"] == 800  # malformed lines still count as lines
    assert len(report.problems) == 6

    assert validate_main(["--data-dir", str(tmp_path), "--tasks", "kitti_dist", "dtd"]) == 1
    out = capsys.readouterr().out
    assert "6 problems" in out and "(missing)" in out and "0/2 tasks ok" in out
    assert "dtd" in out and "accepted folder names: dtd" in out


def test_train800val200_must_be_train800_then_val200(tmp_path):
    root = write_fake_task(tmp_path, "dtd")
    lines = (root / "train800val200.txt").read_text().splitlines()
    (root / "train800val200.txt").write_text("\n".join(lines[800:] + lines[:800]) + "\n")
    report = validate_task(tmp_path, TASKS["dtd"], images=False)
    assert [p.message for p in report.problems] == ["labels are not train800's followed by val200's"]


def test_problem_listing_is_capped_per_task(tmp_path):
    root = write_fake_task(tmp_path, "dtd")
    (root / "test.txt").write_text("".join(f"images/gone{i}.jpg 0\n" for i in range(1880)))
    report = validate_task(tmp_path, TASKS["dtd"], images=False)
    assert len(report.problems) == 1880
    text = format_reports([report], max_problems=5)
    assert "1880 problems" in text and "... 1875 more" in text
    assert len(format_reports([report], max_problems=0).splitlines()) > 1880
