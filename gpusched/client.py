"""The socket client the CLI uses: HTTP/1.1 + JSON over the daemon's unix socket.

A few lines over a raw socket instead of ``http.client`` (which pulls in ``email`` and ``ssl``,
30 ms of imports): ``gpusched submit`` must start fast, and the daemon always answers with a
Content-Length and closes nothing mid-reply.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from gpusched import errors
from gpusched.errors import DaemonUnavailable, GpuschedError


class Client:
    def __init__(self, socket_path: Path | str, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _exchange(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: gpusched\r\nConnection: close\r\n"
        if payload is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as err:
                raise DaemonUnavailable(
                    f"the gpusched daemon is not running (no answer on {self.socket_path}): "
                    "start it with `sudo systemctl start gpusched` or `gpusched daemon`"
                ) from err
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
            body = fh.read(length) if length is not None else fh.read()
            fh.close()
            if length is not None and len(body) != length:  # the daemon died mid-reply
                raise ConnectionError(f"the daemon closed the connection mid-reply "
                                      f"({len(body)} of {length} bytes)")
            return status, body

    def request(self, method: str, path: str, body: Any = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        try:
            status, data = self._exchange(method, path, payload)
        except DaemonUnavailable:
            raise
        except (OSError, ValueError, IndexError) as err:
            raise DaemonUnavailable(
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
        return result

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})
