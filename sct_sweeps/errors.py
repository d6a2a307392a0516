"""User errors of the sweep CLI: each renders as one line naming the field, file or sweep, and exit 2."""

from __future__ import annotations

import errno

from pydantic import ValidationError

from dashboards.errors import DashboardError
from trainer.config import format_validation_error
from trainer.errors import TrainerError

EXIT_USER_ERROR = 2


class SweepError(Exception):
    """Base of every sweep error the user can fix."""


class SpecError(SweepError, ValueError):
    """The sweep YAML is malformed or a setting is invalid (message names the field path)."""


class SweepExistsError(SweepError):
    """`run` was asked to start a sweep whose results directory already exists."""


class SweepNotFoundError(SweepError):
    """`resume`, `status`, `export` ... name a sweep that has no results or MLflow experiment."""


class ResourceError(SweepError):
    """The sweep asks for resources (GPUs, CPUs) that this machine or cluster does not have."""


class ClusterError(SweepError):
    """The Ray cluster named by --address / RAY_ADDRESS cannot be reached."""


class TrackingError(SweepError):
    """The MLflow tracking store cannot be reached or used."""


class RecurringTrialError(SweepError):
    """A retried trial whose earlier attempt ended in an error that recurs on every attempt."""


class StorageError(SweepError):
    """A directory the sweep writes to is read-only, full, or not ours to write."""


# An OSError the user fixes on their side (a directory read-only, full, over quota or not theirs), not a bug.
_STORAGE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def user_message(err: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug (which should show a traceback)."""
    if isinstance(err, (SweepError, TrainerError, DashboardError)):
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ValidationError):
        return format_validation_error(err)
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        where = err.filename or "a sweep directory"
        return f"{where}: {err.strerror}; free space or choose a writable directory, then `sct-sweep resume` goes on"
    return None
