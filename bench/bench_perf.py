"""Performance benchmark of issue 15, side by side with task-spooler: prints figures, asserts
nothing (the targets are printed next to the figures, to be read).

    .venv/bin/python bench/bench_perf.py [--quick] [--repeats 3] [--json FILE] [--sections 1,2,...]

Sections (each prints its target from issue 15 next to the figure):

1. Drain: N no-op 1-GPU jobs queued behind a 2-GPU blocker on 2 simulated GPUs, then the blocker
   is cancelled: jobs/s until all are done; task-spooler the same with 2 slots (2 blockers,
   ``tsp -k``).
2. Submission: one request per job through the API (gpusched.client, with an Idempotency-Key as
   the CLI sends), one ``gpusched submit -- true`` per job, and, when ``gpusched submit --help``
   offers them, ``--array`` and ``--from-file`` (one call for many jobs); versus ``tsp true``.
   The jobs queue behind blockers on both sides.
3. CLI start-up: median wall of ``gpusched submit -- true`` and ``gpusched ls`` versus
   ``tsp true``, ``tsp -l`` and ``python -c pass``, round-robin; ``python -X importtime`` of
   ``import gpusched.cli`` (the typer app, which every other command builds) and of a real
   ``gpusched submit -- true`` (the fast path, ``gpusched.fastcli``), top modules by cumulative
   time. Run it with the Python of a normal install (``pip install .`` or the wheel into a
   venv) for the issue's figure: an editable install's import hook costs about 11 ms.
4. Big queue: with 100 / 2,000 / 20,000 / 100,000 queued jobs (pinned to GPU 1 behind a blocker
   there, so the planner sees them; ``--queue-kind held`` queues them ``--hold`` instead): the
   daemon's own tick figures if its health exposes any, else the submit->done latency of one
   no-op job beside the queue (priority 10, runs on GPU 0), an estimate of CPU per idle tick,
   ``gpusched ls`` wall and the daemon CPU it costs, API submit latency, idle CPU over 10 s, RSS.
5. Reads vs scheduling: at 20,000 queued jobs, submit->done latency of one no-op job while 0, 1
   and 4 clients loop ``gpusched ls``, and while one loops ``gpusched health``.
6. Submit->start latency on an idle daemon, server side (the job's queued/starting/running
   event timestamps) and client side.

A and B alternate (gpusched, task-spooler, gpusched, ...) ``--repeats`` times; medians and
ratios to task-spooler are printed. task-spooler is Debian's ``task-spooler`` (binary ``tsp``,
or ``ts`` elsewhere; the moreutils ``ts`` is told apart by its ``-V``); without it the
task-spooler column is skipped with a note. Every daemon and task-spooler server runs on its own
temporary directory and is stopped (with its jobs) on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gpusched
from gpusched.client import Client
from gpusched.models import JobSpec
from gpusched.store import Store
from gpusched.testing.harness import DaemonProcess, cpu_seconds, rss_mib, short_tmpdir
from gpusched.units import parse_gpus

REPO = Path(__file__).resolve().parent.parent
PKG_SRC = Path(gpusched.__file__).resolve().parent.parent  # the tree the figures are of
TERMINAL = ("succeeded", "failed", "cancelled", "lost")
T_START = time.monotonic()
OWNER = pwd.getpwuid(os.getuid()).pw_name
PATH_ENV = os.environ.get("PATH", "/usr/bin:/bin")

# -- output ---------------------------------------------------------------------------------


def progress(msg: str) -> None:
    """A progress line (stderr), so a long run is never silent."""
    print(f"  .. [{time.monotonic() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def out(msg: str = "") -> None:
    print(msg, flush=True)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def section(title: str, target: str) -> None:
    out()
    out(f"== {title} ==")
    out(f"   target (issue 15): {target}")
    out(f"   load average now: {load()} (on {os.cpu_count()} CPUs)")


def med(values: Iterable[float]) -> float:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else float("nan")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, round(q / 100 * (len(v) - 1)))]


def fmt_runs(values: list[float], unit: str = "", digits: int = 0) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values) + (f" {unit}" if unit else "")


def ratio(a: float, b: float | None) -> str:
    if b is None or b != b or not b or a != a:
        return "n/a"
    return f"{a / b:.2f}x"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


# -- cleanup --------------------------------------------------------------------------------

LIVE: list[Any] = []  # objects with close(): daemons, task-spooler servers, loopers
#: state directories removed only when the benchmark ends. On a filesystem mounted with
#: ``discard`` (this VM's root), deleting a drain's thousands of run directories and logs
#: slows the metadata operations and fsyncs of whatever runs next for seconds (a minimal
#: Python loop measured 824 -> 225 jobs/s over runs that each deleted the last one's files,
#: 812-1000 without the deletes): an A B A B comparison would charge each side for the other's
#: clean-up.
LEFT: list[Path] = []


def remove_later(path: Path) -> None:
    LEFT.append(path)


def close_all() -> None:
    while LIVE:
        obj = LIVE.pop()
        try:
            obj.close()
        except Exception as err:  # cleanup goes on
            print(f"cleanup of {obj!r} failed: {err}", file=sys.stderr)
    while LEFT:
        shutil.rmtree(LEFT.pop(), ignore_errors=True)


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- gpusched -------------------------------------------------------------------------------


def gpusched_exe() -> str:
    exe = shutil.which("gpusched", path=str(Path(sys.executable).parent))
    return exe or "gpusched"


def job_body(command: list[str], gpus: str = "1", **extra: Any) -> dict[str, Any]:
    """The body `gpusched submit` sends for a local job."""
    body: dict[str, Any] = {"command": command, "gpus": parse_gpus(gpus), "priority": 0,
                            "name": None, "env": {"PATH": PATH_ENV}, "retries": 0,
                            "hold": False, "retry_on": None, "after": [], "workdir": "/tmp"}
    body.update(extra)
    return body


class Bench:
    """A real daemon (gpusched.testing.harness.DaemonProcess) on a temporary state directory,
    with simulated GPUs; close() kills its jobs (a stopped daemon leaves them running), stops
    it and removes the directory."""

    def __init__(self) -> None:
        self.state = short_tmpdir("gsperf")
        self.d = DaemonProcess(self.state)
        self.db_path = self.state / "gpusched.db"
        self._db: sqlite3.Connection | None = None
        self.closed = False
        LIVE.append(self)

    def __repr__(self) -> str:
        return f"<gpusched daemon on {self.state}>"

    def start(self) -> Bench:
        self.d.start(timeout=60)
        assert self.d.proc is not None
        self.pid = self.d.proc.pid
        self.c = Client(self.d.socket, timeout=300)
        return self

    @property
    def env(self) -> dict[str, str]:
        return self.d.env

    @property
    def db(self) -> sqlite3.Connection:
        """A connection of our own for reading (WAL: readers do not block the daemon)."""
        if self._db is None:
            self._db = sqlite3.connect(str(self.db_path), timeout=60, isolation_level=None)
        return self._db

    def q(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, list(params)).fetchall()

    def submit(self, body: dict[str, Any]) -> int:
        return int(self.c.submit("/v1/jobs", body)["id"])

    def status(self, job_id: int) -> str:
        rows = self.q("SELECT status FROM jobs WHERE id = ?", [job_id])
        return rows[0][0] if rows else "?"

    def wait_status(self, job_id: int, want: Iterable[str], timeout: float,
                    interval: float = 0.005) -> str | None:
        want = set(want)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(job_id)
            if st in want:
                return st
            time.sleep(interval)
        return None

    def blocker(self, gpus: str) -> int:
        """A long job holding ``gpus``, running before this returns."""
        jid = self.submit(job_body(["sleep", "900"], gpus, name="blocker"))
        if self.wait_status(jid, ["running"], 60) is None:
            raise RuntimeError(f"blocker {jid} did not start: {self.status(jid)}; daemon log:\n"
                               f"{self.d.log()}")
        return jid

    def prefill(self, n: int, gpus: str = "1", hold: bool = False, chunk: int = 10000,
                user: pwd.struct_passwd | None = None) -> float:
        """Queue ``n`` no-op jobs straight into the store (the rows the API writes, minus the
        API), in transactions of ``chunk`` (the daemon's own writes wait at most its 30 s busy
        timeout), as ``user``'s jobs (default: ours). Returns the seconds it took."""
        t0 = time.monotonic()
        spec = JobSpec(command=["true"], workdir="/tmp", env={"PATH": PATH_ENV},
                       gpus=parse_gpus(gpus), hold=hold)  # type: ignore[arg-type]
        st = Store(self.db_path)
        try:
            done = 0
            while done < n:
                k = min(chunk, n - done)
                with st.write():
                    for _ in range(k):
                        st.submit(spec, owner_uid=user.pw_uid if user else os.getuid(),
                                  owner=user.pw_name if user else OWNER, now=time.time())
                done += k
        finally:
            st.close()
        return time.monotonic() - t0

    def active(self) -> int:
        return int(self.q("SELECT count(*) FROM jobs WHERE status IN"
                          " ('queued','starting','running','unknown')")[0][0])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> float:
        return rss_mib(self.pid)

    def kill_jobs(self) -> None:
        """SIGKILL the process group of every live attempt's shim (jobs outlive the daemon)."""
        if not self.db_path.exists():
            return
        try:
            rows = self.q("SELECT pid FROM attempts WHERE state IN ('starting','live')"
                          " AND pid IS NOT NULL")
        except sqlite3.Error:
            return
        for (pid,) in rows:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"gpusched-shim" in cmd:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.kill_jobs()
        try:
            self.d.stop(timeout=20)
        finally:
            with contextlib.suppress(Exception):
                self.kill_jobs()  # anything launched while it stopped
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
            remove_later(self.state)
            with contextlib.suppress(ValueError):
                LIVE.remove(self)


