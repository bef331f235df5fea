"""No silent waits: a queued job says why it waits in `ls`, `show` and `top`, also when the
planner does not consider it (its runner is unavailable, an --after job has not succeeded)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest

from gpusched.testing.harness import DaemonProcess, short_tmpdir

pytestmark = pytest.mark.acceptance

IMAGE = "nvcr.io/nvidia/tao/tao-toolkit:5.0.0-tf1.15.5"


@pytest.fixture
def no_docker() -> Iterator[DaemonProcess]:
    """A daemon whose Docker endpoint does not exist (Docker not installed or stopped)."""
    root = short_tmpdir("gsw")
    d = DaemonProcess(root / "state", env={
        "GPUSCHED_DOCKER__ENABLED": "true",
        "GPUSCHED_DOCKER__BASE_URL": f"unix://{root}/no-docker.sock",
        "GPUSCHED_DOCKER__TIMEOUT_S": "2"}).start()
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def submit(d: DaemonProcess, *args: str) -> int:
    r = d.cli("submit", *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def waiting_reason(d: DaemonProcess, job: int, contains: str, timeout: float = 30) -> str:
    """The job's waiting reason once it says ``contains`` (the launch that meets the missing
    Docker happens on a tick: wait for that condition, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        row = d.show(job)
        assert row["status"] == "queued", row
        if contains in (row.get("waiting_reason") or ""):
            return str(row["waiting_reason"])
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} waits with {row.get('waiting_reason')!r}:\n{d.log()}")
        time.sleep(0.1)


def test_a_job_whose_runner_is_unavailable_says_so(no_docker: DaemonProcess) -> None:
    d = no_docker
    job = submit(d, "--image", IMAGE, "--name", "in-a-container", "--", "true")
    why = waiting_reason(d, job, "the docker runner is unavailable")
    show = d.cli("show", str(job)).stdout
    assert f"waiting:     {why}" in show
    ls = d.cli("ls").stdout
    assert "the docker runner is unavailable" in ls, ls
    listed = {j["id"]: j for j in json.loads(d.cli("ls", "--json").stdout)}
    assert listed[job]["waiting_reason"].startswith("the docker runner is unavailable")
    top = d.cli("top", "--once").stdout
    assert "in-a-container" in top and "the docker runner is unavailable" in top, top
    local = submit(d, "--", "true")  # the local runner goes on
    assert d.wait_status(local, ["succeeded"])["status"] == "succeeded"


def test_a_job_waiting_for_an_upstream_job_names_it(daemon: DaemonProcess) -> None:
    d = daemon
    up = submit(d, "--hold", "--name", "prepare-data", "--", "true")
    down = submit(d, "--after", str(up), "--name", "train", "--", "true")
    why = d.show(down)["waiting_reason"]
    assert why == f"after job {up} prepare-data (held)"
    assert why in d.cli("ls").stdout
    assert why in d.cli("top", "--once").stdout
    assert d.cli("release", str(up)).returncode == 0
    assert d.wait_status(down, ["succeeded"])["status"] == "succeeded"
