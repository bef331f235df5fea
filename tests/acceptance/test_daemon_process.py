"""The real daemon as a subprocess on two simulated GPUs, driven through the real CLI."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpusched.testing.harness import DaemonProcess, short_tmpdir
from gpusched.testing.users import checkout_reachable

pytestmark = pytest.mark.acceptance


def submit(d: DaemonProcess, *args: str) -> int:
    r = d.cli("submit", *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def show(d: DaemonProcess, job_id: int) -> dict:
    r = d.cli("show", str(job_id), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_all(d: DaemonProcess, ids: list[int], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return d.cli("wait", *map(str, ids), "--timeout", str(timeout), timeout=timeout + 10)


STAMP = ("echo start $(date +%s.%N) $CUDA_VISIBLE_DEVICES; sleep {s}; "
         "echo end $(date +%s.%N)")


def intervals(d: DaemonProcess, job_id: int) -> tuple[float, float, str]:
    r = d.cli("logs", str(job_id))
    lines = r.stdout.split("\n")
    start = next(ln for ln in lines if ln.startswith("start")).split()
    end = next(ln for ln in lines if ln.startswith("end")).split()
    return float(start[1]), float(end[1]), start[2] if len(start) > 2 else ""


def test_gpus_and_health(daemon: DaemonProcess) -> None:
    r = daemon.cli("gpus", "--json")
    gpus = json.loads(r.stdout)
    assert [g["name"] for g in gpus] == ["RTX A4000", "RTX 2070"]
    assert {"index", "uuid", "name", "memory_total_mib", "memory_used_mib", "state"} <= set(gpus[0])
    assert [g["memory_total_mib"] for g in gpus] == [16384, 8192]
    table = daemon.cli("gpus").stdout
    assert "RTX A4000" in table and "idle" in table
    h = daemon.cli("health")
    assert h.returncode == 0 and "gpusched ok" in h.stdout


def test_health_says_where_the_ticks_time_goes(daemon: DaemonProcess) -> None:
    """Each step's time since the start, and the parts of plan_and_launch that launched a
    job, are in health's JSON; the text names the busiest steps."""
    job = submit(daemon, "--", "true")
    assert wait_all(daemon, [job]).returncode == 0
    tick = json.loads(daemon.cli("health", "--json").stdout)["tick"]
    by_step = tick["seconds_by_step"]
    assert {"reap", "plan_and_launch", "commit", "plan_and_launch.start"} <= set(by_step)
    assert by_step["plan_and_launch.start"] > 0  # the job's process was started
    assert by_step["plan_and_launch"] >= by_step["plan_and_launch.start"]
    assert list(by_step.values()) == sorted(by_step.values(), reverse=True)
    text = daemon.cli("health").stdout
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("tick"))
    assert re.search(r"median [\d.]+ ms, p95 [\d.]+ ms over the last \d+ of \d+ ticks; "
                     r"time by step: \w+ \d+%", line), line
    assert "plan_and_launch" in line and "plan_and_launch." not in line  # parts not summed


def test_isolation_no_overlap_and_no_starvation(daemon: DaemonProcess) -> None:
    """Every job sees exactly its allocation; no GPU runs two jobs at once; a 2-GPU job gets
    both GPUs while 1-GPU jobs keep arriving."""
    first = [submit(daemon, "--", "sh", "-c", STAMP.format(s=0.6)) for _ in range(2)]
    big = submit(daemon, "--gpus", "2", "--", "sh", "-c", STAMP.format(s=0.3))
    stream = []
    for _ in range(6):  # 1-GPU jobs keep arriving while the 2-GPU job waits
        stream.append(submit(daemon, "--", "sh", "-c", STAMP.format(s=0.3)))
        time.sleep(0.1)
    ids = [*first, big, *stream]
    r = wait_all(daemon, ids)
    assert r.returncode == 0, r.stdout + r.stderr
    per_gpu: dict[str, list[tuple[float, float, int]]] = {}
    for jid in ids:
        j = show(daemon, jid)
        start, end, seen = intervals(daemon, jid)
        assert seen == ",".join(j["gpus"]), f"job {jid} saw {seen}, was given {j['gpus']}"
        for g in j["gpus"]:
            per_gpu.setdefault(g, []).append((start, end, jid))
    assert len(show(daemon, big)["gpus"]) == 2
    for g, spans in per_gpu.items():
        spans.sort()
        for (_s1, e1, j1), (s2, _e2, j2) in itertools.pairwise(spans):
            assert e1 <= s2, f"jobs {j1} and {j2} overlapped on {g}"
    big_start = intervals(daemon, big)[0]
    # the 2-GPU job ran before the 1-GPU jobs that arrived after it
    assert big_start < min(intervals(daemon, j)[0] for j in stream)


