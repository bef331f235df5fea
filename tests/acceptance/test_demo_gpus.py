"""The demo prints its GPU list: the daemon serves before its first inventory is in, so the
list read right after start-up was empty and the demo printed no GPU at all."""

from __future__ import annotations

import shutil

import pytest

from gpusched import demo
from gpusched.testing.harness import SIM_GPUS, DaemonProcess, short_tmpdir

pytestmark = pytest.mark.acceptance


def test_wait_for_gpus_returns_the_simulated_inventory() -> None:
    root = short_tmpdir("gsg")
    d = DaemonProcess(root / "state", simulate=SIM_GPUS).start()
    try:
        gpus = demo.wait_for_gpus(d.client())
        assert [(g["index"], g["name"], g["simulated"]) for g in gpus] == [
            (0, "RTX A4000", True), (1, "RTX 2070", True)]
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
