"""No raw errors: bad input through the real CLI is a message (one line per problem, with a hint
where one helps), never a traceback; and reports go where -o says, in every format."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.errors import SpecError
from gpusched.testing.harness import DaemonProcess, short_tmpdir

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    root = short_tmpdir("gsm")
    daemon = DaemonProcess(root / "state").start()
    yield daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


def test_ls_refuses_an_unknown_status_with_the_valid_names(d: DaemonProcess) -> None:
    r = d.cli("ls", "--status", "runing")
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    assert "'runing' is not a status" in r.stderr
    for name in ("queued", "held", "running", "succeeded", "failed", "cancelled"):
        assert name in r.stderr


def test_daemon_log_level_bogus_is_a_message() -> None:
    env = {k: v for k, v in DaemonProcess(Path("/nonexistent")).env.items()}
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "daemon", "--log-level", "bogus"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    assert r.stderr.count("\n") == 1, r.stderr
    assert "log_level: unknown log level (got 'bogus')" in r.stderr
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in r.stderr


@pytest.mark.parametrize("argv", [["report", "throughput"], ["report", "throughput", "--format", "csv"],
                                  ["report", "timeline"], ["report", "timeline", "--format", "svg"]])
def test_report_into_a_missing_directory_is_a_message(d: DaemonProcess, argv: list[str]) -> None:
    r = d.cli(*argv, "-o", "/missing/dir/x")
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    assert r.stderr == "gpusched: cannot write /missing/dir/x: the directory /missing/dir does not exist\n"


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "html"])
def test_report_throughput_writes_the_file_for_every_format(d: DaemonProcess, tmp_path: Path,
                                                            fmt: str) -> None:
    out = tmp_path / f"report.{fmt}"
    r = d.cli("report", "throughput", "--format", fmt, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out}\n"
    text = out.read_text()
    if fmt == "html":
        assert "<html" in text
        return
    direct = d.cli("report", "throughput", "--format", fmt)
    if fmt == "json":
        assert json.loads(text)["sets"] == [] and json.loads(direct.stdout)["sets"] == []
    else:
        assert text == direct.stdout  # the same report, in the file instead of on stdout


def test_a_pipeline_gate_error_is_one_line_with_the_hint(d: DaemonProcess, tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('name = "p"\n[stages.train]\ntask = "train"\nspec = "s.txt"\nresults = "r"\n'
                    '[gate]\ncandidate = "train"\nbaseline = "train"\nmax_drop = 2\n')
    r = d.cli("pipeline", "run", str(toml))
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    assert r.stderr == ("gpusched: bad pipeline: gate.max_drop: Input should be less than 1 "
                        "(got 2); max_drop is a fraction of mAP: 0.02 = 2 points\n")
    assert "pydantic.dev" not in r.stderr


def test_an_invalid_request_names_each_field_on_its_own_line(d: DaemonProcess) -> None:
    with pytest.raises(SpecError) as err:
        d.client().post("/v1/jobs", {"command": ["true"], "priority": 5000,
                                     "gpus": {"count": -1}})
    lines = err.value.message.split("\n")
    assert len(lines) == 2, lines
    assert all(line.startswith("invalid request: ") for line in lines)
    assert any(re.search(r"priority: .*\(got 5000\); higher runs first", x) for x in lines)
    assert any(re.search(r"gpus\.count: .*\(got -1\); a number of GPUs", x) for x in lines)


def test_tao_mounts_is_read_safely_and_its_errors_are_lines(tmp_path: Path) -> None:
    """A FIFO as ~/.tao_mounts.json is refused at once (a plain open would block the CLI), and a
    bad file gets one line per problem, before anything reaches the daemon."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**DaemonProcess(tmp_path / "state").env, "HOME": str(home)}
    argv = [sys.executable, "-m", "gpusched.cli", "submit", "--tao-mounts", "--image",
            "nvcr.io/nvidia/tao/tao-toolkit:5.0.0-tf1.15.5", "--", "true"]
    fifo = home / ".tao_mounts.json"
    os.mkfifo(fifo)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    assert f"cannot read {fifo}" in r.stderr and "regular file" in r.stderr
    fifo.unlink()
    fifo.write_text(json.dumps({"Mounts": [{"source": str(home)}],
                                "DockerOptions": {"shm_size": "lots"}}))
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    assert r.stderr.splitlines() == [
        "gpusched: ~/.tao_mounts.json: Mounts.0.destination: Field required; a list of "
        '{"source": HOST_PATH, "destination": CONTAINER_PATH}',
        "gpusched: ~/.tao_mounts.json: DockerOptions.shm_size: bad size 'lots': use a number "
        "with an optional unit, e.g. 10G or 512M (got 'lots')"]
