from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.testing.harness import DaemonProcess, fake_tao_env, short_tmpdir


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory under /tmp (an allowed mount root) for specs, results and state."""
    d = short_tmpdir("gst")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tao_daemon(root: Path) -> Iterator[DaemonProcess]:
    """The real daemon on simulated GPUs, running TAO stages on the fake TAO."""
    d = DaemonProcess(root / "state", env=fake_tao_env()).start()
    yield d
    d.stop()
