"""One error hierarchy for gpusched.

Each class's docstring is its default message; raise with a more specific message where one is
known. Third-party errors are wrapped where they enter (``raise ... from err``) so callers only
ever catch ``GpuschedError``. ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class GpuschedError(Exception):
    """gpusched failed."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str | None = None) -> None:
        # the docstring is the default message, on one line whatever its wrapping
        super().__init__(message or " ".join((self.__class__.__doc__ or "").split()))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(GpuschedError):
    """The configuration is invalid."""

    exit_code = 2


class SpecError(GpuschedError):
    """The job specification is invalid."""

    exit_code = 2
    http_status = 400


class NotFound(GpuschedError):
    """No such job."""

    exit_code = 3
    http_status = 404


class PermissionDenied(GpuschedError):
    """Only the job's owner, root or a member of the admin group may do that."""

    exit_code = 4
    http_status = 403


class Conflict(GpuschedError):
    """The job is not in a state that allows this."""

    exit_code = 5
    http_status = 409


class DuplicateSubmission(Conflict):
    """This idempotency key was used already (a retry that raced its first try)."""

    def __init__(self, message: str | None = None, *, pipeline_id: int | None = None) -> None:
        super().__init__(message)
        self.pipeline_id = pipeline_id


class StoreError(GpuschedError):
    """The state database failed."""

    http_status = 503


class StorageFull(StoreError):
    """State storage full: the disk holding the state directory has no space left; free some and
    retry (running jobs are not affected)."""


class CorruptDatabase(StoreError):
    """The state database is corrupt; restore it from a backup with `gpusched admin restore`."""


class AlreadyRunning(GpuschedError):
    """Another gpusched daemon already owns this state directory."""

    exit_code = 6


class DaemonUnavailable(GpuschedError):
    """The gpusched daemon is not running."""

    exit_code = 7
    http_status = 503


class NvmlUnavailable(GpuschedError):
    """NVML is not available on this machine."""

    exit_code = 8


class RunnerError(GpuschedError):
    """The job could not be started."""


class LaunchRefused(RunnerError):
    """The runner refused the job for a reason that a retry will not fix (bad image, bad mount);
    the job is held with the reason."""


class RunnerUnavailable(RunnerError):
    """The runner's backend (Docker) is unreachable; jobs keep running and nothing new starts."""


#: what a field means, added to a validation error that names it (the last part of its path)
FIELD_HINTS: dict[str, str] = {
    "max_drop": "max_drop is a fraction of mAP: 0.02 = 2 points",
    "threshold": "a pruning threshold is a fraction between 0 and 1, e.g. 0.1",
    "retry_thresholds": "pruning thresholds are fractions between 0 and 1, e.g. [0.05, 0.02]",
    "backoff": "the next threshold is the lowest tried × backoff: a fraction, e.g. 0.5",
    "retries": "a count of rounds or attempts, e.g. 2",
    "priority": "higher runs first, from -1000 to 1000",
    "count": "a number of GPUs, 0 for a CPU-only job",
    "mem_mib": "free GPU memory in MiB, e.g. 10240 (--mem 10G)",
    "shm_size": "a size like 16G",
    "user": "a numeric uid:gid, e.g. 1000:1000",
    "log_level": "one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    "port": "a TCP port from 1 to 65535 (0: any free one)",
}
MAX_LINES = 10


def _shown_input(err: Mapping[str, Any]) -> str:
    value = err.get("input")
    if err.get("type") == "missing" or isinstance(value, dict | list) or value is None:
        return ""
    text = repr(value)
    return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"


def validation_lines(err: ValidationError, hints: Mapping[str, str] = FIELD_HINTS) -> list[str]:
    """One line per problem of a pydantic ValidationError: the field's path, the problem, what
    was given, and a hint about the field when one is known::

        gate.max_drop: Input should be less than 1 (got 2.0); max_drop is a fraction of mAP: 0.02 = 2 points
    """
    lines = []
    errors = err.errors()
    for e in errors[:MAX_LINES]:
        loc = [str(x) for x in e.get("loc", ())]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        hint = next((hints[x] for x in reversed(loc) if x in hints), None)
        lines.append(f"{'.'.join(loc) or 'value'}: {msg}{_shown_input(e)}"
                     + (f"; {hint}" if hint else ""))
    if len(errors) > MAX_LINES:
        lines.append(f"... and {len(errors) - MAX_LINES} more")
    return lines


def explain_validation(err: ValidationError, what: str) -> str:
    """``validation_lines`` as one message, each line starting with ``what`` (e.g. "bad
    pipeline"): one problem per line, no pydantic URLs."""
    return "\n".join(f"{what}: {line}" for line in validation_lines(err))
