"""The README's commands work as written: every script exists and answers --help, every config option it names
exists, every single-run train.py command composes, and Quick start activates the venv the commands need."""
from __future__ import annotations

import logging
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from fpet.config import compose_config
from fpet.validate import check_appended_keys

README = (ROOT / "README.md").read_text()
GENERATED = {"hparams"}
"""Config groups whose files a command writes first (`scripts/select_hparams.py` -> configs/hparams/<name>.yaml)."""


def readme_commands() -> list[str]:
    """Every `python ...` command: the lines of the code blocks and the inline `python ...` spans, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        commands += [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("python ")]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`(python [^`]+)`", prose)]
    return [c for c in commands if not c.split()[1].endswith("...")]  # "`python scripts/...`" names no command


COMMANDS = readme_commands()
SCRIPTS = sorted({shlex.split(c)[1] for c in COMMANDS})


def overrides_of(command: str) -> list[str]:
    """The `key=value` arguments of a command (quoted values kept whole)."""
    return [a for a in shlex.split(command)[2:] if "=" in a and not a.startswith("-")]


def test_the_readme_has_commands_and_quick_start_activates_the_venv():
    assert len(COMMANDS) > 30 and "train.py" in SCRIPTS and "scripts/benchmark.py" in SCRIPTS
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = quick_start.splitlines()
    activate = next(i for i, line in enumerate(lines) if line.startswith("source .venv/bin/activate"))
    assert activate == next(i for i, line in enumerate(lines) if line.startswith("make install")) + 1
    after = README.split("## Quick start", 1)[1]
    assert after.index("source .venv/bin/activate") < after.index("\npython ")  # before the first command block


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_exists_and_answers_help(script, capsys, monkeypatch):
    path = ROOT / script
    assert path.is_file(), f"README names {script}, which does not exist"
    if script == "train.py":  # Hydra's own --help: in a process of its own
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "Powered by Hydra" in proc.stdout, proc.stderr[-2000:]
        return
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # a script's basicConfig stays here
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{script} --help exited with {exit_.code}"
    out = capsys.readouterr().out
    assert "usage:" in out or "python scripts/" in out, out[:500]


def test_every_config_option_the_readme_names_exists():
    missing = []
    for command in COMMANDS:
        for override in overrides_of(command):
            key, value = override.lstrip("+").split("=", 1)
            group = ROOT / "configs" / key
            if not group.is_dir() or key in GENERATED or value.startswith(("<", "[")):
                continue
            missing += [f"{command}: {key}={option}" for option in value.split(",")
                        if not (group / f"{option}.yaml").is_file()]
    assert not missing, "\n".join(missing)


SINGLE_RUNS = [c for c in COMMANDS if c.startswith("python train.py") and " -m" not in c and "<" not in c
               and "[" not in c and "--" not in c]


@pytest.mark.parametrize("command", SINGLE_RUNS)
def test_every_single_run_command_composes(command):
    overrides = overrides_of(command)
    cfg = compose_config(overrides)  # an unknown key or option fails here, as on train.py's command line
    check_appended_keys(overrides, cfg)
