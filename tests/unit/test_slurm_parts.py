"""The Slurm runner's pure parts (the rest runs against a real Slurm in
tests/integration/slurm): the batch script, the sbatch options, what Slurm prints, the store
migration that adds the Slurm job id."""

from __future__ import annotations

import pwd
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gpusched.config import SlurmSettings
from gpusched.errors import RunnerUnavailable
from gpusched.models import GpuRequest, JobSpec
from gpusched.runners.base import AttemptRef, LaunchRequest
from gpusched.runners.slurm import (
    SlurmRunner,
    _exit_code,
    parse_fields,
    shim_script,
    slurm_gpu_type,
)
from gpusched.store import MIGRATIONS, Store
from gpusched.tao import SLURM_GPU_INDEX
from gpusched.testing.harness import database_at


def run_script(tmp_path: Path, command: list[str], env: dict[str, str] | None = None
               ) -> tuple[int, str, str]:
    exit_file = tmp_path / "exit"
    script = tmp_path / "job.sh"
    script.write_text(shim_script(3, 1, str(tmp_path), exit_file, command))
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env or {},
                       timeout=30)
    return r.returncode, exit_file.read_text() if exit_file.exists() else "", r.stdout + r.stderr


def test_the_batch_script_runs_the_command_literally_and_records_its_status(
        tmp_path: Path) -> None:
    hostile = ["sh", "-c", 'printf "%s|" "$@"; exit 4', "x", "a b", "$(id)", "'q'", "*", ";"]
    rc, status, out = run_script(tmp_path, hostile)
    assert (rc, status) == (4, "4\n")
    assert out == "a b|$(id)|'q'|*|;|"  # never re-parsed by a shell


def test_a_working_directory_that_cannot_be_entered_is_exit_126_cd(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(shim_script(3, 1, str(tmp_path / "gone"), tmp_path / "exit", ["true"]))
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 126 and (tmp_path / "exit").read_text() == "126 cd\n"


def test_the_gpu_index_placeholder_becomes_slurms_gpus(tmp_path: Path) -> None:
    cmd = ["sh", "-c", 'printf "%s," "$@"', "x", "--gpu_index", SLURM_GPU_INDEX, "--gpus", "2"]
    rc, status, out = run_script(tmp_path, cmd, {"CUDA_VISIBLE_DEVICES": "1,3"})
    assert (rc, out) == (0, "--gpu_index,1,3,--gpus,2,")
    for bad in ("", "0,$(id)", "*"):  # only indices are spliced into the command
        rc, status, out = run_script(tmp_path, cmd, {"CUDA_VISIBLE_DEVICES": bad})
        assert (rc, status) == (125, "125\n") and "allocated no GPU indices" in out


def test_sbatch_options(tmp_path: Path) -> None:
    runner = SlurmRunner(SlurmSettings(partition="gpu", account="lab", instance="box1",
                                       extra_sbatch_args=["--time=1:00:00"]), tmp_path)
    user = pwd.getpwuid(0)
    spec = JobSpec(command=["true"], runner="slurm", name="n",
                   gpus=GpuRequest(count=2, gpu_type="RTX A4000"))
    req = LaunchRequest(job_id=7, attempt=2, spec=spec, gpus=(), simulated=True, env={},
                        log_path=tmp_path / "o.log", run_dir=tmp_path, owner_uid=1234,
                        owner="u")
    args = runner.sbatch_args(req, user, "/w")
    assert args == ["--parsable", "--job-name=n", "--comment=gpusched:box1:7:2", "--chdir=/w",
                    f"--output={tmp_path / 'o.log'}", "--open-mode=append", "--uid=1234",
                    f"--gid={user.pw_gid}", "--export=ALL", "--gpus=rtxa4000:2",
                    "--partition=gpu", "--account=lab", "--time=1:00:00"]


def test_the_jobs_environment_drops_what_would_steer_sbatch(tmp_path: Path) -> None:
    runner = SlurmRunner(SlurmSettings(), tmp_path)
    spec = JobSpec(command=["true"], runner="slurm",
                   env={"SBATCH_PARTITION": "x", "SLURM_CONF": "/evil", "A": "1,2"})
    req = LaunchRequest(job_id=7, attempt=1, spec=spec, gpus=(), simulated=False,
                        env={"CUDA_VISIBLE_DEVICES": "", "GPUSCHED_JOB_ID": "7"},
                        log_path=tmp_path / "o", run_dir=tmp_path, owner_uid=1, owner="u")
    env = runner._job_env(req, pwd.getpwuid(0))
    assert env["A"] == "1,2" and env["GPUSCHED_JOB_ID"] == "7"
    assert not {"SBATCH_PARTITION", "SLURM_CONF", "CUDA_VISIBLE_DEVICES"} & set(env)


def test_what_slurm_prints() -> None:
    assert _exit_code("3:0") == 3 and _exit_code("0:9") == 137 and _exit_code(None) is None
    assert slurm_gpu_type("RTX 2070") == "rtx2070" and slurm_gpu_type("a4000") == "a4000"
    f = parse_fields("NodeName=vm Gres=gpu:a4000:1,gpu:rtx2070:1 GresUsed=gpu:a4000:1(IDX:0) "
                     "State=MIXED OS=Linux 6.1 #1 SMP")
    assert f["Gres"] == "gpu:a4000:1,gpu:rtx2070:1" and f["GresUsed"] == "gpu:a4000:1(IDX:0)"


def test_a_missing_slurm_command_makes_the_runner_unavailable(tmp_path: Path) -> None:
    runner = SlurmRunner(SlurmSettings(squeue=str(tmp_path / "no-squeue"),
                                       scontrol=str(tmp_path / "no-scontrol")), tmp_path)
    with pytest.raises(RunnerUnavailable, match="cannot run"):
        runner.queue(1.0)
    ok, detail = runner.health()  # within the back-off: the reason, without trying again
    assert not ok and "no-squeue" in detail
    ref = AttemptRef(job_id=1, n=1, runner="slurm", gpus=(), log_path=tmp_path / "o",
                     run_dir=tmp_path, started_at=0.0, slurm_job_id="5")
    with pytest.raises(RunnerUnavailable):
        runner.poll(ref, 2.0)


def test_a_v5_database_gains_notifications_and_the_slurm_job_id(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    database_at(path, 5)
    store = Store(path)
    try:
        assert store.schema_version() == len(MIGRATIONS) >= 8  # later migrations too
        cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(attempts)")]
        assert "slurm_job_id" in cols
        tables = {r[0] for r in sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "notifications" in tables
        indexes = {r[0] for r in sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "jobs_queue_order" in indexes  # v8: the queue in planning order
    finally:
        store.close()
