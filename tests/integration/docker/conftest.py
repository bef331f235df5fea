"""A real dockerd for the container runner's tests (never a mock of the Engine API).

``GPUSCHED_TEST_DOCKER_HOST`` names one that is already running (CI starts one for the whole
run); otherwise ``scripts/dockerd-test`` starts a private one for the session. Where none can
run the tests skip with the reason, unless ``GPUSCHED_REQUIRE_DOCKER=1`` makes that a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.testing.tiers import mark_under, private_backend

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "dockerd-test"
IMAGE = "gpusched-test:latest"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_under(items, Path(__file__).parent, pytest.mark.docker)


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    """The DOCKER_HOST URL of a dockerd that has the image gpusched-test:latest."""
    given = os.environ.get("GPUSCHED_TEST_DOCKER_HOST")
    if given:
        yield given
        return
    with private_backend("docker", "dockerd", SCRIPT, "DOCKER_HOST", prefix="gsd",
                         start_timeout=240) as (host, _):
        yield host
