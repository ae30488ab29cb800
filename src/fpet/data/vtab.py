"""The VTAB-1K folder reader (NOAH's format, what most PET papers use):

    ${paths.data_dir}/vtab-1k/<folder>/
        train800.txt  val200.txt  train800val200.txt  test.txt    one "relative/path.jpg <label>" per line
        images/...

Each image goes PIL -> RGB -> Resize((224, 224), bicubic) as torchvision does on PIL images (the official FPET
code's `transforms.Resize((224, 224), interpolation=3)`) -> uint8 `[3, H, W]` -> optional on-disk cache
(`fpet.data.cache`) -> the shared `ToFloat` transform, which equals `ToTensor()` (plus optional ImageNet mean/std).
Bad input stops with an error naming the list file and line; `fpet.data.vtab_validate` reports every problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fpet.data.cache import ImageCache, cache_key
from fpet.errors import UserError
from fpet.data.vtab_rules import SPLIT_SIZES, SPLITS
from fpet.data.workers import resolve_workers

VTAB_SUBDIR = "vtab-1k"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CACHE_VERSION = 1  # bump when the decode pipeline changes, so old caches are not reused


class VTABDataError(UserError, ValueError):
    """Missing or malformed VTAB-1K data; the message names the path / line and the fix."""


@dataclass(frozen=True)
class Problem:
    """One problem in a task folder: where (file, 1-based line or None) and what."""

    file: Path
    line: Optional[int]
    message: str

    def __str__(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: {self.message}"


@dataclass(frozen=True)
class Entry:
    """One list line: the image, its label, the line number and the file's (size, mtime_ns)."""

    path: Path
    label: int
    line: int
    stat: tuple[int, int]


def how_to_get_data(task: str) -> str:
    """The sentence every missing-data error ends with."""
    return (f"Export it with `python scripts/prepare_vtab.py --tasks {task}` (needs `make install-prepare`), or "
            "use folders made by NOAH's VTAB-1K exporter (README 'Data') and point paths.data_dir at the directory "
            f"holding {VTAB_SUBDIR}/.")


def find_task_dir(data_dir: str | Path, task: str, folders: Sequence[str]) -> Path:
    """The folder of `task` under `data_dir/vtab-1k/`, trying each accepted spelling in `folders`."""
    base = Path(data_dir) / VTAB_SUBDIR
    tried = [base / name for name in dict.fromkeys(folders)]
    for path in tried:
        if path.is_dir():
            return path
    where = (f"{base} does not exist" if not base.is_dir() else
             f"tried {', '.join(str(p) for p in tried)}")
    raise VTABDataError(f"VTAB-1K task {task!r} not found: {where} (accepted folder names: "
                        f"{', '.join(dict.fromkeys(folders))}). {how_to_get_data(task)}")


def _parse_line(text: str, list_path: Path, number: int, root: Path,
                num_classes: int) -> tuple[Optional[Entry], Optional[Problem]]:
    parts = text.rsplit(None, 1)
    if len(parts) != 2:
        return None, Problem(list_path, number, f"expected '<relative/path.jpg> <label>', got {text!r}")
    rel, raw_label = parts
    try:
        label = int(raw_label)
    except ValueError:
        return None, Problem(list_path, number, f"label {raw_label!r} of {rel} is not an integer")
    if not 0 <= label < num_classes:
        return None, Problem(list_path, number, f"label {label} of {rel} is outside [0, {num_classes}) "
                                                f"(dataset.num_classes={num_classes}); wrong task folder or list?")
    path = root / rel
    try:
        st = path.stat()
    except OSError:
        return None, Problem(list_path, number, f"image {rel} does not exist (looked for {path})")
    return Entry(path, label, number, (st.st_size, st.st_mtime_ns)), None


