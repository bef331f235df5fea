"""Container output into the attempt's log file, complete and resumable after a restart."""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger(__name__)
ALIVE = ("created", "running", "restarting", "paused")


def close_stream(stream: Any) -> None:
    """Cancel a streaming response and free its socket: CancellableStream.close() shuts the
    socket down, but the response's file object holds the descriptor until it is closed too."""
    for close in (lambda: stream.close(), lambda: stream._response.close()):
        with contextlib.suppress(Exception):
            close()


_TIME_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_docker_time_ns(text: str | bytes) -> int | None:
    """RFC 3339 with up to nine fraction digits -> ns since the epoch; None for garbage and
    for Docker's zero time ('0001-01-01T00:00:00Z')."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    m = _TIME_RE.match(text.strip())
    if not m or int(m.group(1)) <= 1:
        return None
    secs = calendar.timegm((*(int(g) for g in m.groups()[:6]), 0, 0, 0))
    if (tz := m.group(8)) != "Z":
        secs -= (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 1_000_000_000 + int((m.group(7) or "0").ljust(9, "0"))


class LogFollower:
    """Copies one container's output (stdout and stderr) into the attempt's log, exactly once.

    The cursor (run_dir/log.cursor) holds the newest timestamp written, how many messages
    carried exactly that timestamp, and the log's size then. A new follower truncates what
    was written after the last cursor save (a crash in between), asks Docker for messages since
    the cursor and skips those it already wrote. Docker's json-file keeps log_max_size x
    log_max_file per container: output rotated away while nobody followed is lost.
    """

    SAVE_EVERY_S = 0.2

    def __init__(self, cid: str, log_path: Path, run_dir: Path,
                 client_fn: Callable[[], DockerClient], max_bytes: int = 1 << 62) -> None:
        self.cid, self.log_path, self.run_dir = cid, Path(log_path), Path(run_dir)
        self.cursor_path, self._client_fn = self.run_dir / "log.cursor", client_fn
        self._lock, self._wake, self.stopped = threading.Lock(), threading.Event(), False
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._fh: Any = None
        self._ns: int | None = None
        self._count = self._offset = 0
        self._saved_at = 0.0
        self.max_bytes = max_bytes
        self._capped = False

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        cur: Any = {}
        with contextlib.suppress(OSError, ValueError):
            cur = json.loads(self.cursor_path.read_text())
        if isinstance(cur, dict) and cur.get("container") == self.cid:
            self._ns, self._count = cur.get("ns"), int(cur.get("count", 0))
            self._offset = min(int(cur.get("offset", size)), size)
        else:
            self._offset = size
        self._fh = open(self.log_path, "ab")  # noqa: SIM115 -- lives as long as the follower
        if size > self._offset:  # written after the last cursor save: Docker sends it again
            self._fh.truncate(self._offset)
        self._capped = self._offset >= self.max_bytes  # an earlier follower cut it already
        self._save()

    def _save(self) -> None:
        self._fh.flush()
        tmp = self.cursor_path.with_name("log.cursor.tmp")
        tmp.write_text(json.dumps(
            {"container": self.cid, "ns": self._ns, "count": self._count, "offset": self._offset}))
        os.replace(tmp, self.cursor_path)
        self._saved_at = time.monotonic()

    def _copy(self, client: DockerClient, follow: bool) -> None:
        """One logs request from the cursor, until the stream ends."""
        # Docker filters with `since` (>=); a float keeps only microseconds, so ask from a
        # millisecond earlier and skip by the exact nanosecond cursor.
        since = None if self._ns is None else max(self._ns // 1_000_000 - 1, 1) / 1000
        stream = client.api.logs(self.cid, stdout=True, stderr=True, stream=True,
                                 follow=follow, timestamps=True, since=since)
        with self._lock:
            self._stream, resume_ns, skip = stream, self._ns, self._count
            if self.stopped:
                return close_stream(stream)
        try:
            for chunk in stream:  # one frame per log message: "<RFC3339Nano> <bytes>"
                sp = chunk.find(b" ")
                ns = parse_docker_time_ns(chunk[:sp]) if sp > 0 else None
                data = chunk[sp + 1:] if ns is not None else chunk
                with self._lock:
                    if self.stopped:
                        return
                    if ns is not None and resume_ns is not None:
                        if ns < resume_ns or (ns == resume_ns and skip > 0):
                            skip -= ns == resume_ns
                            continue
                        resume_ns = None
                    if self._offset + len(data) > self.max_bytes:  # the disk is everyone's
                        if self._capped:
                            continue
                        self._capped = True
                        data = data[:max(0, self.max_bytes - self._offset)] + (
                            f"\n[gpusched: output past {self.max_bytes} bytes not kept; see "
                            "docker.log_max_bytes]\n".encode())
                    self._fh.write(data)
                    self._fh.flush()  # `gpusched logs -f` sees each line at once
                    self._offset += len(data)
                    if ns is not None and (self._ns is None or ns > self._ns):
                        self._ns, self._count = ns, 1
                    elif ns is not None and ns == self._ns:
                        self._count += 1
                    if time.monotonic() - self._saved_at >= self.SAVE_EVERY_S:
                        self._save()
        finally:
            close_stream(stream)
            with self._lock:
                self._stream = None
                if not self.stopped:
                    self._save()

    def drain(self) -> None:
        """Copy, synchronously, what the ended container wrote after the cursor."""
        import docker

        self._open()
        try:
            with contextlib.suppress(docker.errors.NotFound):
                self._copy(self._client_fn(), follow=False)
        finally:
            self.stop()

    def start(self) -> None:
        self._open()
        self._thread = threading.Thread(
            target=self._loop, name=f"gpusched-logs-{self.cid[:12]}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import docker

        delay = 0.2
        try:
            while not self.stopped:
                try:
                    client = self._client_fn()
                    self._copy(client, follow=True)
                    if client.api.inspect_container(self.cid)["State"]["Status"] not in ALIVE:
                        return
                except docker.errors.NotFound:
                    return
                except Exception as err:  # Docker restarting: retry from the cursor
                    log.debug("log follower %s: %s", self.cid[:12], err)
                self._wake.wait(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.stop()

    def stop(self) -> None:
        """No write happens after this returns, and the cursor matches the file."""
        with self._lock:
            if self.stopped:
                return
            self.stopped, stream, self._stream = True, self._stream, None
            if self._fh is not None:
                with contextlib.suppress(OSError):
                    self._save()
                self._fh.close()
        self._wake.set()
        close_stream(stream)

    def join(self, timeout: float) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
