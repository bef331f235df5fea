"""One error hierarchy for gpusched.

Each class's docstring is its default message; raise with a more specific message where one is
known. Third-party errors are wrapped where they enter (``raise ... from err``) so callers only
ever catch ``GpuschedError``. ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations


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
