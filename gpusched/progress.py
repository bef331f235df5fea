"""Follow running attempts' output and turn finished epochs into epoch rows.

Sources, in order of trust: TAO's ``status.json`` (epoch lines carry ``time_per_epoch``,
loss, lr and mAP), gpusched's own one-line format on stdout (``GPUSCHED_EPOCH {...}``, so any
script gets the same timing), and Keras' stdout (``Epoch N/M`` and the final progress bar).
Files are read incrementally from remembered offsets; a partial last line waits for its
newline. Rows are keyed (job, attempt, epoch) and written with upsert, so re-reading a file
after a daemon restart changes nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpusched.parsers import (
    StatusFollower,
    epochs_from_status,
    parse_epoch_line,
    parse_keras_stdout,
    parse_status_line,
    spec_facts,
    workload_key,
)
from gpusched.runners.base import AttemptRef
from gpusched.safefs import open_in_daemon_dir, open_user_file, read_user_file

MAX_READ = 4 * 1024 * 1024  # bytes per file per pass
MAX_SPEC = 4 * 1024 * 1024  # a TAO experiment spec is a few KiB


@dataclass
class _Tail:
    path: Path
    offset: int = 0
    follower: StatusFollower = field(default_factory=StatusFollower)
    owner_uid: int | None = None  # read only what this user could read (None: as root could)
    own: bool = False  # a file in a folder of the daemon's own making (a job's log)
    _last: tuple[int, int, int] | None = None  # (inode, device, size) when read to the end

    def read(self) -> list[str]:
        # Most polls find nothing new: one lstat tells, before the safe open. It only ever
        # skips a read (of a file as big as, and the same file as, the one read last time);
        # what it sees is never trusted for anything else.
        try:
            seen = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return []
        if (seen.st_ino, seen.st_dev, seen.st_size) == self._last or (
                self._last is None and seen.st_size == 0):  # nothing in it yet (a new log)
            return []
        # the file is in a place the job's user controls: never block on a FIFO, never follow
        # a symlink out of it (safefs). A job's log, in the log folder the daemon made, is
        # reached from that folder; a user's file (status.json) is walked from /, always
        try:
            fd = (open_in_daemon_dir(self.path) if self.own else
                  open_user_file(self.path, owner_uid=self.owner_uid))
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if st.st_size < self.offset:  # truncated or replaced: start over
                self.offset, self.follower = 0, StatusFollower()
            # what is there now, no more (a 4 MiB buffer for a few bytes costs an allocation)
            want = min(MAX_READ, st.st_size - self.offset)
            data = os.pread(fd, want, self.offset) if want > 0 else b""
        except OSError:
            return []
        finally:
            os.close(fd)
        self.offset += len(data)
        if self.offset >= st.st_size:  # all of it read: the next poll may skip
            self._last = (st.st_ino, st.st_dev, self.offset)
        return self.follower.feed_lines(data.decode(errors="replace"))


@dataclass
class _Attempt:
    log: _Tail
    status: _Tail | None
    keras_text: list[str] = field(default_factory=list)
    status_records: list[dict[str, Any]] = field(default_factory=list)
    last_seen: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> row
    max_epoch: int | None = None


def stage_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The TAO stage of a job spec (``spec.stage.stage``), or {} for plain jobs."""
    return dict(((spec.get("stage") or {}).get("stage")) or {})


def read_spec_facts(path: str, owner_uid: int | None = None) -> dict[str, Any] | None:
    """The facts of a spec file (``parsers.spec_facts``), read through safefs: None when it is
    missing, not a regular file, reached through a user's symlink, or (with ``owner_uid``) not
    readable by that user."""
    data = read_user_file(path, max_bytes=MAX_SPEC, owner_uid=owner_uid)
    return None if data is None else spec_facts(data.decode(errors="replace"))


def recorded_spec_facts(spec: dict[str, Any], owner_uid: int | None = None) -> dict[str, Any]:
    """The spec-file facts a TAO stage recorded at submission ({} without a spec file). Jobs
    stored before stages recorded them read the file once more, through safefs."""
    info = spec.get("stage") or {}
    facts = info.get("spec_facts")
    if isinstance(facts, dict):
        return facts
    path = stage_fields(spec).get("spec")
    if not path:
        return {}
    return read_spec_facts(path, owner_uid=owner_uid) or spec_facts("")


def workload_of(spec: dict[str, Any], owner: str | None = None) -> str:
    """The workload key epochs are grouped by: network/backbone/batch size/spec hash for TAO
    training, the job's name (or program) otherwise. No file I/O for stages that recorded
    their spec's facts (the daemon calls this on its tick)."""
    stage = stage_fields(spec)
    if stage.get("spec") and stage.get("task") in ("train", "retrain"):
        ratio = (spec.get("stage") or {}).get("model_pruning_ratio")
        return workload_key(recorded_spec_facts(spec),
                            float(ratio) if isinstance(ratio, int | float) else None)
    name = str(spec.get("name") or _program(spec["command"]))
    # a plain job's workload is its own user's: a name is no proof of what runs, and epochs
    # reported under another user's workload name must not steer that user's placement
    return f"{name} [{owner}]" if owner else name


