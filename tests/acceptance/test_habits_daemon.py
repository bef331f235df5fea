"""Issue 16 end to end: the real daemon as a subprocess, the real CLI, real signals, a real
HTTP receiver: --time stops a job at its limit, --notify-url and --notify deliver its end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.testing.harness import DaemonProcess
from gpusched.testing.receiver import Receiver

pytestmark = pytest.mark.acceptance


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_time_limit_and_notifications_on_the_real_daemon(daemon: DaemonProcess,
                                                        receiver: Receiver,
                                                        tmp_path: Path) -> None:
    note = tmp_path / "note"
    r = daemon.cli("submit", "--time", "0:02", "--notify-url", receiver.url, "--notify",
                   f"echo $GPUSCHED_JOB_STATUS $GPUSCHED_EXIT_CODE > {note}", "--",
                   "sleep", "300")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    t0 = time.monotonic()
    w = daemon.cli("wait", str(job), "--timeout", "60", timeout=90)
    took = time.monotonic() - t0
    assert w.returncode == 1 and "time limit (2 s)" in w.stdout, w.stdout + w.stderr
    assert took < 30  # stopped at its limit, not after sleep's 300 s
    deadline = time.monotonic() + 30
    while not (receiver.bodies and note.exists() and note.read_text()):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert (receiver.bodies[0]["id"], receiver.bodies[0]["status"]) == (job, "failed")
    assert receiver.bodies[0]["reason"] == "time limit (2 s)"
    assert note.read_text().split() == ["failed", str(128 + 15)]
