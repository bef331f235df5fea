"""Issue 11: an adversary with two real accounts against the root daemon and a real dockerd.

1. the container user: only root (and the admin group, where allowed) may run a container as another uid/gid;
2. a mount source swapped for a symlink between submission and launch is refused at launch;
3. a container created but never started (kill -9 between create and start) is run again,
   once, instead of being adopted as running forever;
4. two daemons sharing a dockerd and a docker.instance: the second refuses to touch it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpusched.config import DockerSettings, GpusSettings, SchedulerSettings, Settings
from gpusched.errors import LaunchRefused, RunnerUnavailable
from gpusched.gpus import SimulatedInventory
from gpusched.models import GpuRequest, JobSpec, Mount
from gpusched.runners.base import LaunchRequest
from gpusched.runners.docker import ContainerRunner, InstanceLeased, lease_volume
from gpusched.service import Service
from gpusched.testing import users as real
from gpusched.testing.clock import FakeClock
from gpusched.testing.harness import SIM_GPUS, DaemonProcess, short_tmpdir
from gpusched.testing.users import as_user

IMAGE = "gpusched-test:latest"
TERMINAL = ("succeeded", "failed", "cancelled", "lost")
Users = dict[str, pwd.struct_passwd]


def docker_env(host: str, mount_root: Path, instance: str) -> dict[str, str]:
    return {
        "GPUSCHED_DOCKER__ENABLED": "true",
        "GPUSCHED_DOCKER__BASE_URL": host,
        "GPUSCHED_DOCKER__IMAGES": json.dumps(["gpusched-test:*"]),
        "GPUSCHED_DOCKER__MOUNT_ROOTS": json.dumps([str(mount_root)]),
        "GPUSCHED_DOCKER__NETWORK": "none",
        "GPUSCHED_DOCKER__INSTANCE": instance,
        "GPUSCHED_DOCKER__ULIMITS": json.dumps({"stack": 67108864}),
        "GPUSCHED_DOCKER__STOP_GRACE_S": "2",
        "GPUSCHED_SCHEDULER__RECONCILE_INTERVAL_S": "2",
    }


def instance_name(tag: str) -> str:
    return f"sec{os.getpid()}{tag}{time.monotonic_ns() % 10**9}"


def ours(client: docker.DockerClient, instance: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"gpusched.instance={instance}"})


def forget(client: docker.DockerClient, instance: str) -> None:
    """Remove an instance's containers and lease volume from the test dockerd."""
    for c in ours(client, instance):
        c.remove(force=True)
    try:
        client.volumes.get(lease_volume(instance)).remove(force=True)
    except docker.errors.NotFound:
        pass


@pytest.fixture
def dclient(dockerd: str) -> Iterator[docker.DockerClient]:
    c = docker.DockerClient(base_url=dockerd)
    yield c
    c.close()


class SecDaemon:
    """A root daemon with docker on the test dockerd and gsrel-admin its admin group; its
    only mount root is ``mount_root`` (default: its own state directory)."""

    def __init__(self, dockerd: str, instance: str, mount_root: Path | None = None) -> None:
        self.instance = instance
        self.state = short_tmpdir("gssec")
        os.chmod(self.state, 0o755)  # like /var/lib/gpusched: users reach the socket
        self.d = DaemonProcess(self.state, env={
            **docker_env(dockerd, mount_root or self.state, instance),
            "GPUSCHED_API__ADMIN_GROUP": real.ADMIN_GROUP,
            "GPUSCHED_DOCKER__LOG_MAX_BYTES": "1M"})

    def close(self, client: docker.DockerClient) -> None:
        self.d.stop()
        forget(client, self.instance)
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def secd(users: Users, dockerd: str, shared_dir: Path,
         dclient: docker.DockerClient) -> Iterator[DaemonProcess]:
    s = SecDaemon(dockerd, instance_name("u"), shared_dir)  # shared_dir: like /tmp
    s.d.start()
    try:
        yield s.d
    finally:
        s.close(dclient)


def _jobs(d: DaemonProcess) -> list[dict[str, Any]]:
    r = d.cli("ls", "--all", "--json")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


# -- 1. who a container runs as -------------------------------------------------------------

