"""Run attempts as Docker containers through the Engine API, one container per attempt.

Labels on the container name its job, attempt, instance and GPUs, so a restarted daemon finds,
adopts or removes it. Output reaches ``ref.log_path`` through one follower thread per container,
resumed from ``ref.run_dir / "log.cursor"``. ``docker`` is imported lazily: the CLI starts fast.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import pwd
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gpusched.config import DockerSettings
from gpusched.errors import LaunchRefused, RunnerError, RunnerUnavailable
from gpusched.models import parse_size_bytes
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Orphan, Outcome

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger(__name__)
T = TypeVar("T")
ALIVE = ("created", "running", "restarting", "paused")
# Set by the runner from the allocation; the user's spec cannot override them.
_RUNNER_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES")


class ContainerRunner:
    name = "docker"

    def __init__(self, settings: DockerSettings, *, kill_grace_s: float = 10.0) -> None:
        self.settings = settings
        self.kill_grace_s = kill_grace_s  # the daemon escalates; signal_cancel never waits
        self.url = settings.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._client: DockerClient | None = None
        self._stream_client: DockerClient | None = None
        self._followers: dict[str, LogFollower] = {}
        self._wake: tuple[int, int] | None = None
        self._events_thread: threading.Thread | None = None
        self._events_stream: Any = None

    def _unreachable(self, err: object) -> RunnerUnavailable:
        return RunnerUnavailable(f"Docker unreachable at {self.url}: {err}")

    def _docker(self, stream: bool = False) -> DockerClient:
        """The client for short calls (timeout from settings) or, with ``stream``, for logs
        and events (no read timeout). RunnerUnavailable when Docker is down."""
        import docker

        if self.url.startswith("unix://"):
            # Connect ourselves first: the SDK leaks the socket of a failed connect.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(min(5.0, self.settings.timeout_s))
                try:
                    s.connect(self.url[len("unix://"):])
                except OSError as err:
                    raise self._unreachable(err) from err
        with self._lock:
            client = self._stream_client if stream else self._client
            if client is None:
                kw: dict[str, Any] = {"timeout": None if stream else self.settings.timeout_s,
                                      "max_pool_size": 64 if stream else 10}
                try:
                    client = (docker.DockerClient(base_url=self.settings.base_url, **kw)
                              if self.settings.base_url else docker.from_env(**kw))
                except docker.errors.DockerException as err:
                    raise self._unreachable(err) from err
                setattr(self, "_stream_client" if stream else "_client", client)
            return client

    def _do(self, what: str, call: Callable[[], T], *, ok: tuple[int, ...] = ()) -> T | None:
        """One Docker call. None when the object is gone (404) or Docker answers a status in
        ``ok``; RunnerUnavailable when Docker cannot be asked; RunnerError otherwise."""
        import docker
        import requests

        try:
            return call()
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as err:
            if err.status_code in ok:
                return None
            raise RunnerError(f"{what}: {_explain(err)}") from err
        except (requests.RequestException, docker.errors.DockerException, OSError) as err:
            raise self._unreachable(err) from err

    def container_name(self, job_id: int, attempt: int) -> str:
        suffix = "" if self.settings.instance == "default" else f"-{self.settings.instance}"
        return f"gpusched-{job_id}-a{attempt}{suffix}"

    def _user(self, req: LaunchRequest) -> str:
        if req.spec.user or self.settings.user:
            return str(req.spec.user or self.settings.user)
        try:
            gid = pwd.getpwuid(req.owner_uid).pw_gid
        except KeyError:
            gid = req.owner_uid
        return f"{req.owner_uid}:{gid}"

    def container_config(self, req: LaunchRequest) -> dict[str, Any]:
        """The keyword arguments of ``containers.create`` for this attempt."""
        from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

        s, spec = self.settings, req.spec
        if s.network == "host" and not s.allow_host_network:
            raise LaunchRefused("docker.network is 'host' but allow_host_network is false")
        uuids = [g.uuid for g in req.gpus]
        env = {k: v for k, v in spec.env.items() if k not in _RUNNER_ENV}
        env.update(req.env)  # the daemon's GPUSCHED_* and CUDA_* win over the user's
        device_requests = []
        if uuids and not req.simulated:
            device_requests = [DeviceRequest(device_ids=uuids, capabilities=[["gpu"]])]
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(len(uuids))))  # 0..n-1 inside
            # CUDA images set NVIDIA_VISIBLE_DEVICES=all; with nvidia as the default runtime that
            # alone would expose every GPU, so name exactly the granted ones.
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(uuids)
        else:
            env["NVIDIA_VISIBLE_DEVICES"] = "void"  # no GPU through the nvidia runtime
        shm = spec.shm_size or s.shm_size
        cfg: dict[str, Any] = {
            "image": spec.image, "command": list(spec.command),
            "name": self.container_name(req.job_id, req.attempt),
            "labels": {
                "gpusched.job": str(req.job_id), "gpusched.attempt": str(req.attempt),
                "gpusched.instance": s.instance, "gpusched.gpus": ",".join(uuids),
                "gpusched.owner": req.owner,
            },
            "environment": env,
            "mounts": [Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
                       for m in spec.mounts],
            "working_dir": spec.workdir, "user": self._user(req),
            "shm_size": parse_size_bytes(shm) if shm else None,
            "ulimits": [Ulimit(name=k, soft=v, hard=v) for k, v in s.ulimits.items()],
            "network_mode": s.network, "restart_policy": {"Name": "no"},
            "auto_remove": False, "privileged": False,
            "init": True,  # tini as PID 1 forwards SIGTERM to the job (PID 1 ignores it)
            "log_config": LogConfig(type="json-file", config={
                "max-size": s.log_max_size, "max-file": str(s.log_max_file)}),
            "device_requests": device_requests,
        }
        return {k: v for k, v in cfg.items() if v is not None}

    def create(self, req: LaunchRequest) -> Any:
        """Create the attempt's container (not started). When the name is taken (a crash
        between create and start) adopt that container if it is this attempt's: never two."""
        cfg, img, client = self.container_config(req), req.spec.image, self._docker()
        try:
            c = self._do("Docker could not create it", lambda: client.containers.create(**cfg))
        except RunnerError as err:
            code = getattr(err.__cause__, "status_code", None)
            if code == 400:
                raise LaunchRefused(f"Docker refused job {req.job_id}: {err.message}") from err
            if code != 409:
                raise
            c = self._do("inspect", lambda: client.containers.get(cfg["name"]))
            if c is None:
                raise RunnerError(f"container {cfg['name']} vanished during launch") from err
            lb = c.labels or {}
            if (lb.get("gpusched.job"), lb.get("gpusched.attempt"),
                    lb.get("gpusched.instance")) != (str(req.job_id), str(req.attempt),
                                                     self.settings.instance):
                raise RunnerError(f"a container named {cfg['name']} exists but is not job "
                                  f"{req.job_id} attempt {req.attempt} of this gpusched; "
                                  "remove it (docker rm)") from err
            log.info("adopting existing container %s (%s)", cfg["name"], c.status)
        if c is None:  # 404: ImageNotFound
            raise LaunchRefused(
                f"the image {img} is not on this host: docker pull {img}, or docker load it, "
                f"then gpusched release {req.job_id}")
        return c

    def launch(self, req: LaunchRequest) -> Launched:
        req.run_dir.mkdir(parents=True, exist_ok=True)
        req.log_path.parent.mkdir(parents=True, exist_ok=True)
        c = self.create(req)
        if c.status == "created":
            try:
                self._do(f"Docker could not start {c.name}", c.start)
            except RunnerError as err:
                # A bad command or GPU request (no nvidia runtime): free the name, say why.
                with contextlib.suppress(RunnerError):
                    self._do("remove", lambda: c.remove(force=True))
                code = getattr(err.__cause__, "status_code", None) or 500
                raise (LaunchRefused(err.message) if code < 500 else err) from err.__cause__
        self._follow(c.id, req.log_path, req.run_dir)
        return Launched(container_id=c.id, container_name=c.name)

    def _follow(self, cid: str, log_path: Path, run_dir: Path) -> None:
        with self._lock:
            f = self._followers.get(cid)
            if (f is None or f.stopped) and not self._closed.is_set():
                f = LogFollower(cid, log_path, run_dir, lambda: self._docker(True))
                self._followers[cid] = f
                f.start()

    def _unfollow(self, *cids: str | None, wait: float = 0.0) -> None:
        with self._lock:
            found = [f for f in (self._followers.pop(c or "", None) for c in cids) if f]
        for f in found:
            f.join(wait)
            f.stop()

    def _get(self, ref: AttemptRef) -> Any:
        """The attempt's container, or None when it is gone."""
        key = ref.container_id or ref.container_name or self.container_name(ref.job_id, ref.n)
        client = self._docker()
        try:
            return self._do("inspect", lambda: client.containers.get(key))
        except RunnerError as err:  # Docker cannot answer: not the same as gone
            raise self._unreachable(err.message) from err

    def poll(self, ref: AttemptRef, now: float) -> Outcome | None:
        c = self._get(ref)
        if c is None:
            self._unfollow(ref.container_id)
            return Outcome(exit_code=None, ended_at=now, lost=True, reason="container disappeared")
        if c.status in ALIVE:
            if c.status != "created":
                self._follow(c.id, ref.log_path, ref.run_dir)  # adopted after a restart
            return None
        # Ended: the follower's stream ends with the container; then read anything left.
        self._unfollow(c.id, wait=5.0)
        try:
            LogFollower(c.id, ref.log_path, ref.run_dir, self._docker).drain()
        except RunnerUnavailable:
            raise
        except Exception as err:  # the outcome matters more than a missing tail
            log.warning("could not read the last output of %s: %s", c.name, err)
        state = c.attrs.get("State", {})
        code = None if state.get("ExitCode") is None else int(state["ExitCode"])
        oom = bool(state.get("OOMKilled")) and code == 137
        reason = "killed: out of memory" if oom else f"exit code {code}"
        if state.get("Error") and not oom:
            reason += f": {state['Error']}"
        ended = parse_docker_time_ns(state.get("FinishedAt") or "")
        return Outcome(exit_code=code, ended_at=ended / 1e9 if ended else now, oom=oom,
                       reason=reason)

    def signal_cancel(self, ref: AttemptRef, *, kill: bool) -> None:
        c = self._get(ref)
        if c is not None:  # 409: not running, nothing to stop
            sig = "SIGKILL" if kill else "SIGTERM"
            self._do(f"could not signal {c.name}", lambda: c.kill(signal=sig), ok=(409,))

    def cleanup(self, ref: AttemptRef) -> None:
        c = self._get(ref)
        self._unfollow(ref.container_id, c.id if c is not None else None)
        if c is not None:  # 409: removal already in progress
            self._do(f"could not remove {c.name}", lambda: c.remove(force=True, v=False),
                     ok=(409,))

    def orphans(self, live: set[tuple[int, int]]) -> list[Orphan]:
        inst, client = self.settings.instance, self._docker()
        try:
            found = self._do("list", lambda: client.containers.list(
                all=True, filters={"label": [f"gpusched.instance={inst}"]})) or []
        except RunnerError as err:
            raise self._unreachable(err.message) from err
        out = []
        for c in found:
            lb = c.labels or {}
            if lb.get("gpusched.instance") != inst or "gpusched.job" not in lb:
                continue  # never list what is not ours
            job, attempt = _int(lb["gpusched.job"]), _int(lb.get("gpusched.attempt", ""))
            if job is not None and attempt is not None and (job, attempt) in live:
                continue
            out.append(Orphan(
                description=f"container {c.name} ({c.status}) of job {job} attempt {attempt}",
                gpus=tuple(g for g in lb.get("gpusched.gpus", "").split(",") if g),
                job_id=job, attempt=attempt, handle=c.id))
        return out

    def remove_orphan(self, orphan: Orphan) -> bool:
        client = self._docker()
        try:
            c = self._do("inspect", lambda: client.containers.get(orphan.handle))
            if c is None:
                return True
            if (c.labels or {}).get("gpusched.instance") != self.settings.instance:
                return False  # never touch a container that is not ours
            if c.status in ("running", "restarting", "paused"):
                self._do("kill", c.kill, ok=(409,))
            self._do("remove", lambda: c.remove(force=True, v=False), ok=(409,))
            return self._do("inspect", lambda: client.containers.get(orphan.handle)) is None
        except RunnerError as err:
            log.warning("could not remove orphan %s: %s", orphan.description, err.message)
            return False

    def wait_fds(self) -> list[int]:
        """A pipe that becomes readable when one of our containers dies (Docker events).
        The daemon reads and discards its bytes."""
        with self._lock:
            if self._closed.is_set():
                return []
            if self._wake is None:
                self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._events_thread = threading.Thread(
                    target=self._events_loop, name="gpusched-docker-events", daemon=True)
                self._events_thread.start()
            return [self._wake[0]]

    def _poke(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self._wake is not None:
                os.write(self._wake[1], b"x")

    def _events_loop(self) -> None:
        delay = 0.5
        filters = {"type": "container", "event": "die",
                   "label": [f"gpusched.instance={self.settings.instance}"]}
        while not self._closed.is_set():
            try:
                stream = self._docker(True).events(decode=True, filters=filters)
                with self._lock:
                    self._events_stream = stream
                try:
                    if self._closed.is_set():
                        return
                    self._poke()  # deaths while nobody listened
                    delay = 0.5
                    for _ in stream:
                        self._poke()
                finally:
                    _close_stream(stream)
            except Exception as err:  # Docker restarting: reconnect quietly
                log.debug("docker events: %s", err)
            self._closed.wait(delay)
            delay = min(delay * 2, 5.0)

    def health(self) -> tuple[bool, str]:
        try:
            client = self._docker()
            version = (self._do("version", client.version) or {}).get("Version", "?")
        except RunnerError as err:
            return False, f"Docker unreachable at {self.url}: {err.message}"
        return True, f"docker {version} at {self.url}"

    def close(self) -> None:
        """Stop the follower and events threads and close the clients (jobs keep running).
        No log write happens after this returns. Safe to call twice."""
        self._closed.set()
        with self._lock:
            followers, stream = list(self._followers.values()), self._events_stream
            self._followers.clear()
        for f in followers:
            f.stop()
        _close_stream(stream)
        for t in [*(f._thread for f in followers), self._events_thread]:
            if t is not None:
                t.join(timeout=2.0)
        with self._lock:
            clients = [c for c in (self._client, self._stream_client) if c is not None]
            self._client = self._stream_client = None
            wake, self._wake = self._wake, None
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
        for fd in wake or ():
            os.close(fd)


def _explain(err: Any) -> str:
    return str(getattr(err, "explanation", None) or err)


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _close_stream(stream: Any) -> None:
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
                 client_fn: Callable[[], DockerClient]) -> None:
        self.cid, self.log_path, self.run_dir = cid, Path(log_path), Path(run_dir)
        self.cursor_path, self._client_fn = self.run_dir / "log.cursor", client_fn
        self._lock, self._wake, self.stopped = threading.Lock(), threading.Event(), False
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._fh: Any = None
        self._ns: int | None = None
        self._count = self._offset = 0
        self._saved_at = 0.0

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
                return _close_stream(stream)
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
            _close_stream(stream)
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
        _close_stream(stream)

    def join(self, timeout: float) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
