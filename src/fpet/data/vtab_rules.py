"""VTAB-1K facts as data and pure functions: the 19 tasks, their tfds splits and label rules.

Everything here follows the official VTAB code (google-research/task_adaptation) as NOAH's exporter runs it, and
reference/vtab1k.md. No file or framework access: the folder reader, the validator and the tfds exporter
all read their facts from `TASKS`, and the tests check the rules on hand-made examples.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

GROUPS = ("natural", "specialized", "structured")
SPLITS = ("train800", "val200", "train800val200", "test")
SPLIT_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
"""Sizes of the VTAB-1K training splits; the test size is per task (`TaskSpec.test_size`)."""

CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE_DISTANCE = 1000.0
KITTI_VEHICLE_TYPES = 3  # object types 0, 1, 2 = Car, Van, Truck
CLEVR_MIN_OBJECTS = 3

MANUAL_RESISC45 = (
    "resisc45 needs a manual download: get NWPU-RESISC45.rar (link on "
    "https://www.tensorflow.org/datasets/catalog/resisc45), extract it so that {manual_dir}/NWPU-RESISC45/<class>/"
    "*.jpg exist, then run the same command again.")
MANUAL_RETINOPATHY = (
    "diabetic_retinopathy needs a manual download from Kaggle "
    "(https://www.kaggle.com/c/diabetic-retinopathy-detection/data, competition rules must be accepted): unpack "
    "train.zip.* into {manual_dir}/train/, test.zip.* into {manual_dir}/test/, sample.zip into {manual_dir}/sample/ "
    "and put trainLabels.csv in {manual_dir}/, then run the same command again (tfds also needs opencv for the "
    "btgraham-300 preprocessing).")


@dataclass(frozen=True)
class TaskSpec:
    """One VTAB-1K task.

    Attributes:
        name: canonical name (config name, tables).
        folder: NOAH's folder name under `vtab-1k/`; `aliases` are other spellings found on disk.
        tfds_name: tfds builder with VTAB's version pin, e.g. `cifar100:3.*.*`.
        splits: tfds split strings of train800, val200 and test (train800val200 = train800 + val200).
        source_sizes: tfds split sizes of the pinned version (VTAB's offsets are percentages of these).
        label: name of the label rule in `LABEL_RULES`.
        image: `rgb`, `gray` (tile to 3 channels) or `binary` (tile and scale 0/1 to 0/255).
        manual: instructions for a manual download (tfds `manual_dir`), or None.
        manual_files: paths below `manual_dir` that must exist before tfds can build the task.
    """

    name: str
    folder: str
    tfds_name: str
    splits: Mapping[str, str]
    label: str
    num_classes: int
    group: str
    test_size: int
    source_sizes: Mapping[str, int]
    aliases: tuple[str, ...] = ()
    image: str = "rgb"
    manual: str | None = None
    manual_files: tuple[str, ...] = field(default=())

    @property
    def folders(self) -> tuple[str, ...]:
        """Accepted folder spellings, NOAH's first."""
        return tuple(dict.fromkeys((self.folder, *self.aliases, self.name)))

    def split_spec(self, split: str) -> str:
        """The tfds split string of a VTAB-1K split, e.g. `train[:800]+train[45000:45200]`."""
        if split == "train800val200":
            return f"{self.splits['train800']}+{self.splits['val200']}"
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        return self.splits[split]

    def expected_size(self, split: str) -> int:
        """Number of images VTAB-1K puts in `split`."""
        return self.test_size if split == "test" else SPLIT_SIZES[split]


def _task(name: str, folder: str, tfds_name: str, val200: str, test: str, label: str, num_classes: int,
          group: str, test_size: int, source_sizes: dict[str, int], **kw: Any) -> TaskSpec:
    splits = {"train800": "train[:800]", "val200": val200, "test": test}
    return TaskSpec(name, folder, tfds_name, splits, label, num_classes, group, test_size, source_sizes, **kw)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _task("cifar100", "cifar", "cifar100:3.*.*", "train[45000:45200]", "test", "label", 100, "natural", 10000,
          {"train": 50000, "test": 10000}, aliases=("cifar100",)),
    _task("caltech101", "caltech101", "caltech101:3.*.*", "train[2754:2954]", "test", "label", 102, "natural",
          6084, {"train": 3060, "test": 6084}),
    _task("dtd", "dtd", "dtd:3.*.*", "validation[:200]", "test", "label", 47, "natural", 1880,
          {"train": 1880, "validation": 1880, "test": 1880}),
    _task("oxford_flowers102", "oxford_flowers102", "oxford_flowers102:2.*.*", "validation[:200]", "test", "label",
          102, "natural", 6149, {"train": 1020, "validation": 1020, "test": 6149}),
    _task("oxford_iiit_pet", "oxford_iiit_pet", "oxford_iiit_pet:3.*.*", "train[2944:3144]", "test", "label", 37,
          "natural", 3669, {"train": 3680, "test": 3669}, aliases=("oxford_pet",)),
    _task("svhn", "svhn", "svhn_cropped:3.*.*", "train[65931:66131]", "test", "label", 10, "natural", 26032,
          {"train": 73257, "test": 26032}),
    _task("sun397", "sun397", "sun397/tfds:4.*.*", "validation[:200]", "test", "label", 397, "natural", 21750,
          {"train": 76128, "validation": 10875, "test": 21750}),
    _task("patch_camelyon", "patch_camelyon", "patch_camelyon:2.*.*", "validation[:200]", "test", "label", 2,
          "specialized", 32768, {"train": 262144, "validation": 32768, "test": 32768}),
    _task("eurosat", "eurosat", "eurosat/rgb:2.*.*", "train[16200:16400]", "train[21600:]", "label", 10,
          "specialized", 5400, {"train": 27000}),
    _task("resisc45", "resisc45", "resisc45:3.*.*", "train[18900:19100]", "train[25200:]", "label", 45,
          "specialized", 6300, {"train": 31500}, manual=MANUAL_RESISC45, manual_files=("NWPU-RESISC45",)),
    _task("diabetic_retinopathy", "diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
          "validation[:200]", "test", "label", 5, "specialized", 42670,
          {"train": 35126, "validation": 10906, "test": 42670}, manual=MANUAL_RETINOPATHY,
          manual_files=("train", "test", "trainLabels.csv")),
    _task("clevr_count", "clevr_count", "clevr:3.*.*", "train[63000:63200]", "validation", "clevr_count", 8,
          "structured", 15000, {"train": 70000, "validation": 15000}),
    _task("clevr_dist", "clevr_dist", "clevr:3.*.*", "train[63000:63200]", "validation", "clevr_dist", 6,
          "structured", 15000, {"train": 70000, "validation": 15000}),
    _task("dmlab", "dmlab", "dmlab:2.0.1", "validation[:200]", "test", "label", 6, "structured", 22735,
          {"train": 65550, "validation": 22628, "test": 22735}),
    _task("kitti_dist", "kitti", "kitti:3.2.0", "validation[:200]", "test", "kitti_dist", 4, "structured", 711,
          {"train": 6347, "validation": 423, "test": 711}, aliases=("kitti_dist",)),
    _task("dsprites_loc", "dsprites_loc", "dsprites:2.*.*", "train[589824:590024]", "train[663552:]",
          "dsprites_loc", 16, "structured", 73728, {"train": 737280}, image="binary"),
    _task("dsprites_ori", "dsprites_ori", "dsprites:2.*.*", "train[589824:590024]", "train[663552:]",
          "dsprites_ori", 16, "structured", 73728, {"train": 737280}, image="binary"),
    _task("smallnorb_azi", "smallnorb_azi", "smallnorb:2.*.*", "test[:200]", "test[50%:]", "smallnorb_azi", 18,
          "structured", 12150, {"train": 24300, "test": 24300}, image="gray"),
    _task("smallnorb_ele", "smallnorb_ele", "smallnorb:2.*.*", "test[:200]", "test[50%:]", "smallnorb_ele", 9,
          "structured", 12150, {"train": 24300, "test": 24300}, image="gray"),
)}


