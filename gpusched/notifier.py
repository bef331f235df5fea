"""What a job's end sends: ``--output`` copies and ``--notify`` commands (run as the job's
owner, never as root) and ``--notify-url`` POSTs (on a worker thread), one ``notifications``
row each, made at submission. ``step(now)`` is the daemon's ``notify`` tick step: it only
starts, polls and records, so a slow receiver or command delays no job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from gpusched.clock import iso
from gpusched.config import Settings
from gpusched.runners.hooks import COPY_SH, Hooks, Post, Poster
from gpusched.runners.local import SHIM_UNSAFE_ENV
from gpusched.store import Row, Store

log = logging.getLogger(__name__)

#: (job id, what, the call, now): the daemon's containment of one job's part of a step
Contain = Callable[[int, str, Callable[[], None], float], None]


class Notifier:
    def __init__(self, settings: Settings, store: Store,
                 log_path: Callable[[int, int], str]) -> None:
        self.settings, self.store, self.log_path = settings, store, log_path
        self.hooks, self.poster = Hooks(), Poster()
        self._started = False
        self._quiet: tuple[int, int] | None = None  # Store.notify_state when none was open

    def close(self) -> None:
        self.hooks.close()
        self.poster.close()

    def step(self, now: float, contain: Contain) -> None:
        if not self._started:
            self._started = True
            if n := self.store.requeue_sending_notifications():
                log.info("%s notification(s) in flight at the last stop are due again", n)
        state = self.store.notify_state()  # read before the query: a change after it shows
        if state == self._quiet:
            return  # none was open, and no write since could have opened one
        if not self.store.notifications_open():
            self._quiet = state  # none waits for its job, is being sent or will be retried
            return
        self._quiet = None
        for key, error in self.poster.results():
            self._delivered(key, error, now)
        for row in self.store.notifications(state="sending"):
            if row["kind"] != "url":  # one that never started is failed with the reason
                done, error = self.hooks.poll(row["id"], now)
                if done:
                    self._delivered(row["id"], error, now)
        for row in self.store.due_notifications(now):
            def deliver(row: Row = row) -> None:
                self._deliver(row, now)
            contain(row["job_id"], f"notify ({row['kind']})", deliver, now)

    def _deliver(self, row: Row, now: float) -> None:
        note_id, cfg = row["id"], self.settings.notify
        self.store.update_notification(note_id, state="sending", tries=row["tries"] + 1)
        if row["kind"] == "url":
            self.poster.submit(Post(note_id, row["target"], job_json(row), cfg.timeout_s))
            return
        spec = json.loads(row["job_spec"])
        attempt = row["attempt"] or 0
        # a local job's own environment (its --export), as its shim got it; a container's is
        # the image's business, not the host's
        env = ({k: v for k, v in spec.get("env", {}).items() if k not in SHIM_UNSAFE_ENV}
               if row["runner"] == "local" else {})
        env |= {"GPUSCHED_JOB_ID": str(row["job_id"]), "GPUSCHED_JOB_STATUS": row["job_status"],
                "GPUSCHED_EXIT_CODE": "" if row["exit_code"] is None else str(row["exit_code"]),
                "GPUSCHED_JOB_NAME": row["job_name"] or "",
                "GPUSCHED_JOB_REASON": row["reason"] or "", "GPUSCHED_ATTEMPT": str(attempt)}
        command, stdin = row["target"], None
        if row["kind"] == "output":
            log_path = self.log_path(row["job_id"], attempt) if attempt else None
            if log_path is None or not os.path.exists(log_path):  # the daemon's own directory
                self._delivered(note_id, "no log: the job never ran", now)
                return
            env["GPUSCHED_OUTPUT"] = row["target"].replace("%j", str(row["job_id"]))
            command, stdin = COPY_SH, log_path
        try:
            self.hooks.start(note_id, command, uid=row["owner_uid"], env=env, now=now,
                             workdir=spec.get("workdir") or "/", stdin_path=stdin,
                             timeout_s=cfg.command_timeout_s)
        except (OSError, KeyError) as err:
            self._delivered(note_id, f"could not start: {err}", now)

    def _delivered(self, note_id: int, error: str | None, now: float) -> None:
        row, cfg = self.store.notification(note_id), self.settings.notify
        if row is None:
            return
        if error is None:
            log.info("job %s: %s %s delivered", row["job_id"], row["kind"], note_id)
            self.store.update_notification(note_id, state="done", done_at=now, last_error=None)
        elif row["kind"] == "url" and row["tries"] <= cfg.retries:
            delay = cfg.retry_backoff_s * 2 ** (row["tries"] - 1)
            log.warning("job %s: POST to its --notify-url failed (%s); retrying in %g s",
                        row["job_id"], error, delay)
            self.store.update_notification(note_id, state="pending", next_at=now + delay,
                                           last_error=error)
        else:
            log.warning("job %s: %s %s failed: %s", row["job_id"], row["kind"], note_id, error)
            self.store.update_notification(note_id, state="failed", done_at=now,
                                           last_error=error)


def job_json(row: Row) -> dict[str, Any]:
    """What a --notify-url receives: the job's outcome, not its command or environment."""
    return {"id": row["job_id"], "name": row["job_name"], "status": row["job_status"],
            "exit_code": row["exit_code"], "reason": row["reason"], "owner": row["owner"],
            "owner_uid": row["owner_uid"], "attempt": row["attempt"], "kind": row["job_kind"],
            "runner": row["runner"], "submitted_at": iso(row["submitted_at"]),
            "started_at": iso(row["started_at"]), "ended_at": iso(row["ended_at"])}
