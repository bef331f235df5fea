"""A real dockerd for the container runner's tests (never a mock of the Engine API).

``GPUSCHED_TEST_DOCKER_HOST`` names one that is already running (CI starts one for the whole
run); otherwise ``scripts/dockerd-test`` starts a private one for the session. Where none can
run the tests skip with the reason, unless ``GPUSCHED_REQUIRE_DOCKER=1`` makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "dockerd-test"
IMAGE = "gpusched-test:latest"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("GPUSCHED_REQUIRE_DOCKER") == "1":
        pytest.fail(f"GPUSCHED_REQUIRE_DOCKER=1 but no dockerd: {reason}", pytrace=False)
    pytest.skip(f"no dockerd: {reason}")


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    """The DOCKER_HOST URL of a dockerd that has the image gpusched-test:latest."""
    given = os.environ.get("GPUSCHED_TEST_DOCKER_HOST")
    if given:
        yield given
        return
    if os.geteuid() != 0:
        _unavailable("the tests start their own dockerd, which needs root")
    # Short: the socket path must stay under 108 bytes.
    base = tempfile.mkdtemp(prefix="gsd", dir="/tmp")
    try:
        proc = subprocess.run(
            [str(SCRIPT), "start", base], capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        subprocess.run([str(SCRIPT), "stop", base], capture_output=True, timeout=60)
        _unavailable("scripts/dockerd-test start timed out")
    if proc.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", base], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(proc.stderr.strip() or proc.stdout.strip() or "dockerd-test failed")
    line = [x for x in proc.stdout.splitlines() if x.startswith("DOCKER_HOST=")]
    host = line[-1].split("=", 1)[1]
    try:
        yield host
    finally:
        subprocess.run([str(SCRIPT), "stop", base], capture_output=True, timeout=120)
