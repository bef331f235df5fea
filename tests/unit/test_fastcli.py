"""The fast path of ``gpusched submit`` / ``gpusched ls`` (gpusched.fastcli) parses exactly as
the typer commands do, or leaves the command line to them; --array and --from-file parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from typer.main import get_command

from gpusched import cli_submit, fastcli
from gpusched.cli import app
from gpusched.errors import SpecError

TABLES = {"submit": (fastcli.SUBMIT_OPTIONS, fastcli.SUBMIT_DEFAULTS, "command"),
          "ls": (fastcli.LS_OPTIONS, fastcli.LS_DEFAULTS, None)}


def _command(name: str) -> click.Command:
    group = get_command(app)
    assert isinstance(group, click.Group)
    return group.commands[name]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_tables_are_the_typer_commands_options(name: str) -> None:
    options, defaults, rest = TABLES[name]
    cmd = _command(name)
    want: dict[str, tuple[str, str]] = {}
    want_defaults: dict[str, Any] = {}
    for p in cmd.params:
        assert p.name is not None
        if isinstance(p, click.Argument):
            assert p.name == rest
            want_defaults[p.name] = None
            continue
        assert isinstance(p, click.Option)
        if p.name == "help":
            continue
        kind = ("flag" if p.is_flag else "multi" if p.multiple else
                "int" if isinstance(p.type, click.types.IntParamType) else "str")
        assert kind == "flag" or isinstance(p.type, click.types.IntParamType | click.types.StringParamType), p
        for opt in p.opts:
            want[opt] = (p.name, kind)
        want_defaults[p.name] = [] if p.multiple else p.default
    assert options == want
    assert defaults == want_defaults


SUBMIT_LINES = [
    ["--", "true"], ["true"], ["--gpus", "2", "--", "python", "train.py", "--lr", "1"],
    ["-g", "0,1", "--name=sweep", "-e", "A=1", "--env", "B=2", "-p", "-5", "--hold", "true"],
    ["--array", "0-9", "--json", "--", "sh", "-c", "echo $GPUSCHED_ARRAY_INDEX"],
    ["--from-file", "-", "--gpus", "0"], ["--priority", " 7 ", "--", "x"], ["-v", "a:b", "x"],
    ["--name", "-x", "--", "true"], ["--gpus", "1", "--gpus", "2", "run", "--gpus", "3"],
    ["--wrap", "make && ./run", "--time", "10m"], ["--", "--not-an-option"], ["-"], [],
]
LS_LINES = [[], ["--all"], ["-a", "--limit", "5"], ["--status", "queued,held", "--mine"],
            ["--name=x", "--json"], ["--limit", "3", "--limit", "4"]]
#: lines the fast path leaves to typer (its messages, help, rules for the rare forms)
DEFERRED = {"submit": [["--help"], ["-h"], ["--gpu", "2", "--", "true"], ["-g2", "--", "x"],
                       ["--gpus"], ["--priority", "high", "--", "x"], ["--hold=1", "true"]],
            "ls": [["--help"], ["extra"], ["--limit", "x"], ["--all=1"], ["--limit"]]}


@pytest.mark.parametrize(("name", "args"), [("submit", a) for a in SUBMIT_LINES]
                         + [("ls", a) for a in LS_LINES])
def test_the_fast_parse_is_clicks(name: str, args: list[str]) -> None:
    options, defaults, rest = TABLES[name]
    fast = fastcli.parse(options, defaults, args, rest=rest)
    assert fast is not None, f"the fast path should handle {args}"
    ctx = _command(name).make_context(name, list(args))
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()}
    if rest is not None and want.get(rest) == []:
        want[rest] = None
    assert fast == want


@pytest.mark.parametrize(("name", "args"), [(n, a) for n, lines in DEFERRED.items()
                                            for a in lines])
def test_the_rest_is_left_to_typer(name: str, args: list[str]) -> None:
    options, defaults, rest = TABLES[name]
    assert fastcli.parse(options, defaults, args, rest=rest) is None


def test_the_fast_path_imports_neither_typer_click_pydantic_nor_the_daemon() -> None:
    code = ("import sys; import gpusched.fastcli, gpusched.cli_submit, gpusched.cli_list, "
            "gpusched.client, gpusched.paths; "
            "bad = [m for m in ('typer', 'click', 'pydantic', 'rich', 'gpusched.daemon', "
            "'gpusched.models', 'gpusched.server', 'sqlite3') if m in sys.modules]; "
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


@pytest.mark.parametrize(("text", "want"), [
    ("0-4", [0, 1, 2, 3, 4]), ("1,3,5", [1, 3, 5]), ("0-10:5", [0, 5, 10]), ("7", [7]),
    ("0-3,8", [0, 1, 2, 3, 8]), (" 2 , 1 ", [2, 1]), ("1-3,2-4", [1, 2, 3, 4]),
])
def test_array_ranges(text: str, want: list[int]) -> None:
    assert cli_submit.parse_array(text) == want


@pytest.mark.parametrize(("text", "says"), [
    ("", "use a range"), ("1,,2", "use a range"), ("a-b", "'a-b' is not"), ("-1", "not an"),
    ("5-1", "must go up"), ("0-10:0", "step of at least 1"), ("0-10000", "more than 10,000"),
    ("0-2000000", "up to 1,000,000"),
])
def test_bad_arrays_say_what_to_give(text: str, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        cli_submit.parse_array(text)


def test_job_lines_are_split_as_a_shell_would(tmp_path: Path) -> None:
    f = tmp_path / "jobs.txt"
    f.write_text("# a sweep\n\npython train.py --lr 0.1\n  \n"
                 "python train.py --name 'a b' # why\n\t# indented comment\necho \"x\\\"y\"\n")
    commands, lines = cli_submit.read_job_lines(str(f))
    assert commands == [["python", "train.py", "--lr", "0.1"],
                        ["python", "train.py", "--name", "a b"], ["echo", 'x"y']]
    assert lines == [3, 5, 7]


@pytest.mark.parametrize(("content", "says"), [
    (b"true\necho 'open\n", "line 2: No closing quotation"),
    (b"true\n\xff\n", "line 2: not UTF-8"), (b"# only\n\n", "holds no command"),
    (b"true\nx\x00y\n", "line 2: contains a NUL byte"),
])
def test_a_bad_job_line_is_named(tmp_path: Path, content: bytes, says: str) -> None:
    f = tmp_path / "jobs.txt"
    f.write_bytes(content)
    with pytest.raises(SpecError, match=says):
        cli_submit.read_job_lines(str(f))


def test_too_many_job_lines_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "jobs.txt"
    f.write_text("true\n" * (cli_submit.MAX_BATCH + 1))
    with pytest.raises(SpecError, match="more than 10,000 commands"):
        cli_submit.read_job_lines(str(f))


def test_an_array_jobs_index_is_never_exported_into_a_submission(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSCHED_ARRAY_INDEX", "3")
    monkeypatch.setenv("GPUSCHED_JOB_ID", "12")
    env = cli_submit.exported_env(None, container=False)
    assert "GPUSCHED_ARRAY_INDEX" not in env and "GPUSCHED_JOB_ID" not in env


def test_the_cli_and_the_daemon_agree_on_the_batch_limits() -> None:
    from gpusched import server  # the daemon side (pydantic): the CLI keeps its own copy

    assert (cli_submit.MAX_BATCH, cli_submit.MAX_ARRAY_INDEX, cli_submit.ARRAY_INDEX_ENV) == (
        server.MAX_BATCH, server.MAX_ARRAY_INDEX, server.ARRAY_INDEX_ENV)