def get_task(name: str) -> TaskSpec:
    """The task called `name` (canonical name or any accepted folder spelling)."""
    if name in TASKS:
        return TASKS[name]
    for task in TASKS.values():
        if name in task.folders:
            return task
    raise ValueError(f"unknown VTAB-1K task {name!r}; known: {', '.join(TASKS)}")


def select_tasks(names: Sequence[str]) -> list[TaskSpec]:
    """Tasks named on a command line: names, folder spellings, groups (natural...) or `all`; commas allowed."""
    selected: dict[str, TaskSpec] = {}
    for name in (n for arg in names for n in arg.split(",") if n):
        if name == "all":
            selected.update(TASKS)
        elif name in GROUPS:
            selected.update({t.name: t for t in TASKS.values() if t.group == name})
        else:
            task = get_task(name)
            selected[task.name] = task
    return list(selected.values())


# ---------------------------------------------------------------------------------------------------------------
# split strings (tfds syntax: `name`, `name[a:b]`, `name[a%:b%]`, joined by `+`)

_SLICE = re.compile(r"^(?P<split>[a-z_]+)(?:\[(?P<start>-?\d*)(?P<sp>%?):(?P<stop>-?\d*)(?P<tp>%?)\])?$")


def vtab_offset(count: int, percent: int) -> int:
    """First index after the first `percent`% of `count` examples, as VTAB computes its custom splits."""
    return percent * count // 100


