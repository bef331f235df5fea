"""ContainerRunner against a real dockerd (busybox image built by scripts/dockerd-test)."""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpusched.config import DockerSettings
from gpusched.errors import LaunchRefused, RunnerError, RunnerUnavailable
from gpusched.models import Gpu, JobSpec, Mount
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Outcome
from gpusched.runners.docker import ContainerRunner

IMAGE = "gpusched-test:latest"


class Env:
    def __init__(self, host: str, tmp: Path) -> None:
        self.host, self.tmp = host, tmp
        self.instance = f"t{uuid.uuid4().hex[:8]}"
        self.settings = DockerSettings(
            images=["gpusched-test:*"], mount_roots=[str(tmp)], base_url=host,
            network="none", instance=self.instance, shm_size="64M",
            # memlock -1 (the default) needs CAP_SYS_RESOURCE, which sandboxes may lack.
            ulimits={"memlock": 4 * 1024 * 1024, "stack": 67108864},
        )
        self.client = docker.DockerClient(base_url=host)
        self.runners: list[ContainerRunner] = []

    def runner(self) -> ContainerRunner:
        r = ContainerRunner(self.settings, kill_grace_s=1.0)
        self.runners.append(r)
        return r

    def req(self, command: str, job: int = 1, attempt: int = 1, *, simulated: bool = True,
            gpus: tuple[Gpu, ...] = (), owner_uid: int = 0, **spec: Any) -> LaunchRequest:
        return LaunchRequest(
            job_id=job, attempt=attempt,
            spec=JobSpec(command=["sh", "-c", command], runner="docker",
                         image=spec.pop("image", IMAGE), **spec),
            gpus=gpus, simulated=simulated,
            env={"GPUSCHED_JOB_ID": str(job), "GPUSCHED_ATTEMPT": str(attempt),
                 "GPUSCHED_GPUS": ",".join(g.uuid for g in gpus)},
            log_path=self.tmp / "logs" / f"{job}.log",
            run_dir=self.tmp / "runs" / f"{job}-{attempt}",
            owner_uid=owner_uid, owner="root" if owner_uid == 0 else f"u{owner_uid}",
        )

    def ref(self, req: LaunchRequest, launched: Launched) -> AttemptRef:
        return AttemptRef(
            job_id=req.job_id, n=req.attempt, runner="docker", gpus=(), log_path=req.log_path,
            run_dir=req.run_dir, started_at=time.time(), container_id=launched.container_id,
            container_name=launched.container_name,
        )

    def ours(self) -> list[Any]:
        return self.client.containers.list(
            all=True, filters={"label": f"gpusched.instance={self.instance}"}
        )


