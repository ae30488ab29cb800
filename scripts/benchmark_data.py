"""Time one epoch of VTAB-1K data loading: decoding JPEGs every epoch vs the uint8 tensor cache.

    python scripts/benchmark_data.py                       # 1000 images of 500x375, q75, batch 64, 0 workers
    python scripts/benchmark_data.py --workers 4 --repeats 3

Writes a VTAB-style task folder of generated natural-size JPEGs into a temporary directory, builds the cache once
(timed), then times full passes of a shuffled DataLoader as the training loop runs them: `uint8` (the batches the
loaders yield: decoded, resized images) and `float` (plus the per-batch conversion to float model input, here on
the CPU; on a GPU the loop converts on the device after the copy).
Prints a readable block and, on the last stdout line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from fpet.data.transforms import ToFloat  # noqa: E402
from fpet.data.vtab import VTABFolder  # noqa: E402
from fpet.results import describe_device  # noqa: E402


def natural_jpeg(path: Path, seed: int, width: int, height: int, quality: int) -> None:
    """A photo-like image: smooth colour fields plus fine texture, so the JPEG has a natural size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                            Image.BICUBIC)
    texture = rng.normal(0, 18, size=(height, width, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=quality)


def write_task(root: Path, n: int, width: int, height: int, quality: int) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        natural_jpeg(root / "images" / f"{i:06d}.jpg", i, width, height, quality)
        lines.append(f"images/{i:06d}.jpg {i % 10}\n")
    (root / "train800val200.txt").write_text("".join(lines))


def time_epochs(dataset: Dataset, batch: int, workers: int, repeats: int, to_float: bool) -> list[float]:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    convert = ToFloat()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for images, _labels in loader:
            if to_float:
                convert(images)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (DataLoader workers always use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vtab-1k" / "bench"
        write_task(root, args.n, args.width, args.height, args.quality)
        jpeg_kb = sum(p.stat().st_size for p in (root / "images").iterdir()) / args.n / 1024
        start = time.perf_counter()
        VTABFolder(root, "train800val200", 10, cache_dir=Path(tmp) / "cache", num_workers=args.workers)
        build = time.perf_counter() - start
        epochs = {}
        for stage in ("float", "uint8"):
            for variant, cache_dir in (("decode", None), ("cached", Path(tmp) / "cache")):
                data = VTABFolder(root, "train800val200", 10, cache_dir=cache_dir)
                times = time_epochs(data, args.batch, args.workers, args.repeats, to_float=stage == "float")
                epochs[stage, variant] = statistics.median(times)
    out = {"images": args.n, "jpeg": f"{args.width}x{args.height} q{args.quality} ({jpeg_kb:.0f} KB)",
           "batch": args.batch, "workers": args.workers, "threads": args.threads, "cache_build_s": round(build, 3)}
    for stage in ("float", "uint8"):
        decode, cached = epochs[stage, "decode"], epochs[stage, "cached"]
        out.update({f"{stage}_decode_epoch_s": round(decode, 3), f"{stage}_cached_epoch_s": round(cached, 3),
                    f"{stage}_speedup": round(decode / cached, 1)})
    out["device"] = describe_device(torch.device("cpu"))
    for key, value in out.items():
        print(f"{key:>22}: {value}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