_LAUNCHERS = re.compile(r"(python[\d.]*|sh|bash|env|torchrun|accelerate|nohup|uv|time)")


def _program(cmd: list[str]) -> str:
    """train.py for `python3 -u train.py`, not the interpreter's name."""
    for arg in cmd:
        name = Path(arg).name
        if arg.startswith("-") or _LAUNCHERS.fullmatch(name):
            continue
        return name
    return Path(cmd[0]).name


class ProgressTracker:
    """One per daemon; ``poll`` is called for every live attempt on each progress pass."""

    def __init__(self) -> None:
        self._attempts: dict[tuple[int, int], _Attempt] = {}

    def forget(self, key: tuple[int, int]) -> None:
        self._attempts.pop(key, None)

    def poll(self, ref: AttemptRef, spec: dict[str, Any], now: float, *,
             owner_uid: int | None = None) -> list[dict[str, Any]]:
        """New or changed epoch rows (without GPU columns) since the last poll. The results
        directory is the job's user's: its files are read only as that user could read them
        (``owner_uid``), so no job reads another user's status.json through the daemon."""
        st = self._attempts.get(ref.key)
        if st is None:
            stage = stage_fields(spec)
            status_path = (Path(stage["results_dir"]) / "status.json"
                           if stage.get("results_dir") and stage.get("task") in
                           ("train", "retrain") else None)
            st = self._attempts[ref.key] = _Attempt(
                log=_Tail(ref.log_path, own=True),
                status=_Tail(status_path, owner_uid=owner_uid) if status_path else None)
        rows: dict[int, dict[str, Any]] = {}
        stdout_status: list[dict[str, Any]] = []  # TAO-style status lines printed by any job
        for line in st.log.read():
            ep = parse_epoch_line(line)
            if ep is None and line.startswith("{") and '"epoch"' in line:
                rec = parse_status_line(line)
                if rec is not None:
                    stdout_status.append(rec)
                    continue
            if ep is not None:
                secs = ep.get("seconds")
                rows[int(ep["epoch"])] = {
                    "epoch": int(ep["epoch"]), "max_epoch": ep.get("max_epoch"),
                    "seconds": secs, "loss": ep.get("loss"), "lr": ep.get("lr"),
                    "map": ep.get("mAP", ep.get("map")), "validated": int(
                        ep.get("mAP", ep.get("map")) is not None), "ended_at": now,
                    "started_at": now - secs if secs else None}
            elif st.status is None and ("Epoch " in line or "/step" in line):
                st.keras_text.append(line)
        if st.status is None and st.keras_text:
            for epoch, max_epoch, secs in parse_keras_stdout("\n".join(st.keras_text)):
                if secs is not None and epoch not in rows and epoch not in st.last_seen:
                    rows[epoch] = {"epoch": epoch, "max_epoch": max_epoch, "seconds": secs,
                                   "validated": 0, "ended_at": now, "started_at": now - secs}
            st.keras_text = st.keras_text[-50:]
        records = stdout_status
        if st.status is not None:
            records += [r for r in map(parse_status_line, st.status.read()) if r is not None]
        if records:
            for e in epochs_from_status(records):
                end = e.at or now
                rows[e.epoch] = {"epoch": e.epoch, "max_epoch": e.max_epoch,
                                 "seconds": e.seconds, "loss": e.loss, "lr": e.lr,
                                 "map": e.map, "validated": int(e.validated), "ended_at": end,
                                 "started_at": end - e.seconds if e.seconds else None}
        fresh = []
        for epoch, row in sorted(rows.items()):
            if row.get("max_epoch"):
                st.max_epoch = int(row["max_epoch"])
            if st.last_seen.get(epoch) != row:
                st.last_seen[epoch] = row
                fresh.append(row)
        return fresh

    def summary(self, key: tuple[int, int]) -> dict[str, Any] | None:
        """Epoch N/M and recent s/epoch of a followed attempt (for ls/show/top)."""
        st = self._attempts.get(key)
        if st is None:
            return None
        # API threads call this while the tick's poll may add epochs: work on a copy (made
        # in one step under the GIL), never on the dict itself
        items = sorted(st.last_seen.copy().items())
        if not items:
            return None
        last = items[-1][0]
        training = [r["seconds"] for e, r in items if r.get("seconds") and e > 1][-5:]
        seen = [float(r["ended_at"]) for _, r in items if r.get("ended_at")]
        return {"epoch": last, "max_epoch": st.max_epoch, "recent_seconds": training,
                "last_at": max(seen) if seen else None}
