"""Test tiers that need a real backend (dockerd, Slurm) started by a script of ``scripts/``.

A tier's conftest marks its tests, and a session fixture either uses a backend named by the
environment (CI starts one for the whole run) or starts a private one with the script's
``start DIR`` (whose stdout has a ``KEY=value`` line) and ends it with ``stop DIR``. Where none
can run, the tests skip with the reason, unless ``GPUSCHED_REQUIRE_<TIER>=1`` makes that a
failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest


def mark_under(items: list[pytest.Item], here: Path, marker: pytest.MarkDecorator) -> None:
    """Mark every collected test below ``here``."""
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(marker)


def unavailable(tier: str, what: str, reason: str) -> NoReturn:
    """Skip (or fail, under ``GPUSCHED_REQUIRE_<TIER>=1``) for want of ``what``."""
    var = f"GPUSCHED_REQUIRE_{tier.upper()}"
    if os.environ.get(var) == "1":
        pytest.fail(f"{var}=1 but no {what}: {reason}", pytrace=False)
    pytest.skip(f"no {what}: {reason}")


@contextmanager
def private_backend(tier: str, what: str, script: Path, key: str, *, prefix: str,
                    start_timeout: float) -> Iterator[tuple[str, Path]]:
    """``script start DIR`` in a fresh short DIR (unix socket paths stay under 108 bytes):
    (the value of its ``KEY=`` line, DIR); ``script stop DIR`` afterwards."""
    if os.geteuid() != 0:
        unavailable(tier, what, f"the tests start their own {what}, which needs root")
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        proc = subprocess.run([str(script), "start", base], capture_output=True, text=True,
                              timeout=start_timeout)
    except subprocess.TimeoutExpired:
        subprocess.run([str(script), "stop", base], capture_output=True, timeout=120)
        unavailable(tier, what, f"scripts/{script.name} start timed out")
    if proc.returncode != 0:
        subprocess.run([str(script), "stop", base], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
        unavailable(tier, what, proc.stderr.strip() or proc.stdout.strip() or
                    f"{script.name} failed")
    line = [x for x in proc.stdout.splitlines() if x.startswith(f"{key}=")]
    try:
        yield line[-1].split("=", 1)[1], Path(base)
    finally:
        subprocess.run([str(script), "stop", base], capture_output=True, timeout=120)