def test_plain_user_cannot_run_a_container_as_another_uid(
        secd: DaemonProcess, users: Users, shared_dir: Path) -> None:
    """gsuser1 asks for uid 0 (with a bind mount: chown a setuid shell, host root), or for
    gsuser2's uid, or their own uid with root's gid: each refused at submission with who may,
    nothing stored. Their own uid with their own gid runs, as exactly that."""
    u1, u2 = users["gsuser1"], users["gsuser2"]
    data = shared_dir / "u1data"
    data.mkdir()
    os.chown(data, u1.pw_uid, u1.pw_gid)
    for user in ("0:0", "0", f"{u2.pw_uid}:{u2.pw_gid}", f"{u1.pw_uid}:0"):
        r = as_user(secd, u1, "submit", "--image", IMAGE, "--user", user,
                    "--mount", f"{data}:/data", "--", "sh", "-c", "id -u")
        assert r.returncode == 2, (user, r.stdout, r.stderr)
        assert f"container user '{user}' refused" in r.stderr, r.stderr
        assert "only root (and the admin group, where" in r.stderr, r.stderr
        assert f"you (uid {u1.pw_uid}) may use {u1.pw_uid}:<gid>" in r.stderr, r.stderr
    assert _jobs(secd) == []
    r = as_user(secd, u1, "submit", "--image", IMAGE, "--user", f"{u1.pw_uid}:{u1.pw_gid}",
                "--mount", f"{data}:/data", "--", "sh", "-c", "id -u; id -g; touch /data/mine")
    assert r.returncode == 0, r.stderr
    j = secd.wait_status(int(r.stdout), TERMINAL)
    assert j["status"] == "succeeded", j
    assert secd.cli("logs", str(j["id"])).stdout.split() == [str(u1.pw_uid), str(u1.pw_gid)]
    st = (data / "mine").stat()
    assert (st.st_uid, st.st_gid) == (u1.pw_uid, u1.pw_gid)


def test_root_may_choose_the_container_user_the_admin_group_only_when_allowed(
        secd: DaemonProcess, users: Users) -> None:
    """docker.allow_user_override (default false) would make the admin group root-equivalent:
    off, only root may run a container as another uid; its capabilities stay (it is root)."""
    r = as_user(secd, users["gsadmin1"], "submit", "--image", IMAGE, "--user", "0:0", "--",
                "true")
    assert r.returncode != 0 and "docker.allow_user_override is false" in r.stderr, r.stderr
    r = as_user(secd, None, "submit", "--image", IMAGE, "--user", "0:0", "--",
                "sh", "-c", "id -u")
    assert r.returncode == 0, r.stderr
    j = secd.wait_status(int(r.stdout), TERMINAL)
    assert j["status"] == "succeeded" and secd.cli("logs", str(j["id"])).stdout == "0\n"


def test_containers_get_no_new_privileges_and_no_capabilities(
        secd: DaemonProcess, users: Users) -> None:
    """A setuid binary in the image must not raise a job's privileges, and a container that
    is not root keeps no capability in its bounding set to use on its bind mounts."""
    r = as_user(secd, users["gsuser1"], "submit", "--image", IMAGE, "--", "grep", "-E",
                "^(NoNewPrivs|CapBnd):", "/proc/self/status")
    assert r.returncode == 0, r.stderr
    j = secd.wait_status(int(r.stdout), TERMINAL)
    assert j["status"] == "succeeded", j
    fields = dict(line.split(":\t") for line in secd.cli("logs", str(j["id"])).stdout.split("\n")
                  if line)
    assert fields == {"NoNewPrivs": "1", "CapBnd": "0000000000000000"}, fields