def test_after_chain_and_failure(daemon: DaemonProcess) -> None:
    a = submit(daemon, "--", "sh", "-c", STAMP.format(s=0.2))
    b = submit(daemon, "--after", str(a), "--", "sh", "-c", STAMP.format(s=0))
    c = submit(daemon, "--after", str(b), "--", "sh", "-c", "exit 4")
    d = submit(daemon, "--after", str(c), "--", "true")
    r = wait_all(daemon, [a, b, c, d])
    assert r.returncode == 1  # not all succeeded
    assert intervals(daemon, a)[1] <= intervals(daemon, b)[0]
    assert show(daemon, c)["exit_code"] == 4
    jd = show(daemon, d)
    assert jd["status"] == "failed" and f"dependency job {c} failed" in jd["reason"]


def test_cancel_queued_and_running(daemon: DaemonProcess) -> None:
    running = submit(daemon, "--gpus", "2", "--", "sleep", "60")
    queued = submit(daemon, "--", "true")
    deadline = time.time() + 10
    while show(daemon, running)["status"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    r = daemon.cli("cancel", str(queued), str(running))
    assert r.returncode == 0, r.stderr
    assert f"{queued}: cancelled" in r.stdout and f"{running}: cancelling" in r.stdout
    wait_all(daemon, [running, queued], timeout=20)
    assert show(daemon, queued)["status"] == "cancelled"
    j = show(daemon, running)
    assert j["status"] == "cancelled" and j["exit_code"] == 143
    again = daemon.cli("cancel", str(running))
    assert again.returncode == 0 and "already" in again.stdout


def test_kill9_mid_job_then_restart_adopts_and_records(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    try:
        job = submit(d, "--", "sh", "-c", "echo before; sleep 5; echo after; exit 5")
        deadline = time.time() + 10
        while show(d, job)["status"] != "running" and time.time() < deadline:
            time.sleep(0.05)
        pid = show(d, job)["attempts"][0]["pid"]
        d.kill9()
        assert Path(f"/proc/{pid}").exists(), "the job died with the daemon"
        d.start()
        j = show(d, job)
        assert j["status"] == "running" and j["attempt"] == 1
        wait_all(d, [job], timeout=20)
        j = show(d, job)
        assert (j["status"], j["exit_code"], j["attempt"]) == ("failed", 5, 1)
        assert len(j["attempts"]) == 1
        assert d.cli("logs", str(job)).stdout == "before\nafter\n"
    finally:
        d.stop()


def test_sigterm_leaves_jobs_running(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    try:
        job = submit(d, "--", "sleep", "5")
        while show(d, job)["status"] != "running":
            time.sleep(0.05)
        assert d.stop() == 0
        time.sleep(0.3)
        d.start()
        assert show(d, job)["status"] == "running"
        assert wait_all(d, [job]).returncode == 0
    finally:
        d.stop()


def test_second_daemon_on_the_same_state_dir_exits(daemon: DaemonProcess) -> None:
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "daemon", "--simulate-gpus", "X:1G"],
                       env=daemon.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 6
    assert "another gpusched daemon already owns" in r.stderr
    assert daemon.cli("health").returncode == 0


def test_daemon_not_running_gives_one_clear_line() -> None:
    d = DaemonProcess(short_tmpdir())
    try:
        r = d.cli("ls")
        assert r.returncode == 7
        assert r.stderr.count("\n") == 1
        assert "daemon is not running" in r.stderr and "gpusched daemon" in r.stderr
    finally:
        shutil.rmtree(d.state_dir, ignore_errors=True)


def test_once_mode_runs_until_idle(state_dir: Path) -> None:
    d = DaemonProcess(state_dir, args=["--once"]).start()
    submit(d, "--", "sh", "-c", "sleep 1; exit 0")  # keeps the daemon busy while we submit
    for i in (1, 2):
        submit(d, "--", "sh", "-c", f"exit {i}")
    assert d.proc is not None
    assert d.proc.wait(30) == 0
    d.proc = None
    d2 = DaemonProcess(state_dir).start()
    try:
        codes = sorted(j["exit_code"] for j in json.loads(d2.cli("ls", "--all", "--json").stdout))
        assert codes == [0, 1, 2]
    finally:
        d2.stop()


def test_bad_input_is_refused_and_nothing_stored(daemon: DaemonProcess) -> None:
    cases = [
        (["--gpus", "two", "--", "true"], "bad --gpus"),
        (["--gpus", "3", "--", "true"], "this host has 2"),
        (["--mem", "lots", "--", "true"], "bad size"),
        (["--after", "999", "--", "true"], "do not exist"),
        (["--workdir", "/proc/self/fd/3", "--", "true"], "/proc"),
        (["--env", "1BAD=x", "--", "true"], "environment variable"),
        (["--mount", "/tmp:/x", "--", "true"], "need --image"),
    ]
    for args, message in cases:
        r = daemon.cli("submit", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert json.loads(daemon.cli("ls", "--all", "--json").stdout) == []


def test_raw_http_over_the_socket(daemon: DaemonProcess) -> None:
    """curl --unix-socket works; bodies are validated; oversized bodies are refused."""
    c = daemon.client()
    from gpusched.errors import SpecError

    with pytest.raises(SpecError, match="invalid request"):
        c.post("/v1/jobs", {"command": [], "gpus": {"count": 1}})
    with pytest.raises(SpecError, match="Extra inputs"):
        c.post("/v1/jobs", {"command": ["true"], "owner_uid": 0, "privileged": True})
    with pytest.raises(SpecError, match="larger than the limit"):
        c.post("/v1/jobs", {"command": ["x" * (2 * 1024 * 1024)]})
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "--unix-socket", str(daemon.socket),
                              "http://localhost/v1/health"], capture_output=True, text=True,
                             timeout=10)
        assert json.loads(out.stdout)["status"] == "ok"
    assert json.loads(daemon.cli("ls", "--all", "--json").stdout) == []


@pytest.mark.skipif(os.geteuid() != 0 or not checkout_reachable(),
                    reason="needs root, and a checkout other users can read, to act as a second user")
def test_another_user_cannot_touch_my_job(daemon: DaemonProcess) -> None:
    job = submit(daemon, "--hold", "--", "true")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is missing")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-m", "gpusched.cli"]
    os.chmod(daemon.state_dir, 0o755)
    for action in ("cancel", "release"):
        r = subprocess.run([*as_nobody, action, str(job)], env=daemon.env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 4, r.stderr
        assert "belongs to root" in r.stderr
    r = subprocess.run([*as_nobody, "logs", str(job)], env=daemon.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 4
    assert show(daemon, job)["status"] == "held"
    daemon.cli("cancel", str(job), check=True)


def test_logs_follow_streams_until_the_end(daemon: DaemonProcess) -> None:
    job = submit(daemon, "--", "sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done")
    p = subprocess.Popen([sys.executable, "-m", "gpusched.cli", "logs", "-f", str(job)],
                         env=daemon.env, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0
    assert out == "line 1\nline 2\nline 3\n"


def test_sigint_and_sigterm_exit_cleanly(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    assert d.stop(signal.SIGINT) == 0
    assert not d.socket.exists()


def test_prometheus_endpoint_on_loopback(state_dir: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = DaemonProcess(state_dir, env={"GPUSCHED_METRICS__PORT": str(port)}).start()
    try:
        submit(d, "--hold", "--", "true")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'gpusched_jobs{status="held"} 1.0' in text
        assert "gpusched_gpu_state" in text and "gpusched_queue_length" in text
    finally:
        d.stop()


def test_corrupt_database_refuses_to_start_and_restore_works(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    job = submit(d, "--hold", "--", "true")
    backup = d.cli("admin", "backup")  # while the daemon runs: an online backup
    assert backup.returncode == 0, backup.stderr
    d.stop()
    db = state_dir / "gpusched.db"
    with open(db, "r+b") as fh:  # wreck the pages after the header
        fh.seek(4096)
        fh.write(b"\xde\xad\xbe\xef" * 4096)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "daemon", "--simulate-gpus", "A:1G"],
                       env=d.env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    newest = backup.stdout.strip()
    assert "corrupt" in r.stderr and newest in r.stderr and "gpusched admin restore" in r.stderr
    assert "Traceback" not in r.stderr
    restored = d.cli("admin", "restore", newest)
    assert restored.returncode == 0, restored.stderr
    d.start()
    try:
        assert show(d, job)["status"] == "held"
    finally:
        d.stop()


def test_systemd_notify_protocol(state_dir: Path) -> None:
    """With NOTIFY_SOCKET set (Type=notify) the daemon says READY=1 once it serves, feeds the
    watchdog after healthy ticks, and says STOPPING=1 on SIGTERM."""
    import socket

    addr = str(state_dir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)
        sock.settimeout(10)
        d = DaemonProcess(state_dir, env={"NOTIFY_SOCKET": addr}).start()
        try:
            messages = []
            deadline = time.time() + 10
            while time.time() < deadline and not any("WATCHDOG=1" in m for m in messages):
                messages.append(sock.recv(4096).decode())
            assert any("READY=1" in m for m in messages)
            assert any("WATCHDOG=1" in m for m in messages)
        finally:
            d.stop()
        rest = []
        sock.settimeout(0.5)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in m for m in rest)
