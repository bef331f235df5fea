"""The daemon's tick against a real SQLite file and real local processes, with a FakeClock."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from gpusched.config import Settings
from gpusched.gpus import SimulatedInventory
from gpusched.models import GpuRequest, JobSpec
from gpusched.runners.base import AttemptRef, LaunchRequest
from gpusched.runners.local import LocalRunner, exit_path
from gpusched.service import Service
from gpusched.states import JobStatus
from gpusched.testing.clock import FakeClock
from gpusched.testing.harness import SIM_GPUS
from gpusched.testing.ticks import ended, restarted, run_until, status, submit


def log_of(svc: Service, job_id: int, n: int | None = None) -> str:
    n = n or svc.store.get_job(job_id)["attempt"]
    return Path(svc.store.attempt(job_id, n)["log_path"]).read_text()  # type: ignore[index]


def test_jobs_see_exactly_their_allocated_gpus(service: Service) -> None:
    one = submit(service, "sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES ORDER=$CUDA_DEVICE_ORDER "
                 "JOB=$GPUSCHED_JOB_ID ATT=$GPUSCHED_ATTEMPT")
    two = submit(service, "sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES", gpus=GpuRequest(count=2))
    run_until(service, ended(service, one, two))
    for job_id in (one, two):
        att = service.store.attempt(job_id, 1)
        assert att is not None
        gpus = json.loads(att["gpus"])
        assert f"CVD={','.join(gpus)}" in log_of(service, job_id)
        assert status(service, job_id) == "succeeded"
    assert f"ORDER=PCI_BUS_ID JOB={one} ATT=1" in log_of(service, one)
    assert len(json.loads(service.store.attempt(two, 1)["gpus"])) == 2  # type: ignore[index]
    assert service.store.allocations() == []


def test_exit_code_reason_and_retries(service: Service) -> None:
    job = submit(service, "sh", "-c", "echo try $GPUSCHED_ATTEMPT; exit 3", retries=1)
    run_until(service, ended(service, job))
    row = service.store.get_job(job)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 3, 2)
    assert row["reason"] == "exit code 3"
    assert [a["exit_code"] for a in service.store.attempts(job)] == [3, 3]
    assert "try 2" in log_of(service, job, 2)


def test_command_not_found_is_a_clear_failure(service: Service) -> None:
    job = submit(service, "no-such-program-gpusched")
    run_until(service, ended(service, job))
    row = service.store.get_job(job)
    assert row["exit_code"] == 127 and "command not found" in row["reason"]


def test_shell_metacharacters_stay_literal(service: Service) -> None:
    job = submit(service, "echo", "$(touch /tmp/gpusched-pwned)", ";", "rm", "-rf", "/", "`id`")
    run_until(service, ended(service, job))
    assert log_of(service, job).strip() == "$(touch /tmp/gpusched-pwned) ; rm -rf / `id`"
    assert not Path("/tmp/gpusched-pwned").exists()


def test_after_chain_runs_in_order_and_failure_propagates(service: Service) -> None:
    a = submit(service, "sh", "-c", "sleep 0.2; date +%s.%N")
    b = submit(service, "sh", "-c", "date +%s.%N", after=[a])
    bad = submit(service, "false")
    c = submit(service, "true", after=[bad])
    d = submit(service, "true", after=[c])
    run_until(service, ended(service, a, b, bad, c, d))
    assert status(service, b) == "succeeded"
    assert float(log_of(service, a)) < float(log_of(service, b))
    assert status(service, c) == "failed" and f"dependency job {bad} failed" in (
        service.store.get_job(c)["reason"])
    assert status(service, d) == "failed" and service.store.attempts(d) == []


def test_after_unknown_job_is_refused(service: Service) -> None:
    from gpusched.errors import SpecError

    with pytest.raises(SpecError, match="do not exist"):
        submit(service, "true", after=[999])
    assert service.store.list_jobs() == []


def test_cancel_queued_and_running(service: Service) -> None:
    # cancel once the command runs: a SIGTERM that lands while the shim is between fork and
    # exec is caught by the shim's trap and lost (the SIGKILL after the grace still ends the
    # job, but this test holds the fake clock still, so the grace would never pass)
    running = submit(service, "sh", "-c", "echo ready; exec sleep 30")
    service.daemon.tick(service.clock.now())
    assert status(service, running) == "running"
    run_until(service, lambda: "ready" in log_of(service, running, 1), step=0.0)
    queued = submit(service, "true", gpus=GpuRequest(count=2))
    service.daemon.tick(service.clock.now())
    assert status(service, queued) == "queued"
    assert service.store.request_cancel(queued, actor="tester", now=service.clock.now()) == (
        "cancelled")
    assert service.store.request_cancel(running, actor="tester", now=service.clock.now()) == (
        "cancelling")
    # a second cancel is harmless
    assert service.store.request_cancel(running, actor="tester", now=service.clock.now()) == (
        "cancelling")
    # the fake clock stands still: on a loaded machine the kill grace must not run out (in
    # fake time) before the job has handled its SIGTERM
    run_until(service, ended(service, running), step=0.0)
    row = service.store.get_job(running)
    assert row["status"] == "cancelled" and row["exit_code"] == 143
    pid = service.store.attempt(running, 1)["pid"]  # type: ignore[index]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    events = [e["to_status"] for e in service.store.events(running)]
    assert events.count("cancelled") == 1


def test_cancel_escalates_to_sigkill_after_grace(service: Service) -> None:
    job = submit(service, "sh", "-c", "trap '' TERM; echo ready; sleep 60 & wait")
    run_until(service, lambda: "ready" in (log_of(service, job) if status(service, job)
                                           == "running" else ""))
    service.store.request_cancel(job, actor="tester", now=service.clock.now())
    service.daemon.tick(service.clock.now())  # SIGTERM, ignored by the job
    time.sleep(0.3)
    assert status(service, job) == "running"
    service.clock.advance(service.settings.scheduler.kill_grace_s + 1)
    run_until(service, ended(service, job))
    row = service.store.get_job(job)
    assert row["status"] == "cancelled" and row["exit_code"] == 137


def test_hold_and_release(service: Service) -> None:
    job = submit(service, "true", hold=True)
    service.daemon.tick(service.clock.now())
    assert status(service, job) == "held"
    service.store.release(job, actor="tester", now=service.clock.now())
    run_until(service, ended(service, job))
    assert status(service, job) == "succeeded"


def test_drained_gpu_is_never_used(service: Service) -> None:
    service.daemon.tick(service.clock.now())
    gpu0 = service.daemon.gpus[0].uuid
    service.store.drain(gpu0, reason="fan noise", by="tester", now=service.clock.now())
    jobs = [submit(service, "sh", "-c", "echo $CUDA_VISIBLE_DEVICES") for _ in range(4)]
    big = submit(service, "true", gpus=GpuRequest(count=2))
    run_until(service, ended(service, *jobs))
    for j in jobs:
        assert gpu0 not in log_of(service, j)
    assert status(service, big) == "queued"
    assert "1 usable" in service.daemon.waiting[big] or "drained" in service.daemon.waiting[big]


def test_lost_gpu_is_drained_and_stays_drained_after_restart(settings: Settings,
                                                             clock: FakeClock) -> None:
    inv = SimulatedInventory(SIM_GPUS)
    svc = Service(settings, inventory=inv, runners={"local": LocalRunner.of(settings)},
                  clock=clock)
    uuid = inv.uuids[1]
    inv.set_health(uuid, "lost", "GPU is lost (fell off the bus)")
    svc.daemon.tick(clock.now())
    assert [g.state for g in svc.daemon.gpu_states()] == ["idle", "lost"]
    svc.close()
    svc2 = Service(settings, inventory=SimulatedInventory(SIM_GPUS),
                   runners={"local": LocalRunner.of(settings)}, clock=clock)
    svc2.daemon.tick(clock.now())
    states = {g.uuid: (g.state, g.drain_reason) for g in svc2.daemon.gpu_states()}
    assert states[uuid] == ("drained", "GPU is lost (fell off the bus)")
    svc2.close()


def test_foreign_memory_keeps_a_job_waiting(service: Service) -> None:
    inv = service.inventory
    assert isinstance(inv, SimulatedInventory)
    big_gpu = inv.uuids[0]  # the 16G A4000
    inv.set_foreign(big_gpu, 12 * 1024)
    job = submit(service, "true", gpus=GpuRequest(count=1, mem_mib=10 * 1024))
    service.daemon.tick(service.clock.now())
    assert status(service, job) == "queued"
    assert job in service.daemon.waiting
    states = {g.uuid: g.state for g in service.daemon.gpu_states()}
    assert states[big_gpu] == "foreign"
    inv.set_foreign(big_gpu, 0)
    service.clock.advance(service.settings.gpus.poll_interval_s)
    run_until(service, ended(service, job))
    assert json.loads(service.store.attempt(job, 1)["gpus"]) == [big_gpu]  # type: ignore[index]


def test_restart_adopts_a_running_job_and_records_its_exit(service: Service) -> None:
    job = submit(service, "sh", "-c", "sleep 1; exit 7")
    service.daemon.tick(service.clock.now())
    assert status(service, job) == "running"
    with restarted(service) as svc2:
        svc2.daemon.tick(svc2.clock.now())
        assert status(svc2, job) == "running"
        run_until(svc2, ended(svc2, job))
        row = svc2.store.get_job(job)
        assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 7, 1)
        assert len(svc2.store.attempts(job)) == 1


def test_job_that_ended_while_the_daemon_was_down(service: Service) -> None:
    # the exit file's mtime is real time, and an end time is kept within the attempt's life
    service.clock.advance(time.time() - service.clock.now())  # type: ignore[attr-defined]
    job = submit(service, "sh", "-c", "exit 3")
    service.daemon.tick(service.clock.now())
    time.sleep(0.3)
    with restarted(service) as svc2:
        att = svc2.store.attempt(job, 1)
        assert att is not None
        exit_file = exit_path(Path(att["run_dir"]), Path(att["log_path"]), 1)
        svc2.clock.advance(3600)  # the daemon came back an hour later
        svc2.daemon.tick(svc2.clock.now())
        row = svc2.store.get_job(job)
        assert (row["status"], row["exit_code"]) == ("failed", 3)
        assert row["ended_at"] == pytest.approx(exit_file.stat().st_mtime)
        assert svc2.store.allocations() == []


def test_crash_after_claim_requeues_without_burning_a_retry(service: Service) -> None:
    service.daemon.refresh_inventory(service.clock.now())
    job = submit(service, "sh", "-c", "echo ran")
    service.store.claim(job, [service.daemon.gpus[0].uuid], runner="local",
                        now=service.clock.now(), paths=service.daemon.paths)
    with restarted(service) as svc2:
        run_until(svc2, ended(svc2, job))
        row = svc2.store.get_job(job)
        assert (row["status"], row["attempt"], row["retries_left"]) == ("succeeded", 2, 0)
        assert [a["state"] for a in svc2.store.attempts(job)] == ["ended", "ended"]
        assert log_of(svc2, job).strip() == "ran"


def test_crash_after_launch_before_commit_adopts_not_reruns(service: Service) -> None:
    service.daemon.refresh_inventory(service.clock.now())
    job = submit(service, "sh", "-c", "echo started >> counter; sleep 1")
    gpu = service.daemon.gpus[0]
    n = service.store.claim(job, [gpu.uuid], runner="local", now=service.clock.now(),
                            paths=service.daemon.local_paths)
    assert n == 1
    log_path, run_dir = service.daemon.local_paths(job, n)
    spec = JobSpec.model_validate_json(service.store.get_job(job)["spec"])
    stray = LocalRunner()  # the launch of the daemon that is about to die
    stray.launch(LaunchRequest(
        job_id=job, attempt=n, spec=spec, gpus=(gpu,), simulated=True,
        env=service.daemon.job_env(job, n, (gpu,)), log_path=Path(log_path),
        run_dir=Path(run_dir), owner_uid=os.getuid(), owner="tester"))
    stray.close()
    with restarted(service) as svc2:  # the daemon died before recording the launch
        svc2.daemon.tick(svc2.clock.now())
        assert status(svc2, job) == "running"
        run_until(svc2, ended(svc2, job))
        assert status(svc2, job) == "succeeded"
        assert len(svc2.store.attempts(job)) == 1
        counter = Path(svc2.settings.state_dir) / "counter"
        assert counter.read_text() == "started\n"


def test_another_daemons_shims_are_not_orphans(service: Service, tmp_path: Path) -> None:
    """Two daemons (state directories) on one host: reconcile never touches the other's jobs."""
    other = LocalRunner(tmp_path / "other-runs", tmp_path / "other-logs")
    spec = JobSpec(command=["sleep", "30"], workdir="/tmp")
    gpu = SimulatedInventory(SIM_GPUS).snapshot(lambda pid: None)[0]
    launched = other.launch(LaunchRequest(  # the layout its daemon gives a local attempt
        job_id=1, attempt=1, spec=spec, gpus=(gpu,), simulated=True, env={},
        log_path=tmp_path / "other-logs" / "1" / "1.log", run_dir=tmp_path / "other-logs" / "1",
        owner_uid=os.getuid(), owner="tester"))
    try:
        # launch returns as soon as the shim's exec began (vfork); its command line is in
        # /proc only once the exec is done (the daemon records and reconciles a tick later)
        assert launched.pid is not None
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{launched.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the shim's exec did not finish in 30 s"
            time.sleep(0.001)
        ours = service.daemon.runners["local"]
        assert ours.orphans(set()) == []
        found = other.orphans(set())
        assert [o.job_id for o in found] == [1]
    finally:
        assert launched.pid is not None
        os.killpg(launched.pid, 9)
        time.sleep(0.1)
        other.poll(AttemptRef(job_id=1, n=1, runner="local", gpus=(), log_path=tmp_path / "o.log",
                              run_dir=tmp_path / "other-runs" / "1" / "1", started_at=0,
                              pid=launched.pid), 0)
        other.close()


def test_orphan_shim_is_killed(service: Service) -> None:
    """A shim for an attempt the store does not know (a cancelled job's leftover) goes."""
    job = submit(service, "sleep", "30")
    service.daemon.tick(service.clock.now())
    att = AttemptRef.from_row(service.store.live_attempts()[0])
    # the store forgets it (as if the job had been recorded ended); the process stays
    service.store.finish_attempt(job, 1, to=JobStatus.LOST, now=service.clock.now(),
                                 ended_at=service.clock.now(), exit_code=None, reason="test")
    service.daemon.request_reconcile()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{att.pid}"):
        service.daemon.tick(service.clock.now())
        service.daemon._reconcile_now = True
        time.sleep(0.05)
        service.daemon.runners["local"].poll(att, service.clock.now())
    stat = Path(f"/proc/{att.pid}/stat")
    assert not stat.exists() or ") Z" in stat.read_text()


def test_gpu_lost_mid_job_requeues_without_using_a_retry(service: Service) -> None:
    inv = service.inventory
    assert isinstance(inv, SimulatedInventory)
    job = submit(service, "sh", "-c", "echo attempt $GPUSCHED_ATTEMPT on $CUDA_VISIBLE_DEVICES; "
                 "sleep 30", gpus=GpuRequest(count=1, gpu_type="A4000"))
    run_until(service, lambda: status(service, job) == "running")
    inv.set_health(inv.uuids[0], "lost", "GPU is lost (fell off the bus)")
    service.clock.advance(service.settings.gpus.poll_interval_s)
    run_until(service, lambda: status(service, job) == "queued")
    row = service.store.get_job(job)
    assert row["retries_left"] == 0 and "GPU 0 failed" in row["reason"]
    assert service.store.attempts(job)[0]["exit_code"] == 137
    states = {g.uuid: g.state for g in service.daemon.gpu_states()}
    assert states[inv.uuids[0]] == "lost"
    # the only A4000 is gone: the job waits (it never lands on the lost GPU)
    service.daemon.tick(service.clock.now())
    assert status(service, job) == "queued"
    service.store.request_cancel(job, actor="tester", now=service.clock.now())


def test_retry_only_on_the_named_exit_codes(service: Service) -> None:
    transient = submit(service, "sh", "-c", "exit 75", retries=2, retry_on=[75])
    fatal = submit(service, "sh", "-c", "exit 3", retries=2, retry_on=[75])
    run_until(service, ended(service, transient, fatal))
    assert service.store.get_job(transient)["attempt"] == 3
    assert service.store.get_job(fatal)["attempt"] == 1


def test_queue_etas_follow_running_progress(service: Service) -> None:
    """A running job at epoch 3/10 with 10 s epochs frees its GPUs in about 70 s; the queued
    2-GPU job (--time 50 s) is expected then, the job after it when that one ends."""
    lines = "; ".join(f"echo 'GPUSCHED_EPOCH {{\"epoch\": {e}, \"max_epoch\": 10, \"seconds\": 10}}'"
                      for e in (1, 2, 3))
    first = submit(service, "sh", "-c", f"{lines}; sleep 30", gpus=GpuRequest(count=2))
    run_until(service, lambda: (service.daemon.progress_of(first, 1) or {}).get("epoch") == 3)
    pair = submit(service, "true", gpus=GpuRequest(count=2), est_runtime_s=50)
    single = submit(service, "true", gpus=GpuRequest(count=1))
    pinned = submit(service, "true", gpus=GpuRequest(ids=("1",)))
    service.daemon.tick(service.clock.now())
    starts = service.queue_starts(service.store.list_jobs())
    assert starts[pair] == pytest.approx(70)
    assert starts[single] == pytest.approx(120)
    assert starts[pinned] is None  # GPUs are not interchangeable for it: no estimate
    service.store.request_cancel(first, actor="tester", now=service.clock.now())
    run_until(service, ended(service, first))


def test_any_job_reports_epochs_with_tao_style_status_lines(service: Service) -> None:
    """A plain job printing status.json-style lines on stdout gets epoch rows, like TAO."""
    line = ('{"epoch": %d, "max_epoch": 3, "time_per_epoch": "0:00:41.500000", '
            '"status": "RUNNING", "graphical": {"loss": "0.5", "learning_rate": "0.01", '
            '"mean average precision": "nan"}}')
    script = "; ".join(f"echo '{line % e}'" for e in (1, 2, 3))
    job = submit(service, "sh", "-c", script, name="tao-style")
    run_until(service, ended(service, job))
    rows = service.store.epochs(job_id=job)
    assert [(r["epoch"], r["seconds"], r["workload"]) for r in rows] == [
        (1, 41.5, "tao-style [tester]"), (2, 41.5, "tao-style [tester]"), (3, 41.5, "tao-style [tester]")]
    assert rows[0]["gpu_models"] == '["RTX 2070"]'


def test_a_local_attempt_makes_one_folder_per_job_and_two_files(service: Service) -> None:
    """The log and the shim's exit file share the job's log folder (the daemon's, 0711): a
    sweep of short jobs creates three inodes per job, not five, and nothing under runs/."""
    job = submit(service, "sh", "-c", "echo hi; exit 4")
    run_until(service, ended(service, job))
    again = submit(service, "true")
    run_until(service, ended(service, again))
    folder = service.settings.logs_dir / str(job)
    assert sorted(os.listdir(folder)) == ["1.exit", "1.log"]
    assert (folder / "1.exit").read_text() == "4\n" and (folder / "1.log").read_text() == "hi\n"
    st = os.stat(folder)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o711)
    att = service.store.attempt(job, 1)
    assert att is not None and att["run_dir"] == str(folder)
    assert not (service.settings.runs_dir / str(job)).exists()
    assert not (service.settings.runs_dir / str(again)).exists()
