"""The job state machine: one table, used by the store for every guarded status change.

Status says where a job is in its lifecycle; the outcome (exit code, reason) is kept apart.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    HELD = "held"
    STARTING = "starting"
    RUNNING = "running"
    UNKNOWN = "unknown"  # the runner's backend is unreachable; the attempt may still be alive
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # the attempt vanished without an exit status


S = JobStatus

TERMINAL: frozenset[JobStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST})
#: statuses in which a job holds GPUs and may have a live attempt
ACTIVE: frozenset[JobStatus] = frozenset({S.STARTING, S.RUNNING, S.UNKNOWN})

#: to-status -> the statuses it may be entered from
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    # release, requeue after a GPU failure, retry; `gpusched requeue` of an ended job
    S.QUEUED: frozenset({S.HELD, S.STARTING, S.RUNNING, S.UNKNOWN, S.SUCCEEDED, S.FAILED,
                         S.CANCELLED, S.LOST}),
    S.HELD: frozenset({S.QUEUED, S.STARTING}),  # hold; a launch refused for a lasting reason
    S.STARTING: frozenset({S.QUEUED}),  # claim
    S.RUNNING: frozenset({S.STARTING, S.UNKNOWN}),  # launched; backend reachable again
    S.UNKNOWN: frozenset({S.STARTING, S.RUNNING}),
    S.SUCCEEDED: frozenset({S.STARTING, S.RUNNING, S.UNKNOWN}),
    S.FAILED: frozenset({S.QUEUED, S.HELD, S.STARTING, S.RUNNING, S.UNKNOWN}),
    S.CANCELLED: frozenset({S.QUEUED, S.HELD, S.STARTING, S.RUNNING, S.UNKNOWN}),
    S.LOST: frozenset({S.STARTING, S.RUNNING, S.UNKNOWN}),
}

