"""Issue 11: the API against a hostile or broken client, with the real daemon as a subprocess.

Connection caps and the idle timeout (a client holding connections open, or sending half a
body, must neither hold server threads for ever nor lock others out), request validation
(Content-Length, query values: 400, never 500), idempotent submissions (a retry after a lost
reply returns the first job), and the socket file (a removed one is put back).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.client import Client
from gpusched.errors import Conflict, DaemonUnavailable, SpecError
from gpusched.server import ApiServer
from gpusched.service import Service
from gpusched.testing.harness import DaemonProcess, short_tmpdir


def raw(sock_path: Path, data: bytes, *, timeout: float = 30, shut: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read until the daemon closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.fixture
def tuned(state_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start the real daemon with api.* settings: ``tuned(idle_timeout_s=1)``."""
    started: list[DaemonProcess] = []

    def start(**api: Any) -> DaemonProcess:
        env = {f"GPUSCHED_API__{k.upper()}": str(v) for k, v in api.items()}
        started.append(DaemonProcess(state_dir, env=env).start())
        return started[-1]

    yield start
    for d in started:
        d.stop()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- point 5: connection caps -------------------------------------------------------------------

def test_connections_over_the_cap_get_503_and_the_daemon_keeps_serving(
        tuned: Callable[..., DaemonProcess]) -> None:
    d = tuned(max_connections_per_user=8, idle_timeout_s=120)
    assert d.proc is not None
    n = 300
    conns = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            conns.append(s)
        # the daemon accepts in order: once the last connection has its answer, every earlier
        # one was either taken (no answer: idle) or refused (a 503 waiting to be read)
        conns[-1].settimeout(30)
        last = conns[-1].recv(65536)
        assert status_of(last) == 503, last
        assert b"retry in a moment" in last and b"max_connections_per_user" in last, last
        answered, idle = 1, 0
        for s in conns[:-1]:
            s.setblocking(False)
            try:
                data = s.recv(65536)
            except BlockingIOError:
                idle += 1
                continue
            answered += data.startswith(b"HTTP/1.1 503")
        assert idle == 8, (idle, answered)
        assert answered == n - 8
        # the refused connections are closed: the daemon holds no more fds than it serves
        assert fd_count(d.proc.pid) < 80, fd_count(d.proc.pid)
        assert d.proc.poll() is None
    finally:
        for s in conns:
            s.close()
    # the slots come back as the server threads see the hang-ups
    deadline = time.monotonic() + 30
    while True:
        try:
            assert d.client().get("/v1/health")["pid"] == d.proc.pid
            break
        except DaemonUnavailable:
            assert time.monotonic() < deadline, "the capped slots never came back"
            time.sleep(0.05)
    r = d.cli("ls")
    assert r.returncode == 0, r.stderr


def test_a_client_that_sends_half_a_body_is_dropped_after_the_idle_timeout(
        tuned: Callable[..., DaemonProcess]) -> None:
    d = tuned(idle_timeout_s=1)
    head = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    t0 = time.monotonic()
    reply = raw(d.socket, head + b'{"command"', timeout=60)  # 10 of 100 bytes, then silence
    assert time.monotonic() - t0 < 30
    assert reply == b"" or status_of(reply) == 408, reply
    # an idle connection that never sends a byte is dropped too
    assert raw(d.socket, b"", timeout=60) == b""
    assert d.client().get("/v1/jobs?all=1") == []  # nothing was stored, the daemon serves


# -- point 7: request validation ----------------------------------------------------------------

@pytest.mark.parametrize("length", [b"-1", b"+5", b"1e3", b"abc", b"5, 7"])
def test_a_bad_content_length_is_a_400_and_nothing_is_stored(daemon: DaemonProcess,
                                                             length: bytes) -> None:
    body = json.dumps({"command": ["true"], "gpus": {"count": 0}, "workdir": "/tmp"}).encode()
    reply = raw(daemon.socket, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                + b"\r\nContent-Type: application/json\r\n\r\n" + body, shut=True)
    assert status_of(reply) == 400, reply
    assert b"Content-Length" in reply
    assert daemon.client().get("/v1/jobs?all=1") == []


