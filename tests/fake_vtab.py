"""Tiny VTAB-1K folders and a fake tfds source for the tests (a few small JPEGs, lists of any length)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Optional

import numpy as np
from PIL import Image

from fpet.data.vtab_rules import TaskSpec, get_task, resolve_split


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    """A smooth random RGB image (width x height) as a quality-75 JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(path, quality=75)


def write_fake_task(data_dir: Path, task: str, folder: Optional[str] = None,
                    sizes: Optional[Mapping[str, int]] = None, n_images: int = 5) -> Path:
    """`data_dir/vtab-1k/<folder>/` with `n_images` JPEGs and list files of `sizes` lines (VTAB's by default)
    that cycle through the images and the labels; train800val200 = train800 + val200."""
    spec = get_task(task)
    root = Path(data_dir) / "vtab-1k" / (folder or spec.folder)
    for k in range(n_images):
        write_jpeg(root / "images" / f"img{k}.jpg", seed=k, size=(40 + 4 * k, 30 + 2 * k))
    sizes = {s: spec.expected_size(s) for s in ("train800", "val200", "test")} | dict(sizes or {})
    lines = {s: [f"images/img{(i + off) % n_images}.jpg {(i + off) % spec.num_classes}\n" for i in range(sizes[s])]
             for s, off in (("train800", 0), ("val200", 1), ("test", 2))}
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (root / f"{split}.txt").write_text("".join(split_lines))
    return root


class FakeSource:
    """Stands in for a tfds builder: split sizes, and examples made from (split, index) by `make(split, i)`."""

    version = "0.0.fake"

    def __init__(self, sizes: Mapping[str, int], make: Any, fail_on: Optional[str] = None) -> None:
        self.sizes, self.make, self.fail_on = dict(sizes), make, fail_on
        self.requested: list[str] = []

    def split_sizes(self) -> Mapping[str, int]:
        return self.sizes

    def examples(self, spec: str) -> Iterator[Mapping[str, Any]]:
        self.requested.append(spec)
        for split, start, stop in resolve_split(spec, self.sizes):
            for index in range(start, stop):
                if spec == self.fail_on and index == start + 3:
                    raise RuntimeError("simulated crash in the middle of a split")
                yield self.make(split, index)


def tiny_image(split: str, index: int, binary: bool = False) -> np.ndarray:
    """An 8x8 image of one random colour (JPEG keeps it nearly exact); `binary`: 0/1 left/right halves."""
    if binary:
        image = np.zeros((8, 8, 1), dtype=np.uint8)
        image[:, 4 * (index % 2):4 * (index % 2) + 4] = 1
        return image
    colour = np.random.default_rng([len(split), index]).integers(0, 256, size=3, dtype=np.uint8)
    return np.broadcast_to(colour, (8, 8, 3)).copy()


def kitti_example(split: str, index: int) -> dict[str, Any]:
    """A KITTI-like example whose closest vehicle is at depth 4, 12, 30 or absent, cycling with `index`."""
    depth = (4.0, 12.0, 30.0, None)[index % 4]
    types = [3, 0] if depth is not None else [3, 4]  # a pedestrian at 1 m is never the answer
    locations = [[0.0, 0.0, 1.0], [0.0, 0.0, depth if depth is not None else 2.0]]
    return {"image": tiny_image(split, index), "objects": {"type": np.array(types),
                                                           "location": np.array(locations, np.float32)}}


def task_with(task: str, **changes: Any) -> TaskSpec:
    from dataclasses import replace

    return replace(get_task(task), **changes)


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module, so tests can call its `main(argv)`."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
