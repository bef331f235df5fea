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
import stat
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
from gpusched.models import Gpu, GpuRequest, JobSpec, JobView
from gpusched.paths import (
    DAEMON_UMASK,
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    STATE_DIR_MODE,
    ensure_dir,
    ensure_mode,
)
from gpusched.runners.base import Runner
from gpusched.runners.local import LocalRunner
from gpusched.server import ApiServer, admin_uids, job_view
from gpusched.store import Row, Store

log = logging.getLogger(__name__)
#: how long the loop waits for more work before it commits the last tick's starts alone
GROUP_COMMIT_WAIT_MS = 5


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
    ensure_dir(state_dir, STATE_DIR_MODE)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 PRIVATE_FILE_MODE)
    with contextlib.suppress(OSError):
        os.fchmod(fd, PRIVATE_FILE_MODE)  # one made 0644 by an older gpusched
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another gpusched daemon already owns {state_dir} "
                             "(see `gpusched health`); stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def secure_state_dir(settings: Settings) -> None:
    """Give the state directory its modes (issue 11), fixing what an older gpusched or an
    admin left wider: the directories users pass through 0711 (not listable), the database,
    backups, lock and job logs 0600. A job's own run directory belongs to its user and is left
    alone."""
    ensure_dir(settings.state_dir, STATE_DIR_MODE)
    for top in (settings.logs_dir, settings.runs_dir):
        ensure_dir(top, STATE_DIR_MODE)
        with contextlib.suppress(OSError):
            for job in os.scandir(top):
                if job.is_dir(follow_symlinks=False):
                    ensure_mode(Path(job.path), STATE_DIR_MODE)
    with contextlib.suppress(OSError):
        for job in os.scandir(settings.logs_dir):
            if not job.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(job.path):
                st = f.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                    ensure_mode(Path(f.path), st.st_mode & 0o700)
    ensure_dir(settings.backups_dir, PRIVATE_DIR_MODE)
    for path in (*settings.backups_dir.glob("gpusched-*.db*"),
                 *settings.state_dir.glob("gpusched.db*"), settings.state_dir / "daemon.lock"):
        if path.is_file():
            ensure_mode(path, PRIVATE_FILE_MODE)


def refuse_reset_database(settings: Settings) -> None:
    """Fail closed on a missing or zero-length database in a state directory that shows earlier
    jobs (backups, job logs or run directories): starting empty would hide every job and hand
    out their ids again."""
    from gpusched.admin import earlier_state, reset_message

    try:
        what = "empty (0 bytes)" if settings.db_path.stat().st_size == 0 else None
    except FileNotFoundError:
        what = "missing"
    if what is None:
        return
    evidence = earlier_state(settings)
    if evidence:
        raise CorruptDatabase(reset_message(settings, what, evidence))


def make_runners(settings: Settings) -> dict[str, Runner]:
    runners: dict[str, Runner] = {"local": LocalRunner.of(settings)}
    if settings.docker.enabled:
        from gpusched.runners.docker import ContainerRunner

        runners["docker"] = ContainerRunner(settings.docker, state_dir=settings.state_dir,
                                            kill_grace_s=settings.docker.stop_grace_s)
    if settings.slurm.enabled:
        from gpusched.runners.slurm import SlurmRunner

        runners["slurm"] = SlurmRunner(settings.slurm, settings.slurm_runs_dir)
    return runners