def test_bad_query_values_are_a_400_naming_the_parameter(daemon: DaemonProcess) -> None:
    c = daemon.client()
    job = c.post("/v1/jobs", {"command": ["true"], "gpus": {"count": 0}, "workdir": "/tmp"})["id"]
    cases = {
        "/v1/jobs?limit=x": "limit", "/v1/jobs?limit=-3": "limit", "/v1/jobs?owner=x": "owner",
        "/v1/jobs?ids=a,b": "ids", "/v1/jobs?status=bogus": "status",
        f"/v1/jobs/{job}/log?offset=x": "offset", f"/v1/jobs/{job}/log?offset=-1": "offset",
        f"/v1/jobs/{job}/log?attempt=x": "attempt", "/v1/epochs?since=x": "since",
        "/v1/epochs?since=nan": "since", "/v1/epochs?job=x": "job", "/v1/spans?since=x": "since",
    }
    for path, param in cases.items():
        with pytest.raises(SpecError) as err:
            c.get(path)
        assert f"?{param}=" in err.value.message, (path, err.value.message)
    # an id too large for SQLite is simply not there
    with pytest.raises(Exception) as err:
        c.get("/v1/jobs/99999999999999999999999")
    assert type(err.value).__name__ == "NotFound", err.value
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()


# -- point 15: idempotent submissions ------------------------------------------------------------

