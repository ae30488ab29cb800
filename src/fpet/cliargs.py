"""Scripts with argparse flags also take train.py's spelling of the same settings, e.g.
`python scripts/validate_vtab.py paths.data_dir=/big/data dataset=dtd` = `--data-dir /big/data --tasks dtd`."""
from __future__ import annotations

import argparse
import re
from typing import Mapping, Sequence

OVERRIDE = re.compile(r"^\+{0,2}([A-Za-z_][\w.]*)=(.*)$")
"""A Hydra-style `key=value` argument (paths and flags never match: they start with `/`, `.` or `-`)."""


def translate_overrides(argv: Sequence[str], flags: Mapping[str, str], parser: argparse.ArgumentParser,
                        lists: Sequence[str] = ()) -> list[str]:
    """`argv` with each `key=value` of `flags` (config key -> flag) replaced by `flag value`; a flag in `lists`
    takes the comma-separated values as separate arguments (`dataset=a,b` -> `--tasks a b`). Any other
    `key=value` stops the script (`parser.error`, exit 2) naming the keys and flags it takes."""
    out: list[str] = []
    for arg in argv:
        match = OVERRIDE.match(arg)
        if match is None:
            out.append(arg)
            continue
        key, value = match.groups()
        if key not in flags:
            known = ", ".join(f"{k}=... (= {f})" for k, f in flags.items())
            parser.error(f"{arg!r}: this script takes flags (--help lists them), not train.py's config overrides; "
                         f"of those it understands {known}")
        flag = flags[key]
        out += [flag, *value.split(",")] if flag in lists else [flag, value]
    return out
