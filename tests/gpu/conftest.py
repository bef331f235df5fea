"""Real-GPU tests: marked ``gpu`` and skipped, with the reason, where NVML or nvidia-smi is
missing, so the suite stays green on machines without an NVIDIA GPU."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.errors import NvmlUnavailable
from gpusched.gpus import NvmlInventory

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def nvidia_smi() -> str:
    path = shutil.which("nvidia-smi")
    if path is None:
        pytest.skip("nvidia-smi is not on PATH: no NVIDIA driver here")
    return path


@pytest.fixture
def inventory(nvidia_smi: str) -> Iterator[NvmlInventory]:
    try:
        inv = NvmlInventory()
    except NvmlUnavailable as err:
        pytest.skip(f"NVML does not initialise here: {err.message}")
    try:
        yield inv
    finally:
        inv.close()


@functools.cache
def _python_with_torch() -> str | None:
    # The project's venv need not hold PyTorch; a GPU machine's system python3 often does.
    candidates = [sys.executable, shutil.which("python3")]
    for exe in candidates:
        if exe is None:
            continue
        probe = subprocess.run(
            [exe, "-c", "import torch; assert torch.cuda.is_available()"],
            capture_output=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
        )
        if probe.returncode == 0:
            return exe
    return None


@pytest.fixture
def torch_python(inventory: NvmlInventory) -> str:
    exe = _python_with_torch()
    if exe is None:
        pytest.skip("no Python here can import torch with CUDA")
    return exe


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets fixtures see whether the test failed (rep_call), to print the daemon's log then.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
