"""``gpusched submit`` without typer: the spec it builds, the batches ``--array`` and
``--from-file`` make, and the request it sends.

Both the typer command (``gpusched.cli``) and the fast path (``gpusched.fastcli``, which
answers ``gpusched submit`` without importing typer or click) call :func:`run_submit`, so the
two give the same spec, the same messages and the same exit codes. Standard library only, plus
the stdlib-only parts of gpusched (errors, units, render, client, paths).
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, Any

from gpusched.errors import GpuschedError, SpecError
from gpusched.units import parse_gpus, parse_size_mib, parse_time_limit

if TYPE_CHECKING:  # render (datetime) and pathlib are imported where used: every ms counts
    from collections.abc import Callable

    Send = Callable[[str, Any], Any]

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # models.ENV_KEY_RE, without pydantic
#: the variable each job of an ``--array`` gets (Slurm's SLURM_ARRAY_TASK_ID)
ARRAY_INDEX_ENV = "GPUSCHED_ARRAY_INDEX"
#: what the daemon sets for each job: never exported from a shell inside another job
JOB_IDENTITY_ENV = frozenset({"GPUSCHED_JOB_ID", "GPUSCHED_ATTEMPT", "GPUSCHED_GPUS",
                              "GPUSCHED_GPU_NAMES", "GPUSCHED_SIMULATED_HOST_GPUS",
                              "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
                              "NVIDIA_VISIBLE_DEVICES", ARRAY_INDEX_ENV})
#: the most jobs one ``--array`` or ``--from-file`` queues (the daemon enforces it too)
MAX_BATCH = 10_000
#: the largest array index (Slurm's MaxArraySize is 1001 by default; ours is generous)
MAX_ARRAY_INDEX = 1_000_000
#: the largest ``--from-file`` read (the daemon's request limit is usually smaller)
MAX_FILE_BYTES = 16 * 1024 * 1024
TAO_MOUNTS_MAX_BYTES = 1024 * 1024


class Exit(SystemExit):
    """Exit with a code (typer.Exit without typer: both end as SystemExit)."""


def echo(text: Any, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def report(err: GpuschedError) -> None:
    from gpusched import render

    # one line per problem (a validation error lists each field on its own line)
    for line in err.message.split("\n"):
        echo(f"gpusched: {render.safe(line)}", err=True)


def fail(err: GpuschedError) -> None:
    report(err)
    raise Exit(err.exit_code)


def client() -> Any:
    from gpusched.client import Client
    from gpusched.paths import client_socket

    return Client(client_socket())


def send(path: str, body: Any) -> Any:
    """A submission, retried with the same idempotency key while its reply is lost (the
    daemon restarting): the user gets one job id (one set of ids), never two jobs."""
    def say(message: str) -> None:
        from gpusched import render

        echo(f"gpusched: {render.safe(message)}", err=True)

    return client().submit(path, body, on_retry=say)


# -- options shared with tao and pipeline -------------------------------------------------


def env_pairs(env: list[str]) -> dict[str, str]:
    out = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise SpecError(f"--env {item}: use K=V, or K alone to pass K from your shell")
            value = os.environ[key]
        out[key] = value
    return out


def no_dash_n(value: str | None) -> None:
    """``-n`` is Slurm's --ntasks: it no longer names the job (``submit -n 2`` did)."""
    if value is not None:
        raise SpecError(f"-n {value}: -n is not --name here (in Slurm it is --ntasks): "
                        "use --name NAME to name the job, --gpus N for N GPUs")


def gpu_mem_option(gpu_mem: str | None, mem: str | None) -> str | None:
    """--gpu-mem, or the deprecated --mem (in Slurm --mem is host memory) with a note."""
    if mem is not None:
        echo("gpusched: --mem is deprecated: it is GPU memory here; use --gpu-mem", err=True)
        if gpu_mem is not None and gpu_mem != mem:
            raise SpecError("--mem (deprecated) and --gpu-mem disagree: give --gpu-mem only")
    return gpu_mem if gpu_mem is not None else mem


def exported_env(export: str | None, *, container: bool) -> dict[str, str]:
    """--export, as Slurm: ALL (the default for local jobs) sends this shell's environment,
    NONE (the default for containers: the image brings its own) nothing, VAR,VAR=VALUE,...
    only those (after ALL, in addition to it). Names a job cannot take (exported bash
    functions) and a surrounding job's identity (a submission from inside a job, an array
    job's index) are left out."""
    text = (export if export is not None else ("NONE" if container else "ALL")).strip()
    items = [i.strip() for i in text.split(",") if i.strip()]
    out: dict[str, str] = {}
    if items and items[0].upper() in ("ALL", "NONE"):
        if items.pop(0).upper() == "ALL":
            if container:
                raise SpecError("--export ALL is for local jobs: a container's PATH and "
                                "libraries are its image's; name the variables "
                                "(--export VAR,...) or use --env")
            out = {k: v for k, v in os.environ.items()
                   if ENV_NAME.match(k) and k not in JOB_IDENTITY_ENV and "\x00" not in v}
    for item in items:
        key, sep, value = item.partition("=")
        if not ENV_NAME.match(key):
            raise SpecError(f"--export {item!r}: not a variable name")
        if sep:
            out[key] = value
        elif key in os.environ:
            out[key] = os.environ[key]
    return out


