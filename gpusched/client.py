"""The socket client the CLI uses: HTTP/1.1 + JSON over the daemon's unix socket.

A few lines over a raw socket instead of ``http.client`` (which pulls in ``email`` and ``ssl``,
30 ms of imports): ``gpusched submit`` must start fast, and the daemon always answers with a
Content-Length and closes nothing mid-reply.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from gpusched import errors
from gpusched.errors import DaemonUnavailable, GpuschedError

if TYPE_CHECKING:  # pathlib costs ms at every CLI start
    from collections.abc import Callable
    from pathlib import Path

#: how long the CLI keeps retrying a submission whose reply was lost (the daemon restarting)
SUBMIT_RETRY_S = 10.0
#: a running daemon puts a removed socket file back within this (its housekeeping)
SOCKET_RECREATE_S = 5


class NotConnected(DaemonUnavailable):
    """The gpusched daemon is not running: nothing was sent."""


class ReplyLost(DaemonUnavailable):
    """The request was sent but the daemon's reply did not come (it may have been handled)."""


class Client:
    def __init__(self, socket_path: Path | str, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _not_running(self, err: OSError) -> NotConnected:
        path = self.socket_path
        start = "start it with `sudo systemctl start gpusched` or `gpusched daemon`"
        if isinstance(err, FileNotFoundError):
            return NotConnected(
                f"no socket at {path}: the gpusched daemon is not running, or its socket file "
                f"was removed (a running daemon recreates it within {SOCKET_RECREATE_S} s; see "
                f"`systemctl status gpusched`); {start}")
        if isinstance(err, ConnectionRefusedError):
            return NotConnected(f"the gpusched daemon is not running (nothing listens on "
                                f"{path}): {start}")
        return NotConnected(f"cannot connect to the gpusched daemon on {path} ({err})")

    def _check_server(self, sock: socket.socket) -> None:
        """The daemon is root (the system service) or ourselves (a personal one): anyone else
        listening on the path (a socket configured in a directory others can write) would get
        our jobs, their environment and our identity's requests."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            raise GpuschedError(
                f"{self.socket_path} is served by uid {uid}, neither root nor you: refusing to "
                "talk to it (check GPUSCHED_SOCKET / the socket setting)")

    def _exchange(self, method: str, path: str, payload: bytes | None,
                  headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: gpusched\r\nConnection: close\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if payload is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as err:
                raise self._not_running(err) from err
            self._check_server(sock)
            try:
                sock.sendall(head.encode() + b"\r\n" + (payload or b""))
            except BrokenPipeError:
                pass  # the daemon refused the body early; its answer is still readable
            fh = sock.makefile("rb")
            status_line = fh.readline()
            if not status_line:
                raise ConnectionError("the daemon closed the connection without answering")
            status = int(status_line.split()[1])
            length = None
            while (line := fh.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if line == b"":  # the daemon died inside the headers
                raise ConnectionError("the daemon closed the connection mid-reply (headers)")
            body = fh.read(length) if length is not None else fh.read()
            fh.close()
            if length is not None and len(body) != length:  # the daemon died mid-reply
                raise ConnectionError(f"the daemon closed the connection mid-reply "
                                      f"({len(body)} of {length} bytes)")
            return status, body

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        try:
            status, data = self._exchange(method, path, payload, headers)
        except DaemonUnavailable:
            raise
        except (OSError, ValueError, IndexError) as err:
            raise ReplyLost(
                f"lost the connection to the gpusched daemon on {self.socket_path} ({err}); "
                "it may be restarting: retry in a moment"
            ) from err
        try:
            result = json.loads(data) if data else None
        except json.JSONDecodeError as err:
            raise GpuschedError(f"the daemon's reply is not JSON: {data[:200]!r}") from err
        if status >= 400:
            message = result.get("error") if isinstance(result, dict) else str(result)
            kind = result.get("type") if isinstance(result, dict) else None
            cls = getattr(errors, kind or "", None)
            if not (isinstance(cls, type) and issubclass(cls, GpuschedError)):
                cls = GpuschedError
            raise cls(message)
        if result is None:  # every endpoint answers with a JSON body
            raise ReplyLost(f"the gpusched daemon on {self.socket_path} sent an empty reply; "
                            "it may be restarting: retry in a moment")
        return result

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def submit(self, path: str, body: Any, *, retry_s: float = SUBMIT_RETRY_S,
               on_retry: Callable[[str], None] | None = None, key: str | None = None) -> Any:
        """POST a submission (job, TAO stage, pipeline) with an ``Idempotency-Key``; when the
        reply is lost (the daemon died after reading it, or is busy), send the same request
        with the same key again for up to ``retry_s``: the daemon returns the submission the
        first request made, so a retry never queues the work twice. A daemon that is not
        running at the first try is reported at once."""
        key = key or os.urandom(16).hex()  # as uuid4().hex, without importing uuid
        headers = {"Idempotency-Key": key}
        deadline = time.monotonic() + retry_s
        delay, tries = 0.1, 0
        while True:
            try:
                return self.request("POST", path, body, headers)
            except DaemonUnavailable as err:
                tries += 1
                if (tries == 1 and isinstance(err, NotConnected)) or \
                        time.monotonic() + delay > deadline:
                    if tries > 1:
                        raise DaemonUnavailable(
                            f"{err.message} (gave up after {tries} tries in {retry_s:.0f} s; "
                            "if the submission was queued, `gpusched ls --mine` shows it once: "
                            "retrying never queues it twice)") from err
                    raise
                if tries == 1 and on_retry is not None:
                    on_retry(f"{err.message.split(';')[0]}; retrying the same submission "
                             f"(for up to {retry_s:.0f} s; it will not be queued twice)")
            time.sleep(delay)
            delay = min(1.0, delay * 2)