def step_seconds(health: Any) -> dict[str, float]:
    """The seconds the daemon spent in each tick step since it started (health's tick)."""
    return dict((health.get("tick") or {}).get("seconds_by_step") or {})


def tick_figures(health: Any) -> dict[str, Any]:
    """Numbers the daemon reports about its ticks (any key naming a tick), if it has any."""
    found: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                p = f"{path}.{k}" if path else str(k)
                if "tick" in str(k).lower() and isinstance(v, int | float | dict):
                    found[p] = v
                walk(v, p)

    walk(health, "")
    return found


# -- task-spooler ---------------------------------------------------------------------------


def find_tsp() -> tuple[str | None, str]:
    """Debian's task-spooler binary (tsp, or ts where it is not renamed): (path, version) or
    (None, why). moreutils also has a `ts` (a timestamp filter): told apart by -V."""
    tried = []
    for name in ("tsp", "ts"):
        exe = shutil.which(name)
        if not exe:
            tried.append(f"{name}: not found")
            continue
        tmp = tempfile.mkdtemp(prefix="tspv", dir="/tmp")
        try:
            r = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=5,
                               stdin=subprocess.DEVNULL,
                               env={**os.environ, "TS_SOCKET": f"{tmp}/s", "TMPDIR": tmp})
            text = (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            text = f"({err})"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if "task spooler" in text.lower():
            return exe, text.splitlines()[0]
        tried.append(f"{exe}: not task-spooler ({text[:60]!r})")
    return None, "; ".join(tried)


#: task-spooler's server keeps one connection per queued job (its client waits on it to run
#: the job) and allows at most MAXCONN = 1000 (a compile-time limit in its server.c; it waits
#: on them with select()); beyond that `tsp cmd` blocks. The drain's blockers and `tsp -w`
#: take three more.
TSP_MAX_QUEUED = 1000 - 3


class Tsp:
    """A task-spooler server of our own: TS_SOCKET and TMPDIR (its output files) in a
    temporary directory, ``-S slots``."""

    def __init__(self, exe: str, slots: int = 2, maxconn: int = 1000) -> None:
        self.exe = exe
        self.dir = Path(tempfile.mkdtemp(prefix="tsperf", dir="/tmp"))
        self.env = {**os.environ, "TS_SOCKET": str(self.dir / "socket"), "TMPDIR": str(self.dir),
                    "TS_MAXCONN": str(maxconn), "TS_MAXFINISHED": str(max(1000, maxconn))}
        self.blockers: list[int] = []
        self.closed = False
        LIVE.append(self)
        self.run("-S", str(slots))

    def __repr__(self) -> str:
        return f"<task-spooler server on {self.dir}>"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd="/tmp")

    def add(self, *cmd: str) -> int:
        r = self.run(*cmd)
        if r.returncode != 0:
            raise RuntimeError(f"tsp {' '.join(cmd)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip())

    def blocker(self) -> int:
        jid = self.add("sleep", "900")
        self.blockers.append(jid)
        return jid

    def finished(self) -> int:
        return sum(1 for line in self.run("-l").stdout.splitlines()[1:]
                   if line.split()[1:2] == ["finished"])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for jid in self.blockers:
                with contextlib.suppress(Exception):
                    self.run("-k", str(jid), timeout=10)
            with contextlib.suppress(Exception):
                self.run("-K", timeout=10)
        finally:
            remove_later(self.dir)  # a client still exiting after -K may write there late
            with contextlib.suppress(ValueError):
                LIVE.remove(self)


# -- loopers (section 5) --------------------------------------------------------------------


class Looper:
    """A client that runs one CLI command in a loop until stopped."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.stop_ev = threading.Event()
        self.walls: list[float] = []
        self.errors = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        LIVE.append(self)

    def start(self) -> Looper:
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop_ev.is_set():
            t0 = time.perf_counter()
            try:
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                             cwd="/tmp")
                rc = self.proc.wait(timeout=300)
            except (OSError, subprocess.TimeoutExpired):
                rc = -1
                if self.proc is not None:
                    with contextlib.suppress(OSError):
                        self.proc.kill()
            if self.stop_ev.is_set() and rc != 0:
                break  # killed by close(): not a call that counts
            self.walls.append(time.perf_counter() - t0)
            if rc not in (0, 1):  # health exits 1 when degraded: still an answer
                self.errors += 1

    def close(self) -> None:
        self.stop_ev.set()
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
        self.thread.join(timeout=10)
        with contextlib.suppress(ValueError):
            LIVE.remove(self)


# -- sections -------------------------------------------------------------------------------


class Perf:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.results: dict[str, Any] = {}
        self.tsp_exe, self.tsp_version = find_tsp()
        self.gs = gpusched_exe()
        self.drain_user = drain_user(args.drain_user)

    # 1 -------------------------------------------------------------------------------------

    def drain_gpusched(self, n: int) -> dict[str, Any]:
        b = Bench().start()
        try:
            blocker = b.blocker("2")
            b.prefill(n, "1", user=self.drain_user)
            time.sleep(1.5)  # a tick or two: the queue is planned (and waits) before release
            timeout = max(120.0, n / 10)
            steps0 = step_seconds(b.c.get("/v1/health"))
            cpu0 = b.cpu()
            t0 = time.time()
            b.c.post(f"/v1/jobs/{blocker}/cancel")
            while b.active() > 0:
                if time.time() - t0 > timeout:
                    raise RuntimeError(f"drain of {n} jobs not done after {timeout:.0f} s "
                                       f"({b.active()} active)")
                time.sleep(0.01)
            wall = time.time() - t0
            cpu = b.cpu() - cpu0
            steps = {k: (v - steps0.get(k, 0.0)) / n * 1000
                     for k, v in step_seconds(b.c.get("/v1/health")).items()}
            a, z, cnt, ok = b.q("SELECT min(started_at), max(ended_at), count(*),"
                                " sum(status = 'succeeded') FROM jobs WHERE id != ?",
                                [blocker])[0]
            per_gpu = dict(b.q("SELECT gpus, count(*) FROM attempts WHERE job_id != ?"
                               " GROUP BY gpus", [blocker]))
            return {"jobs": cnt, "succeeded": ok, "wall_s": wall, "jobs_per_s": n / wall,
                    "span_s": z - a, "span_jobs_per_s": n / (z - a) if z > a else None,
                    "per_gpu": sorted(per_gpu.values(), reverse=True),
                    "cpu_ms_per_job": cpu / n * 1000, "step_ms_per_job": steps}
        finally:
            b.close()

    def drain_tsp(self, n: int) -> dict[str, Any]:
        assert self.tsp_exe
        t = Tsp(self.tsp_exe, 2, maxconn=n + 100)
        try:
            b1, b2 = t.blocker(), t.blocker()
            ids = [t.add("true") for _ in range(n)]
            time.sleep(0.5)
            t0 = time.time()
            t.run("-k", str(b1))
            t.run("-k", str(b2))
            t.run("-w", str(ids[-1]), timeout=max(120.0, n / 10))
            # with 2 slots the last job can end while an earlier one still runs: all done is
            # when `tsp -l` lists every job finished
            deadline = time.time() + 60
            while (done := t.finished() - 2) < n and time.time() < deadline:
                time.sleep(0.002)
            wall = time.time() - t0
            return {"jobs": n, "succeeded": done, "wall_s": wall, "jobs_per_s": n / wall}
        finally:
            t.close()

    def drain_floor(self, n: int) -> dict[str, Any]:
        """bench/floor_loop.py: a minimal durable Python loop doing a job's unavoidable work."""
        root = Path(tempfile.mkdtemp(prefix="gsfloor", dir="/tmp"))
        remove_later(root)
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("floor_loop.py")),
                            str(n), str(root)], capture_output=True, text=True,
                           timeout=max(120.0, n / 10))
        if r.returncode != 0:
            raise RuntimeError(f"floor_loop.py failed: {r.stderr.strip()[-500:]}")
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))

    def s1_drain(self) -> None:
        n = self.a.drain_jobs
        section(f"1. Drain: {n} no-op 1-GPU jobs (`true`) on 2 simulated GPUs / 2 tsp slots, "
                "queued behind a blocker, then released",
                ">= 900 jobs/s (task-spooler 1.0.1 did 887-1,114 jobs/s, gpusched 161)")
        if self.drain_user is not None:
            out(f"   gpusched's jobs run as {self.drain_user.pw_name} (uid {self.drain_user.pw_uid}):"
                " the daemon (root) switches to the job's user at each launch, as on a shared box;"
                " task-spooler and the floor run theirs as root")
        gs, ts, fl = [], [], []
        for i in range(self.a.repeats):
            progress(f"drain run {i + 1}/{self.a.repeats}: gpusched ({n} jobs)")
            gs.append(self.drain_gpusched(n))
            progress(f"  gpusched {gs[-1]['jobs_per_s']:.0f} jobs/s; load {load()}")
            if self.tsp_exe and n <= TSP_MAX_QUEUED:
                progress(f"drain run {i + 1}/{self.a.repeats}: task-spooler ({n} jobs)")
                ts.append(self.drain_tsp(n))
                progress(f"  tsp {ts[-1]['jobs_per_s']:.0f} jobs/s")
            progress(f"drain run {i + 1}/{self.a.repeats}: the Python floor ({n} jobs)")
            fl.append(self.drain_floor(n))
            progress(f"  floor {fl[-1]['jobs_per_s']:.0f} jobs/s")
        g = med(r["jobs_per_s"] for r in gs)
        out(f"   gpusched      runs {fmt_runs([r['jobs_per_s'] for r in gs])} jobs/s   "
            f"median {g:.0f} jobs/s  (release -> all done; "
            f"{min(r['succeeded'] for r in gs)}/{n} succeeded in every run)")
        out(f"                 server span first start -> last end: median "
            f"{med(r['span_jobs_per_s'] or float('nan') for r in gs):.0f} jobs/s; jobs per GPU "
            f"{gs[-1]['per_gpu']}")
        steps = {k: med(r["step_ms_per_job"].get(k, 0.0) for r in gs)
                 for k in gs[-1]["step_ms_per_job"]}
        shown = [f"{k} {v:.2f}" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])
                 if v >= 0.01]
        out(f"                 daemon CPU {med(r['cpu_ms_per_job'] for r in gs):.2f} ms per job; "
            f"tick time by step, ms per job (median; health's seconds_by_step, parts of "
            f"plan_and_launch after a dot): {', '.join(shown)}")
        t = None
        if ts:
            t = med(r["jobs_per_s"] for r in ts)
            out(f"   task-spooler  runs {fmt_runs([r['jobs_per_s'] for r in ts])} jobs/s   "
                f"median {t:.0f} jobs/s  ({min(r['succeeded'] for r in ts)}/{n} finished)")
        elif self.tsp_exe:
            out(f"   task-spooler  skipped: it cannot queue {n} jobs (its server holds one "
                f"connection per queued job, at most 1,000); use --drain-jobs "
                f"{TSP_MAX_QUEUED} or fewer for that column")
        else:
            out(f"   task-spooler  skipped: {self.tsp_version}")
        f = med(r["jobs_per_s"] for r in fl)
        out(f"   Python floor  runs {fmt_runs([r['jobs_per_s'] for r in fl])} jobs/s   "
            f"median {f:.0f} jobs/s  (bench/floor_loop.py: the same durable claims, ends, "
            f"folder, log, exit file and shim, nothing else; {med(r['cpu_ms_per_job'] for r in fl):.2f}"
            f" ms of CPU per job)")
        out(f"   gpusched / task-spooler: {ratio(g, t)}   gpusched / Python floor: {ratio(g, f)}"
            f"   target >= 900 jobs/s: {verdict(g >= 900)}")
        self.results["drain"] = {"jobs": n, "gpusched": gs, "tsp": ts, "floor": fl,
                                 "floor_median_jobs_per_s": f,
                                 "gpusched_median_jobs_per_s": g, "tsp_median_jobs_per_s": t,
                                 "target_jobs_per_s": 900}

    # 2 -------------------------------------------------------------------------------------

    def bulk_options(self) -> dict[str, bool]:
        r = subprocess.run([self.gs, "submit", "--help"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "200"})
        text = r.stdout + r.stderr
        return {"array": "--array" in text, "from_file": "--from-file" in text}

    def _bulk(self, b: Bench, argv: list[str], n: int, stdin: str | None = None) -> dict[str, Any]:
        before = int(b.q("SELECT count(*) FROM jobs")[0][0])
        t0 = time.perf_counter()
        r = subprocess.run([self.gs, "submit", *argv], env=b.env, capture_output=True,
                           text=True, timeout=300, cwd="/tmp", input=stdin)
        wall = time.perf_counter() - t0
        made = int(b.q("SELECT count(*) FROM jobs")[0][0]) - before
        res: dict[str, Any] = {"jobs": made, "wall_s": wall,
                               "jobs_per_s": made / wall if made else 0.0, "rc": r.returncode}
        if r.returncode != 0 or made != n:
            res["error"] = (r.stderr or r.stdout).strip()[-300:]
        return res

    def submit_gpusched(self, n_api: int, n_cli: int, n_bulk: int,
                        bulk: dict[str, bool]) -> dict[str, Any]:
        b = Bench().start()
        try:
            b.blocker("2")  # the submitted jobs queue, as a sweep behind busy GPUs does
            body = job_body(["true"])
            lat = []
            t0 = time.perf_counter()
            for _ in range(n_api):
                t1 = time.perf_counter()
                b.c.submit("/v1/jobs", body)
                lat.append(time.perf_counter() - t1)
            api = {"jobs": n_api, "wall_s": time.perf_counter() - t0,
                   "median_ms": med(lat) * 1000}
            api["jobs_per_s"] = n_api / api["wall_s"]
            t0 = time.perf_counter()
            for _ in range(n_cli):
                subprocess.run([self.gs, "submit", "--", "true"], env=b.env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                               cwd="/tmp")
            cli = {"jobs": n_cli, "wall_s": time.perf_counter() - t0}
            cli["jobs_per_s"] = n_cli / cli["wall_s"]
            res: dict[str, Any] = {"api": api, "cli": cli}
            if bulk["array"]:
                res["array"] = self._bulk(b, ["--array", f"0-{n_bulk - 1}", "--", "true"],
                                          n_bulk)
            if bulk["from_file"]:
                lines = "".join(f"true {i}\n" for i in range(n_bulk))
                path = b.state / "jobs.txt"
                path.write_text(lines)
                res["from_file"] = self._bulk(b, ["--from-file", str(path)], n_bulk)
                res["from_file_stdin"] = self._bulk(b, ["--from-file", "-"], n_bulk,
                                                    stdin=lines)
            return res
        finally:
            b.close()

    def submit_tsp(self, n: int) -> dict[str, Any]:
        assert self.tsp_exe
        n = min(n, TSP_MAX_QUEUED)  # a rate: as many as its server can queue
        t = Tsp(self.tsp_exe, 2, maxconn=n + 100)
        try:
            t.blocker()
            t.blocker()
            t0 = time.perf_counter()
            for _ in range(n):
                r = t.run("true")
                if r.returncode != 0:
                    raise RuntimeError(f"tsp true failed: {r.stderr}")
            wall = time.perf_counter() - t0
            return {"jobs": n, "wall_s": wall, "jobs_per_s": n / wall}
        finally:
            t.close()

    def s2_submit(self) -> None:
        n_api, n_cli, n_bulk = self.a.submit_jobs, self.a.cli_submits, self.a.bulk_jobs
        bulk = self.bulk_options()
        section("2. Submission: jobs/s, one request per job (API, CLI) and one call for many "
                "(--array, --from-file)",
                "bulk >= 1,000 jobs/s through one call (--array / --from-file); "
                "today's API 240-279 jobs/s, tsp's C client 567-636")
        gs, ts = [], []
        for i in range(self.a.repeats):
            progress(f"submission run {i + 1}/{self.a.repeats}: gpusched (API {n_api}, "
                     f"CLI {n_cli}" + (f", bulk {n_bulk}" if any(bulk.values()) else "") + ")")
            gs.append(self.submit_gpusched(n_api, n_cli, n_bulk, bulk))
            progress(f"  API {gs[-1]['api']['jobs_per_s']:.0f} jobs/s, CLI "
                     f"{gs[-1]['cli']['jobs_per_s']:.1f} jobs/s; load {load()}")
            if self.tsp_exe:
                progress(f"submission run {i + 1}/{self.a.repeats}: task-spooler ({n_api} x "
                         "`tsp true`)")
                ts.append(self.submit_tsp(n_api))
                progress(f"  tsp {ts[-1]['jobs_per_s']:.0f} jobs/s")
        t = med(r["jobs_per_s"] for r in ts) if ts else None
        rows = [("API, 1 request/job", "api"), ("CLI `gpusched submit -- true`", "cli")]
        if bulk["array"]:
            rows.append((f"CLI --array 0-{n_bulk - 1} (1 call)", "array"))
        if bulk["from_file"]:
            rows += [(f"CLI --from-file ({n_bulk} lines)", "from_file"),
                     ("CLI --from-file - (stdin)", "from_file_stdin")]
        summary: dict[str, Any] = {}
        for label, key in rows:
            vals = [r[key]["jobs_per_s"] for r in gs]
            m = med(vals)
            summary[key] = m
            extra = ""
            if key == "api":
                extra = f"; median request {med(r['api']['median_ms'] for r in gs):.1f} ms"
            errs = [r[key].get("error") for r in gs if r[key].get("error")]
            if errs:
                extra += f"; ERROR: {errs[0]}"
            target = ""
            if key in ("array", "from_file", "from_file_stdin"):
                target = f"   target >= 1,000: {verdict(m >= 1000)}"
            out(f"   gpusched {label:<36} runs {fmt_runs(vals, digits=1)}   median {m:.1f} "
                f"jobs/s   vs tsp {ratio(m, t)}{extra}{target}")
        if not bulk["array"]:
            out("   gpusched --array: skipped: `gpusched submit --help` has no --array (not "
                "implemented yet)")
        if not bulk["from_file"]:
            out("   gpusched --from-file: skipped: `gpusched submit --help` has no --from-file "
                "(not implemented yet)")
        if ts:
            out(f"   task-spooler `tsp true` (1 process/job)   runs "
                f"{fmt_runs([r['jobs_per_s'] for r in ts])}   median {t:.0f} jobs/s")
        else:
            out(f"   task-spooler: skipped: {self.tsp_version}")
        self.results["submission"] = {"gpusched": gs, "tsp": ts, "medians": summary,
                                      "tsp_median_jobs_per_s": t, "bulk_available": bulk}

    # 3 -------------------------------------------------------------------------------------

    def importtime(self, argv: list[str] | None = None,
                   env: dict[str, str] | None = None) -> list[tuple[str, float, float]]:
        """``python -X importtime`` of ``argv`` (default: ``-c 'import gpusched.cli'``):
        (module, self ms, cumulative ms) per module."""
        r = subprocess.run([sys.executable, "-X", "importtime",
                            *(argv or ["-c", "import gpusched.cli"])], capture_output=True,
                           text=True, timeout=120, cwd="/tmp", env=env)
        rows = []
        for line in r.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(.*)$", line)
            if m:
                rows.append((m.group(3).rstrip(), int(m.group(1)) / 1000, int(m.group(2)) / 1000))
        return rows

    def print_importtime(self, title: str, rows: list[tuple[str, float, float]]) -> None:
        total = sum(self_ms for _, self_ms, _ in rows)
        ours = sum(self_ms for name, self_ms, _ in rows if name.strip().startswith("gpusched"))
        out(f"   python -X importtime {title}: {len(rows)} modules, {total:.1f} ms in all "
            f"(gpusched's own {ours:.1f} ms); top {self.a.import_top} by cumulative time (ms):")
        top = sorted(rows, key=lambda r: -r[2])[:self.a.import_top]
        for name, self_ms, cum in top:
            out(f"     {cum:8.1f} cumulative  {self_ms:7.1f} self   {name.strip()}")
        heavy = {m: next((c for n, _, c in rows if n.strip() == m), None)
                 for m in ("typer", "click", "pydantic", "rich", "gpusched.render",
                           "gpusched.errors", "gpusched.units", "gpusched.models",
                           "gpusched.daemon", "sqlite3")}
        out("     imported (cumulative ms, '-' = not imported): "
            + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in heavy.items()))

    def s3_startup(self) -> None:
        runs = self.a.startup_runs
        section(f"3. CLI start-up: median wall over {runs} runs each, round-robin",
                "`gpusched submit` <= 60 ms median wall from a normal (non-editable) install "
                "(measured 160 ms; tsp 1.1 ms; python -c pass 17 ms)")
        durl = next(iter((REPO / ".venv/lib").glob("python*/site-packages/tao_gpusched-*"
                                                   ".dist-info/direct_url.json")), None)
        editable = bool(durl and '"editable": true' in durl.read_text())
        if PKG_SRC != REPO and Path(sys.prefix) != REPO / ".venv":
            how = f"normal (non-editable) install in {sys.prefix}: gpusched from {PKG_SRC}"
        elif PKG_SRC != REPO:
            how = (f"gpusched imported from {PKG_SRC} (PYTHONPATH), ahead of the venv's "
                   f"{'editable ' if editable else ''}install")
        else:
            how = ("editable (pip -e: gpusched imports go through the editable finder)"
                   if editable else "normal")
        out(f"   install: {how}; CLI {self.gs}; the venv's .pth files run at every start, "
            "`python -c pass` included")
        b = Bench().start()
        t = Tsp(self.tsp_exe, 2) if self.tsp_exe else None
        try:
            b.blocker("2")  # submitted jobs queue: no job runs while we time
            if t:
                t.blocker()
                t.blocker()
                for _ in range(3):
                    t.add("true")
            cmds: list[tuple[str, list[str], dict[str, str]]] = [
                ("gpusched submit -- true", [self.gs, "submit", "--", "true"], b.env),
                ("gpusched ls", [self.gs, "ls"], b.env),
                ("python -c 'import gpusched.cli'", [sys.executable, "-c", "import gpusched.cli"],
                 b.env),
                ("python -c pass", [sys.executable, "-c", "pass"], b.env)]
            if t:
                cmds += [("tsp true", [t.exe, "true"], t.env), ("tsp -l", [t.exe, "-l"], t.env)]
            walls: dict[str, list[float]] = {c[0]: [] for c in cmds}
            for i in range(runs):
                if i % 10 == 0:
                    progress(f"start-up round {i + 1}/{runs}")
                for label, argv, env in cmds:
                    t0 = time.perf_counter()
                    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, timeout=120, cwd="/tmp")
                    walls[label].append((time.perf_counter() - t0) * 1000)
                    if r.returncode != 0:
                        raise RuntimeError(f"{label} failed ({r.returncode}): "
                                           f"{r.stderr.decode(errors='replace')[-300:]}")
            fast = self.importtime([self.gs, "submit", "--", "true"], env=b.env)
        finally:
            if t:
                t.close()
            b.close()
        ref_ts = med(walls["tsp -l"]) if t else None
        for label, w in walls.items():
            m = med(w)
            tgt = (f"   target <= 60 ms: {verdict(m <= 60)}"
                   if label.startswith("gpusched submit") else "")
            out(f"   {label:<34} median {m:7.1f} ms  (min {min(w):.1f}, p90 {pct(w, 90):.1f})"
                f"   vs tsp -l {ratio(m, ref_ts)}{tgt}")
        if not t:
            out(f"   task-spooler: skipped: {self.tsp_version}")
        rows = self.importtime()
        total = next((c for name, _, c in rows if name.strip() == "gpusched.cli"), None)
        top = sorted(rows, key=lambda r: -r[2])[:self.a.import_top]
        self.print_importtime("-c 'import gpusched.cli' (the typer app: every other command)",
                              rows)
        self.print_importtime("of `gpusched submit -- true` itself (the fast path)", fast)
        self.results["startup"] = {"runs": runs, "walls_ms": walls, "editable": editable,
                                   "medians_ms": {k: med(v) for k, v in walls.items()},
                                   "importtime_top": top, "importtime_gpusched_cli_ms": total,
                                   "importtime_submit": fast,
                                   "target_submit_ms": 60}

    # 4 -------------------------------------------------------------------------------------

    def probe(self, b: Bench, timeout: float) -> dict[str, Any]:
        """One no-op job beside the queue (priority 10: the head; GPU 0 is free): client
        submit -> done seen in the store, and the daemon's own times."""
        t0 = time.time()
        jid = b.submit(job_body(["true"], "1", priority=10))
        st = b.wait_status(jid, TERMINAL, timeout, interval=0.005)
        wall = time.time() - t0
        if st is None:
            return {"id": jid, "done_s": None, "timeout_s": timeout}
        sub, end = b.q("SELECT submitted_at, ended_at FROM jobs WHERE id = ?", [jid])[0]
        ev = dict(b.q("SELECT to_status, at FROM job_events WHERE job_id = ? ORDER BY id", [jid]))
        return {"id": jid, "status": st, "done_s": wall,
                "server_submit_to_end_s": (end - sub) if end else None,
                "server_submit_to_running_s": ev.get("running", sub) - sub}

    def idle_cpu(self, b: Bench, seconds: float) -> float:
        c0, t0 = b.cpu(), time.monotonic()
        time.sleep(seconds)
        return (b.cpu() - c0) / (time.monotonic() - t0) * 100

    def big_queue_one(self, size: int) -> dict[str, Any]:
        held = self.a.queue_kind == "held"
        b = Bench().start()
        try:
            blocker = b.blocker("1,")
            fill_s = b.prefill(size, "1,", hold=held)
            progress(f"  {size} jobs queued ({'held' if held else 'queued, pinned to GPU 1 '}"
                     f"behind the blocker) in {fill_s:.1f} s; settling")
            time.sleep(2.0)
            rss0 = b.rss()
            cpu = self.idle_cpu(b, self.a.idle_seconds)
            rss1 = b.rss()
            # after the idle seconds: the ticks of a settled queue, not the first ones (they
            # build the plan window's jobs and check every dependency once)
            ticks = tick_figures(b.c.get("/v1/health"))
            progress(f"  idle CPU {cpu:.2f}%, RSS {rss1:.0f} MiB; probes")
            probes = [self.probe(b, 120) for _ in range(self.a.repeats)]
            lat = []
            body = job_body(["true"], "1,", hold=held)
            for _ in range(self.a.submit_latency_samples):
                t0 = time.perf_counter()
                b.c.submit("/v1/jobs", body)
                lat.append((time.perf_counter() - t0) * 1000)
            progress(f"  API submit median {med(lat):.1f} ms; `gpusched ls`")
            ls_walls, ls_cpu, ls_rc = [], [], 0
            for i in range(self.a.repeats):
                c0, t0 = b.cpu(), time.perf_counter()
                try:
                    r = subprocess.run([self.gs, "ls"], env=b.env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, timeout=self.a.ls_timeout,
                                       cwd="/tmp")
                    ls_rc = ls_rc or r.returncode
                except subprocess.TimeoutExpired:
                    ls_rc = 124
                ls_walls.append(time.perf_counter() - t0)
                ls_cpu.append(b.cpu() - c0)
                if ls_walls[-1] > self.a.slow_ls_s and i + 1 < self.a.repeats:
                    progress(f"  ls took {ls_walls[-1]:.1f} s: no more runs at this size")
                    break
            rss2 = b.rss()
            n_active = b.active()
            return {"size": size, "queue_kind": self.a.queue_kind, "fill_s": fill_s,
                    "tick_figures": ticks, "idle_cpu_pct": cpu,
                    "cpu_ms_per_tick_est": cpu * 10 / self.ticks_per_s(),
                    "rss_mib_before_idle": rss0, "rss_mib_idle": rss1, "rss_mib_after_ls": rss2,
                    "probes": probes, "probe_done_s_median": med(p["done_s"] for p in probes),
                    "api_submit_ms": lat, "api_submit_ms_median": med(lat),
                    "ls_wall_s": ls_walls, "ls_wall_s_median": med(ls_walls),
                    "ls_daemon_cpu_s": ls_cpu, "ls_daemon_cpu_s_median": med(ls_cpu),
                    "ls_rc": ls_rc, "active_jobs": n_active, "blocker": blocker}
        finally:
            b.close()

    @staticmethod
    def ticks_per_s() -> float:
        """Ticks an idle daemon runs per second with default settings: one per
        scheduler.tick_interval_s (1 s), plus a wake-up per gpus.poll_interval_s (5 s) and
        api.socket_check_interval_s (5 s) by housekeeping (an upper bound: they may coincide)."""
        return 1.0 + 1 / 5.0

    def s4_big_queue(self) -> None:
        sizes = self.a.sizes
        kind = ("held (--hold)" if self.a.queue_kind == "held" else
                "queued, pinned to GPU 1 behind a running blocker there (the planner sees them)")
        section(f"4. Big queue: {', '.join(f'{s:,}' for s in sizes)} no-op jobs, {kind}",
                "tick <= 5 ms median at 100,000 queued (flat vs empty); `gpusched ls` <= 300 ms; "
                "idle CPU ~0 %; RSS < 100 MiB; submit speed flat. Measured before: "
                "ls daemon 0.011/0.19/2.26 s, API submit 2.8/3.0/8.2 ms, idle CPU "
                "0.33/0.67/3.7 %, RSS 60/73/106 MiB at 100/2,000/20,000")
        res = []
        for size in sizes:
            progress(f"big queue: {size:,} jobs")
            res.append(self.big_queue_one(size))
            progress(f"  done; load {load()}")
        figures = [r["tick_figures"] for r in res if r["tick_figures"]]
        ticks = [(r["size"], r["tick_figures"].get("tick")) for r in res]
        if all(isinstance(t, dict) and "median_ms" in t for _, t in ticks):
            out("   the daemon's own tick durations (health, its last ticks after the idle "
                "seconds):")
            for size, t in ticks:
                assert isinstance(t, dict)
                out(f"   {size:>8,} queued: tick median {t['median_ms']:.2f} ms, p95 "
                    f"{t['p95_ms']:.2f} ms, max {t['max_ms']:.2f} ms over {t['over_last']} ticks")
        elif figures:
            out(f"   daemon's own tick figures (health): {figures}")
        else:
            out("   tick time: the daemon exposes no tick figures (health/API has none): shown "
                "as the submit->done latency of one no-op job beside the queue (priority 10, "
                "GPU 0 free), and as idle CPU per tick (estimate: idle CPU / "
                f"{self.ticks_per_s():.1f} ticks/s at the default tick_interval_s=1, "
                "poll_interval_s=5)")
        hdr = (f"   {'queued':>8} | {'probe submit->done':>18} | {'~CPU/idle tick':>14} | "
               f"{'ls wall':>8} | {'ls daemon CPU':>13} | {'API submit':>10} | {'idle CPU':>8} | "
               f"{'RSS idle':>8} | {'RSS after ls':>12}")
        out(hdr)
        out("   " + "-" * (len(hdr) - 3))
        for r in res:
            probe = r["probe_done_s_median"] * 1000
            out(f"   {r['size']:>8,} | {probe:>15.0f} ms | {r['cpu_ms_per_tick_est']:>11.1f} ms | "
                f"{r['ls_wall_s_median']:>6.2f} s | {r['ls_daemon_cpu_s_median']:>11.2f} s | "
                f"{r['api_submit_ms_median']:>7.1f} ms | {r['idle_cpu_pct']:>6.2f} % | "
                f"{r['rss_mib_idle']:>4.0f} MiB | {r['rss_mib_after_ls']:>8.0f} MiB"
                + ("" if r["ls_rc"] == 0 else f"  (ls exit {r['ls_rc']})"))
        last = res[-1]
        out(f"   at {last['size']:,}: ls <= 300 ms {verdict(last['ls_wall_s_median'] <= 0.3)}; "
            f"idle CPU ~0 % (<= 0.5 %) {verdict(last['idle_cpu_pct'] <= 0.5)}; RSS < 100 MiB "
            f"{verdict(last['rss_mib_after_ls'] < 100)}; API submit flat (<= 1.5x of "
            f"{res[0]['size']:,}) "
            f"{verdict(last['api_submit_ms_median'] <= 1.5 * res[0]['api_submit_ms_median'])}"
            f"; ls runs per size: {[len(r['ls_wall_s']) for r in res]}")
        self.results["big_queue"] = res

    # 5 -------------------------------------------------------------------------------------

    def s5_reads(self) -> None:
        size = self.a.reads_size
        section(f"5. Reads vs scheduling: submit->done of one no-op job with {size:,} queued jobs "
                "while clients loop reads",
                "reads never starve scheduling (before: 66 ms idle, 2.0 s with 1 `ls` loop, "
                "34.6 s with 4, `health` once 47.7 s)")
        b = Bench().start()
        res: list[dict[str, Any]] = []
        try:
            b.blocker("1,")
            fill = b.prefill(size, "1,", hold=self.a.queue_kind == "held")
            progress(f"reads: {size:,} jobs queued in {fill:.1f} s")
            time.sleep(2.0)
            conds = [("no reader", 0, "ls"), ("1 client looping `gpusched ls`", 1, "ls"),
                     ("4 clients looping `gpusched ls`", 4, "ls"),
                     ("1 client looping `gpusched health`", 1, "health")]
            for label, k, cmd in conds:
                progress(f"reads: {label}")
                loopers = [Looper([self.gs, cmd], b.env).start() for _ in range(k)]
                try:
                    # steady state: every reader has finished one call (its next is under way)
                    warm = time.monotonic() + self.a.reads_warmup_s
                    while k and time.monotonic() < warm and \
                            not all(lp.walls for lp in loopers):
                        time.sleep(0.05)
                    t0 = time.monotonic()
                    probes = []
                    for i in range(self.a.repeats):
                        if i:
                            time.sleep(0.3)  # probes at different points of the readers' calls
                        probes.append(self.probe(b, self.a.probe_timeout))
                        done = probes[-1]["done_s"]
                        progress("  probe " + ("timed out" if done is None else
                                               f"{done * 1000:.0f} ms"))
                        if done is None or time.monotonic() - t0 > self.a.reads_cap_s:
                            break
                finally:
                    for lp in loopers:
                        lp.close()
                walls = [w for lp in loopers for w in lp.walls]
                res.append({"condition": label, "clients": k, "command": cmd, "probes": probes,
                            "done_s_median": med(p["done_s"] for p in probes
                                                 if p["done_s"] is not None),
                            "timeouts": sum(p["done_s"] is None for p in probes),
                            "reader_calls": len(walls), "reader_wall_s_median": med(walls),
                            "reader_errors": sum(lp.errors for lp in loopers)})
        finally:
            b.close()
        base = res[0]["done_s_median"]
        for r in res:
            vals = [p["done_s"] for p in r["probes"]]
            shown = ", ".join("timeout" if v is None else f"{v * 1000:.0f}" for v in vals)
            reader = (f"; readers: {r['reader_calls']} calls done, median "
                      f"{r['reader_wall_s_median']:.2f} s each"
                      + (f", {r['reader_errors']} failed" if r["reader_errors"] else "")
                      if r["clients"] else "")
            out(f"   {r['condition']:<36} submit->done runs [{shown}] ms   median "
                f"{r['done_s_median'] * 1000:8.0f} ms   ({ratio(r['done_s_median'], base)} of no "
                f"reader){reader}")
        out("   target: latency with readers ~ latency without (reads must not block the tick): "
            + verdict(all(r["timeouts"] == 0 and r["done_s_median"] <= max(0.2, 2 * base)
                          for r in res)))
        self.results["reads"] = {"size": size, "conditions": res}

    # 6 -------------------------------------------------------------------------------------

    def s6_latency(self) -> None:
        n = self.a.latency_samples
        section(f"6. Submit->start latency on an idle daemon ({n} jobs, one at a time)",
                "<= 3 ms (server side)")
        b = Bench().start()
        q_start, q_run, c_run, c_stamp, c_done = [], [], [], [], []
        try:
            time.sleep(1.0)
            progress(f"latency: {n} jobs")
            for _ in range(n):
                t0 = time.time()
                # the job stamps its own first instruction (as bench_core.py does)
                jid = b.submit(job_body(["sh", "-c", "date +%s.%N"]))
                st = b.wait_status(jid, TERMINAL, 60, interval=0.002)
                t1 = time.time()
                if st is None:
                    raise RuntimeError(f"job {jid} did not end")
                at: dict[str, float] = {}
                for s, a in b.q("SELECT to_status, at FROM job_events WHERE job_id = ?"
                                " ORDER BY id", [jid]):
                    at.setdefault(s, a)
                q_start.append((at["starting"] - at["queued"]) * 1000)
                q_run.append((at["running"] - at["queued"]) * 1000)
                c_run.append((at["running"] - t0) * 1000)
                c_done.append((t1 - t0) * 1000)
                log_path = b.q("SELECT log_path FROM attempts WHERE job_id = ?", [jid])[0][0]
                with contextlib.suppress(OSError, ValueError):
                    c_stamp.append((float(Path(log_path).read_text().strip()) - t0) * 1000)
        finally:
            b.close()
        same = all(abs(x - y) < 1e-6 for x, y in zip(q_start, q_run, strict=True))
        rows = [("server: queued -> starting (claimed) event", q_start),
                ("server: queued -> running (launched) event", q_run),
                ("client send -> running event", c_run),
                ("client send -> job's own first instruction", c_stamp),
                ("client send -> done seen in the store", c_done)]
        for label, v in rows:
            out(f"   {label:<44} p50 {pct(v, 50):7.2f} ms   p90 {pct(v, 90):7.2f} ms   "
                f"p99 {pct(v, 99):7.2f} ms")
        if same:
            out("   note: the starting and running events carry the same time: the daemon stamps "
                "every event of a tick with the tick's `now`, so the server-side figure is "
                "submit -> start of the tick that launched it, not the launch itself")
        out(f"   target <= 3 ms server side (queued -> running p50): "
            f"{verdict(pct(q_run, 50) <= 3)}; client send -> first instruction p50 "
            f"{pct(c_stamp, 50):.1f} ms")
        self.results["latency"] = {"samples": n, "server_queued_to_starting_ms": q_start,
                                   "server_queued_to_running_ms": q_run,
                                   "events_share_tick_time": same,
                                   "client_to_running_ms": c_run,
                                   "client_to_first_instruction_ms": c_stamp,
                                   "client_to_done_ms": c_done, "p50_server_ms": pct(q_run, 50)}