@pytest.mark.parametrize("command", ["submit", "tao"])
def test_tao_mounts_docker_user_is_checked_by_the_daemon(
        secd: DaemonProcess, users: Users, shared_dir: Path, command: str) -> None:
    """~/.tao_mounts.json DockerOptions.user reaches spec.user through the CLI: the same
    daemon-side rule refuses it, for `submit --tao-mounts` and for `gpusched tao`."""
    u1 = users["gsuser1"]
    home = shared_dir / "home-u1"
    (home / "ds").mkdir(parents=True)
    (home / ".tao_mounts.json").write_text(json.dumps({
        "Mounts": [{"source": str(home / "ds"), "destination": "/workspace/ds"}],
        "DockerOptions": {"user": "0:0"}}))
    for p in (home, home / "ds", home / ".tao_mounts.json"):
        os.chown(p, u1.pw_uid, u1.pw_gid)
    if command == "submit":
        args = ["submit", "--image", IMAGE, "--tao-mounts", "--", "id", "-u"]
    else:
        for f in ("spec.txt", "model.hdf5"):
            (home / "ds" / f).write_text("")
        args = ["tao", "--image", IMAGE, "--runner", "docker", "ssd", "evaluate", "-e",
                f"{home}/ds/spec.txt", "-m", f"{home}/ds/model.hdf5", "-k", "key"]
    r = as_user(secd, u1, *args, env={"HOME": str(home)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "container user '0:0' refused" in r.stderr, r.stderr
    assert "only root (and the admin group, where" in r.stderr, r.stderr
    assert _jobs(secd) == []


# -- 2. a mount checked at submission is checked again at launch ---------------------------

@pytest.fixture
def dd(dockerd: str, dclient: docker.DockerClient) -> Iterator[DaemonProcess]:
    s = SecDaemon(dockerd, instance_name("m"))
    s.d.start()
    try:
        yield s.d
    finally:
        s.close(dclient)


@pytest.mark.parametrize("swap", ["leaf-to-etc", "parent-out-of-roots"])
def test_mount_swapped_for_a_symlink_after_submission_is_refused_at_launch(
        dd: DaemonProcess, dclient: docker.DockerClient, swap: str) -> None:
    """The check at submission saw a plain directory; before the (held) job is released the
    directory, or a parent of it, becomes a symlink to /etc or out of the roots. Docker must
    never be handed the path: the job is held with the reason, and no container exists."""
    base = dd.state_dir / "data"
    (base / "ds").mkdir(parents=True)
    (base / "ds" / "mine.txt").write_text("mine\n")
    link = dd.state_dir / "via"
    link.symlink_to(base)  # a symlink at submission is fine: it is stored resolved
    job = int(dd.cli("submit", "--hold", "--image", IMAGE, "--mount", f"{link}/ds:/data",
                     "--", "sh", "-c", "ls /data", check=True).stdout)
    stored = dd.show(job)["spec"]["mounts"]
    assert [m["source"] for m in stored] == [str(base / "ds")]
    outside = short_tmpdir("gsoutside")
    try:
        (outside / "ds").mkdir()
        if swap == "leaf-to-etc":
            shutil.rmtree(base / "ds")
            (base / "ds").symlink_to("/etc")
            now = "/etc"
        else:
            shutil.rmtree(base)
            base.symlink_to(outside)
            now = f"{outside}/ds"
        expect = f"mount source '{base / 'ds'}' now resolves to '{now}'"
        assert dd.cli("release", str(job)).returncode == 0
        j = dd.wait_status(job, ("held", *TERMINAL))
        assert j["status"] == "held", (j, dd.cli("logs", str(job)).stdout)
        assert expect in (j["reason"] or ""), j["reason"]
        assert ours(dclient, dd.extra_env["GPUSCHED_DOCKER__INSTANCE"]) == []
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_runner_resolves_every_mount_again_at_launch(
        dockerd: str, dclient: docker.DockerClient, tmp_path: Path) -> None:
    """ContainerRunner itself, whoever built the spec: a source that is not its own resolved
    path, or that resolves outside the roots, is LaunchRefused; nothing is created."""
    inst = instance_name("r")
    settings = DockerSettings(images=["gpusched-test:*"], mount_roots=[str(tmp_path)],
                              base_url=dockerd, network="none", instance=inst,
                              ulimits={"stack": 67108864})
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / "inner").symlink_to(tmp_path / "real")
    r = ContainerRunner(settings)
    try:
        def req(source: Path) -> LaunchRequest:
            return LaunchRequest(
                job_id=1, attempt=1, spec=JobSpec(
                    command=["cat", "/x/passwd"], runner="docker", image=IMAGE,
                    mounts=[Mount(source=str(source), target="/x")]),
                gpus=(), simulated=True, env={}, log_path=tmp_path / "1.log",
                run_dir=tmp_path / "run", owner_uid=0, owner="root")

        with pytest.raises(LaunchRefused, match=re.escape(
                f"mount source '{tmp_path}/link' now resolves to '/etc'")):
            r.launch(req(tmp_path / "link"))
        with pytest.raises(LaunchRefused, match=r"mount refused at launch: .*outside the allowed"):
            r.launch(req(Path("/etc")))
        with pytest.raises(LaunchRefused, match=re.escape(
                f"mount source '{tmp_path}/inner' now resolves to '{tmp_path}/real'")):
            r.launch(req(tmp_path / "inner"))
        assert ours(dclient, inst) == []
        cfg = r.container_config(req(tmp_path / "real"))
        assert [m["Source"] for m in cfg["mounts"]] == [str(tmp_path / "real")]
    finally:
        r.close()
        forget(dclient, inst)


# -- 3. kill -9 between create and start ----------------------------------------------------

def _service(state: Path, dockerd: str, instance: str, mount_root: Path) -> Service:
    settings = Settings(state_dir=state, socket=state / "gpusched.sock",
                        gpus=GpusSettings(simulate=SIM_GPUS, release_timeout_s=5),
                        scheduler=SchedulerSettings(kill_grace_s=2),
                        docker=DockerSettings(base_url=dockerd, instance=instance,
                                              images=["gpusched-test:*"], network="none",
                                              mount_roots=[str(mount_root)],
                                              ulimits={"stack": 67108864}))
    runner = ContainerRunner(settings.docker, state_dir=state, kill_grace_s=1.0)
    return Service(settings, inventory=SimulatedInventory(SIM_GPUS),
                   runners={"docker": runner}, clock=FakeClock())


def _tick_until(svc: Service, job: int, statuses: tuple[str, ...], timeout: float = 30) -> str:
    """Tick (a real dockerd: containers end in real time) until the job is in ``statuses``,
    waking on the runner's Docker events, not on a timer."""
    import select

    deadline = time.monotonic() + timeout
    while True:
        svc.daemon.tick(time.time())
        status = str(svc.store.get_job(job)["status"])
        if status in statuses or time.monotonic() > deadline:
            return status
        select.select(svc.daemon.wait_fds(), [], [], 0.5)
        svc.daemon.drain_wake()


def test_container_created_but_never_started_runs_again_once(
        dockerd: str, dclient: docker.DockerClient) -> None:
    """Point 10: the daemon claimed the job, created its container and died before start.
    The restarted daemon must not adopt the never-started container as running (the job
    would run forever, its GPU blocking the queue): it removes it and queues the job again,
    which then runs exactly once and succeeds; the GPU is free afterwards."""
    state = short_tmpdir("gscrash")
    inst = instance_name("c")
    out = state / "out"
    out.mkdir()
    svc = _service(state, dockerd, inst, state)
    try:
        spec = JobSpec(command=["sh", "-c", "echo ran >> /out/runs"], runner="docker",
                       image=IMAGE, mounts=[Mount(source=str(out), target="/out")])
        job = svc.store.submit(spec, owner_uid=0, owner="root", now=time.time())
        svc.daemon.refresh_inventory(time.time())
        gpu = svc.daemon.gpus[0]
        # daemon._launch up to the create, then kill -9 (the attempt stays 'starting')
        n = svc.store.claim(job, [gpu.uuid], runner="docker", now=time.time(),
                            paths=svc.daemon.paths)
        assert n == 1
        log_path, run_dir = svc.daemon.paths(job, n)
        req = LaunchRequest(job_id=job, attempt=n, spec=spec, gpus=(gpu,), simulated=True,
                            env=svc.daemon.job_env(job, n, (gpu,)), log_path=Path(log_path),
                            run_dir=Path(run_dir), owner_uid=0, owner="root")
        created = svc.daemon.runners["docker"].create(req)  # type: ignore[attr-defined]
        assert created.status == "created"
    finally:
        svc.close()  # the crash: nothing stopped or removed
    svc = _service(state, dockerd, inst, state)
    try:
        svc.daemon.tick(time.time())  # start-up: reconcile, then plan and launch
        attempts = svc.store.attempts(job)
        assert [a["n"] for a in attempts] == [1, 2], attempts
        assert attempts[0]["state"] == "ended"
        assert "before the attempt started; queued again" in attempts[0]["reason"]
        with pytest.raises(docker.errors.NotFound):
            dclient.containers.get(created.id)  # removed, never started
        assert _tick_until(svc, job, TERMINAL) == "succeeded"
        assert (out / "runs").read_text() == "ran\n"  # exactly once
        # the GPU is not blocked: a job that needs every GPU runs next
        both = svc.store.submit(JobSpec(command=["true"], runner="docker", image=IMAGE,
                                        gpus=GpuRequest(count=2)),
                                owner_uid=0, owner="root", now=time.time())
        assert _tick_until(svc, both, TERMINAL) == "succeeded"
        svc.daemon.tick(time.time())  # the end's GPUs are released on the next pass
        assert [g.state for g in svc.daemon.gpu_states()] == ["idle", "idle"]
        assert ours(dclient, inst) == []
    finally:
        svc.close()
        forget(dclient, inst)
        shutil.rmtree(state, ignore_errors=True)


def test_orphans_of_never_started_containers_are_not_adoptable(
        dockerd: str, dclient: docker.DockerClient, tmp_path: Path) -> None:
    inst = instance_name("o")
    settings = DockerSettings(images=["gpusched-test:*"], mount_roots=[str(tmp_path)],
                              base_url=dockerd, network="none", instance=inst,
                              ulimits={"stack": 67108864})
    r = ContainerRunner(settings)
    try:
        def req(job: int) -> LaunchRequest:
            return LaunchRequest(
                job_id=job, attempt=1,
                spec=JobSpec(command=["sleep", "30"], runner="docker", image=IMAGE),
                gpus=(), simulated=True, env={}, log_path=tmp_path / f"{job}.log",
                run_dir=tmp_path / f"run{job}", owner_uid=0, owner="root")

        r.create(req(1))
        r.launch(req(2))
        found = {o.job_id: o.adoptable for o in r.orphans(set())}
        assert found == {1: False, 2: True}
    finally:
        r.close()
        forget(dclient, inst)


# -- 4. one daemon per docker.instance on a dockerd -----------------------------------------

def test_second_runner_on_a_leased_instance_refuses_everything(
        dockerd: str, dclient: docker.DockerClient, tmp_path: Path) -> None:
    inst = instance_name("l")
    settings = DockerSettings(images=["gpusched-test:*"], mount_roots=[str(tmp_path)],
                              base_url=dockerd, network="none", instance=inst,
                              ulimits={"stack": 67108864})
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    first = ContainerRunner(settings, state_dir=a_dir)
    runners = [first]

    def req(job: int) -> LaunchRequest:
        return LaunchRequest(
            job_id=job, attempt=1,
            spec=JobSpec(command=["sleep", "30"], runner="docker", image=IMAGE),
            gpus=(), simulated=True, env={}, log_path=tmp_path / f"{job}.log",
            run_dir=tmp_path / f"run{job}", owner_uid=0, owner="root")

    try:
        ok, _ = first.health()
        assert ok
        labels = dclient.volumes.get(lease_volume(inst)).attrs["Labels"]
        assert labels["gpusched.lease.state_dir"] == str(a_dir)
        assert labels["gpusched.lease.host"] == socket.gethostname()
        mine = first.launch(req(1))  # a job of the first daemon
        second = ContainerRunner(settings, state_dir=b_dir)
        runners.append(second)
        message = (f"another gpusched (state dir {a_dir} on host {socket.gethostname()}) owns "
                   f"docker.instance '{inst}' on this dockerd; give this daemon its own "
                   f"docker.instance, or remove the lease with `docker volume rm "
                   f"{lease_volume(inst)}` if that daemon is gone")
        with pytest.raises(InstanceLeased) as err:
            second.orphans(set())  # would list the first daemon's job as an orphan
        assert err.value.message == message
        assert isinstance(err.value, RunnerUnavailable)  # the daemon: degraded, not crashed
        assert second.health() == (False, message)
        with pytest.raises(InstanceLeased):
            second.launch(req(2))
        assert [c.id for c in ours(dclient, inst)] == [mine.container_id]
        assert dclient.containers.get(mine.container_id).status == "running"
        # the first daemon restarted (same host, same state dir) still owns it
        again = ContainerRunner(settings, state_dir=a_dir)
        runners.append(again)
        assert again.orphans({(1, 1)}) == []
        # an admin removes the lease of a daemon that is gone: the second may take it
        first.close()
        again.close()
        dclient.containers.get(mine.container_id).remove(force=True)
        dclient.volumes.get(lease_volume(inst)).remove()
        assert second.health()[0] is True
        assert dclient.volumes.get(lease_volume(inst)).attrs["Labels"][
            "gpusched.lease.state_dir"] == str(b_dir)
    finally:
        for r in runners:
            r.close()
        forget(dclient, inst)


def test_second_daemon_on_the_same_instance_leaves_the_first_ones_jobs_alone(
        dockerd: str, dclient: docker.DockerClient) -> None:
    """Two real daemons, one dockerd, one docker.instance: before, the second removed the
    first one's containers as orphans on its first reconcile (jobs lost). Now the second
    reports docker unhealthy with the reason and the first one's job runs to the end."""
    inst = instance_name("d")
    a, b = SecDaemon(dockerd, inst), SecDaemon(dockerd, inst)
    try:
        a.d.start()
        job = int(a.d.cli("submit", "--image", IMAGE, "--", "sh", "-c",
                          "trap 'exit 0' TERM; while [ ! -e /tmp/stop ]; do sleep 0.1; done",
                          check=True).stdout)
        a.d.wait_status(job, ("running",))
        cid = a.d.show(job)["attempts"][0]["container_id"]
        b.d.start()
        deadline = time.monotonic() + 30
        while True:  # until the second daemon's first reconcile ran, or the job was lost
            refused = "runner docker unavailable: another gpusched" in b.d.log()
            lost = a.d.show(job)["status"] != "running" or not ours(dclient, inst)
            if refused or lost or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not lost, (a.d.show(job), b.d.log())
        assert refused, b.d.log()
        h = json.loads(b.d.cli("health", "--json").stdout)
        detail = h["checks"]["docker"]["detail"]
        assert h["checks"]["docker"]["ok"] is False
        assert detail.startswith(f"another gpusched (state dir {a.state} on host "), detail
        assert f"docker volume rm {lease_volume(inst)}" in detail
        assert dclient.containers.get(cid).status == "running"
        dclient.containers.get(cid).exec_run(["touch", "/tmp/stop"])
        j = a.d.wait_status(job, TERMINAL)
        assert (j["status"], j["attempt"]) == ("succeeded", 1)
    finally:
        b.close(dclient)
        a.close(dclient)


def test_daemon_refused_by_a_lease_works_once_the_lease_is_removed(
        dockerd: str, dclient: docker.DockerClient) -> None:
    """The message says `docker volume rm` the lease if the other daemon is gone: after that
    the refused daemon takes the lease on its next reconcile and runs its queue, without a
    restart. (Needs Daemon.reconcile to mark a runner up again once orphans() answers.)"""
    inst = instance_name("g")
    a, b = SecDaemon(dockerd, inst), SecDaemon(dockerd, inst)
    try:
        a.d.start()
        assert json.loads(a.d.cli("health", "--json").stdout)["checks"]["docker"]["ok"]
        a.d.stop()  # gone for good; its lease stays (its containers would outlive it)
        b.d.start()
        job = int(b.d.cli("submit", "--image", IMAGE, "--", "true", check=True).stdout)
        deadline = time.monotonic() + 30
        while "runner docker unavailable: another gpusched" not in b.d.log():
            assert time.monotonic() < deadline, b.d.log()
            time.sleep(0.1)
        assert b.d.show(job)["status"] == "queued"
        dclient.volumes.get(lease_volume(inst)).remove()
        assert b.d.wait_status(job, TERMINAL)["status"] == "succeeded"
        labels = dclient.volumes.get(lease_volume(inst)).attrs["Labels"]
        assert labels["gpusched.lease.state_dir"] == str(b.state)
    finally:
        b.close(dclient)
        a.close(dclient)


def test_a_containers_output_is_kept_only_up_to_the_cap(secd: DaemonProcess,
                                                        users: Users) -> None:
    """gpusched copies a container's output as root, past user quotas: one chatty job must
    not fill the state disk for everyone (docker.log_max_bytes, 1 MiB here)."""
    r = as_user(secd, users["gsuser1"], "submit", "--image", IMAGE, "--", "sh", "-c",
                "yes 0123456789 | head -c 3000000; echo done >&2")
    assert r.returncode == 0, r.stderr
    j = secd.wait_status(int(r.stdout), TERMINAL, timeout=60)
    assert j["status"] == "succeeded", j
    log = Path(j["attempts"][0]["log_path"]).read_bytes()
    note = b"\n[gpusched: output past 1048576 bytes not kept; see docker.log_max_bytes]\n"
    assert log.endswith(note) and len(log) == (1 << 20) + len(note), (len(log), log[-200:])
    assert log.startswith(b"0123456789\n0123456789\n")
