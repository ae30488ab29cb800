"""The errors that describe a user's input (config, data, files) rather than a bug: their message is the report.

A corrupt cache is not among them: it is rebuilt, never reported (fpet.data.cache).
"""
from __future__ import annotations

from fpet.backbone import CheckpointError
from fpet.data.vtab import VTABDataError
from fpet.resume import ResumeError
from fpet.sweep import RunDirConflict
from fpet.train import NonFiniteLossError
from fpet.validate import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError, ConfigError, NonFiniteLossError, ResumeError, RunDirConflict, VTABDataError,
)
