"""Thin wiring around the tick: the state-directory lock, the socket server, signals,
APScheduler for housekeeping, and systemd's notify protocol."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import select
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from gpusched.clock import Clock, SystemClock
from gpusched.config import Settings
from gpusched.daemon import Daemon
from gpusched.errors import (
    AlreadyRunning,
    CorruptDatabase,
    NotFound,
    SpecError,
    StorageFull,
    StoreError,
)
from gpusched.gpus import Inventory, open_inventory
from gpusched.models import GpuRequest, JobSpec, JobView
from gpusched.runners.base import Runner
from gpusched.runners.local import LocalRunner
from gpusched.server import ApiServer, admin_uids, job_view
from gpusched.store import Row, Store

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """systemd's notify protocol (READY=1, STATUS=..., WATCHDOG=1); a no-op without systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
        return True
    except OSError as err:
        log.debug("sd_notify failed: %s", err)
        return False


def lock_state_dir(state_dir: Path) -> int:
    """One daemon per state directory: an exclusive flock held for the daemon's life."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another gpusched daemon already owns {state_dir} "
                             "(see `gpusched health`); stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def make_runners(settings: Settings) -> dict[str, Runner]:
    runners: dict[str, Runner] = {"local": LocalRunner(settings.runs_dir)}
    if settings.docker.enabled:
        from gpusched.runners.docker import ContainerRunner

        runners["docker"] = ContainerRunner(settings.docker,
                                            kill_grace_s=settings.docker.stop_grace_s)
    return runners


class Service:
    """Everything one running daemon holds."""

    def __init__(self, settings: Settings, *, inventory: Inventory | None = None,
                 runners: dict[str, Runner] | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        for d in (settings.state_dir, settings.logs_dir, settings.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self.store = Store(settings.db_path)
            qc = self.store.quick_check()
        except StoreError as err:
            if isinstance(err, StorageFull):
                raise
            qc = err.message
        if qc != "ok":
            from gpusched.admin import corrupt_message

            raise CorruptDatabase(corrupt_message(settings, qc))
        self.inventory = inventory or open_inventory(settings.gpus.simulate)
        self.daemon = Daemon(settings, self.store, self.inventory,
                             runners if runners is not None else make_runners(settings))
        self.stopping = threading.Event()
        self.server: ApiServer | None = None
        self.metrics_server: Any = None
        self._admins = admin_uids(settings.api.admin_group)

    # -- used by the API ------------------------------------------------------------------

    def is_admin(self, uid: int) -> bool:
        if uid == 0 or uid == os.geteuid():
            return True
        members, gid = self._admins
        if uid in members:
            return True
        try:
            return gid is not None and pwd.getpwuid(uid).pw_gid == gid
        except KeyError:
            return False

    def validate_spec(self, spec: JobSpec, uid: int) -> None:
        """Refuse what must never be stored: runner off, paths and images out of policy."""
        from gpusched import policy

        if spec.runner not in self.daemon.runners:
            raise SpecError(f"the {spec.runner} runner is not enabled on this daemon")
        if spec.runner == "docker":
            policy.validate_docker_spec(spec, self.settings.docker)
        elif spec.workdir:
            policy.validate_local_workdir(spec.workdir)
        n_gpus = len(self.daemon.gpus)
        if spec.gpus.ids is None and spec.gpus.count > n_gpus and self.daemon.gpus:
            raise SpecError(f"the job asks for {spec.gpus.count} GPUs; this host has {n_gpus}")

    def resolve_gpu(self, ref: str) -> str:
        for g in self.daemon.gpus:
            if ref == str(g.index) or ref.lower() == g.uuid.lower():
                return g.uuid
        for r in self.store.gpu_rows():
            if ref == str(r["idx"]) or ref.lower() == r["uuid"].lower():
                return str(r["uuid"])
        raise NotFound(f"no GPU {ref!r}: give an index or UUID from `gpusched gpus`")

    def views(self, rows: list[Row]) -> list[JobView]:
        index_of = {g.uuid: g.index for g in self.daemon.gpus}
        out = []
        for row in rows:
            att = self.store.attempt(row["id"], row["attempt"]) if row["attempt"] else None
            progress = (self.daemon.progress_of(row["id"], row["attempt"])
                        if row["status"] in ("running", "unknown") else None)
            view = job_view(row, index_of, att, progress)
            out.append(view)
        return out

    def queue_starts(self, rows: list[Row]) -> dict[int, float | None]:
        """Expected start (seconds from now) of queued jobs, in queue order, from the running
        jobs' ETAs and each queued job's expected run time: --time, or for TAO training its
        epochs × the median s/epoch this workload had on as many GPUs."""
        from gpusched.throughput import queue_etas

        running, queued = [], []
        pinned: set[int] = set()
        medians: dict[tuple[str, int], float | None] = {}  # (workload, GPU count) -> s/epoch
        for r in rows:
            if r["status"] in ("starting", "running", "unknown"):
                p = self.daemon.progress_of(r["id"], r["attempt"]) or {}
                att = self.store.attempt(r["id"], r["attempt"]) if r["attempt"] else None
                held = len(json.loads(att["gpus"])) if att else 1
                running.append((r["id"], p.get("eta_s"), held))
        for r in self.daemon.runnable():
            spec = json.loads(self.store.get_job(r["id"])["spec"])
            req = GpuRequest.model_validate_json(r["request"])
            if req.ids is not None or req.gpu_type or req.mem_mib:
                # the model treats GPUs as interchangeable; a pinned or typed job holds its
                # place in the queue but gets no estimate rather than a wrong one
                pinned.add(r["id"])
            total = spec.get("est_runtime_s")
            if total is None and spec.get("kind") in ("tao:train", "tao:retrain"):
                total = self._tao_runtime(spec, req.count, medians)
            queued.append((r["id"], total, req.count))
        starts = queue_etas(running, queued, len(self.daemon.gpus))
        return {int(k): (None if k in pinned else v)  # type: ignore[call-overload]
                for k, v in starts.items()}

    def _tao_runtime(self, spec: dict[str, Any], gpus: int,
                     medians: dict[tuple[str, int], float | None]) -> float | None:
        """A TAO training stage's expected run time: its epochs × the best median s/epoch its
        workload had on as many GPUs in the last 30 days (read once per workload)."""
        from gpusched.parsers import spec_summary
        from gpusched.progress import stage_fields, workload_of
        from gpusched.throughput import summarize

        wl = workload_of(spec)
        if (wl, gpus) not in medians:
            sets = [s for s in summarize(self.store.epochs(
                since=self.clock.now() - 30 * 86400, workload=wl)) if s.gpu_count == gpus]
            medians[(wl, gpus)] = min(s.median_s for s in sets) if sets else None
        per_epoch = medians[(wl, gpus)]
        try:
            epochs = spec_summary(Path(stage_fields(spec).get("spec", "")).read_text())[
                "num_epochs"]
        except (OSError, KeyError):
            return None
        return per_epoch * int(epochs) if per_epoch and epochs else None

    def spans(self, since: float) -> list[dict[str, Any]]:
        """Attempts in the window, shaped for the timeline report."""
        gpus = {g.uuid: g for g in self.daemon.gpus}
        rows = {r["uuid"]: r for r in self.store.gpu_rows()}
        out = []
        for r in self.store.spans(since):
            uuids = json.loads(r["gpus"])
            out.append({
                "job_id": r["job_id"], "attempt": r["attempt"], "name": r["name"],
                "kind": r["kind"], "status": r["status"], "gpu_uuids": uuids,
                "gpu_indices": [gpus[u].index if u in gpus else rows.get(u, {}).get("idx", -1)
                                for u in uuids],
                "gpu_names": [gpus[u].name if u in gpus else rows.get(u, {}).get("name", "?")
                              for u in uuids],
                "started_at": r["started_at"], "ended_at": r["ended_at"]})
        return out

    def health(self) -> dict[str, Any]:
        with self.daemon.lock:
            h = self.daemon.health()
        h["pid"] = os.getpid()
        h["state_dir"] = str(self.settings.state_dir)
        h["socket"] = str(self.settings.socket)
        h["jobs"] = self.store.count_by_status()
        return h

    def close(self) -> None:
        """Let go of the runners, the database and NVML; jobs keep running."""
        self.daemon.close()
        self.store.close()
        self.inventory.close()

    # -- the loop -------------------------------------------------------------------------

    def start_server(self) -> None:
        self.server = ApiServer(self.settings.socket, self)
        threading.Thread(target=self.server.serve_forever, name="api", daemon=True).start()
        if self.settings.metrics.port is not None:
            from gpusched.metrics import serve_metrics

            self.metrics_server = serve_metrics(self.settings.metrics.port, self.metrics)
            log.info("Prometheus metrics on http://127.0.0.1:%d/metrics",
                     self.metrics_server.server_address[1])

    def metrics(self) -> bytes:
        """One scrape: GPU state, jobs by state, queue length, the last day's epoch times."""
        from gpusched.metrics import render_metrics

        with self.daemon.lock:
            gpus = [g.model_dump() for g in self.daemon.gpu_states()]
        counts = self.store.count_by_status()
        epochs = self.store.epochs(since=self.clock.now() - 86400)
        return render_metrics(gpus, counts, counts.get("queued", 0), epochs)

    def _housekeeping(self) -> Any:
        from apscheduler.schedulers.background import BackgroundScheduler

        sched = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            executors={"default": {"type": "threadpool", "max_workers": 1}})
        sched.add_job(self.daemon.request_reconcile, "interval",
                      seconds=self.settings.scheduler.reconcile_interval_s, id="reconcile")
        sched.add_job(self.daemon.wake, "interval", seconds=self.settings.gpus.poll_interval_s,
                      id="inventory")
        sched.add_job(self.backup, "interval", seconds=self.settings.backup.interval_s,
                      id="backup")
        sched.start()
        return sched

    def run(self, *, once: bool = False) -> None:
        """Serve until SIGTERM/SIGINT (or, with ``once``, until no work is left). Jobs are
        left running either way."""
        def on_signal(signum: int, frame: Any) -> None:
            self.stopping.set()
            self.daemon.wake()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.start_server()
        sched = self._housekeeping()
        try:
            self.daemon.tick(self.clock.now())
            sd_notify("READY=1\nSTATUS=serving")
            log.info("gpusched daemon serving on %s (state %s, %d GPU(s)%s)",
                     self.settings.socket, self.settings.state_dir, len(self.daemon.gpus),
                     ", simulated" if self.inventory.simulated else "")
            while not self.stopping.is_set():
                self._wait()
                now = self.clock.now()
                try:
                    self.daemon.tick(now)
                    self.daemon.tick_error = None
                    sd_notify("WATCHDOG=1")
                except Exception as err:  # keep serving; health reports it
                    self.daemon.tick_error = f"tick failed: {err}"
                    log.exception("tick failed")
                if once and not self.store.has_work():
                    log.info("--once: no job is queued or running; exiting")
                    break
                if once and self._stuck():
                    log.warning("--once: the queued jobs cannot start: %s", self.daemon.waiting)
                    break
        finally:
            sd_notify("STOPPING=1")
            sched.shutdown(wait=False)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            if self.server:
                self.server.shutdown()
                self.server.server_close()
                with contextlib.suppress(OSError):
                    self.settings.socket.unlink()
            self.close()
            for s, h in old.items():
                signal.signal(s, h)
            log.info("gpusched daemon stopped; running jobs keep running")

    def backup(self) -> None:
        try:
            path = self.store.backup(self.settings.backups_dir, keep=self.settings.backup.keep,
                                     now=self.clock.now())
            log.info("database backed up to %s", path)
        except Exception as err:  # a failed backup must not stop the daemon
            log.error("database backup failed: %s", err)

    def _stuck(self) -> bool:
        """--once: queued work that no placement can ever start (nothing active either)."""
        if self.daemon.placed_last_tick or self.store.live_attempts():
            return False
        return not self.store.allocations()

    def _wait(self) -> None:
        """Sleep until a wake-up (submission, signal), a job's end (pidfd, Docker event) or
        the next due housekeeping, whichever comes first."""
        timeout = max(0.0, min(self.settings.scheduler.tick_interval_s,
                               self.daemon.next_due() - self.clock.now()))
        # select() on a fresh list each time: pidfds come and go, and a reused fd number in a
        # long-lived epoll set could silently miss a job's end
        with contextlib.suppress(InterruptedError, OSError):
            select.select(self.daemon.wait_fds(), [], [], timeout)
        self.daemon.drain_wake()
