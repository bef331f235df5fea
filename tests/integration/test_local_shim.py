"""The local runner's shim, driven directly: what reconcile counts as a shim, and an attempt's
end reported until the daemon has committed it (issue 11, point 11)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.gpus import SimulatedInventory
from gpusched.models import JobSpec
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Outcome
from gpusched.runners.local import SHIM, SHIM_NAME, LocalRunner
from gpusched.testing.harness import SIM_GPUS


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[LocalRunner]:
    r = LocalRunner(tmp_path / "runs")
    yield r
    r.close()


def launch(runner: LocalRunner, tmp_path: Path, command: list[str], job: int = 1
           ) -> tuple[Launched, AttemptRef]:
    gpu = SimulatedInventory(SIM_GPUS).snapshot(lambda pid: None)[0]
    run_dir = tmp_path / "runs" / str(job) / "1"
    log = tmp_path / f"{job}.log"
    launched = runner.launch(LaunchRequest(
        job_id=job, attempt=1, spec=JobSpec(command=command, workdir="/tmp"), gpus=(gpu,),
        simulated=True, env={}, log_path=log, run_dir=run_dir, owner_uid=os.getuid(),
        owner="tester"))
    launched = runner.confirm(launched)  # as the daemon records it: with its start time
    return launched, AttemptRef(job_id=job, n=1, runner="local", gpus=(), log_path=log,
                                run_dir=run_dir, started_at=0, pid=launched.pid,
                                pid_start=launched.pid_start)


def wait_end(runner: LocalRunner, ref: AttemptRef, timeout: float = 30) -> Outcome:
    deadline = time.monotonic() + timeout
    while (outcome := runner.poll(ref, 0)) is None:
        assert time.monotonic() < deadline, "the attempt never ended"
        time.sleep(0.02)
    return outcome


def cmdline_count(argv: list[str]) -> int:
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as fh:
                n += fh.read() == want
    return n


def test_only_the_session_leader_counts_as_a_shim(runner: LocalRunner, tmp_path: Path) -> None:
    """The shim forks to run the command, and its child has the shim's command line until it
    execs: reconcile must count one shim, not two (the flaky ``[1, 1] == [1]``). The job's
    command here is a copy of its own shim's command line, so that child stays in place."""
    exit_file = tmp_path / "runs" / "1" / "1" / "exit"
    twin = ["/bin/sh", "-c", SHIM, SHIM_NAME, "/tmp", str(exit_file), "sleep", "30"]
    launched, _ = launch(runner, tmp_path, twin)
    assert launched.pid is not None
    try:
        deadline = time.monotonic() + 30
        while cmdline_count(twin) < 1:  # the shim's child, with the shim's own argv
            assert time.monotonic() < deadline, "the twin never started"
            time.sleep(0.02)
        found = runner.orphans(set())
        assert [(o.job_id, o.attempt) for o in found] == [(1, 1)]
        assert found[0].handle[0] == launched.pid
        assert runner.orphans({(1, 1)}) == []
    finally:
        os.killpg(launched.pid, signal.SIGKILL)


def test_the_end_is_reported_until_cleanup_even_without_an_exit_file(
        runner: LocalRunner, tmp_path: Path) -> None:
    """The shim could not write its exit file (here: the job put a directory in its place; in
    life: a full disk): the shim's own exit status is the command's, and poll keeps reporting
    that same end until cleanup() (the daemon may fail to commit it and ask again)."""
    exit_file = tmp_path / "runs" / "1" / "1" / "exit"
    _, ref = launch(runner, tmp_path, ["sh", "-c", f"rm -f {exit_file}; mkdir {exit_file}; exit 3"])
    first = wait_end(runner, ref)
    assert first.exit_code == 3, first
    assert not first.lost, first
    assert "exit file" in (first.reason or ""), first
    assert runner.wait_fds() == []  # ended: nothing to wake the daemon any more
    for _ in range(3):
        assert runner.poll(ref, 1000.0) == first
    runner.cleanup(ref)
    # forgotten: without the process or an exit file, it now looks lost
    assert runner.poll(ref, 1000.0) == Outcome(
        exit_code=None, ended_at=1000.0, lost=True, reason="the job's process is gone and left "
        "no exit status (the exit file is refused (" + f"{exit_file} is not a regular file))")


def test_the_shim_exits_with_the_commands_status(runner: LocalRunner, tmp_path: Path) -> None:
    _, ref = launch(runner, tmp_path, ["sh", "-c", "exit 7"])
    assert wait_end(runner, ref).exit_code == 7
    assert runner._procs[ref.key].returncode == 7  # what a daemon holding the Popen learns
    assert (ref.run_dir / "exit").read_text() == "7\n"