def mount_option(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (
            len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise SpecError(f"bad --mount {text!r}: use SRC:DST or SRC:DST:ro")
    return {"source": os.path.abspath(parts[0]), "target": parts[1],
            "read_only": len(parts) == 3 and parts[2] == "ro"}


def apply_tao_mounts(spec: dict[str, Any]) -> None:
    """Read ~/.tao_mounts.json here, as the user, and send its content with the spec; the
    daemon validates the mounts like any other before storing anything."""
    from pathlib import Path

    from gpusched.policy import parse_tao_mounts
    from gpusched.safefs import read_user_bytes

    path = Path.home() / ".tao_mounts.json"
    try:  # never blocks on a FIFO, only a regular file, capped (safefs)
        text = read_user_bytes(path, max_bytes=TAO_MOUNTS_MAX_BYTES).decode(errors="replace")
    except OSError as err:
        raise SpecError(f"--tao-mounts: cannot read {path}: {err}") from err
    mounts, envs, options = parse_tao_mounts(text)
    spec["mounts"] = [m.model_dump() for m in mounts] + spec["mounts"]
    spec["env"] = {**envs, **spec["env"]}
    if options.get("privileged") or options.get("network") == "host":
        raise SpecError(f"{path} asks for privileged or host-network containers: no gpusched "
                        "job runs privileged, and the host network is an admin setting "
                        "(docker.network); remove them from DockerOptions")
    spec["shm_size"] = spec["shm_size"] or options.get("shm_size")
    spec["user"] = spec["user"] or options.get("user")
    spec["use_tao_mounts"] = True


# -- batches ------------------------------------------------------------------------------

_ARRAY_ITEM = re.compile(r"^(\d{1,7})(?:-(\d{1,7})(?::(\d{1,7}))?)?$")


def parse_array(text: str) -> list[int]:
    """Slurm's --array: ``0-999``, ``1,3,5``, ``0-10:2`` (a step), or a mix (``0-3,8``);
    each index once, in the order given. At most MAX_BATCH jobs."""
    how = "use a range 0-999, a list 1,3,5, a stepped range 0-10:2, or a mix 0-3,8"
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise SpecError(f"bad --array {text[:60]!r}: {how}")
    out: list[int] = []
    seen: set[int] = set()
    for item in items:
        m = _ARRAY_ITEM.match(item)
        if not m:
            raise SpecError(f"bad --array {text[:60]!r}: {item[:30]!r} is not an index or a "
                            f"range; {how}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo or step < 1:
            raise SpecError(f"bad --array {text[:60]!r}: in {item!r} the range must go up "
                            "(0-9, not 9-0) with a step of at least 1")
        if hi > MAX_ARRAY_INDEX:
            raise SpecError(f"bad --array {text[:60]!r}: indices go up to {MAX_ARRAY_INDEX:,}")
        if len(out) + (hi - lo) // step + 1 > MAX_BATCH:
            raise SpecError(f"--array {text[:60]!r} makes more than {MAX_BATCH:,} jobs, the "
                            "most one submission queues: split it into several --array "
                            "submissions (e.g. 0-9999, then 10000-19999)")
        for i in range(lo, hi + 1, step):
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out


def read_job_lines(source: str) -> tuple[list[list[str]], list[int]]:
    """``--from-file``: one command line per line, split as a shell would (shlex: quotes and
    backslashes, no variables, globs or pipes: use --wrap-style ``sh -c '...'`` for those);
    blank lines and ``#`` comments skipped; ``-`` reads standard input. Returns the commands
    and their line numbers."""
    import shlex

    from gpusched import render

    where = "standard input" if source == "-" else source
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(source, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise SpecError(f"--from-file: cannot read {where}: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(f"--from-file: {where} is larger than {MAX_FILE_BYTES // 2**20} MiB: "
                        "split it into several files")
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SpecError(f"--from-file {where}, line {line}: not UTF-8 text") from err
    commands: list[list[str]] = []
    lines: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\x00" in line:
            raise SpecError(f"--from-file {where}, line {n}: contains a NUL byte")
        try:
            argv = shlex.split(line, comments=True)
        except ValueError as err:
            raise SpecError(f"--from-file {where}, line {n}: {err} (quote it as a shell "
                            f"would): {render.safe(line[:80])}") from err
        if not argv:
            continue
        if len(commands) >= MAX_BATCH:
            raise SpecError(f"--from-file {where} has more than {MAX_BATCH:,} commands, the "
                            "most one submission queues: split it into several files")
        commands.append(argv)
        lines.append(n)
    if not commands:
        raise SpecError(f"--from-file {where} holds no command (one command line per line; "
                        "blank lines and # comments are skipped)")
    return commands, lines


# -- submit -------------------------------------------------------------------------------


def run_submit(send_fn: Send, *, command: list[str] | None, gpus: str, gpu_type: str | None,
               gpu_mem: str | None, mem: str | None, priority: int, after: str | None,
               after_any: str | None, name: str | None, ntasks: str | None,
               workdir: str | None, env: list[str], export: str | None, wrap: str | None,
               output: str | None, notify: str | None, notify_url: str | None, retries: int,
               retry_on: str | None, hold: bool, est_time: str | None, image: str | None,
               mount: list[str], shm_size: str | None, host_mem: str | None,
               user: str | None, tao_mounts: bool, runner: str | None, array: str | None,
               from_file: str | None, as_json: bool) -> None:
    """``gpusched submit``: build the spec, send it (one job, or one batch), print the id(s)."""
    try:
        no_dash_n(ntasks)
        batch: dict[str, Any] | None = None
        if from_file is not None:
            if command or wrap is not None or array is not None:
                raise SpecError("--from-file gives every job its command: give no `-- CMD`, "
                                "--wrap or --array with it")
        elif wrap is not None:
            if command:
                raise SpecError("--wrap takes the whole command: give it or `-- CMD`, not both")
            command = ["/bin/sh", "-c", wrap]
        if from_file is None and not command:
            raise SpecError("no command: give `-- CMD [ARGS]...` or --wrap \"CMD && CMD\""
                            + (" for the array's jobs" if array is not None else ""))
        if array is not None:
            batch = {"array": parse_array(array)}
        spec: dict[str, Any] = {
            "priority": priority,
            "gpus": parse_gpus(gpus, gpu_type, gpu_mem_option(gpu_mem, mem)),
            "name": name, "retries": retries, "hold": hold,
            "retry_on": [int(x) for x in retry_on.split(",") if x.strip()] if retry_on else None,
            "after": [int(a) for a in after.split(",") if a.strip()] if after else [],
            "after_any": ([int(a) for a in after_any.split(",") if a.strip()]
                          if after_any else []),
            "notify_cmd": notify, "notify_url": notify_url,
            "output": os.path.abspath(output) if output else None,
            "env": {**exported_env(export, container=bool(image)), **env_pairs(env)},
        }
        if command:
            spec = {"command": command, **spec}
        if est_time is not None:
            spec["time_limit_s"] = parse_time_limit(est_time)
        if image:
            spec.update(runner="docker", image=image, workdir=workdir,
                        mounts=[mount_option(m) for m in mount], shm_size=shm_size, user=user,
                        host_mem_mib=parse_size_mib(host_mem) if host_mem else None)
            if tao_mounts:
                apply_tao_mounts(spec)
        else:
            if mount or shm_size or user or tao_mounts or host_mem:
                raise SpecError("--mount, --shm-size, --host-mem, --user and --tao-mounts need "
                                "--image (a local job's host memory is not limited)")
            spec["workdir"] = workdir or os.getcwd()
        if runner:
            if runner not in ("local", "docker", "slurm") or (runner == "docker") != bool(image):
                raise SpecError(f"--runner {runner}: use local or slurm, or docker with --image")
            spec["runner"] = runner
        if from_file is not None:
            commands, lines = read_job_lines(from_file)
            batch = {"commands": commands, "lines": lines}
        if batch is not None:
            result = _send_batch(send_fn, spec, batch, from_file)
        else:
            result = send_fn("/v1/jobs", spec)
    except ValueError as err:
        fail(SpecError(f"bad --after, --after-any or --retry-on: give numbers like 12,13 "
                       f"({err})"))
    except GpuschedError as err:
        fail(err)
    if as_json:
        from gpusched import render

        render.emit_json(result)
    elif batch is not None:
        sys.stdout.write("".join(f"{i}\n" for i in result["ids"]))
        sys.stdout.flush()
    else:
        echo(result["id"])


def _send_batch(send_fn: Send, spec: dict[str, Any], batch: dict[str, Any],
                from_file: str | None) -> Any:
    """One request for every job of an --array or --from-file (one transaction: all queued,
    or none)."""
    try:
        return send_fn("/v1/jobs/batch", {"spec": spec, **batch})
    except SpecError as err:
        msg = err.message
        if msg.startswith("request body of"):
            msg += ("; split the batch into smaller ones (or ask the admin to raise "
                    "api.max_body_bytes)")
        elif from_file is not None:
            where = "standard input" if from_file == "-" else from_file
            msg = f"--from-file {where}, {msg}"
        raise SpecError(msg) from err
