"""The socket client the CLI uses: HTTP/1.1 + JSON over the daemon's unix socket.

Only the standard library, so ``gpusched submit`` starts fast."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from gpusched import errors
from gpusched.errors import DaemonUnavailable, GpuschedError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: Path | str, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as err:
                raise DaemonUnavailable(
                    f"the gpusched daemon is not running (no answer on {self.socket_path}): "
                    "start it with `sudo systemctl start gpusched` or `gpusched daemon`"
                ) from err
            except (ConnectionError, http.client.HTTPException, TimeoutError, OSError) as err:
                raise DaemonUnavailable(
                    f"lost the connection to the gpusched daemon on {self.socket_path} ({err}); "
                    "it may be restarting: retry in a moment"
                ) from err
        finally:
            conn.close()
        try:
            result = json.loads(data) if data else None
        except json.JSONDecodeError as err:
            raise GpuschedError(f"the daemon sent a reply that is not JSON: {data[:200]!r}") from err
        if resp.status >= 400:
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
