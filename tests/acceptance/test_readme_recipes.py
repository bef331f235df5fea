"""The README's recipes work as written: the install section and the fake-TAO configuration."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from test_tao_stages import SCALE, queue_stage, show, small_spec, wait_ended

from gpusched.testing.harness import DaemonProcess

pytestmark = pytest.mark.acceptance

README = Path(__file__).resolve().parents[2] / "README.md"
VENV_PYTHON = "/opt/gpusched/bin/python"  # the install section's venv


def fake_tao_recipe() -> str:
    """The README's TOML block that sets ``tao.local_command``."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if "local_command" in b]
    assert len(found) == 1, "the README should hold one [tao] local_command recipe"
    return found[0]


def test_readme_does_not_promise_an_install_from_pypi() -> None:
    text = README.read_text()
    assert not re.search(r"pip install tao-gpusched\b", text)
    assert "not on PyPI yet" in text
    install = text[text.index("## Install"):text.index("### Run it as a service")]
    assert f"{VENV_PYTHON[:-len('/bin/python')]}/bin/pip install" in install


def test_fake_tao_recipe_names_the_venv_python() -> None:
    tao = tomllib.loads(fake_tao_recipe())["tao"]
    assert tao["runner"] == "local"
    # a bare python3 is the system's: stages run with a fixed PATH, not the submitter's
    assert tao["local_command"][0] == VENV_PYTHON


def test_fake_tao_recipe_as_written_runs_a_stage(root: Path) -> None:
    """The recipe, with the venv's python in place of /opt/gpusched's, trains a stage."""
    recipe = fake_tao_recipe().replace(VENV_PYTHON, sys.executable)
    config = root / "gpusched.toml"
    config.write_text(recipe)
    d = DaemonProcess(root / "state", env={"GPUSCHED_CONFIG": str(config)}).start()
    try:
        spec = small_spec(root / "train.txt", num_epochs=2, checkpoint_interval=1,
                          validation_period=1)
        job = queue_stage(d, "-e", SCALE, "ssd", "train", "-e", str(spec), "-r", str(root / "r"))
        wait_ended(d, [job])
        j = show(d, job)
        assert j["status"] == "succeeded", (j["reason"], d.cli("logs", str(job)).stdout[-2000:])
        assert j["command"][:3] == [sys.executable, "-m", "gpusched.testing.fake_tao"]
    finally:
        d.stop()