def parse_list(list_path: Path, root: Path, num_classes: int) -> tuple[list[Entry], list[Problem]]:
    """Every valid line of a list file and every problem (blank lines are skipped)."""
    if not list_path.is_file():
        return [], [Problem(list_path, None, f"list file {list_path.name} is missing from {root}")]
    entries, problems = [], []
    for number, text in enumerate(list_path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        entry, problem = _parse_line(text.strip(), list_path, number, root, num_classes)
        if entry is not None:
            entries.append(entry)
        if problem is not None:
            problems.append(problem)
    return entries, problems


def decode_image(path: Path, img_size: int = 224, interpolation: str = "bicubic") -> Tensor:
    """Open, convert to RGB and resize to `img_size` x `img_size` exactly as torchvision's `Resize` on PIL:
    uint8 `[3, img_size, img_size]`. Raises OSError / ValueError for unreadable files."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    resized = TF.resize(rgb, [img_size, img_size], interpolation=InterpolationMode(interpolation))
    return TF.pil_to_tensor(resized)


def check_image(path: Path) -> Optional[str]:
    """None if `path` decodes completely (JPEGs at reduced DCT scale, which still reads every byte), else why."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(err).__name__}: {err}"
    return None


class VTABFolder(Dataset):
    """One split of a VTAB-1K task folder: items `(transform(uint8 [3, H, W]), label)`.

    Args:
        root: the task folder (holds `<split>.txt`).
        split: train800 | val200 | train800val200 | test.
        num_classes: labels must lie in [0, num_classes).
        cache_dir: directory of the decoded-image cache; None decodes every image on every access.
        num_workers: processes that decode while the cache is built.
    """

    def __init__(self, root: str | Path, split: str, num_classes: int, img_size: int = 224,
                 interpolation: str = "bicubic", transform: Optional[Callable[[Tensor], Tensor]] = None,
                 cache_dir: Optional[str | Path] = None, num_workers: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"dataset.interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
        self.root, self.split = Path(root), split
        self.list_path = self.root / f"{split}.txt"
        self.img_size, self.interpolation, self.transform = img_size, interpolation, transform
        self.entries, problems = parse_list(self.list_path, self.root, num_classes)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise VTABDataError(f"{problems[0]}{more}. `python scripts/validate_vtab.py` lists every problem.")
        if not self.entries:
            raise VTABDataError(f"{self.list_path} lists no images")
        self.labels = [e.label for e in self.entries]
        self.cache = self._make_cache(Path(cache_dir)) if cache_dir is not None else None
        if self.cache is not None:
            self.cache.ensure(self.decode, num_workers, desc=f"caching {self.root.name}/{split}")

    def _make_cache(self, cache_dir: Path) -> ImageCache:
        key = cache_key(CACHE_VERSION, self.list_path.read_bytes(), self.img_size, self.interpolation,
                        [e.stat for e in self.entries])
        name = f"{self.split}-{self.img_size}-{self.interpolation}-{key[:16]}.u8"
        return ImageCache(cache_dir / name, key, len(self.entries), (3, self.img_size, self.img_size))

    def decode(self, index: int) -> Tensor:
        """The uint8 image `[3, H, W]` of item `index`, decoded from its file."""
        entry = self.entries[index]
        try:
            return decode_image(entry.path, self.img_size, self.interpolation)
        except Exception as err:
            raise VTABDataError(f"{self.list_path}:{entry.line}: cannot read image {entry.path} "
                                f"({type(err).__name__}: {err}); re-export or re-download it") from None

    def __len__(self) -> int:
        return len(self.entries)

    def image(self, index: int) -> Tensor:
        """The uint8 image `[3, H, W]` of item `index`, from the cache if there is one."""
        return self.cache[index] if self.cache is not None else self.decode(index)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.transform is None:
            return self.image(index), self.labels[index]
        # the transform makes a new tensor, so it may read the cache's mapped pages directly
        image = self.cache.view(index) if self.cache is not None else self.decode(index)
        return self.transform(image), self.labels[index]


def build_vtab(cfg: DictConfig, split: str, data_dir: Path, transform: Callable) -> VTABFolder:
    """`DATASET_KINDS["vtab"]`: the split of the task `cfg` (= `cfg.dataset`) under `data_dir`."""
    root = find_task_dir(data_dir, cfg.name, [cfg.folder, *cfg.get("aliases", []), cfg.name])
    cache_dir = None
    if cfg.get("cache", True):
        cache_dir = Path(cfg.get("cache_dir") or Path(data_dir) / "cache" / cfg.name)
    return VTABFolder(root, split, int(cfg.num_classes), int(cfg.img_size), cfg.get("interpolation", "bicubic"),
                      transform, cache_dir, resolve_workers(cfg.get("num_workers", 0)))


def check_task_files(cfg: DictConfig, data_dir: Path) -> list[str]:
    """Up-front check (`fpet.data.DATASET_FILE_CHECKS["vtab"]`): the task folder and the list files of the protocol's
    splits exist. Cheap; `scripts/validate_vtab.py` checks the contents."""
    from fpet.data import PROTOCOLS

    try:
        root = find_task_dir(data_dir, cfg.name, [cfg.folder, *cfg.get("aliases", []), cfg.name])
    except VTABDataError as err:
        return [f"dataset={cfg.name}: {err}"]
    splits = PROTOCOLS.get(cfg.get("protocol"), ())
    missing = [s for s in splits if not (root / f"{s}.txt").is_file()]
    return [f"dataset={cfg.name}: {root / f'{s}.txt'} is missing (dataset.protocol={cfg.protocol} needs it). "
            f"{how_to_get_data(cfg.name)}" for s in missing] + split_size_problems(cfg, root, [
                s for s in splits if s not in missing])


def expected_split_size(cfg: DictConfig, split: str) -> Optional[int]:
    """Images VTAB-1K puts in `split` of the task `cfg` (= `cfg.dataset`): 800 / 200 / 1000, the test split's
    `test_size`; None where the config names none (custom data)."""
    return SPLIT_SIZES.get(split, cfg.get("test_size") if split == "test" else None)


def count_listed(list_path: Path) -> int:
    """Images a list file names (its non-blank lines, as `parse_list` reads them)."""
    with list_path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def split_size_problems(cfg: DictConfig, root: Path, splits: Sequence[str]) -> list[str]:
    """Each split of `splits` whose list names another number of images than VTAB-1K's (`expected_split_size`),
    unless `dataset.check_sizes=false`. Cheap: the list files are counted, nothing is decoded."""
    check = cfg.get("check_sizes", True)
    if not isinstance(check, bool):
        return [f"dataset.check_sizes={check!r}: must be true or false"]
    problems = []
    for split in splits if check else ():
        expected = expected_split_size(cfg, split)
        found = count_listed(root / f"{split}.txt") if expected is not None else None
        if found is not None and found != expected:
            problems.append(
                f"dataset={cfg.name}: split {split} has {found:,} images ({root / f'{split}.txt'}), VTAB-1K's "
                f"{cfg.name} {split} split has {expected:,}{' (dataset.test_size)' if split == 'test' else ''}: "
                f"an incomplete or different export (`python scripts/validate_vtab.py --tasks {cfg.name}` lists "
                f"its problems; `python scripts/prepare_vtab.py --tasks {cfg.name} --force` exports it again). "
                f"For custom data with other split sizes add dataset.check_sizes=false (recorded in results.json).")
    return problems


__all__ = ["Entry", "Problem", "VTABDataError", "VTABFolder", "build_vtab", "check_image", "check_task_files",
           "count_listed", "decode_image", "expected_split_size", "find_task_dir", "parse_list",
           "split_size_problems"]
