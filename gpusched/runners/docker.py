"""Run attempts as Docker containers through the Engine API, one container per attempt.

Labels on the container name its job, attempt, instance and GPUs, so a restarted daemon finds,
adopts or removes it. Because it removes what it does not know, one daemon must own an instance:
a lease volume ``gpusched-lease-<instance>`` names the owner (host and state directory), and a
runner whose instance is leased to another daemon refuses every call. Output reaches
``ref.log_path`` through one follower thread per container, resumed from
``ref.run_dir / "log.cursor"``. ``docker`` is imported lazily: the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gpusched import policy
from gpusched.config import DockerSettings
from gpusched.errors import LaunchRefused, RunnerError, RunnerUnavailable, SpecError
from gpusched.models import parse_size_bytes
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Orphan, Outcome
from gpusched.runners.docker_logs import ALIVE, LogFollower, close_stream, parse_docker_time_ns

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger(__name__)
T = TypeVar("T")
# Set by the runner from the allocation; the user's spec cannot override them.
_RUNNER_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES")
LEASE_HOST, LEASE_DIR = "gpusched.lease.host", "gpusched.lease.state_dir"


class InstanceLeased(RunnerUnavailable):
    """Another gpusched owns this docker.instance on this dockerd; this daemon leaves its
    containers alone."""


def lease_volume(instance: str) -> str:
    return f"gpusched-lease-{instance}"


class ContainerRunner:
    name = "docker"

    def __init__(self, settings: DockerSettings, *, kill_grace_s: float = 10.0,
                 state_dir: Path | None = None) -> None:
        """``state_dir``: the daemon's, which (with the host name) owns the instance's lease;
        None (tools, tests) takes no lease. The lease is never given back: the daemon's
        containers outlive it, and another daemon must not take them for orphans."""
        self.settings = settings
        self._log_cap = parse_size_bytes(settings.log_max_bytes)
        self.owner = (None if state_dir is None else
                      {LEASE_HOST: socket.gethostname(), LEASE_DIR: os.path.realpath(state_dir)})
        self._lease_lock = threading.Lock()
        self._lease_ok = False
        self.kill_grace_s = kill_grace_s  # the daemon escalates; signal_cancel never waits
        self.url = settings.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._client: DockerClient | None = None
        self._stream_client: DockerClient | None = None
        self._followers: dict[str, LogFollower] = {}
        self._wake: tuple[int, int] | None = None
        self._pokes = self._pokes_seen = 0
        self._events_thread: threading.Thread | None = None
        self._events_stream: Any = None

    def _unreachable(self, err: object) -> RunnerUnavailable:
        return RunnerUnavailable(f"Docker unreachable at {self.url}: {err}")

    def _docker(self, stream: bool = False) -> DockerClient:
        """The client for short calls (timeout from settings) or, with ``stream``, for logs
        and events (no read timeout). RunnerUnavailable when Docker is down, InstanceLeased
        while another daemon owns the instance."""
        client = self._connect(stream)
        if self.owner is not None and not self._lease_ok:
            self._take_lease(self._connect(False) if stream else client)
        return client

    def _take_lease(self, client: DockerClient) -> None:
        """Create the lease volume, or find it: Docker returns an existing volume (with its
        labels) to a create of the same name, so two daemons racing get one owner. Once held
        it is only checked again before orphans are listed (cheap: one call per reconcile);
        while another daemon holds it every call asks again, so removing it is enough."""
        owner = self.owner
        assert owner is not None
        name = lease_volume(self.settings.instance)
        with self._lease_lock:
            try:
                vol = self._do("lease", lambda: client.volumes.create(
                    name=name, driver="local",
                    labels={**owner, "gpusched.instance": self.settings.instance}))
            except RunnerError as err:
                raise self._unreachable(f"cannot create the lease volume {name}: "
                                        f"{err.message}") from err
            labels = (vol.attrs.get("Labels") if vol is not None else None) or {}
            if {k: labels.get(k) for k in owner} != owner:
                self._lease_ok = False
                raise InstanceLeased(
                    f"another gpusched (state dir {labels.get(LEASE_DIR, '?')} on host "
                    f"{labels.get(LEASE_HOST, '?')}) owns docker.instance "
                    f"'{self.settings.instance}' on this dockerd; give this daemon its own "
                    f"docker.instance, or remove the lease with `docker volume rm {name}` "
                    "if that daemon is gone")
            self._lease_ok = True

    def _connect(self, stream: bool) -> DockerClient:
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
        user = self._user(req)
        if s.network == "host" and not s.allow_host_network:
            raise LaunchRefused("docker.network is 'host' but allow_host_network is false")
        uuids = [g.uuid for g in req.gpus]
        env = {k: v for k, v in spec.env.items() if k not in _RUNNER_ENV}
        env.update(req.env)  # the daemon's GPUSCHED_* and CUDA_* win over the user's
        env.pop("GPUSCHED_SIMULATED_HOST_GPUS", None)  # a container sees only its own GPUs
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
            "mounts": [Mount(target=m.target, source=self._mount_source(m.source), type="bind",
                             read_only=m.read_only) for m in spec.mounts],
            "working_dir": spec.workdir, "user": user,
            "shm_size": parse_size_bytes(shm) if shm else None,
            "ulimits": [Ulimit(name=k, soft=v, hard=v) for k, v in s.ulimits.items()],
            "network_mode": s.network, "restart_policy": {"Name": "no"},
            "auto_remove": False, "privileged": False,
            # a setuid binary in the image never raises the job's privileges, and a container
            # that is not root has no capabilities to use on its bind mounts
            "security_opt": ["no-new-privileges"],
            "cap_drop": ["ALL"] if not user.startswith("0:") and user != "0" else None,
            "init": True,  # tini as PID 1 forwards SIGTERM to the job (PID 1 ignores it)
            "log_config": LogConfig(type="json-file", config={
                "max-size": s.log_max_size, "max-file": str(s.log_max_file)}),
            "device_requests": device_requests,
        }
        if spec.host_mem_mib:  # --host-mem: RAM and swap together, so it is a real cap
            cfg["mem_limit"] = cfg["memswap_limit"] = f"{spec.host_mem_mib}m"
        return {k: v for k, v in cfg.items() if v is not None}

    def _mount_source(self, source: str) -> str:
        """Check a bind source again at launch: it was resolved and checked at submission,
        so a source that no longer resolves to itself had a component swapped for a symlink
        since (it could point anywhere, /etc included)."""
        real = os.path.realpath(source)
        if real != source:
            raise LaunchRefused(
                f"mount source {source!r} now resolves to {real!r}: a part of the path was "
                "replaced by a symlink after the job was submitted; put the directory back "
                "and release the job, or submit it again")
        try:
            return policy.check_mount_source(source, self.settings)
        except SpecError as err:  # e.g. the roots changed since
            raise LaunchRefused(f"mount refused at launch: {err.message}") from err

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
                f = LogFollower(cid, log_path, run_dir, lambda: self._docker(True),
                                max_bytes=self._log_cap)
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
            LogFollower(c.id, ref.log_path, ref.run_dir, self._docker,
                        max_bytes=self._log_cap).drain()
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
        held = self._lease_ok
        inst, client = self.settings.instance, self._docker()  # takes the lease if not held
        if self.owner is not None and held:
            self._take_lease(client)  # still ours? never list (so remove) another's containers
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
                job_id=job, attempt=attempt, handle=c.id,
                # created, never started: a crash between create and start; adopting it
                # would leave a job "running" forever with nothing to start it
                adoptable=c.status != "created"))
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

        The daemon calls this before each wait and ticks after it. The pipe is emptied here,
        but only when nothing died since the previous call (a tick has seen those deaths), so
        nothing is lost and the daemon need not read it."""
        with self._lock:
            if self._closed.is_set():
                return []
            if self._wake is None:
                self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._events_thread = threading.Thread(
                    target=self._events_loop, name="gpusched-docker-events", daemon=True)
                self._events_thread.start()
            if self._pokes == self._pokes_seen:
                with contextlib.suppress(OSError):
                    while os.read(self._wake[0], 4096):
                        pass
            self._pokes_seen = self._pokes
            return [self._wake[0]]

    def _poke(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self._wake is not None:
                self._pokes += 1
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
                    close_stream(stream)
            except Exception as err:  # Docker restarting: reconnect quietly
                log.debug("docker events: %s", err)
            self._closed.wait(delay)
            delay = min(delay * 2, 5.0)

    def health(self) -> tuple[bool, str]:
        try:
            client = self._docker()
            version = (self._do("version", client.version) or {}).get("Version", "?")
        except RunnerUnavailable as err:
            return False, err.message
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
        close_stream(stream)
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
