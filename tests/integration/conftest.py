"""Fixtures of the integration tier."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"


@pytest.fixture
def root() -> Iterator[Path]:
    """A world-readable experiment directory in /tmp holding the example's train spec."""
    d = Path(tempfile.mkdtemp(prefix="gstr", dir="/tmp"))
    os.chmod(d, 0o755)
    (d / "spec.txt").write_text(EXAMPLE_SPEC.read_text())
    yield d
    shutil.rmtree(d, ignore_errors=True)
