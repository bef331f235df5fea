"""The real daemon (a subprocess) with container jobs on a real dockerd: adoption after kill -9,
jobs that ended while it was down, orphans removed, Docker unreachable, hostile specs and cancel
races, for containers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpusched.testing.harness import DaemonProcess, short_tmpdir

ROOT = Path(__file__).resolve().parents[3]
IMAGE = "gpusched-test:latest"
TERMINAL = ("succeeded", "failed", "cancelled", "lost")


def docker_env(host: str, mount_root: Path) -> dict[str, str]:
    return {
        "GPUSCHED_DOCKER__ENABLED": "true",
        "GPUSCHED_DOCKER__BASE_URL": host,
        "GPUSCHED_DOCKER__IMAGES": json.dumps(["gpusched-test:*"]),
        "GPUSCHED_DOCKER__MOUNT_ROOTS": json.dumps([str(mount_root)]),
        "GPUSCHED_DOCKER__NETWORK": "none",
        "GPUSCHED_DOCKER__INSTANCE": f"t{os.getpid()}x{mount_root.name}",
        # this machine's dockerd may not raise memlock (no CAP_SYS_RESOURCE)
        "GPUSCHED_DOCKER__ULIMITS": json.dumps({"stack": 67108864}),
        "GPUSCHED_DOCKER__STOP_GRACE_S": "2",
        "GPUSCHED_SCHEDULER__RECONCILE_INTERVAL_S": "2",
    }


def wait_destroyed(client: docker.DockerClient, container_id: str, *, since: int,
                   cap_s: float = 180.0) -> bool:
    """Wait for dockerd's `destroy` event of one container (replayed from `since`, so one that
    went before we listened counts), not on a wall-clock poll: the daemon's reconcile may run
    late on a loaded CI machine. `cap_s` only bounds a daemon that never removes it."""
    if not client.containers.list(all=True, filters={"id": container_id}):
        return True
    stream = client.events(since=since, until=int(time.time() + cap_s), decode=True,
                           filters={"container": container_id, "event": "destroy"})
    try:
        for ev in stream:
            if ev.get("Action") == "destroy" or ev.get("status") == "destroy":
                return True
    finally:
        stream.close()
    return not client.containers.list(all=True, filters={"id": container_id})


@pytest.fixture
def dd(dockerd: str) -> Iterator[DaemonProcess]:
    state = short_tmpdir()
    d = DaemonProcess(state, env=docker_env(dockerd, state))
    d.start()
    yield d
    d.stop()
    client = docker.DockerClient(base_url=dockerd)
    try:
        inst = d.extra_env["GPUSCHED_DOCKER__INSTANCE"]
        for c in client.containers.list(all=True, filters={"label": f"gpusched.instance={inst}"}):
            c.remove(force=True)
        for v in client.volumes.list(filters={"name": f"gpusched-lease-{inst}"}):
            v.remove(force=True)  # the daemon's lease on its instance
    finally:
        client.close()
    shutil.rmtree(state, ignore_errors=True)


def submit(d: DaemonProcess, *args: str) -> int:
    r = d.cli("submit", "--image", IMAGE, *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def show(d: DaemonProcess, job: int) -> dict[str, Any]:
    return d.show(job)


def wait_status(d: DaemonProcess, job: int, statuses: tuple[str, ...],
                timeout: float = 30) -> dict[str, Any]:
    return d.wait_status(job, statuses, timeout)


def test_container_job_end_to_end(dd: DaemonProcess) -> None:
    data = dd.state_dir / "data"
    data.mkdir()
    job = submit(dd, "--gpus", "2", "--mount", f"{data}:/data", "--env", "GREETING=hi", "--",
                 "sh", "-c", "echo $GREETING $GPUSCHED_JOB_ID $CUDA_VISIBLE_DEVICES > "
                 "/data/out; echo to-log; exit 3")
    j = wait_status(dd, job, TERMINAL)
    assert (j["status"], j["exit_code"], j["reason"]) == ("failed", 3, "exit code 3")
    gpus = ",".join(j["gpus"])
    assert (data / "out").read_text().split() == ["hi", str(job), gpus]
    assert dd.cli("logs", str(job)).stdout == "to-log\n"
    assert j["attempts"][0]["container_name"] == f"gpusched-{job}-a1-" + dd.extra_env[
        "GPUSCHED_DOCKER__INSTANCE"]


def test_hostile_container_specs_are_refused_and_nothing_stored(dd: DaemonProcess) -> None:
    outside = short_tmpdir("gsout")
    link = dd.state_dir / "escape"
    link.symlink_to("/etc")
    cases = [
        (["--image", "busybox:latest", "--", "true"], "not allowed"),
        (["--image", IMAGE, "--mount", f"{outside}:/x", "--", "true"], "mount"),
        (["--image", IMAGE, "--mount", f"{link}:/x", "--", "true"], "mount"),
        (["--image", IMAGE, "--mount", f"{dd.state_dir}/../../etc:/x", "--", "true"], "mount"),
        (["--image", IMAGE, "--workdir", "/proc/self/fd/7", "--", "true"], "/proc"),
        (["--image", IMAGE, "--user", "root;id", "--", "true"], "user"),
    ]
    try:
        for args, message in cases:
            r = dd.cli("submit", *args)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert message in r.stderr.lower(), (args, r.stderr)
        assert json.loads(dd.cli("ls", "--all", "--json").stdout) == []
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_missing_image_holds_the_job_with_the_reason(dd: DaemonProcess) -> None:
    job = submit(dd, "--", "true")
    # allowed by the pattern, absent from the host
    r = dd.cli("submit", "--image", "gpusched-test:absent", "--", "true")
    missing = int(r.stdout)
    j = wait_status(dd, missing, ("held",))
    assert "not on this host" in j["reason"] and "docker pull" in j["reason"]
    assert wait_status(dd, job, TERMINAL)["status"] == "succeeded"


def test_kill9_with_three_containers_running_adopts_them(dockerd: str) -> None:
    """Scenario 1: kill -9 the daemon while a 1-GPU, a 1-GPU and a 2-GPU container job run;
    after the restart all three are adopted (same attempt, same container), their logs
    continue without gaps or repeats, and they succeed."""
    state = short_tmpdir()
    dd = DaemonProcess(state, simulate="RTX A4000:16G,RTX A4000:16G,RTX 2070:8G,RTX 2070:8G",
                       env=docker_env(dockerd, state))
    prog = "for i in $(seq 1 16); do echo tick $i; sleep 0.5; done"
    try:
        dd.start()
        jobs = [submit(dd, "--", "sh", "-c", prog), submit(dd, "--", "sh", "-c", prog),
                submit(dd, "--gpus", "2", "--", "sh", "-c", prog)]
        for job in jobs:
            wait_status(dd, job, ("running",))
        before = {job: show(dd, job)["attempts"][0]["container_id"] for job in jobs}
        time.sleep(1.0)
        dd.kill9()
        time.sleep(1.0)
        dd.start()
        for job in jobs:
            j = show(dd, job)
            assert j["status"] == "running" and j["attempt"] == 1, j
            assert j["attempts"][0]["container_id"] == before[job]
        for job in jobs:
            j = wait_status(dd, job, TERMINAL, timeout=40)
            assert (j["status"], j["attempt"], len(j["attempts"])) == ("succeeded", 1, 1)
            out = dd.cli("logs", str(job)).stdout
            assert out == "".join(f"tick {i}\n" for i in range(1, 17)), out
    finally:
        dd.stop()
        client = docker.DockerClient(base_url=dockerd)
        try:
            inst = dd.extra_env["GPUSCHED_DOCKER__INSTANCE"]
            for v in client.volumes.list(filters={"name": f"gpusched-lease-{inst}"}):
                v.remove(force=True)  # the daemon's lease on its instance
        finally:
            client.close()
        shutil.rmtree(state, ignore_errors=True)


def test_jobs_that_end_while_the_daemon_is_down(dd: DaemonProcess, dockerd: str) -> None:
    """Scenario 2: exit 0, exit 3 and OOM-killed while the daemon is down."""
    ok = submit(dd, "--", "sh", "-c", "sleep 1")
    three = submit(dd, "--", "sh", "-c", "sleep 1; exit 3")
    for job in (ok, three):
        wait_status(dd, job, ("running",))
    dd.kill9()
    client = docker.DockerClient(base_url=dockerd)
    try:
        time.sleep(2.5)
        states = {job: client.containers.get(show_name(dd, job)).attrs["State"]
                  for job in (ok, three)}
    finally:
        client.close()
    dd.start()
    for job, code in ((ok, 0), (three, 3)):
        j = wait_status(dd, job, TERMINAL)
        assert j["exit_code"] == code
        finished = states[job]["FinishedAt"]
        assert j["ended_at"][:19] == finished[:19]  # the container's real end time
    assert json.loads(dd.cli("gpus", "--json").stdout)[0]["state"] == "idle"


def show_name(d: DaemonProcess, job: int) -> str:
    from gpusched.store import Store

    store = Store(d.state_dir / "gpusched.db")
    try:
        return str(store.attempts(job)[0]["container_name"])
    finally:
        store.close()


def test_orphans_removed_and_foreign_containers_untouched(dd: DaemonProcess, dockerd: str) -> None:
    """Scenario 4."""
    inst = dd.extra_env["GPUSCHED_DOCKER__INSTANCE"]
    client = docker.DockerClient(base_url=dockerd)
    since = int(time.time()) - 1
    try:
        orphan = client.containers.run(
            IMAGE, ["sleep", "60"], detach=True, name=f"gpusched-999-a1-{inst}",
            labels={"gpusched.job": "999", "gpusched.attempt": "1", "gpusched.instance": inst,
                    "gpusched.gpus": ""}, network_mode="none")
        stranger = client.containers.run(IMAGE, ["sleep", "60"], detach=True, network_mode="none",
                                         labels={"owner": "someone-else"})
        assert wait_destroyed(client, orphan.id, since=since), \
            "the orphan gpusched container was not removed"
        stranger.reload()
        assert stranger.status == "running"
        stranger.remove(force=True)
    finally:
        client.close()


def test_cancel_running_container_ends_cancelled_once(dd: DaemonProcess, dockerd: str) -> None:
    """Scenario 16: cancel twice, once during start."""
    job = submit(dd, "--", "sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done")
    dd.cli("cancel", str(job))  # possibly while starting
    dd.cli("cancel", str(job))
    j = wait_status(dd, job, TERMINAL)
    assert j["status"] == "cancelled"
    assert [e["to_status"] for e in j["events"]].count("cancelled") == 1
    client = docker.DockerClient(base_url=dockerd)
    try:
        name = j["attempts"][0]["container_name"] if j["attempts"] else None
        if name:
            found = client.containers.list(all=True, filters={"name": name})
            if found:
                assert wait_destroyed(client, found[0].id, since=int(time.time()) - 1)
    finally:
        client.close()


def test_docker_outage_makes_jobs_unknown_then_running_again() -> None:
    """Scenario 9: a private dockerd stops answering (SIGSTOP: its socket accepts, nothing
    answers, as with a hung or overloaded Docker) under a running job, then comes back. The
    container itself keeps running, as it does across a real Docker outage with live-restore."""
    ddir = short_tmpdir("gsdo")
    script = str(ROOT / "scripts" / "dockerd-test")
    r = subprocess.run([script, "start", str(ddir)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        if os.environ.get("GPUSCHED_REQUIRE_DOCKER") == "1":
            pytest.fail(f"cannot start a private dockerd: {r.stderr}")
        pytest.skip(f"cannot start a private dockerd: {r.stderr.strip()}")
    host = r.stdout.strip().split("DOCKER_HOST=")[-1]
    state = short_tmpdir()
    d = DaemonProcess(state, env={**docker_env(host, state), "GPUSCHED_DOCKER__TIMEOUT_S": "1"})
    dockerd_pid = int((ddir / "dockerd.pid").read_text())
    try:
        d.start()
        job = submit(d, "--", "sh", "-c", "sleep 8; echo survived")
        wait_status(d, job, ("running",))
        os.kill(dockerd_pid, signal.SIGSTOP)
        j = wait_status(d, job, ("unknown",), timeout=20)
        assert "unreachable" in (j["reason"] or "")
        h = d.cli("health", "--json")
        assert h.returncode == 1 and json.loads(h.stdout)["checks"]["docker"]["ok"] is False
        later = submit(d, "--", "true")
        time.sleep(1.5)
        assert show(d, later)["status"] == "queued"  # nothing new starts while Docker is away
        os.kill(dockerd_pid, signal.SIGCONT)
        j = wait_status(d, job, ("running", *TERMINAL), timeout=30)
        assert j["attempt"] == 1
        assert wait_status(d, later, TERMINAL, timeout=30)["status"] == "succeeded"
    finally:
        os.kill(dockerd_pid, signal.SIGCONT)
        d.stop()
        subprocess.run([script, "stop", str(ddir)], timeout=60, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