def _bound(value: str, percent: bool, size: int, default: int) -> int:
    if value == "":
        return default
    number = int(value)
    if percent:
        number = int(round(number * size / 100))  # tfds' default "closest" rounding of percent boundaries
    if number < 0:
        number += size
    return max(0, min(number, size))


def resolve_split(spec: str, sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """`train[:800]+train[45000:45200]` -> `[("train", 0, 800), ("train", 45000, 45200)]` given split sizes."""
    parts = []
    for part in spec.split("+"):
        match = _SLICE.match(part.strip())
        if match is None:
            raise ValueError(f"cannot parse tfds split {part!r} in {spec!r}")
        name = match["split"]
        if name not in sizes:
            raise ValueError(f"split {spec!r} reads {name!r}, which has no size in {dict(sizes)}")
        size = sizes[name]
        start = _bound(match["start"] or "", bool(match["sp"]), size, 0)
        stop = _bound(match["stop"] or "", bool(match["tp"]), size, size)
        parts.append((name, start, max(start, stop)))
    return parts


def split_size(spec: str, sizes: Mapping[str, int]) -> int:
    """Number of examples a tfds split string selects."""
    return sum(stop - start for _, start, stop in resolve_split(spec, sizes))


# ---------------------------------------------------------------------------------------------------------------
# label rules: raw tfds example -> 0-based class

def bin_label(value: float, thresholds: Sequence[float]) -> int:
    """Largest i with `thresholds[i] < value` (VTAB's `reduce_max(where(thrs - value < 0))`).

    A value equal to a threshold falls in the bin below it.
    """
    above = [i for i, t in enumerate(thresholds) if t < value]
    if not above:
        raise ValueError(f"value {value} is not above the first threshold {thresholds[0]}: it has no bin")
    return above[-1]


def clevr_count_label(num_objects: int) -> int:
    """CLEVR count: 3..10 objects -> classes 0..7."""
    return int(num_objects) - CLEVR_MIN_OBJECTS


def clevr_distance_label(pixel_coords: np.ndarray) -> int:
    """CLEVR closest-object distance: depth = min of `pixel_coords[:, 2]` over objects, binned (6 classes)."""
    depth = float(np.min(np.asarray(pixel_coords, dtype=np.float32).reshape(-1, 3)[:, 2]))
    return bin_label(depth, CLEVR_DIST_THRESHOLDS)


def kitti_distance_label(types: np.ndarray, locations: np.ndarray) -> int:
    """KITTI closest-vehicle distance: min z of cars/vans/trucks (1000 if none), binned (4 classes)."""
    types = np.asarray(types).reshape(-1)
    depths = np.asarray(locations, dtype=np.float32).reshape(-1, 3)[:, 2][types < KITTI_VEHICLE_TYPES]
    nearest = float(np.min(depths)) if depths.size else KITTI_NO_VEHICLE_DISTANCE
    return bin_label(nearest, KITTI_DIST_THRESHOLDS)


def dsprites_label(value: int, num_values: int, num_classes: int = 16) -> int:
    """dSprites: group `num_values` neighbouring values into `num_classes` (floor(value / (num_values / classes)))."""
    return int(value) * num_classes // num_values


LABEL_RULES: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "label": lambda ex: int(ex["label"]),
    "clevr_count": lambda ex: clevr_count_label(len(ex["objects"]["size"])),
    "clevr_dist": lambda ex: clevr_distance_label(ex["objects"]["pixel_coords"]),
    "kitti_dist": lambda ex: kitti_distance_label(ex["objects"]["type"], ex["objects"]["location"]),
    "dsprites_loc": lambda ex: dsprites_label(ex["label_x_position"], 32),
    "dsprites_ori": lambda ex: dsprites_label(ex["label_orientation"], 40),
    "smallnorb_azi": lambda ex: int(ex["label_azimuth"]),
    "smallnorb_ele": lambda ex: int(ex["label_elevation"]),
}
"""Label rule name -> function of one tfds example (a dict of numpy values)."""


def vtab_image(image: np.ndarray, mode: str = "rgb") -> np.ndarray:
    """tfds image `[H, W, C]` -> uint8 `[H, W, 3]`: grayscale tiled to 3 channels; `binary` 0/1 pixels x 255."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if mode == "binary":
        image = image.astype(np.uint8) * np.uint8(255)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image with 1 or 3 channels, got {image.dtype} {image.shape}")
    return image
