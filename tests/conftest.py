from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.config import Settings
from gpusched.gpus import SimulatedInventory
from gpusched.runners.local import LocalRunner
from gpusched.service import Service
from gpusched.testing import users as real
from gpusched.testing.clock import FakeClock
from gpusched.testing.harness import SIM_GPUS, DaemonProcess, short_tmpdir
from gpusched.testing.users import UNAVAILABLE


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def settings(state_dir: Path) -> Settings:
    return Settings(state_dir=state_dir, socket=state_dir / "gpusched.sock",
                    gpus={"simulate": SIM_GPUS, "release_timeout_s": 5},
                    docker={"enabled": False}, scheduler={"kill_grace_s": 2})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(settings: Settings, clock: FakeClock) -> Iterator[Service]:
    """A daemon driven by hand: ``service.daemon.tick(clock.now())``, no loop, no sleeps."""
    svc = Service(settings, inventory=SimulatedInventory(SIM_GPUS),
                  runners={"local": LocalRunner.of(settings)}, clock=clock)
    yield svc
    svc.close()


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[DaemonProcess]:
    """The real daemon as a subprocess on two simulated GPUs."""
    d = DaemonProcess(state_dir).start()
    yield d
    d.stop()


# -- real users (promise 9): the fixtures skip where this host cannot create users ------------

@pytest.fixture(scope="session")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """gsuser1, gsuser2 and gsadmin1 (in group gsrel-admin), created for the run."""
    if not real.available():
        pytest.skip(UNAVAILABLE)
    with real.real_users() as found:
        yield found


@pytest.fixture
def root_daemon(users: dict[str, pwd.struct_passwd]) -> Iterator[DaemonProcess]:
    """The real daemon as root, with gsrel-admin as its admin group."""
    with real.root_daemon() as d:
        yield d


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory (like /tmp) for users' working directories."""
    d = short_tmpdir("gsshared")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)