@pytest.fixture
def env(dockerd: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(dockerd, tmp_path)
    try:
        yield e
    finally:
        for r in e.runners:
            r.close()
        for c in e.ours():
            c.remove(force=True)
        e.client.close()


def wait(runner: ContainerRunner, ref: AttemptRef, timeout: float = 20.0) -> Outcome:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = runner.poll(ref, time.time())
        if out is not None:
            return out
        time.sleep(0.05)
    raise AssertionError(f"container {ref.container_name} did not end in {timeout} s")


def test_launch_sets_name_labels_env_mounts_workdir_and_user(env: Env) -> None:
    data = env.tmp / "data"
    data.mkdir(mode=0o777)
    data.chmod(0o777)
    r = env.runner()
    req = env.req(
        'echo "job=$GPUSCHED_JOB_ID mine=$MINE cvd=$CUDA_VISIBLE_DEVICES"; pwd; id -u; id -g; '
        "echo written > out.txt",
        job=7, owner_uid=4321, env={"MINE": "yes", "GPUSCHED_JOB_ID": "spoofed"},
        mounts=[Mount(source=str(data), target="/work")], workdir="/work",
    )
    launched = r.launch(req)
    ref = env.ref(req, launched)
    assert launched.container_name == f"gpusched-7-a1-{env.instance}"
    out = wait(r, ref)
    assert (out.exit_code, out.oom, out.lost, out.reason) == (0, False, False, "exit code 0")
    assert abs(out.ended_at - time.time()) < 60
    assert req.log_path.read_text().splitlines() == [
        "job=7 mine=yes cvd=", "/work", "4321", "4321",
    ]
    assert (data / "out.txt").read_text() == "written\n"
    info = env.client.api.inspect_container(launched.container_id)
    assert info["Name"] == f"/gpusched-7-a1-{env.instance}"
    assert info["Config"]["Labels"] == {
        "gpusched.job": "7", "gpusched.attempt": "1", "gpusched.instance": env.instance,
        "gpusched.gpus": "", "gpusched.owner": "u4321",
    }
    hc = info["HostConfig"]
    assert hc["RestartPolicy"]["Name"] == "no"
    assert hc["AutoRemove"] is False and hc["Privileged"] is False and hc["Init"] is True
    assert hc["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "50m"}}
    assert hc["NetworkMode"] == "none"
    assert hc["ShmSize"] == 64 * 1024 * 1024
    assert {u["Name"]: u["Hard"] for u in hc["Ulimits"]} == {"memlock": 4194304, "stack": 67108864}
    assert not hc.get("DeviceRequests")
    assert "NVIDIA_VISIBLE_DEVICES=void" in info["Config"]["Env"]
    assert info["Config"]["User"] == "4321:4321"
    r.cleanup(ref)
    assert env.ours() == []
    r.cleanup(ref)  # twice is fine


def test_exit_code_is_reported(env: Env) -> None:
    r = env.runner()
    req = env.req("echo failing >&2; exit 3")
    ref = env.ref(req, r.launch(req))
    out = wait(r, ref)
    assert (out.exit_code, out.oom, out.reason) == (3, False, "exit code 3")
    assert req.log_path.read_text() == "failing\n"


def test_oom_killed_container(env: Env) -> None:
    r = env.runner()
    req = env.req('x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo survived ${#x}')
    cfg = r.container_config(req)
    cfg.update(mem_limit="32m", memswap_limit="32m")
    c = env.client.containers.create(**cfg)
    c.start()
    ref = env.ref(req, Launched(container_id=c.id, container_name=c.name))
    out = wait(r, ref)
    assert (out.exit_code, out.oom, out.reason) == (137, True, "killed: out of memory")


def test_host_mem_is_the_containers_memory_limit(env: Env) -> None:
    """--host-mem (host_mem_mib) becomes Docker's memory limit, swap included: a job past it
    is OOM-killed and reported as such; one under it runs."""
    r = env.runner()
    hog = env.req('x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo survived ${#x}',
                  job=1, host_mem_mib=32)
    ref = env.ref(hog, launched := r.launch(hog))
    hc = env.client.api.inspect_container(launched.container_id)["HostConfig"]
    assert hc["Memory"] == hc["MemorySwap"] == 32 * 1024 * 1024
    out = wait(r, ref)
    assert (out.exit_code, out.oom, out.reason) == (137, True, "killed: out of memory")
    small = env.req("echo fine", job=2, host_mem_mib=64)
    assert wait(r, env.ref(small, r.launch(small))).exit_code == 0


def test_cancel_sends_term_then_kill(env: Env) -> None:
    r = env.runner()
    polite = env.req('trap "echo got-term; exit 7" TERM; echo ready; '
                     "while true; do sleep 0.1; done", job=1)
    stubborn = env.req('trap "" TERM; echo ready; while true; do sleep 0.1; done', job=2)
    refs = [env.ref(q, r.launch(q)) for q in (polite, stubborn)]
    for q in (polite, stubborn):
        _wait_for_text(q.log_path, "ready")
    for ref in refs:
        r.signal_cancel(ref, kill=False)
    out = wait(r, refs[0])
    assert out.exit_code == 7 and "got-term" in polite.log_path.read_text()
    time.sleep(0.5)
    assert r.poll(refs[1], time.time()) is None  # ignores SIGTERM
    r.signal_cancel(refs[1], kill=True)
    assert wait(r, refs[1]).exit_code == 137
    r.signal_cancel(refs[1], kill=True)  # not running: fine
    r.cleanup(refs[1])
    r.signal_cancel(refs[1], kill=False)  # gone: fine


def _wait_for_text(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}")


def test_log_is_complete(env: Env) -> None:
    r = env.runner()
    req = env.req('seq 1 2000; echo "to stderr" >&2; sleep 0.1; printf "no newline"')
    ref = env.ref(req, r.launch(req))
    assert wait(r, ref).exit_code == 0
    text = req.log_path.read_text()
    # Docker copies stdout and stderr separately: their relative order is not kept.
    lines = text.splitlines()
    assert lines.count("to stderr") == 1
    lines.remove("to stderr")
    assert lines == [*(str(i) for i in range(1, 2001)), "no newline"]
    assert text.endswith("no newline")
    assert (req.run_dir / "log.cursor").exists()
    assert wait(r, ref).exit_code == 0  # polling again adds nothing
    assert req.log_path.read_text() == text


def test_log_resumes_after_restart_without_gaps_or_duplicates(env: Env) -> None:
    r1 = env.runner()
    req = env.req("i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo line-$i; "
                  "[ $((i % 200)) = 0 ] && sleep 0.1; done; true")
    launched = r1.launch(req)
    ref = env.ref(req, launched)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and req.log_path.read_text().count("\n") < 500:
        time.sleep(0.02)
    r1.close()  # the daemon stops mid-stream
    seen = req.log_path.read_text().count("\n")
    assert 500 <= seen < 3000
    with req.log_path.open("a") as fh:  # written after the last cursor save, then a crash
        fh.write("line-dup\n")
    time.sleep(0.3)  # lines written while nobody follows
    r2 = env.runner()
    assert wait(r2, ref).exit_code == 0
    assert req.log_path.read_text().splitlines() == [f"line-{i}" for i in range(1, 3001)]


def test_adopts_a_container_that_ended_while_the_daemon_was_down(env: Env) -> None:
    r1 = env.runner()
    req = env.req("seq 1 50")
    ref = env.ref(req, r1.launch(req))
    r1.close()
    time.sleep(0.5)
    r2 = env.runner()
    assert wait(r2, ref).exit_code == 0
    assert req.log_path.read_text().splitlines() == [str(i) for i in range(1, 51)]


def test_same_attempt_never_gets_a_second_container(env: Env) -> None:
    r = env.runner()
    req = env.req("sleep 30")
    created = r.create(req)  # a crash after create, before start
    assert created.status == "created"
    first = r.launch(req)
    assert first.container_id == created.id
    assert r.launch(req).container_id == created.id
    assert env.runner().launch(req).container_id == created.id
    assert len(env.ours()) == 1
    assert env.ours()[0].status == "running"


def test_name_taken_by_a_stranger_is_an_error(env: Env) -> None:
    r = env.runner()
    req = env.req("true")
    env.client.containers.create(IMAGE, "true", name=r.container_config(req)["name"])
    try:
        with pytest.raises(RunnerError, match="is not job 1 attempt 1"):
            r.launch(req)
    finally:
        env.client.containers.get(r.container_config(req)["name"]).remove(force=True)


def test_orphans_are_listed_and_removed_but_strangers_left_alone(env: Env) -> None:
    r = env.runner()
    live = env.req("sleep 30", job=1)
    r.launch(live)
    orphan_req = env.req("sleep 30", job=2, attempt=3, simulated=False,
                         gpus=(_gpu(0, "GPU-11111111"),))
    r.create(orphan_req)  # never started: an orphan all the same
    stranger = env.client.containers.create(IMAGE, "sleep 30", name=f"stranger-{env.instance}",
                                            labels={"gpusched.job": "9"})
    try:
        found = r.orphans({(1, 1)})
        assert [(o.job_id, o.attempt, o.gpus) for o in found] == [(2, 3, ("GPU-11111111",))]
        assert "gpusched-2-a3" in found[0].description
        assert r.remove_orphan(found[0]) is True
        assert r.orphans({(1, 1)}) == []
        assert [c.name for c in env.ours()] == [f"gpusched-1-a1-{env.instance}"]
        stranger.reload()
        assert stranger.status == "created"
    finally:
        stranger.remove(force=True)


def _gpu(index: int, uid: str) -> Gpu:
    return Gpu(index=index, uuid=uid, name="Fake GPU", memory_total_mib=16384,
               memory_free_mib=16384, simulated=True)


def test_real_gpus_become_a_device_request(env: Env) -> None:
    r = env.runner()
    gpus = (_gpu(2, "GPU-aaaaaaaa-0000"), _gpu(0, "GPU-bbbbbbbb-1111"))
    req = env.req("true", simulated=False, gpus=gpus, env={"CUDA_VISIBLE_DEVICES": "5"})
    c = r.create(req)  # start would fail without the nvidia runtime
    info = env.client.api.inspect_container(c.id)
    (dr,) = info["HostConfig"]["DeviceRequests"]
    assert dr["DeviceIDs"] == ["GPU-aaaaaaaa-0000", "GPU-bbbbbbbb-1111"]
    assert dr["Capabilities"] == [["gpu"]]
    assert dr["Count"] == 0 and dr["Driver"] == ""
    cenv = info["Config"]["Env"]
    assert "CUDA_VISIBLE_DEVICES=0,1" in cenv and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in cenv
    assert "NVIDIA_VISIBLE_DEVICES=GPU-aaaaaaaa-0000,GPU-bbbbbbbb-1111" in cenv
    assert info["Config"]["Labels"]["gpusched.gpus"] == "GPU-aaaaaaaa-0000,GPU-bbbbbbbb-1111"


def test_missing_image_is_refused_with_what_to_do(env: Env) -> None:
    r = env.runner()
    req = env.req("true", image="gpusched-test:absent")
    with pytest.raises(LaunchRefused, match=r"docker pull gpusched-test:absent.*release 1"):
        r.launch(req)
    assert env.ours() == []


def test_missing_program_fails_with_127(env: Env) -> None:
    # The init process (tini) starts, so this is an ordinary failed run, not a refused launch.
    r = env.runner()
    req = env.req("true")
    req = LaunchRequest(**{**req.__dict__, "spec": JobSpec(
        command=["/no/such/program"], runner="docker", image=IMAGE)})
    ref = env.ref(req, r.launch(req))
    assert wait(r, ref).exit_code == 127
    assert "/no/such/program" in req.log_path.read_text()


def test_bind_source_missing_is_refused(env: Env) -> None:
    r = env.runner()
    req = env.req("true", mounts=[Mount(source=str(env.tmp / "absent"), target="/x")])
    with pytest.raises(LaunchRefused, match="absent"):
        r.launch(req)


def test_vanished_container_is_lost(env: Env) -> None:
    r = env.runner()
    req = env.req("sleep 30")
    ref = env.ref(req, r.launch(req))
    env.client.containers.get(ref.container_id).remove(force=True)
    out = r.poll(ref, 123.0)
    assert out == Outcome(exit_code=None, ended_at=123.0, lost=True, reason="container disappeared")


def test_wait_fd_wakes_when_a_container_dies(env: Env) -> None:
    r = env.runner()
    fds = r.wait_fds()
    assert len(fds) == 1
    time.sleep(0.5)  # the events stream connects (and wakes once: deaths while away)
    r.wait_fds()
    assert select.select(r.wait_fds(), [], [], 0)[0] == []  # idle: no busy loop
    req = env.req("sleep 0.2")
    r.launch(req)
    readable, _, _ = select.select(fds, [], [], 10)
    assert readable == fds
    # The daemon never reads the pipe: the next call keeps it readable (a tick must see the
    # death), the one after empties it, so the daemon's loop does not spin.
    assert select.select(r.wait_fds(), [], [], 0)[0] == fds
    assert select.select(r.wait_fds(), [], [], 0.2)[0] == []


def test_health(env: Env) -> None:
    ok, text = env.runner().health()
    assert ok and text.startswith("docker 2") and env.host in text


def test_unreachable_docker(env: Env, tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-docker.sock"
    r = ContainerRunner(DockerSettings(images=["gpusched-test:*"], mount_roots=[str(tmp_path)],
                                       base_url=url, network="none"))
    env.runners.append(r)
    req = env.req("true")
    ref = AttemptRef(job_id=1, n=1, runner="docker", gpus=(), log_path=req.log_path,
                     run_dir=req.run_dir, started_at=0.0, container_id="abc")
    with pytest.raises(RunnerUnavailable, match="Docker unreachable at unix://"):
        r.launch(req)
    with pytest.raises(RunnerUnavailable):
        r.poll(ref, 0.0)
    with pytest.raises(RunnerUnavailable):
        r.orphans(set())
    ok, text = r.health()
    assert not ok and url in text
