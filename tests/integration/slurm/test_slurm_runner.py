"""The Slurm runner against a real slurmctld and slurmd (two fake GPUs: a4000 and rtx2070).

Every wait is on a state (gpusched's store through the CLI, or squeue), never a sleep.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Callable
from pathlib import Path

from gpusched.testing.slurm import SlurmDaemon, events, wait_until


def test_one_and_two_gpu_jobs_get_slurms_gpus_and_exit_codes(slurm_daemon: SlurmDaemon,
                                                            shared_dir: Path) -> None:
    d = slurm_daemon
    one = d.submit("--gpus", "1", "--", "sh", "-c",
                   'echo "CVD=$CUDA_VISIBLE_DEVICES UID=$(id -u) JOB=$GPUSCHED_JOB_ID"; exit 3')
    two = d.submit("--gpus", "2", "--", "sh", "-c", 'echo "CVD=$CUDA_VISIBLE_DEVICES"')
    typed = d.submit("--gpus", "1", "--gpu-type", "RTX 2070", "--", "sh", "-c",
                     'echo "CVD=$CUDA_VISIBLE_DEVICES"')
    row = d.wait_status(one, {"failed"}, timeout=90)
    assert row["exit_code"] == 3 and row["reason"] == "exit code 3", row
    out = d.output(one)
    assert re.search(rf"CVD=[01] UID={d.user.pw_uid} JOB={one}\n", out), out
    assert d.wait_status(two, {"succeeded"}, timeout=90)["exit_code"] == 0
    assert "CVD=0,1\n" in d.output(two)
    assert d.wait_status(typed, {"succeeded"}, timeout=90)["exit_code"] == 0
    assert "CVD=1\n" in d.output(typed)  # the rtx2070 is gres index 1
    for job in (one, two, typed):
        att = d.attempt(job)
        assert att["runner"] == "slurm" and att["gpus"] == "[]"  # no local GPU taken
        assert d.cluster.with_comment(f"gpusched:{d.env['GPUSCHED_SLURM__INSTANCE']}:{job}:1") \
            == [att["slurm_job_id"]]


def test_kill9_then_adoption_keeps_the_same_slurm_job(slurm_daemon_factory: Callable[...,
                                                                                    SlurmDaemon],
                                                     shared_dir: Path) -> None:
    d = slurm_daemon_factory()
    job, sid, go = d.running(shared_dir, "exit 7")
    d.kill9()
    # the worst moment: sbatch had answered but the daemon died before recording the Slurm
    # job id (the attempt still "starting"): only the comment can find it again
    with d.db() as db:
        db.execute("UPDATE attempts SET state='starting', slurm_job_id=NULL WHERE job_id=?",
                   (job,))
        db.execute("UPDATE jobs SET status='starting' WHERE id=?", (job,))
    db.close()
    d2 = slurm_daemon_factory()
    row = d2.wait_status(job, {"running"}, timeout=60)
    assert row["attempt"] == 1
    assert d2.slurm_id(job) == sid
    go.touch()
    row = d2.wait_status(job, {"failed"}, timeout=60)
    assert row["exit_code"] == 7 and len(row["attempts"]) == 1, row
    inst = d2.env["GPUSCHED_SLURM__INSTANCE"]
    assert d2.cluster.with_comment(f"gpusched:{inst}:{job}:", prefix=True) == [sid]
    assert any("adopting job" in line for line in d2.log().splitlines())


def test_scancel_outside_gpusched_ends_the_job_with_slurms_reason(
        slurm_daemon: SlurmDaemon, shared_dir: Path) -> None:
    d = slurm_daemon
    job, sid, _ = d.running(shared_dir)
    assert d.cluster.run("scancel", sid).returncode == 0
    row = d.wait_status(job, {"cancelled"}, timeout=60)
    assert f"cancelled in Slurm: Slurm job {sid} CANCELLED" in row["reason"], row


def test_gpusched_cancel_goes_through_scancel(slurm_daemon: SlurmDaemon,
                                              shared_dir: Path) -> None:
    d = slurm_daemon
    job, sid, _ = d.running(shared_dir)
    r = d.cli("cancel", str(job))
    assert r.returncode == 0, r.stderr
    d.wait_status(job, {"cancelled"}, timeout=60)
    assert d.cluster.job(sid).get("state") in ("CANCELLED", None)


def test_slurmctld_down_jobs_unknown_then_reconciled(slurm_daemon: SlurmDaemon,
                                                     shared_dir: Path) -> None:
    d = slurm_daemon
    job, sid, go = d.running(shared_dir, "exit 5")
    d.cluster.ctld("stop")
    try:
        row = d.wait_status(job, {"unknown"}, timeout=60)
        assert "slurm unreachable" in row["reason"], row
        later = d.submit("--gpus", "1", "--", "true")  # queued, not handed to a dead Slurm
        go.touch()  # the job ends while the controller is down: its exit file says how
        wait_until("the exit file", lambda: (Path(d.attempt(job)["run_dir"]) / "exit")
                   .read_text().endswith("\n"))
        assert d.show(later)["status"] == "queued"
        health = d.cli("health", "--json")
        assert health.returncode == 1 and '"slurm"' in health.stdout
    finally:
        d.cluster.ctld("start")
    try:
        row = d.wait_status(job, {"failed"}, timeout=90)
        assert row["exit_code"] == 5 and row["attempts"][0]["slurm_job_id"] == sid, row
        assert "running: runner reachable again" in events(d, job)
        assert d.wait_status(later, {"succeeded"}, timeout=90)["attempt"] == 1
    finally:
        d.cluster.settle()


def test_hold_and_release_a_job_pending_in_slurm(slurm_daemon: SlurmDaemon,
                                                 shared_dir: Path) -> None:
    d = slurm_daemon
    blocker, _, go = d.running(shared_dir, gpus=2)
    job = d.submit("--gpus", "1", "--", "true")
    d.wait_slurm(job, {"PENDING"})
    r = d.cli("hold", str(job), "--json")
    assert r.returncode == 0 and "held in Slurm" in r.stdout, (r.stdout, r.stderr)
    assert "JobHeld" in d.cluster.job(d.slurm_id(job))["reason"]
    go.touch()
    d.wait_status(blocker, {"succeeded"}, timeout=60)
    wait_until("the blocker's GPUs to be free in Slurm",
               lambda: d.cluster.job(d.slurm_id(blocker)).get("state") in ("COMPLETED", None))
    # both GPUs are free, yet the held job stays pending in Slurm
    found = d.cluster.job(d.slurm_id(job))
    assert found["state"] == "PENDING" and "JobHeld" in found["reason"], found
    r = d.cli("release", str(job), "--json")
    assert r.returncode == 0 and "released in Slurm" in r.stdout, (r.stdout, r.stderr)
    assert d.wait_status(job, {"succeeded"}, timeout=60)["exit_code"] == 0
    assert any("held in Slurm by root" in e for e in events(d, job))


def test_bad_partition_is_refused_with_slurms_message(
        slurm_daemon_factory: Callable[..., SlurmDaemon]) -> None:
    d = slurm_daemon_factory(GPUSCHED_SLURM__PARTITION="nosuchpart")
    job = d.submit("--gpus", "1", "--", "true")
    row = d.wait_status(job, {"held"}, timeout=60)
    assert "Slurm refused job" in row["reason"], row
    assert "sbatch: error: invalid partition specified: nosuchpart" in row["reason"], row


def test_gpus_lists_the_cluster_and_health_says_slurm_is_up(slurm_daemon: SlurmDaemon) -> None:
    d = slurm_daemon
    r = d.cli("gpus")
    assert r.returncode == 0, r.stderr
    assert "Slurm cluster:" in r.stdout and "gpu:a4000:1,gpu:rtx2070:1" in r.stdout, r.stdout
    r = d.cli("health", "--json")
    assert '"slurm"' in r.stdout and "is UP" in r.stdout, r.stdout


def test_root_jobs_are_never_run_by_slurm(slurm_daemon: SlurmDaemon) -> None:
    d = slurm_daemon
    r = d.cli("submit", "--runner", "slurm", "--gpus", "0", "--", "id")
    assert r.returncode == 0, r.stderr
    row = d.wait_status(int(r.stdout), {"held"}, timeout=60)
    assert "does not run jobs as root" in row["reason"]


def test_a_slurm_job_of_another_user_with_our_comment_is_not_adopted(
        slurm_daemon_factory: Callable[..., SlurmDaemon], users: dict[str, pwd.struct_passwd],
        shared_dir: Path) -> None:
    d = slurm_daemon_factory()
    job, sid, _ = d.running(shared_dir)
    run_dir = Path(d.attempt(job)["run_dir"])
    d.kill9()
    # the crash came before sbatch: no Slurm job of this attempt ever ran
    assert d.cluster.run("scancel", sid).returncode == 0
    wait_until("the real job gone", lambda: d.cluster.job(sid).get("state") == "CANCELLED")
    (run_dir / "exit").write_text("")
    with d.db() as db:
        db.execute("UPDATE attempts SET state='starting', slurm_job_id=NULL WHERE job_id=?",
                   (job,))
        db.execute("UPDATE jobs SET status='starting' WHERE id=?", (job,))
    db.close()
    comment = f"gpusched:{d.env['GPUSCHED_SLURM__INSTANCE']}:{job}:1"
    other = users["gsuser2"]
    r = d.cluster.run("sbatch", "--parsable", f"--uid={other.pw_uid}", f"--gid={other.pw_gid}",
                      f"--comment={comment}", "--output=/dev/null", "--chdir=/tmp",
                      "--wrap", "sleep 300")
    assert r.returncode == 0, r.stderr
    impostor = r.stdout.strip()
    wait_until("the impostor to run", lambda: d.cluster.job(impostor).get("state") == "RUNNING")
    d2 = slurm_daemon_factory()
    # gsuser1's attempt is queued again as never started, and runs as a new Slurm job; the
    # job of gsuser2 that claims to be it is cancelled, never adopted
    wait_until("attempt 2", lambda: len(d2.show(job)["attempts"]) == 2)
    assert d2.slurm_id(job, 2) not in (sid, impostor)
    wait_until("the impostor cancelled",
               lambda: d2.cluster.job(impostor).get("state") == "CANCELLED")
    assert "not adopting" in d2.log()