class Service:
    """Everything one running daemon holds."""

    def __init__(self, settings: Settings, *, inventory: Inventory | None = None,
                 runners: dict[str, Runner] | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        secure_state_dir(settings)
        refuse_reset_database(settings)
        try:
            if not settings.db_path.exists():  # SQLite gives -wal and -shm the same mode
                os.close(os.open(settings.db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                 PRIVATE_FILE_MODE))
        except FileExistsError:
            pass
        except OSError as err:
            raise StoreError(f"cannot create the state database {settings.db_path}: "
                             f"{err}") from err
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

    def with_notify_default(self, spec: JobSpec) -> JobSpec:
        """A job that names no --notify-url gets the configured notify.url."""
        if spec.notify_url or not self.settings.notify.url:
            return spec
        return spec.model_copy(update={"notify_url": self.settings.notify.url})

    def validate_spec(self, spec: JobSpec, uid: int) -> None:
        """Refuse what must never be stored: runner off, paths and images out of policy."""
        from gpusched import policy

        results = ((spec.stage or {}).get("stage") or {}).get("results_dir")
        if results and spec.kind.startswith("tao:") and spec.kind != "tao:evaluate":
            other = self.store.active_results_dirs().get(results)
            if other is not None:  # two runs writing one directory mix their checkpoints
                raise SpecError(f"{results} is the results directory of job {other}, which has "
                                "not ended: give this stage its own -r")
        if spec.runner not in self.daemon.runners:
            raise SpecError(f"the {spec.runner} runner is not enabled on this daemon")
        if spec.notify_url and spec.notify_url != self.settings.notify.url:  # the admin's is fine
            policy.validate_notify_url(spec.notify_url, self.settings.notify.allowed_hosts)
        if spec.runner == "docker":
            policy.validate_docker_spec(spec, self.settings.docker, uid=uid, is_admin=self.is_admin(uid))
        elif spec.workdir:
            policy.validate_local_workdir(spec.workdir)
        if spec.runner == "slurm":  # Slurm owns (and checks) its cluster's GPUs
            if spec.gpus.ids is not None or spec.gpus.mem_mib is not None:
                raise SpecError("a slurm job asks for a number of GPUs (and --gpu-type): Slurm "
                                "picks them, so GPU ids and --mem cannot be given")
            return
        self._check_gpus_exist(spec.gpus)

    def _check_gpus_exist(self, req: GpuRequest) -> None:
        """Refuse a request no GPU of this host can ever meet (a type it lacks, more memory than
        its largest GPU, a GPU it does not have, more GPUs than it has of that kind), once the
        inventory is known. Drained and lost GPUs still count: an admin may resume them."""
        gpus = list(self.daemon.gpus)
        if not gpus or (req.ids is None and req.count == 0):
            return
        have = "this host has " + ", ".join(
            f"GPU {g.index} ({g.name}, {g.memory_total_mib} MiB)" for g in gpus)

        def fits(g: Gpu) -> str | None:
            if req.gpu_type is not None and req.gpu_type.lower() not in g.name.lower():
                return f"GPU {g.index} is a {g.name}, not --gpu-type {req.gpu_type}"
            if req.mem_mib and g.memory_total_mib < req.mem_mib:
                return (f"GPU {g.index} ({g.name}) has {g.memory_total_mib} MiB in all, less "
                        f"than --gpu-mem {req.mem_mib} MiB")
            return None

        if req.ids is not None:
            for ref in req.ids:
                key = ref.strip()
                g = next((g for g in gpus if key == str(g.index)
                          or key.lower() == g.uuid.lower()), None)
                if g is None:
                    raise SpecError(f"GPU {ref} does not exist; {have}")
                why = fits(g)
                if why:
                    raise SpecError(f"{why}; {have}")
            return
        typed = [g for g in gpus if req.gpu_type is None
                 or req.gpu_type.lower() in g.name.lower()]
        if not typed:
            raise SpecError(f"no GPU matches --gpu-type {req.gpu_type}; {have}")
        big = [g for g in typed if g.memory_total_mib >= (req.mem_mib or 0)]
        if not big:
            largest = max(typed, key=lambda g: g.memory_total_mib)
            kind = f" {req.gpu_type}" if req.gpu_type else ""
            raise SpecError(f"--gpu-mem {req.mem_mib} MiB is more than the largest{kind} GPU has "
                            f"(GPU {largest.index}, {largest.name}: {largest.memory_total_mib} "
                            f"MiB); {have}")
        if req.count > len(big):
            what = f"{req.count} GPUs"
            if req.gpu_type is not None:
                what += f" of type {req.gpu_type}"
            if req.mem_mib:
                what += f" with {req.mem_mib} MiB each"
            raise SpecError(f"the job asks for {what}; this host has {len(big)}"
                            + ("" if len(big) == len(gpus) else " such")
                            + f" ({have.removeprefix('this host has ')})")

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
        workload had on as many GPUs in the last 30 days (read once per workload). The spec
        file's facts were recorded at submission: no file of the user's is read here (a FIFO
        would hang `show` for everyone)."""
        from gpusched.progress import recorded_spec_facts, workload_of
        from gpusched.throughput import summarize

        wl = workload_of(spec)
        if (wl, gpus) not in medians:
            sets = [s for s in summarize(self.store.epochs(
                since=self.clock.now() - 30 * 86400, workload=wl)) if s.gpu_count == gpus]
            medians[(wl, gpus)] = min(s.median_s for s in sets) if sets else None
        per_epoch = medians[(wl, gpus)]
        epochs = recorded_spec_facts(spec).get("num_epochs")
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
        h = self.daemon.health()  # lock-free: see Daemon.health
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
        sock_dir = self.settings.socket.parent
        if not sock_dir.exists():  # an existing one (/run/gpusched, $XDG_RUNTIME_DIR) is kept
            ensure_dir(sock_dir, 0o755)
        self.server = ApiServer(self.settings.socket, self)
        threading.Thread(target=self.server.serve_forever, name="api", daemon=True).start()
        if self.settings.metrics.port is not None:
            from gpusched.metrics import serve_metrics

            self.metrics_server = serve_metrics(self.settings.metrics.port, self.metrics)
            log.info("Prometheus metrics on http://127.0.0.1:%d/metrics",
                     self.metrics_server.server_address[1])

    def metrics(self) -> list[Any]:
        """One scrape: GPU state, jobs by state, queue length, the last day's epoch times."""
        from gpusched.metrics import metric_families

        gpus = [g.model_dump() for g in self.daemon.gpu_states()]  # lock-free
        counts = self.store.count_by_status()
        epochs = self.store.epochs(since=self.clock.now() - 86400)
        return metric_families(gpus, counts, counts.get("queued", 0), epochs)

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
        sched.add_job(self.check_socket, "interval",
                      seconds=self.settings.api.socket_check_interval_s, id="socket")
        sched.start()
        return sched

    def run(self, *, once: bool = False) -> None:
        """Serve until SIGTERM/SIGINT (or, with ``once``, until no work is left). Jobs are
        left running either way."""
        def on_signal(signum: int, frame: Any) -> None:
            self.stopping.set()
            self.daemon.wake()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        # What the daemon creates from here on (job log directories, logs, backups) is private
        # unless given a mode: files 0600, directories 0711
        old_umask = os.umask(DAEMON_UMASK)
        self.start_server()
        sched = self._housekeeping()
        self.daemon.defer_marks = True
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
                except Exception as err:  # keep serving; health reports it
                    self.daemon.tick_error = f"tick failed: {err}"
                    log.exception("tick failed")
                # the loop made progress (steps contain their own failures): feed the watchdog,
                # which is for a loop that hangs, not for one job's bad data
                sd_notify("WATCHDOG=1")
                if once and not self.store.has_work():
                    log.info("--once: no job is queued or running; exiting")
                    break
                if once and self._stuck():
                    log.warning("--once: the queued jobs cannot start: %s", self.daemon.waiting)
                    break
        finally:
            sd_notify("STOPPING=1")
            self._flush_marks()
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
            os.umask(old_umask)
            log.info("gpusched daemon stopped; running jobs keep running")

    def backup(self) -> None:
        try:
            ensure_dir(self.settings.backups_dir, PRIVATE_DIR_MODE)
            path = self.store.backup(self.settings.backups_dir, keep=self.settings.backup.keep,
                                     now=self.clock.now())
            ensure_mode(path, PRIVATE_FILE_MODE)
            log.info("database backed up to %s", path)
        except Exception as err:  # a failed backup must not stop the daemon
            log.error("database backup failed: %s", err)

    def check_socket(self) -> None:
        """Bring back the API socket if its file was deleted or replaced: without it the daemon
        runs on, unreachable."""
        ensure = getattr(self.server, "ensure_socket", None)
        if ensure is None:
            return
        try:
            if ensure():  # ensure_socket logs the warning itself
                log.debug("housekeeping recreated the API socket %s", self.settings.socket)
        except Exception as err:  # housekeeping must not stop the daemon
            log.error("could not recreate the API socket %s: %s", self.settings.socket, err)

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
        # a fresh poll set each time: pidfds come and go, and a reused fd number in a
        # long-lived epoll set could silently miss a job's end. poll(), not select(): select
        # fails outright on an fd number above 1023 (FD_SETSIZE), which a daemon with many API
        # connections or jobs soon hands out
        poller = select.poll()
        for fd in self.daemon.wait_fds():
            poller.register(fd, select.POLLIN)
        with contextlib.suppress(InterruptedError, OSError):
            # starts of the last tick not yet committed (defer_marks): when more comes within
            # GROUP_COMMIT_WAIT_MS (a job ended, a submission), the next tick commits them
            # with its own writes, in one fsync; else they are committed before sleeping
            if self.daemon.has_pending_marks() and not poller.poll(GROUP_COMMIT_WAIT_MS):
                self._flush_marks()
            poller.poll(timeout * 1000)
        self.daemon.drain_wake()

    def _flush_marks(self) -> None:
        try:
            self.daemon.flush_marks()
        except Exception as err:  # the next tick's first transaction tries again
            log.warning("could not record the last starts yet: %s", err)
