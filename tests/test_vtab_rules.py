"""VTAB-1K facts: label rules on hand-made examples (bin edges included), split strings, the task table, configs."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT
from fpet.config import compose_config
from fpet.data.vtab_rules import (CLEVR_DIST_THRESHOLDS, GROUPS, LABEL_RULES, TASKS, bin_label, clevr_count_label,
                                  clevr_distance_label, dsprites_label, get_task, kitti_distance_label,
                                  resolve_split, select_tasks, split_size, vtab_image, vtab_offset)


@pytest.mark.parametrize("depth, label", [
    (1e-3, 0), (8.0, 0), (8.0001, 1), (8.5, 1), (8.51, 2), (9.0, 2), (9.5, 3), (9.75, 4), (10.0, 4), (10.01, 5),
    (99.0, 5),
])
def test_clevr_distance_bins_put_a_value_on_an_edge_in_the_lower_bin(depth, label):
    coords = np.array([[10.0, 20.0, depth + 3.0], [50.0, 60.0, depth], [1.0, 2.0, 40.0]], dtype=np.float32)
    assert clevr_distance_label(coords) == label  # the minimum depth over objects decides


def test_clevr_distance_rejects_a_depth_with_no_bin():
    with pytest.raises(ValueError, match="first threshold"):
        clevr_distance_label(np.array([[0.0, 0.0, 0.0]]))
    assert bin_label(100.5, CLEVR_DIST_THRESHOLDS) == 6  # past the last edge: one more bin than CLEVR's 6 classes


@pytest.mark.parametrize("n_objects, label", [(3, 0), (4, 1), (10, 7)])
def test_clevr_count(n_objects, label):
    assert clevr_count_label(n_objects) == label
    example = {"objects": {"size": np.zeros(n_objects, dtype=np.int64)}}
    assert LABEL_RULES["clevr_count"](example) == label


@pytest.mark.parametrize("types, depths, label", [
    ([0], [5.0], 0), ([1], [8.0], 0), ([2], [8.01], 1), ([0], [20.0], 1), ([0], [20.5], 2), ([0], [998.0], 2),
    ([0, 1], [30.0, 15.0], 1),           # nearest vehicle wins
    ([3, 0], [2.0, 25.0], 2),            # a pedestrian (type 3) nearer than the car is ignored
    ([3, 4, 7], [2.0, 3.0, 4.0], 3),     # no car / van / truck -> 1000 m -> last class
    ([], [], 3),
])
def test_kitti_closest_vehicle_distance(types, depths, label):
    locations = np.array([[1.0, 1.5, d] for d in depths], dtype=np.float32).reshape(-1, 3)
    assert kitti_distance_label(np.array(types), locations) == label
    assert LABEL_RULES["kitti_dist"]({"objects": {"type": np.array(types), "location": locations}}) == label


def test_dsprites_grouping_matches_vtab_float_floordiv_for_every_value():
    for num_values in (32, 40):
        factor = np.float32(num_values / 16)
        for value in range(num_values):
            assert dsprites_label(value, num_values) == int(np.floor(np.float32(value) / factor))
    assert [dsprites_label(v, 32) for v in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [dsprites_label(v, 40) for v in (0, 2, 3, 5, 39)] == [0, 0, 1, 2, 15]
    assert LABEL_RULES["dsprites_loc"]({"label_x_position": 17, "label_orientation": 3}) == 8
    assert LABEL_RULES["dsprites_ori"]({"label_x_position": 17, "label_orientation": 3}) == 1


def test_smallnorb_rules_pick_their_attribute():
    example = {"label_azimuth": 17, "label_elevation": 8, "label_category": 2}
    assert LABEL_RULES["smallnorb_azi"](example) == 17 and LABEL_RULES["smallnorb_ele"](example) == 8


def test_images_are_tiled_and_scaled_to_uint8_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    rgb = vtab_image(gray, "gray")
    assert rgb.shape == (3, 4, 3) and all(np.array_equal(rgb[..., c], gray[..., 0]) for c in range(3))
    binary = vtab_image(np.array([[[0], [1]]], dtype=np.uint8), "binary")
    assert binary.tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert vtab_image(np.zeros((2, 2), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        vtab_image(np.zeros((2, 2, 2), np.uint8))


def test_split_strings_resolve_like_tfds():
    sizes = {"train": 50000, "test": 24300}
    assert resolve_split("train[:800]+train[45000:45200]", sizes) == [("train", 0, 800), ("train", 45000, 45200)]
    assert resolve_split("test[50%:]", sizes) == [("test", 12150, 24300)]
    assert resolve_split("test[:50%]", sizes) == [("test", 0, 12150)]
    assert resolve_split("train[-100:]", sizes) == [("train", 49900, 50000)]
    assert resolve_split("test", sizes) == [("test", 0, 24300)]
    assert split_size("train[49900:50100]", sizes) == 100  # clipped at the end like tfds
    with pytest.raises(ValueError, match="'validation'"):
        resolve_split("validation[:200]", sizes)
    with pytest.raises(ValueError, match="cannot parse"):
        resolve_split("train[::2]", sizes)


# VTAB's custom splits: val200 starts after the first p% of a source split, test after the first q%.
PERCENT_SPLITS = {"cifar100": (90, None), "caltech101": (90, None), "oxford_iiit_pet": (80, None),
                  "svhn": (90, None), "eurosat": (60, 80), "resisc45": (60, 80), "clevr_count": (90, None),
                  "clevr_dist": (90, None), "dsprites_loc": (80, 90), "dsprites_ori": (80, 90)}


@pytest.mark.parametrize("name", sorted(PERCENT_SPLITS))
def test_split_offsets_are_vtabs_percentages_of_the_source_sizes(name):
    task, (val_pct, test_pct) = TASKS[name], PERCENT_SPLITS[name]
    offset = vtab_offset(task.source_sizes["train"], val_pct)
    assert task.splits["val200"] == f"train[{offset}:{offset + 200}]"
    if test_pct is not None:
        assert task.splits["test"] == f"train[{vtab_offset(task.source_sizes['train'], test_pct)}:]"


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_table_row_is_consistent(name):
    task = TASKS[name]
    sizes = dict(task.source_sizes)
    assert split_size(task.split_spec("test"), sizes) == task.test_size
    assert split_size(task.split_spec("train800"), sizes) == 800
    assert split_size(task.split_spec("val200"), sizes) == 200
    assert task.split_spec("train800val200") == f"{task.splits['train800']}+{task.splits['val200']}"
    assert split_size(task.split_spec("train800val200"), sizes) == 1000
    assert task.label in LABEL_RULES and task.group in GROUPS and task.folder == task.folders[0]


def test_task_table_matches_the_reference():
    assert len(TASKS) == 19
    assert [sum(t.group == g for t in TASKS.values()) for g in GROUPS] == [7, 4, 8]
    classes = {n: t.num_classes for n, t in TASKS.items()}
    assert classes == {"cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102,
                       "oxford_iiit_pet": 37, "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10,
                       "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6,
                       "kitti_dist": 4, "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18,
                       "smallnorb_ele": 9}
    assert {t.name for t in TASKS.values() if t.manual} == {"resisc45", "diabetic_retinopathy"}


def test_task_lookup_by_name_spelling_group():
    assert get_task("cifar").name == "cifar100" and get_task("oxford_pet").name == "oxford_iiit_pet"
    assert get_task("kitti").name == "kitti_dist"
    assert [t.name for t in select_tasks(["cifar100,kitti", "dtd"])] == ["cifar100", "kitti_dist", "dtd"]
    assert len(select_tasks(["natural"])) == 7 and len(select_tasks(["all"])) == 19
    with pytest.raises(ValueError, match="unknown VTAB-1K task 'cifar10'"):
        select_tasks(["cifar10"])


def test_dataset_configs_agree_with_the_task_table():
    files = {p.stem for p in (ROOT / "configs" / "dataset").glob("*.yaml")} - {"_vtab", "synthetic"}
    assert files == set(TASKS)
    for name, task in TASKS.items():
        ds = compose_config([f"dataset={name}"]).dataset
        assert (ds.name, ds.kind, ds.folder, ds.num_classes, ds.group, ds.test_size) == \
            (name, "vtab", task.folder, task.num_classes, task.group, task.test_size)
        assert tuple(ds.aliases) == task.aliases
        assert (ds.protocol, ds.normalize, ds.img_size, ds.interpolation, ds.cache) == \
            ("test", "none", 224, "bicubic", True)

