"""A real HTTP receiver on 127.0.0.1 for the --notify-url tests (never a mock of urllib)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """A real HTTP server on 127.0.0.1: answers each POST with the next of ``codes`` (then
    200), or holds it until ``release`` is set when ``hold`` is."""

    def __init__(self, codes: list[int] | None = None, hold: bool = False) -> None:
        self.codes = list(codes or [])
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()
        self.arrived = threading.Event()
        self.hold = hold
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.arrived.set()
                if outer.hold:
                    outer.release.wait(30)
                code = outer.codes.pop(0) if outer.codes else 200
                outer.bodies.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