def post(d: DaemonProcess, path: str, body: Any, key: str) -> tuple[int, Any]:
    payload = json.dumps(body).encode()
    reply = raw(d.socket, f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Idempotency-Key: {key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload)
    return status_of(reply), json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_a_repeated_idempotency_key_returns_the_first_job(daemon: DaemonProcess) -> None:
    body = {"command": ["true"], "gpus": {"count": 0}, "workdir": "/tmp", "hold": True}
    first = post(daemon, "/v1/jobs", body, "k-0123456789abcdef")
    again = post(daemon, "/v1/jobs", body, "k-0123456789abcdef")
    assert first == (201, {"id": first[1]["id"], "status": "held"})
    assert again == (200, first[1])
    other = post(daemon, "/v1/jobs", body, "k-another-key-0001")
    assert other[0] == 201 and other[1]["id"] != first[1]["id"]
    status, err = post(daemon, "/v1/jobs", {**body, "command": ["false"]}, "k-0123456789abcdef")
    assert status == 409 and err["type"] == "Conflict", err
    assert len(daemon.client().get("/v1/jobs?all=1")) == 2
    with pytest.raises(SpecError):
        daemon.client().request("POST", "/v1/jobs", body, headers={"Idempotency-Key": "a b"})
    with pytest.raises(Conflict):
        daemon.client().request("POST", "/v1/jobs", {**body, "priority": 5},
                                headers={"Idempotency-Key": "k-another-key-0001"})


class LoseFirstReply:
    """A unix-socket proxy to the daemon that forwards the first request whole but hangs up
    before the reply (the daemon handled it: a reply lost to a crash), then proxies normally."""

    def __init__(self, path: Path, target: Path) -> None:
        self.target = target
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("the client hung up before a whole request")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                       if ln.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return head + b"\r\n\r\n" + body

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # a connection still in the backlog when the test ends (the daemon already gone)
            # is dropped: an exception here would be blamed on whichever test runs next
            with conn, contextlib.suppress(OSError):
                req = self._read_request(conn)
                self.requests.append(req)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
                    up.connect(str(self.target))
                    up.sendall(req)
                    reply = b""
                    while chunk := up.recv(65536):
                        reply += chunk
                if len(self.requests) > 1:
                    conn.sendall(reply)  # the first reply is lost

    def close(self) -> None:
        self.sock.close()


def test_the_cli_retries_a_lost_submission_with_the_same_key_and_gets_one_job(
        daemon: DaemonProcess, state_dir: Path) -> None:
    proxy = LoseFirstReply(state_dir / "lossy.sock", daemon.socket)
    try:
        env = {**daemon.env, "GPUSCHED_SOCKET": str(state_dir / "lossy.sock")}
        r = subprocess.run([sys.executable, "-m", "gpusched.cli", "submit", "--gpus", "0",
                            "--hold", "--", "echo", "once"], env=env, capture_output=True,
                           text=True, timeout=60)
    finally:
        proxy.close()
    assert r.returncode == 0, r.stderr
    assert "retrying the same submission" in r.stderr, r.stderr
    jobs = daemon.client().get("/v1/jobs?all=1")
    assert [j["id"] for j in jobs] == [int(r.stdout)], (jobs, r.stdout)
    keys = {ln.split(b":", 1)[1].strip() for req in proxy.requests
            for ln in req.split(b"\r\n") if ln.lower().startswith(b"idempotency-key:")}
    assert len(proxy.requests) == 2 and len(keys) == 1, proxy.requests


# -- point 16: the socket file -------------------------------------------------------------------

def test_cli_names_a_missing_socket_file(state_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCHED_")}
    env.update(GPUSCHED_SOCKET=str(state_dir / "gone.sock"), GPUSCHED_CONFIG="/dev/null")
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "ls"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7
    assert f"no socket at {state_dir / 'gone.sock'}" in r.stderr, r.stderr
    assert "socket file was removed" in r.stderr and "systemctl status gpusched" in r.stderr
    # a socket file nobody listens on: not running
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(state_dir / "dead.sock"))
    dead.close()
    env["GPUSCHED_SOCKET"] = str(state_dir / "dead.sock")
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "ls"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7 and "is not running" in r.stderr, r.stderr


def test_ensure_socket_puts_back_a_removed_or_replaced_socket(service: Service) -> None:
    path = short_tmpdir("gssock") / "api.sock"
    server = ApiServer(path, service)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    client = Client(path, timeout=10)
    try:
        assert client.get("/v1/health")["ok"] in (True, False)
        assert server.ensure_socket() is False  # nothing to do
        path.unlink()
        with pytest.raises(DaemonUnavailable, match="no socket at"):
            client.get("/v1/health")
        assert server.ensure_socket() is True
        assert oct(path.stat().st_mode & 0o777) == oct(0o666)
        assert "pid" in client.get("/v1/health")
        assert server.ensure_socket() is False
        path.unlink()
        path.write_text("not a socket")  # replaced by something else
        assert server.ensure_socket() is True
        assert "pid" in client.get("/v1/health")
        assert [p.name for p in path.parent.iterdir()] == ["api.sock"]  # no temp file left
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(path.parent, ignore_errors=True)


def test_the_running_daemon_recreates_its_removed_socket(daemon: DaemonProcess) -> None:
    daemon.socket.unlink()
    deadline = time.monotonic() + 30
    while not daemon.socket.exists():
        assert time.monotonic() < deadline, "the daemon did not put its socket back"
        time.sleep(0.1)
    assert daemon.client().get("/v1/health")["ok"] in (True, False)


@pytest.mark.parametrize("forged", [{"kind": "tao:export"}, {"stage": {"stage": 5}},
                                    {"kind": "tao:train", "stage": {"refs": ["x"]}}])
def test_a_plain_submission_cannot_forge_a_tao_kind_or_stage(daemon: DaemonProcess,
                                                             forged: dict[str, Any]) -> None:
    """A forged kind took a short stage's head start in the queue, and a forged stage made
    the planner fail on every tick: /v1/jobs refuses both; stages come from /v1/stages."""
    c = daemon.client()
    with pytest.raises(SpecError, match="kind and stage are set by the daemon"):
        c.post("/v1/jobs", {"command": ["true"], "gpus": {"count": 0}, "workdir": "/tmp",
                            **forged})
    assert c.get("/v1/jobs?all=1") == []
