"""Atomic file writes: a temporary file in the target's directory, renamed over the target when complete, so a
killed process never leaves half a file under the final name. The file gets the permissions of any file the
user writes (0666 minus the umask), not the 0600 of a temporary file, so colleagues on a shared cluster can read
results and checkpoints."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """`with atomic_open(path, "wb") as f: ...`: `f` is a temporary file, fsynced and renamed to `path` on success,
    deleted on any exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_open(path, "w") as f:
        f.write(text)
