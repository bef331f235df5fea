"""The ``gpusched`` entry point: ``gpusched submit`` and ``gpusched ls`` without typer.

Importing typer and click and building the command tree costs 80-100 ms, more than the
whole budget of a ``gpusched submit`` (issue 15: 60 ms). These two commands are parsed here
with click's own rules, for the command lines this parser is sure of: long options
(``--gpus 2``, ``--gpus=2``), short ones followed by their value (``-g 2``), flags, repeated
options, ``--``, and (for submit) the command after the first non-option word. Anything else
(``--help``, an unknown or misspelt option, ``-g2``, a missing value, a value click would
refuse, shell completion, any other command) goes to the typer app in ``gpusched.cli``, which
answers it as always. Both paths run the same function (``cli_submit.run_submit``,
``cli_list.run_list``), so what they send and print is the same; ``tests/unit/test_fastcli.py``
checks that these tables are the typer commands' options.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

# option -> (parameter, kind): "flag" (no value), "str", "int", "multi" (repeatable str)
Options = dict[str, tuple[str, str]]

SUBMIT_OPTIONS: Options = {
    "--gpus": ("gpus", "str"), "-g": ("gpus", "str"), "--gpu-type": ("gpu_type", "str"),
    "--gpu-mem": ("gpu_mem", "str"), "--mem": ("mem", "str"),
    "--priority": ("priority", "int"), "-p": ("priority", "int"), "--after": ("after", "str"),
    "--after-any": ("after_any", "str"), "--name": ("name", "str"), "-n": ("ntasks", "str"),
    "--workdir": ("workdir", "str"), "--env": ("env", "multi"), "-e": ("env", "multi"),
    "--export": ("export", "str"), "--wrap": ("wrap", "str"), "--output": ("output", "str"),
    "-o": ("output", "str"), "--notify": ("notify", "str"),
    "--notify-url": ("notify_url", "str"), "--retries": ("retries", "int"),
    "--retry-on": ("retry_on", "str"), "--hold": ("hold", "flag"), "--time": ("est_time", "str"),
    "-t": ("est_time", "str"), "--image": ("image", "str"), "--mount": ("mount", "multi"),
    "-v": ("mount", "multi"), "--shm-size": ("shm_size", "str"),
    "--host-mem": ("host_mem", "str"), "--user": ("user", "str"),
    "--tao-mounts": ("tao_mounts", "flag"), "--runner": ("runner", "str"),
    "--array": ("array", "str"), "--from-file": ("from_file", "str"),
    "--json": ("as_json", "flag"),
}
SUBMIT_DEFAULTS: dict[str, Any] = {
    "command": None, "gpus": "1", "gpu_type": None, "gpu_mem": None, "mem": None,
    "priority": 0, "after": None, "after_any": None, "name": None, "ntasks": None,
    "workdir": None, "env": [], "export": None, "wrap": None, "output": None, "notify": None,
    "notify_url": None, "retries": 0, "retry_on": None, "hold": False, "est_time": None,
    "image": None, "mount": [], "shm_size": None, "host_mem": None, "user": None,
    "tao_mounts": False, "runner": None, "array": None, "from_file": None, "as_json": False,
}
LS_OPTIONS: Options = {
    "--all": ("all_", "flag"), "-a": ("all_", "flag"), "--status": ("status", "str"),
    "--mine": ("mine", "flag"), "--name": ("name", "str"), "--limit": ("limit", "int"),
    "--json": ("as_json", "flag"),
}
LS_DEFAULTS: dict[str, Any] = {"all_": False, "status": None, "mine": False, "name": None,
                               "limit": None, "as_json": False}


def parse(options: Options, defaults: dict[str, Any], args: list[str], *,
          rest: str | None) -> dict[str, Any] | None:
    """The parameters click would pass for ``args``, or None where this parser is not sure
    (the typer app answers then). ``rest``: the parameter that takes the words after the
    options (click's allow_interspersed_args=False), or None when the command takes none."""
    values = {k: list(v) if isinstance(v, list) else v for k, v in defaults.items()}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not (arg[:1] == "-" and len(arg) > 1):
            break
        name, eq, explicit = arg.partition("=") if arg[:2] == "--" else (arg, "", "")
        known = options.get(name)
        if known is None:
            return None  # --help, a typo, -g2, -ab: click's messages and rules
        dest, kind = known
        if kind == "flag":
            if eq:
                return None
            values[dest] = True
            i += 1
            continue
        if eq:
            value = explicit
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            return None  # "requires an argument"
        i += 1
        if kind == "int":
            try:
                values[dest] = int(value)
            except ValueError:
                return None
        elif kind == "multi":
            values[dest].append(value)
        else:
            values[dest] = value
    words = args[i:]
    if rest is None:
        return None if words else values
    values[rest] = words or None
    return values


def _submit(args: list[str]) -> bool:
    values = parse(SUBMIT_OPTIONS, SUBMIT_DEFAULTS, args, rest="command")
    if values is None:
        return False
    from gpusched import cli_submit

    cli_submit.run_submit(cli_submit.send, **values)
    return True


def _ls(args: list[str]) -> bool:
    values = parse(LS_OPTIONS, LS_DEFAULTS, args, rest=None)
    if values is None:
        return False
    from gpusched import cli_list

    cli_list.run_list(**values)
    return True


FAST: dict[str, Callable[[list[str]], bool]] = {"submit": _submit, "ls": _ls}


def run_fast(args: list[str]) -> bool:
    """Answer ``args`` here if this parser is sure of them (False: not handled)."""
    fast = FAST.get(args[0]) if args else None
    if fast is None or os.environ.get("_GPUSCHED_COMPLETE"):
        return False
    try:
        return fast(args[1:])
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted!\n")  # as click says it
        sys.exit(1)


def main() -> None:
    if run_fast(sys.argv[1:]):
        sys.exit(0)
    from gpusched.cli import app

    app()


if __name__ == "__main__":
    main()
