"""A real one-node Slurm cluster (slurmctld, slurmd, munged) for the Slurm runner's tests.

``GPUSCHED_TEST_SLURM_CONF`` (and ``GPUSCHED_TEST_SLURM_DIR``, the directory scripts/slurm-test
started it in) name one that already runs (CI starts one for the whole run); otherwise
``scripts/slurm-test`` starts a private one for the session. Where none can run the tests skip
with the reason, unless ``GPUSCHED_REQUIRE_SLURM=1`` makes that a failure. Jobs run as the real
test users (the Slurm runner never runs a job as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpusched.testing.harness import short_tmpdir
from gpusched.testing.slurm import SCRIPT, Cluster, SlurmDaemon
from gpusched.testing.tiers import mark_under, private_backend
from gpusched.testing.users import ADMIN_GROUP


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_under(items, Path(__file__).parent, pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm() -> Iterator[Cluster]:
    given = os.environ.get("GPUSCHED_TEST_SLURM_CONF")
    if given:
        d = os.environ.get("GPUSCHED_TEST_SLURM_DIR")
        yield Cluster(given, Path(d) if d else None)
        return
    with private_backend("slurm", "Slurm", SCRIPT, "GPUSCHED_TEST_SLURM_CONF", prefix="gssl",
                         start_timeout=300) as (conf, base):
        yield Cluster(conf, base)


@pytest.fixture
def slurm_daemon_factory(slurm: Cluster, users: dict[str, pwd.struct_passwd],
                         request: pytest.FixtureRequest
                         ) -> Iterator[Callable[..., SlurmDaemon]]:
    """Start root daemons with the Slurm runner on this test's own slurm.instance."""
    slurm.settle()  # every test starts on an idle cluster (the previous one's jobs are gone)
    started: list[SlurmDaemon] = []
    state = short_tmpdir("gsslurm")
    os.chmod(state, 0o755)  # like /var/lib/gpusched: users reach their run folders
    instance = f"t{os.getpid()}{abs(hash(request.node.nodeid)) % 10**6}"

    def make(**env: str) -> SlurmDaemon:
        d = SlurmDaemon(state, env={
            "GPUSCHED_API__ADMIN_GROUP": ADMIN_GROUP, "GPUSCHED_SLURM__ENABLED": "true",
            "GPUSCHED_SLURM__CONF": slurm.conf, "GPUSCHED_SLURM__INSTANCE": instance,
            "GPUSCHED_SCHEDULER__TICK_INTERVAL_S": "0.5",
            "GPUSCHED_SCHEDULER__RECONCILE_INTERVAL_S": "2", **env})
        d.cluster, d.user = slurm, users["gsuser1"]
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()
    # whatever a failed test left in Slurm goes with it
    for sid in slurm.with_comment(f"gpusched:{instance}:", prefix=True):
        slurm.run("scancel", sid)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def slurm_daemon(slurm_daemon_factory: Callable[..., SlurmDaemon]) -> SlurmDaemon:
    return slurm_daemon_factory()
