"""Settings: file, then environment, then flags; the shipped files are real and complete."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gpusched.config import Settings, load_settings
from gpusched.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_keys(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field
    return out


def test_etc_config_lists_every_key_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "etc" / "gpusched.toml").read_text()
    uncommented = tomllib.loads(text)
    section = ""
    listed: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            section = m.group(1) + "."
            continue
        m = re.match(r"^#?\s?(\w+) = ", line)
        if m:
            listed.add(section + m.group(1))
    expected = set(_keys(Settings))
    assert expected - listed == set(), "keys missing from etc/gpusched.toml"
    assert listed - expected == set(), "etc/gpusched.toml lists unknown keys"
    # every uncommented value is the default
    monkeypatch.delenv("GPUSCHED_STATE_DIR", raising=False)
    defaults = Settings().model_dump()
    for sect, values in uncommented.items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert defaults[sect][k] == v, f"{sect}.{k}"
        else:
            assert defaults[sect] == values, sect


def test_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('log_level = "DEBUG"\n[gpus]\nsimulate = "A:1G"\npoll_interval_s = 2\n'
                    '[docker]\nimages = ["x/*"]\n')
    monkeypatch.setenv("GPUSCHED_CONFIG", str(conf))
    s = load_settings()
    assert (s.log_level, s.gpus.simulate, s.gpus.poll_interval_s, s.docker.images) == (
        "DEBUG", "A:1G", 2.0, ["x/*"])
    monkeypatch.setenv("GPUSCHED_GPUS__SIMULATE", "B:2G")
    monkeypatch.setenv("GPUSCHED_LOG_LEVEL", "WARNING")
    s = load_settings()
    assert (s.gpus.simulate, s.log_level, s.gpus.poll_interval_s) == ("B:2G", "WARNING", 2.0)
    s = load_settings(log_level="ERROR", state_dir=tmp_path / "st")
    assert s.log_level == "ERROR"
    assert s.socket == tmp_path / "st" / "gpusched.sock"  # the socket follows the state dir


def test_bad_config_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text("[gpus]\npoll_interval_s = -1\n")
    monkeypatch.setenv("GPUSCHED_CONFIG", str(conf))
    with pytest.raises(ConfigError, match="poll_interval_s"):
        load_settings()
    conf.write_text("[gpus\n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings()
    monkeypatch.setenv("GPUSCHED_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_config_errors_are_one_line_per_field(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('log_level = "loud"\n[metrics]\nport = 70000\n')
    monkeypatch.setenv("GPUSCHED_CONFIG", str(conf))
    with pytest.raises(ConfigError) as err:
        load_settings()
    lines = err.value.message.split("\n")
    assert len(lines) == 2, lines
    assert all(line.startswith(f"bad configuration (file {conf}") for line in lines)
    assert lines[0].endswith("log_level: unknown log level (got 'loud'); one of DEBUG, INFO, "
                             "WARNING, ERROR, CRITICAL")
    assert "metrics.port: Input should be less than or equal to 65535 (got 70000); a TCP port" \
        in lines[1]
    assert "pydantic.dev" not in err.value.message
    conf.write_text("")
    assert load_settings(log_level="debug").log_level == "DEBUG"


def test_validation_lines_name_field_value_and_hint() -> None:
    from pydantic import ValidationError

    from gpusched.errors import explain_validation, validation_lines
    from gpusched.pipelines import GateDef

    with pytest.raises(ValidationError) as err:
        GateDef(candidate="c", baseline="b", max_drop=2, backoff=0)
    assert validation_lines(err.value) == [
        "max_drop: Input should be less than 1 (got 2); max_drop is a fraction of mAP: 0.02 = 2 points",
        "backoff: Input should be greater than 0 (got 0); the next threshold is the lowest tried "
        "× backoff: a fraction, e.g. 0.5"]
    assert explain_validation(err.value, "bad gate").startswith("bad gate: max_drop: ")
    many = [{"x": i} for i in range(15)]

    class Many(BaseModel):
        items: list[int]

    with pytest.raises(ValidationError) as err:
        Many(items=many)  # type: ignore[arg-type]
    lines = validation_lines(err.value)
    assert len(lines) == 11 and lines[-1] == "... and 5 more"


def test_default_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GPUSCHED_STATE_DIR", "GPUSCHED_SOCKET", "GPUSCHED_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUSCHED_CONFIG", "/dev/null")
    s = load_settings()
    if os.geteuid() == 0:
        assert (s.state_dir, s.socket) == (Path("/var/lib/gpusched"),
                                           Path("/run/gpusched/gpusched.sock"))
    else:
        assert s.state_dir.name == "gpusched"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    exe = shutil.which("gpusched") or str(Path(os.sys.executable).parent / "gpusched")
    unit = (ROOT / "systemd" / "gpusched.service").read_text().replace(
        "/usr/local/bin/gpusched", exe)
    assert "Type=notify" in unit and "KillMode=process" in unit and "WatchdogSec=" in unit
    path = tmp_path / "gpusched.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                       timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if "gpusched.service" in ln and "Documentation" not in ln]
    assert r.returncode == 0 or not problems, r.stdout + r.stderr


def test_readme_documents_every_command_and_key() -> None:
    from typer.main import get_command

    from gpusched.cli import app

    readme = (ROOT / "README.md").read_text()
    cli = get_command(app)
    names = list(cli.commands)  # type: ignore[attr-defined]
    for name in names:
        sub = cli.commands[name]  # type: ignore[attr-defined]
        subs = list(getattr(sub, "commands", {}) or [])
        for full in [name] + [f"{name} {s}" for s in subs]:
            assert f"gpusched {full}" in readme, f"README does not document `gpusched {full}`"
    for key in _keys(Settings):
        assert key.split(".")[-1] in readme, f"README does not mention config key {key}"
