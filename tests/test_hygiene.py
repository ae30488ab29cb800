"""What the tests and the repository leave behind: no temp folders from killed children, no ignored tracked file."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SESSION_TMP, SYSTEM_TMP


def test_child_processes_keep_their_temp_files_in_the_session_dir(tmp_path):
    """A child that imports wandb (timm.utils does: wandb-media / wandb-artifacts temp folders) and dies without
    cleaning up leaves them in the session's temp dir, which conftest removes at the end, not in the system's."""
    assert Path(SESSION_TMP).is_dir() and Path(SESSION_TMP).parent == Path(SYSTEM_TMP)
    has_wandb = importlib.util.find_spec("wandb") is not None
    code = (f"import os, tempfile{', wandb' if has_wandb else ''}; print(tempfile.gettempdir(), flush=True); "
            "os._exit(0)")  # like a SIGKILL: no atexit, no finalizer
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == SESSION_TMP
    if has_wandb:
        assert list(Path(SESSION_TMP).glob("*wandb-media")) and list(Path(SESSION_TMP).glob("*wandb-artifacts"))


def test_gitignore_lists_no_tracked_file():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [], f"tracked files that .gitignore lists: {proc.stdout.split()}"