def git_head() -> str:
    """The commit of the tree gpusched is imported from, and its uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PKG_SRC), *args], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    try:
        if not git("rev-parse", "--show-toplevel"):
            return f"{PKG_SRC} (not a git checkout)"
        head = git("log", "-1", "--format=%h %s")[:90]
        dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
        if dirty:
            # "XY path" (the output was stripped: the first line may have lost its X)
            names = ", ".join(line.split(maxsplit=1)[-1] for line in dirty[:8]) + (
                ", ..." if len(dirty) > 8 else "")
            head += f" (+ uncommitted changes in {len(dirty)} files: {names})"
        return f"{PKG_SRC}: {head}"
    except (OSError, subprocess.TimeoutExpired):
        return f"{PKG_SRC}: ?"


def drain_user(name: str | None) -> pwd.struct_passwd | None:
    """--drain-user's passwd entry; it needs root (only root runs jobs as another user)."""
    if name is None:
        return None
    if os.geteuid() != 0:
        sys.exit("--drain-user needs root: only a daemon run as root starts jobs as another user")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        sys.exit(f"--drain-user {name}: no such user (useradd -M {name}, or name another one)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 repeat and smaller sizes (a smoke run, about 2 minutes)")
    ap.add_argument("--repeats", type=int, help="A B alternations and samples (default 3)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--sections", default="1,2,3,4,5,6", help="which sections (default all)")
    ap.add_argument("--drain-jobs", type=int, help="section 1 (default 900)")
    ap.add_argument("--drain-user", metavar="USER",
                    help="section 1: gpusched's jobs are USER's, so the daemon (run as root) "
                         "switches to that user at each launch, as on a shared box")
    ap.add_argument("--submit-jobs", type=int, help="section 2, API and tsp (default 500)")
    ap.add_argument("--cli-submits", type=int, help="section 2, CLI calls (default 30)")
    ap.add_argument("--bulk-jobs", type=int, help="section 2, --array/--from-file (default 1000)")
    ap.add_argument("--startup-runs", type=int, help="section 3 (default 30)")
    ap.add_argument("--import-top", type=int, default=15)
    ap.add_argument("--sizes", help="section 4 queue sizes (default 100,2000,20000,100000)")
    ap.add_argument("--queue-kind", choices=["blocked", "held"], default="blocked",
                    help="sections 4-5: queued behind a blocker (default) or --hold")
    ap.add_argument("--idle-seconds", type=float, help="section 4 idle CPU window (default 10)")
    ap.add_argument("--submit-latency-samples", type=int, default=20)
    ap.add_argument("--ls-timeout", type=float, default=300.0)
    ap.add_argument("--slow-ls-s", type=float, default=10.0,
                    help="section 4: after an `ls` slower than this, no more runs at that size")
    ap.add_argument("--reads-size", type=int, help="section 5 (default 20000)")
    ap.add_argument("--reads-cap-s", type=float, default=40.0,
                    help="section 5: no further probe once a condition has run this long")
    ap.add_argument("--reads-warmup-s", type=float, default=30.0,
                    help="section 5: wait at most this for every reader to finish a first call")
    ap.add_argument("--probe-timeout", type=float, default=120.0)
    ap.add_argument("--latency-samples", type=int, help="section 6 (default 50)")
    a = ap.parse_args(argv)
    q = a.quick
    defaults = {"repeats": (1, 3), "drain_jobs": (200, 900), "submit_jobs": (100, 500),
                "cli_submits": (10, 30), "bulk_jobs": (200, 1000), "startup_runs": (10, 30),
                "idle_seconds": (3.0, 10.0), "reads_size": (2000, 20000),
                "latency_samples": (10, 50)}
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.sizes = ([int(s) for s in a.sizes.split(",")] if a.sizes else
               ([100, 2000] if q else [100, 2000, 20000, 100000]))
    a.sections = {int(s) for s in a.sections.split(",") if s.strip()}
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.json:
        a.json = str(Path(a.json).resolve())
    # `python -m gpusched.cli daemon` puts the working directory first on sys.path: run from a
    # neutral one, so every process imports the gpusched printed below
    neutral = tempfile.mkdtemp(prefix="gsperf-cwd")
    os.chdir(neutral)
    atexit.register(shutil.rmtree, neutral, True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with it ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(close_all)
    perf = Perf(a)
    started = time.time()
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out(f"gpusched performance benchmark (issue 15), {now}")
    out(f"   host {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}; load average {load()} (shared machine: other work runs "
        "beside this)")
    out(f"   gpusched {git_head()}")
    if perf.tsp_exe:
        out(f"   task-spooler: {perf.tsp_exe} ({perf.tsp_version})")
    else:
        out(f"   task-spooler: not installed: its column is skipped ({perf.tsp_version}); "
            "apt-get install task-spooler")
    out(f"   repeats {a.repeats} (A B alternating){'; --quick' if a.quick else ''}")
    meta = {"started": started, "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "git": git_head(),
            "tsp": perf.tsp_version if perf.tsp_exe else None, "args": {
                k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()},
            "load_start": os.getloadavg()}
    steps: list[tuple[int, Callable[[], None]]] = [
        (1, perf.s1_drain), (2, perf.s2_submit), (3, perf.s3_startup), (4, perf.s4_big_queue),
        (5, perf.s5_reads), (6, perf.s6_latency)]
    rc = 0
    try:
        for n, fn in steps:
            if n in a.sections:
                try:
                    fn()
                except KeyboardInterrupt:
                    raise
                except Exception as err:
                    rc = 1
                    out(f"   SECTION {n} FAILED: {type(err).__name__}: {str(err)[:2000]}")
                finally:
                    close_all()
    except KeyboardInterrupt:
        out("\ninterrupted: stopping daemons and task-spooler servers")
        rc = 130
    finally:
        close_all()
        meta["load_end"] = os.getloadavg()
        meta["wall_s"] = time.time() - started
        out()
        out(f"done in {meta['wall_s']:.0f} s; load average at the end {load()}")
        if a.json:
            Path(a.json).write_text(json.dumps({"meta": meta, **perf.results}, indent=1,
                                               default=str))
            out(f"figures written to {a.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
