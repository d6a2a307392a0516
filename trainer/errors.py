"""User-facing errors of the trainer: each renders as one line naming the field or file."""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(TrainerError, ValueError):
    """A setting is invalid (message names the field path)."""


class DataError(TrainerError, ValueError):
    """A dataset file or directory is missing or malformed (message names the path)."""


class CheckpointError(TrainerError):
    """A checkpoint is missing, truncated or corrupt (message names the file)."""


class DeviceError(TrainerError):
    """The requested device or precision is not available here."""


class DivergenceError(TrainerError):
    """The loss became NaN or infinite; training stopped."""
