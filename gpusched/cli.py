"""The ``gpusched`` command: parse, call the daemon, render. ``--json`` everywhere.

Heavy imports (pydantic, the daemon, rich) happen inside the commands that need them, so a
``gpusched submit`` stays fast.
"""


import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from gpusched import cli_submit as cs
from gpusched import render
from gpusched.cli_list import LS_HEAD, run_list
from gpusched.errors import GpuschedError, NotFound, SpecError
from gpusched.units import parse_size_mib, parse_time_limit

app = typer.Typer(
    help="gpusched: queue GPU jobs and NVIDIA TAO stages on this host's GPUs.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TERMINAL = ("succeeded", "failed", "cancelled", "lost")
_env_pairs, _no_dash_n, _gpu_mem = cs.env_pairs, cs.no_dash_n, cs.gpu_mem_option
_mount, _apply_tao_mounts = cs.mount_option, cs.apply_tao_mounts


def _client() -> Any:
    return cs.client()


def _submit(path: str, body: Any) -> Any:
    """A submission, retried with the same idempotency key while its reply is lost (the
    daemon restarting): the user gets one job id, never two jobs."""
    return cs.send(path, body)


def _fail(err: GpuschedError) -> None:
    cs.report(err)
    raise typer.Exit(err.exit_code)


# -- daemon ------------------------------------------------------------------------------


@app.command()
def daemon(
    once: Annotated[bool, typer.Option("--once", help="Run until no job is queued or running, "
                                       "then exit (burst mode).")] = False,
    simulate_gpus: Annotated[str | None, typer.Option(
        "--simulate-gpus", help='Simulated GPUs instead of NVML, e.g. "RTX A4000:16G,RTX 2070:8G".'
    )] = None,
    state_dir: Annotated[Path | None, typer.Option(help="State directory (database, logs).")] = None,
    socket: Annotated[Path | None, typer.Option(help="Unix socket to listen on.")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR, CRITICAL.")] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs it this way)."""
    import logging

    from gpusched.config import load_settings
    from gpusched.service import Service, lock_state_dir

    try:
        overrides: dict[str, Any] = {"state_dir": state_dir, "socket": socket,
                                     "log_level": log_level}
        settings = load_settings(**overrides)
        if simulate_gpus:
            settings.gpus.simulate = simulate_gpus
        logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        lock_fd = lock_state_dir(settings.state_dir)
        try:
            Service(settings).run(once=once)
        finally:
            os.close(lock_fd)
    except GpuschedError as err:
        _fail(err)


# -- GPUs --------------------------------------------------------------------------------


@app.command()
def gpus(as_json: JsonOpt = False) -> None:
    """List the GPUs the daemon sees, with memory, use, state and foreign processes."""
    try:
        client = _client()
        data = client.get("/v1/gpus")
        cluster = None if as_json else client.get("/v1/cluster")
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(data)
        return
    typer.echo(render.gpus_table(data))
    if cluster and (cluster.get("slurm") is not None or cluster.get("error")):
        typer.echo("\nSlurm cluster:")
        typer.echo(render.cluster_table(cluster["slurm"]) if cluster.get("slurm") is not None
                   else f"  unreachable: {render.safe(cluster['error'])}")


@app.command()
def drain(gpu: Annotated[str, typer.Argument(help="GPU index or UUID.")],
          reason: Annotated[str, typer.Option("--reason", "-r", help="Why (shown to users).")],
          as_json: JsonOpt = False) -> None:
    """Stop placing jobs on a GPU (running jobs finish). Root or the admin group only."""
    try:
        data = _client().post(f"/v1/gpus/{gpu}/drain", {"reason": reason})
    except GpuschedError as err:
        _fail(err)
    render.emit_json(data) if as_json else typer.echo(f"GPU {gpu} drained: {reason}")


@app.command()
def resume(gpu: Annotated[str, typer.Argument(help="GPU index or UUID.")],
           as_json: JsonOpt = False) -> None:
    """Put a drained GPU back into service. Root or the admin group only."""
    try:
        data = _client().post(f"/v1/gpus/{gpu}/resume")
    except GpuschedError as err:
        _fail(err)
    render.emit_json(data) if as_json else typer.echo(f"GPU {gpu} resumed")


# -- jobs --------------------------------------------------------------------------------


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[list[str] | None, typer.Argument(metavar="-- CMD [ARGS]...",
                                                        help="The command, after `--`.")] = None,
    gpus: Annotated[str, typer.Option("--gpus", "-g", help="2 (any two), 0,1 or GPU-uuid,... "
                                      "(exactly those), 1, (exactly GPU 1), 0 (no GPU).")] = "1",
    gpu_type: Annotated[str | None, typer.Option(help='Only GPUs whose name contains this, '
                                                 'e.g. "A4000".')] = None,
    gpu_mem: Annotated[str | None, typer.Option("--gpu-mem", help="Free GPU memory needed on "
                                                "each GPU, e.g. 10G (foreign processes "
                                                "count).")] = None,
    mem: Annotated[str | None, typer.Option("--mem", hidden=True,
                                            help="Deprecated: --gpu-mem.")] = None,
    priority: Annotated[int, typer.Option("--priority", "-p", help="Higher runs first.")] = 0,
    after: Annotated[str | None, typer.Option(help="Job ids (1,2) that must succeed first.")] = None,
    after_any: Annotated[str | None, typer.Option("--after-any", help="Job ids (1,2) that must "
                                                  "have ended first, in any state.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name to find it by.")] = None,
    ntasks: Annotated[str | None, typer.Option("-n", hidden=True)] = None,
    workdir: Annotated[str | None, typer.Option(help="Working directory (default: here, for "
                                                "local jobs).")] = None,
    env: Annotated[list[str], typer.Option("--env", "-e", help="K=V (repeatable); K alone "
                                           "passes K from your shell.")] = [],  # noqa: B006
    export: Annotated[str | None, typer.Option("--export", help="ALL (local jobs' default), "
                                               "NONE (containers' default) or VAR,VAR=VALUE,... "
                                               "(ALL,VAR=VALUE adds to ALL).")] = None,
    wrap: Annotated[str | None, typer.Option("--wrap", help='A shell command line, run with '
                                             'sh -c: --wrap "make && ./run".')] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Also copy the log here "
                                               "when the job ends, as you (%j: the job id).")
                      ] = None,
    notify: Annotated[str | None, typer.Option("--notify", help="Run this shell command as you "
                                               "when the job ends (GPUSCHED_JOB_ID, "
                                               "GPUSCHED_JOB_STATUS, GPUSCHED_EXIT_CODE set).")
                      ] = None,
    notify_url: Annotated[str | None, typer.Option("--notify-url", help="POST the job's JSON to "
                                                   "this http(s) URL when it ends.")] = None,
    retries: Annotated[int, typer.Option(help="Run again this many times on failure.")] = 0,
    retry_on: Annotated[str | None, typer.Option(help="Retry only on these exit codes (75,76); "
                                                 "default: any failure.")] = None,
    hold: Annotated[bool, typer.Option("--hold", help="Queue held; `release` starts it.")] = False,
    est_time: Annotated[str | None, typer.Option("--time", "-t", help="Time limit (Slurm's MM, "
                                                 "MM:SS, HH:MM:SS, D-HH[:MM[:SS]], or 90s, 20m, "
                                                 "2h): stopped past it; lets the job "
                                                 "backfill.")] = None,
    image: Annotated[str | None, typer.Option(help="Run in a container of this image "
                                              "(docker runner).")] = None,
    mount: Annotated[list[str], typer.Option("--mount", "-v", help="SRC:DST[:ro] for containers "
                                             "(repeatable).")] = [],  # noqa: B006
    shm_size: Annotated[str | None, typer.Option(help="Container /dev/shm size, e.g. 16G.")] = None,
    host_mem: Annotated[str | None, typer.Option("--host-mem", help="Container memory limit "
                                                 "(RAM, swap included), e.g. 32G; the container "
                                                 "is OOM-killed past it.")] = None,
    user: Annotated[str | None, typer.Option(help="Container user UID:GID.")] = None,
    tao_mounts: Annotated[bool, typer.Option("--tao-mounts", help="Use the mounts, envs and "
                                             "docker options of ~/.tao_mounts.json.")] = False,
    runner: Annotated[str | None, typer.Option(help="local, docker (implied by --image) or "
                                               "slurm (hand the job to the Slurm cluster).")
                      ] = None,
    array: Annotated[str | None, typer.Option("--array", help="Queue one job per index: "
                                              "0-999, 1,3,5 or 0-10:2 (Slurm's); each gets "
                                              f"{cs.ARRAY_INDEX_ENV}. At most "
                                              f"{cs.MAX_BATCH:,}.")] = None,
    from_file: Annotated[str | None, typer.Option("--from-file", help="Queue one job per line "
                                                  "of this file (- for stdin): a command line, "
                                                  "split as a shell would; blank lines and # "
                                                  "comments skipped.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a job; prints its id. Everything after `--` is the command, taken literally.
    --array and --from-file queue many jobs in one call (all or none); their ids print one
    per line."""
    cs.run_submit(_submit, command=command, gpus=gpus, gpu_type=gpu_type, gpu_mem=gpu_mem,
                  mem=mem, priority=priority, after=after, after_any=after_any, name=name,
                  ntasks=ntasks, workdir=workdir, env=env, export=export, wrap=wrap,
                  output=output, notify=notify, notify_url=notify_url, retries=retries,
                  retry_on=retry_on, hold=hold, est_time=est_time, image=image, mount=mount,
                  shm_size=shm_size, host_mem=host_mem, user=user, tao_mounts=tao_mounts,
                  runner=runner, array=array, from_file=from_file, as_json=as_json)


@app.command(context_settings={"allow_interspersed_args": False,
                               "ignore_unknown_options": True})
def tao(
    argv: Annotated[list[str], typer.Argument(metavar="ssd TASK [TAO FLAGS]...",
                                              help="TAO's own command line after `tao model`.")],
    on: Annotated[str | None, typer.Option("--on", help="Pin GPUs: 0,1 or GPU UUIDs "
                                           "(count = TAO's --gpus).")] = None,
    gpu_type: Annotated[str | None, typer.Option(help="Only GPUs whose name contains this.")] = None,
    gpu_mem: Annotated[str | None, typer.Option("--gpu-mem", help="Free GPU memory needed per "
                                                "GPU, e.g. 10G.")] = None,
    mem: Annotated[str | None, typer.Option("--mem", hidden=True,
                                            help="Deprecated: --gpu-mem.")] = None,
    priority: Annotated[int, typer.Option("--priority", "-p", help="Higher runs first.")] = 0,
    after: Annotated[str | None, typer.Option(help="Job ids that must succeed first.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name to find it by.")] = None,
    ntasks: Annotated[str | None, typer.Option("-n", hidden=True)] = None,
    runner: Annotated[str | None, typer.Option(help="docker, local or slurm (default: the "
                                               "daemon's tao.runner).")] = None,
    image: Annotated[str | None, typer.Option(help="TAO image (default: tao.image).")] = None,
    mount: Annotated[list[str], typer.Option("--mount", "-v", help="SRC:DST[:ro] (repeatable); "
                                             "default: ~/.tao_mounts.json.")] = [],  # noqa: B006
    env: Annotated[list[str], typer.Option("--env", "-e", help="K=V (repeatable).")] = [],  # noqa: B006
    hold: Annotated[bool, typer.Option("--hold", help="Queue held.")] = False,
    retries: Annotated[int, typer.Option(help="Run again on failure (a train continues from "
                                         "its latest checkpoint).")] = 0,
    est_time: Annotated[str | None, typer.Option("--time", "-t", help="Time limit, as for "
                                                 "submit: stopped past it.")] = None,
    notify: Annotated[str | None, typer.Option("--notify", help="Run this shell command as you "
                                               "when the stage ends.")] = None,
    notify_url: Annotated[str | None, typer.Option("--notify-url", help="POST the job's JSON "
                                                   "here when the stage ends.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a spec value: "
                                            "training_config.num_epochs=10 (repeatable); the "
                                            "stage runs a derived copy of the spec.")] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option("--resume", help="train/retrain: continue from the "
                                         "latest checkpoint of the results dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Move another run's output in "
                                            "the results dir aside first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Queue a TAO stage with TAO's own flags: `gpusched tao ssd train -e SPEC -r RESULTS
    --gpus 2 -k KEY` (swap `tao model` for `gpusched tao`; `gpusched tao model ssd ...` works
    too). Prints the job id."""
    from gpusched.tao import parse_tao_command

    try:
        _no_dash_n(ntasks)
        cmd = parse_tao_command(argv)
        for note in cmd.notes:
            typer.echo(f"gpusched: {render.safe(note)}", err=True)
        on = _tao_pin(on, cmd.pin)
        stage = cmd.stage
        if resume and not stage.resume:
            if stage.task not in ("train", "retrain") or stage.initial_epoch is not None:
                raise SpecError("--resume is for train/retrain without --initial_epoch "
                                "(gpusched finds the latest checkpoint)")
            stage = stage.model_copy(update={"resume": True})
        extra = _tao_overrides(stage, [*set_, *cmd.sets])
        if extra:
            stage = stage.model_copy(update={"spec": extra["spec"]})
        if (overwrite or cmd.overwrite) and not stage.resume:
            _tao_move_aside(stage)
        req: dict[str, Any] = {
            "stage": stage.model_dump(mode="json", exclude_defaults=True) | {
                "task": stage.task}, "name": name, "priority": priority,
            "on": [x.strip() for x in on.split(",") if x.strip()] if on else None,
            "gpu_type": gpu_type, "runner": runner, "image": image, "hold": hold,
            "retries": retries, "env": _env_pairs(env),
            "after": [int(a) for a in after.split(",") if a.strip()] if after else [],
            "notify_cmd": notify, "notify_url": notify_url,
            "time_limit_s": parse_time_limit(est_time) if est_time is not None else None}
        if extra:
            req["spec_original"], req["overrides"] = extra["original"], extra["overrides"]
        if (gpu_mem := _gpu_mem(gpu_mem, mem)):
            req["mem_mib"] = parse_size_mib(gpu_mem)
        if mount:
            req["mounts"] = [_mount(m) for m in mount]
        elif (Path.home() / ".tao_mounts.json").exists():
            spec: dict[str, Any] = {"mounts": [], "env": {}, "shm_size": None, "user": None}
            _apply_tao_mounts(spec)
            req["mounts"], req["shm_size"], req["user"] = (spec["mounts"], spec["shm_size"],
                                                          spec["user"])
            req["env"] = {**spec["env"], **req["env"]}
        result = _submit("/v1/stages", req)
    except ValueError as err:
        _fail(SpecError(f"bad --after {after!r}: give job ids like 12,13 ({err})"))
    except GpuschedError as err:
        _fail(err)
    render.emit_json(result) if as_json else typer.echo(result["id"])


def _tao_pin(on: str | None, pin: list[int] | None) -> str | None:
    """``--on``, or the GPUs a notebook's ``--gpu_index`` named."""
    if pin is None:
        return on
    want = ",".join(map(str, pin))
    if on is not None and [x.strip() for x in on.split(",")] != want.split(","):
        raise SpecError(f"--on {on} and --gpu_index {' '.join(map(str, pin))} disagree: give "
                        "one of them")
    return on or want


def _tao_overrides(stage: Any, items: list[str]) -> dict[str, Any] | None:
    """``--set``: the spec with the overrides applied, written beside it as the user
    (``<spec>.gpusched-<hash>.txt``, content-addressed, so the same overrides reuse it)."""
    from gpusched.pipelines import derived_spec_path
    from gpusched.specedit import apply_overrides, parse_set

    if not items:
        return None
    if not stage.spec:
        raise SpecError(f"--set needs a spec file (-e); ssd {stage.task} was given none")
    overrides = parse_set(items)
    src = Path(stage.spec)
    try:
        text = src.read_text()
    except OSError as err:
        raise SpecError(f"--set: cannot read the spec {src}: {err.strerror or err}") from err
    derived = apply_overrides(text, overrides)
    dirs = [src.parent] + ([Path(stage.results_dir)] if stage.results_dir else [])
    for d in dirs:
        dst = Path(derived_spec_path(str(d / src.name), derived))  # as pipeline overrides
        try:
            if not (dst.is_file() and dst.read_text() == derived):
                d.mkdir(parents=True, exist_ok=True)
                tmp = d / f".{dst.name}.{os.getpid()}.tmp"
                tmp.write_text(derived)
                os.replace(tmp, dst)
        except OSError:
            continue
        typer.echo(f"gpusched: spec with {', '.join(f'{k}={v}' for k, v in overrides.items())}"
                   f": {dst}", err=True)
        return {"spec": str(dst), "original": str(src), "overrides": overrides}
    raise SpecError(f"--set: cannot write the derived spec beside {src} or in the results dir")


def _tao_move_aside(stage: Any) -> None:
    """``--overwrite``: move another run's output in the results dir into
    ``<results>/.gpusched-old-<time>/``, here, as the user (the daemon never moves or deletes
    users' files)."""
    from gpusched.stages import movable_output

    if not stage.results_dir or not Path(stage.results_dir).is_dir():
        return
    res = Path(stage.results_dir)
    names = movable_output(stage.task, sorted(os.listdir(res)))
    if not names:
        return
    for used in (getattr(stage, "model", None), getattr(stage, "spec", None)):
        if used and any(Path(used).is_relative_to(res / n) for n in names):
            raise SpecError(f"--overwrite would move {used} aside, which this stage uses: "
                            "copy it elsewhere first, or give another -r")
    old = res / f".gpusched-old-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while old.exists():
        n += 1
        old = res / f".gpusched-old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    try:
        old.mkdir()
        for name in names:
            os.rename(res / name, old / name)
    except OSError as err:
        raise SpecError(f"--overwrite: cannot move the old run aside in {res}: "
                        f"{err.strerror or err}") from err
    typer.echo(f"gpusched: moved {', '.join(names)} aside into {old}", err=True)


@app.command("ls")
def list_jobs(
    all_: Annotated[bool, typer.Option("--all", "-a", help="Every job, ended ones too (no "
                                       "paging).")] = False,
    status: Annotated[str | None, typer.Option(help="Only these statuses (comma list).")] = None,
    mine: Annotated[bool, typer.Option("--mine", help="Only my jobs.")] = False,
    name: Annotated[str | None, typer.Option(help="Only jobs with this name.")] = None,
    limit: Annotated[int | None, typer.Option(help=f"Show N queued/held jobs (default "
                                              f"{LS_HEAD}); with --all, the newest N jobs."
                                              )] = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs: running ones and the head of the queue (planning order) by default, with a
    line saying how many more are queued or held."""
    run_list(all_=all_, status=status, mine=mine, name=name, limit=limit, as_json=as_json)


@app.command()
def show(job_id: int, as_json: JsonOpt = False) -> None:
    """Show one job: status, GPUs, outcome, events."""
    try:
        data = _client().get(f"/v1/jobs/{job_id}")
    except GpuschedError as err:
        _fail(err)
    render.emit_json(data) if as_json else typer.echo(render.job_detail(data))


@app.command()
def logs(job_id: int,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the "
                                              "job ends.")] = False,
         attempt: Annotated[int | None, typer.Option(help="Attempt number (default: last).")] = None
         ) -> None:
    """Print a job's output (stdout and stderr)."""
    client, offset = _client(), 0
    try:
        while True:
            q = f"?offset={offset}" + (f"&attempt={attempt}" if attempt else "")
            chunk = client.get(f"/v1/jobs/{job_id}/log{q}")
            if attempt is None and chunk["attempt"]:
                attempt = chunk["attempt"]
            # an admin reading another user's log gets no terminal escapes of that user's
            # making (lines and tabs stay); one's own output is printed as it is
            data = chunk["data"] if chunk.get("mine", True) else render.safe_log(chunk["data"])
            sys.stdout.write(data)
            sys.stdout.flush()
            offset = chunk["offset"]
            if chunk["data"]:
                continue
            if not follow or chunk["done"] or chunk["status"] in TERMINAL:
                break
            time.sleep(0.25)
    except GpuschedError as err:
        _fail(err)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def wait(job_ids: Annotated[list[int], typer.Argument(help="Job ids.")],
         timeout: Annotated[float | None, typer.Option(help="Give up after this many "
                                                       "seconds (exit 124).")] = None,
         as_json: JsonOpt = False) -> None:
    """Block until the jobs end. Exit 0 only if all succeeded (1 otherwise, 124 on timeout)."""
    client, start = _client(), time.monotonic()
    ids = ",".join(str(i) for i in job_ids)
    try:
        while True:
            jobs = client.get(f"/v1/jobs?all=1&ids={ids}")
            found = {j["id"] for j in jobs}
            missing = [i for i in job_ids if i not in found]
            if missing:
                raise NotFound(f"no job {missing[0]}")
            if all(j["status"] in TERMINAL for j in jobs):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                typer.echo("gpusched: timed out waiting", err=True)
                raise typer.Exit(124)
            time.sleep(0.2)
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(jobs)
    else:
        for j in jobs:
            typer.echo(f"{j['id']}: {j['status']}"
                       + (f" ({render.safe(j['reason'])})" if j["reason"] else ""))
    raise typer.Exit(0 if all(j["status"] == "succeeded" for j in jobs) else 1)


def _action(action: str, job_ids: list[int], as_json: bool,
            by: tuple[bool, str | None, str | None, bool] = (False, None, None, False)) -> None:
    client, results, failed = _client(), [], None
    try:
        if job_ids and any(by):
            raise SpecError(f"{action}: give job ids or a filter, not both")
        job_ids = job_ids or _matching(client, action, *by)
    except GpuschedError as err:
        _fail(err)
    for jid in job_ids:
        try:
            results.append(client.post(f"/v1/jobs/{jid}/{action}"))
        except GpuschedError as err:
            typer.echo(f"gpusched: job {jid}: {render.safe(err.message)}", err=True)
            failed = failed or err
    if as_json:
        render.emit_json(results)
    else:
        for r in results:
            typer.echo(f"{r['id']}: {render.safe(r['result'])}")
    if failed:
        raise typer.Exit(failed.exit_code)


#: the statuses a filter looks at when --status is not given, per action
_ACTION_STATUSES = {"cancel": "queued,held,starting,running,unknown", "hold": "queued",
                    "release": "held"}


def _matching(client: Any, action: str, mine: bool, name: str | None, status: str | None,
              all_users: bool) -> list[int]:
    """The jobs a filter names: the caller's own, unless --all (root and the admin group;
    anyone else's jobs come back redacted, which refuses the whole filter)."""
    from urllib.parse import quote

    if not (mine or name or status or all_users):
        raise SpecError(f"{action}: give job ids or a filter (--mine, --name N, --status S, "
                        "--all)")
    q = [f"status={quote(status or _ACTION_STATUSES[action])}", "all=1"]
    if not all_users:
        q.append(f"owner={os.getuid()}")
    if name:
        q.append(f"name={quote(name)}")
    jobs = client.get("/v1/jobs?" + "&".join(q))
    if any(j.get("redacted") for j in jobs):
        from gpusched.errors import PermissionDenied

        raise PermissionDenied(f"{action} --all: only root and the admin group may act on "
                               "other users' jobs (without --all a filter matches your own)")
    if not jobs:
        typer.echo(f"gpusched: {action}: no job matches", err=True)
    return [int(j["id"]) for j in jobs]


IdsArg = Annotated[list[int] | None, typer.Argument(help="Job ids (or a filter).")]
MineOpt = Annotated[bool, typer.Option("--mine", help="Filter: my jobs (a filter only ever "
                                       "matches yours, unless --all).")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Filter: jobs with this name.")]
StatusOpt = Annotated[str | None, typer.Option("--status", help="Filter: these statuses "
                                               "(comma list).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Filter: every user's jobs (root and the "
                                      "admin group).")]


@app.command()
def cancel(job_ids: IdsArg = None, mine: MineOpt = False, name: NameOpt = None,
           status: StatusOpt = None, all_users: AllOpt = False, as_json: JsonOpt = False) -> None:
    """Cancel jobs: queued ones at once, running ones with SIGTERM, then SIGKILL after a grace."""
    _action("cancel", job_ids or [], as_json, (mine, name, status, all_users))


@app.command()
def hold(job_ids: IdsArg = None, mine: MineOpt = False, name: NameOpt = None,
         status: StatusOpt = None, all_users: AllOpt = False, as_json: JsonOpt = False) -> None:
    """Keep queued jobs from starting until `release`."""
    _action("hold", job_ids or [], as_json, (mine, name, status, all_users))


@app.command()
def release(job_ids: IdsArg = None, mine: MineOpt = False, name: NameOpt = None,
            status: StatusOpt = None, all_users: AllOpt = False, as_json: JsonOpt = False) -> None:
    """Let held jobs start again."""
    _action("release", job_ids or [], as_json, (mine, name, status, all_users))


@app.command()
def requeue(job_ids: Annotated[list[int], typer.Argument(help="Job ids.")],
            as_json: JsonOpt = False) -> None:
    """Run ended jobs again, each as a new attempt (its log, outcome, --notify anew)."""
    _action("requeue", job_ids, as_json)


@app.command()
def health(as_json: JsonOpt = False) -> None:
    """Daemon, store, GPUs and runners: ok or degraded, with the reason. Exit 1 if degraded."""
    try:
        data = _client().get("/v1/health")
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(data)
    else:
        typer.echo(f"gpusched {data['status']} (pid {data['pid']}, state {data['state_dir']})")
        for name, c in data["checks"].items():
            typer.echo(f"  {name:<8}{'ok' if c['ok'] else 'DEGRADED':<10}"
                       f"{render.safe(c['detail'])}")
        line = render.tick_line(data.get("tick") or {})
        if line:
            typer.echo(f"  {'tick':<18}{line}")
    raise typer.Exit(0 if data["ok"] else 1)


@app.command()
def artifacts(job_id: int, as_json: JsonOpt = False) -> None:
    """What a stage produced: checkpoints (epoch, mAP), the best one, evaluation, pruned model."""
    try:
        data = _client().get(f"/v1/jobs/{job_id}/artifacts")
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(data)
    elif not data:
        typer.echo(f"job {job_id} recorded no artifacts")
    else:
        typer.echo(render.artifacts_table(data))


@app.command()
def top(once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
        interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0) -> None:
    """A live view of GPUs, running jobs (progress, s/epoch, ETA) and the head of the queue."""
    from gpusched.top import run_top

    client = _client()
    try:
        client.get("/v1/health")
    except GpuschedError as err:
        _fail(err)
    run_top(lambda: client.get("/v1/top"), interval_s=interval, once=once)


report_app = typer.Typer(help="Per-GPU throughput and timeline reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")


def _since(text: str) -> float:
    units = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip()
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(t[:-1]) * units[t[-1]]
    try:
        from gpusched.clock import parse_iso

        return parse_iso(t if "T" in t or ":" in t else t + "T00:00:00+00:00")
    except ValueError:
        raise SpecError(f"bad --since {text!r}: use 24h, 7d or a date like 2026-11-01") from None


@report_app.command("throughput")
def report_throughput(
    since: Annotated[str, typer.Option(help="Window start: 24h, 7d or a date.")] = "30d",
    workload: Annotated[str | None, typer.Option(help="Only this workload.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json, csv or html.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this "
                                                "file (any format; html defaults to "
                                                "gpusched-report.html, the others to stdout).")] = None,
) -> None:
    """s/epoch by GPU model and count (median, p90), epochs/h, scaling efficiency, busy
    fraction of each GPU, and recommendations."""
    from gpusched import reports, throughput

    if fmt not in ("table", "json", "csv", "html"):
        _fail(SpecError(f"bad --format {fmt!r}: use table, json, csv or html"))
    try:
        start, client = _since(since), _client()
        q = f"?since={start}" + (f"&workload={workload}" if workload else "")
        epochs = client.get(f"/v1/epochs{q}")
        spans = client.get(f"/v1/spans?since={start}")
        gpus = client.get("/v1/gpus")
    except GpuschedError as err:
        _fail(err)
    now = time.time()
    stats = throughput.summarize(epochs, workload=workload)
    model = reports.speed_model(epochs, gpus)
    recs = reports.advice(stats, model)
    # the window starts at the first job in it: a 30-day window on a week-old host would
    # otherwise dilute every GPU's busy fraction with time before gpusched ran
    chart_start = _first_activity(spans, start, now)
    busy = throughput.busy_fraction(spans, gpus, chart_start, now)
    if fmt == "table":
        text = (reports.throughput_table(stats, recs, model=model,
                                         gpu_names=[g["name"] for g in gpus],
                                         notes=reports.gpu_notes(gpus)) if stats else
                "no training epochs recorded in this window") + "\n"
    elif fmt == "json":
        text = render.json_text(reports.throughput_json(stats, recs, busy))
    elif fmt == "csv":
        text = reports.throughput_csv(stats)
    else:
        output = output or Path("gpusched-report.html")
        text = reports.html_report(stats, recs, busy, spans, gpus, chart_start, now)
    if output is None:
        sys.stdout.write(text)
    else:
        _write_report(output, lambda path: path.write_text(text))


def _write_report(path: Path, write: Callable[[Path], object]) -> None:
    """Write a report file and say so; a path that cannot be written is a message (exit 2),
    not a traceback."""
    if not path.parent.is_dir():
        _fail(SpecError(f"cannot write {path}: the directory {path.parent} does not exist"))
    try:
        write(path)
    except OSError as err:
        _fail(SpecError(f"cannot write {path}: {err.strerror or err}"))
    except ImportError as err:  # png/svg charts need the reports extra
        _fail(GpuschedError(f"cannot write {path}: {err.name or 'matplotlib'} is not installed "
                            "(pip install 'tao-gpusched[reports]')"))
    typer.echo(f"wrote {path}")


def _first_activity(spans: list[dict[str, Any]], since: float, now: float) -> float:
    """Start the chart at the first job in the window (with a 5% margin), not at an empty
    stretch before it; the requested window still bounds it."""
    starts = [s["started_at"] for s in spans if s.get("started_at")]
    if not starts:
        return since
    first = max(since, min(starts))
    return max(since, first - 0.05 * (now - first))


@report_app.command("timeline")
def report_timeline(
    since: Annotated[str, typer.Option(help="Window start: 24h, 7d or a date.")] = "24h",
    fmt: Annotated[str, typer.Option("--format", help="html, png or svg.")] = "html",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file (default "
                                                "gpusched-timeline.FORMAT).")] = None,
) -> None:
    """A Gantt chart of jobs per GPU over time, coloured by stage, idle gaps visible."""
    from gpusched import reports, throughput

    if fmt not in ("html", "png", "svg"):
        _fail(SpecError(f"bad --format {fmt!r}: use html, png or svg"))
    try:
        start, client = _since(since), _client()
        spans = client.get(f"/v1/spans?since={start}")
        gpus = client.get("/v1/gpus")
    except GpuschedError as err:
        _fail(err)
    now = time.time()
    start = _first_activity(spans, start, now)
    path = output or Path(f"gpusched-timeline.{fmt}")
    if fmt == "html":
        busy = throughput.busy_fraction(spans, gpus, start, now)
        html = reports.timeline_html(spans, gpus, start, now, busy)
        _write_report(path, lambda p: p.write_text(html))
    else:
        _write_report(path, lambda p: reports.timeline_plot(spans, gpus, start, now, str(p), fmt=fmt))


pipeline_app = typer.Typer(help="Whole TAO pipelines: train, evaluate, prune, retrain, gate.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("run")
def pipeline_run(
    file: Annotated[Path, typer.Argument(help="The pipeline TOML (see examples/).")],
    mount: Annotated[list[str], typer.Option("--mount", "-v", help="SRC:DST[:ro] for container "
                                             "stages; default: ~/.tao_mounts.json.")] = [],  # noqa: B006
    env: Annotated[list[str], typer.Option("--env", "-e", help="K=V for every stage.")] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Move an earlier run's output in the stages' results directories "
        "aside (into <dir>/.gpusched-old-<time>/) instead of refusing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Queue a whole pipeline and return at once (prints its id); see `pipeline status`."""
    import tomllib

    try:
        try:
            definition = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SpecError(f"cannot read pipeline {file}: {err}") from err
        base_dir = str(file.resolve().parent)
        definition = _derive_pipeline_specs(definition, base_dir)
        if overwrite:
            from gpusched.pipelines import expand, load, retry_round_thresholds

            pdef = load(definition, base_dir)
            rounds = [None, *([v] for v in retry_round_thresholds(pdef))]  # and the gate's
            for values in rounds:
                for planned in expand(pdef, thresholds=values):
                    _tao_move_aside(SimpleNamespace(
                        task=planned.fields["task"], model=planned.fields.get("model"),
                        spec=planned.fields.get("spec"),
                        results_dir=planned.fields.get("results_dir")))
        body: dict[str, Any] = {"definition": definition,
                                "base_dir": base_dir, "env": _env_pairs(env)}
        if mount:
            body["mounts"] = [_mount(m) for m in mount]
        elif (Path.home() / ".tao_mounts.json").exists():
            spec: dict[str, Any] = {"mounts": [], "env": {}, "shm_size": None, "user": None}
            _apply_tao_mounts(spec)
            body["mounts"], body["env"] = spec["mounts"], {**spec["env"], **body["env"]}
        result = _submit("/v1/pipelines", body)
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(result)
    else:
        typer.echo(f"pipeline {result['id']} ({render.safe(result['name'])}) queued with "
                   f"{len(result['jobs'])} stage(s): `gpusched pipeline status {result['id']}`")


def _derive_pipeline_specs(definition: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """Stages with ``overrides``: edit their specs here, as the user (the daemon never reads
    or writes the user's files for this), write each edited spec beside its original, and
    send the definition pointing at the edited files."""
    from gpusched.pipelines import derive_specs

    definition, files = derive_specs(definition, base_dir,
                                     lambda path: Path(path).read_text())
    for path, text in files.items():
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            if target.exists() and target.read_text() == text:
                continue  # the same edits as last time: the name is the content's hash
            tmp.write_text(text)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise SpecError(f"cannot write the edited spec {path}: {err.strerror or err}"
                            ) from err
    return definition


@pipeline_app.command("status")
def pipeline_status(ref: Annotated[str, typer.Argument(help="Pipeline id or name.")],
                    as_json: JsonOpt = False) -> None:
    """A pipeline's stages, its gate and, once decided, the summary table and result."""
    try:
        data = _client().get(f"/v1/pipelines/{ref}")
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(data)
        return
    typer.echo(render.pipeline_detail(data))
    raise typer.Exit(0 if data["status"] in ("running", "succeeded") else 1)


@pipeline_app.command("result")
def pipeline_result(ref: Annotated[str, typer.Argument(help="Pipeline id or name.")]) -> None:
    """Print the file to deploy: the retrained best checkpoint of the branch the gate chose
    (`model=$(gpusched pipeline result NAME)`). Exit 1, saying why on stderr, if there is
    none yet or none at all."""
    try:
        data = _client().get(f"/v1/pipelines/{ref}")
    except GpuschedError as err:
        _fail(err)
    model, why = render.pipeline_model(data)
    if model is None:
        typer.echo(f"gpusched: {why}", err=True)
        raise typer.Exit(1)
    typer.echo(render.safe(model))


@pipeline_app.command("ls")
def pipeline_ls(as_json: JsonOpt = False) -> None:
    """All pipelines with their status."""
    try:
        data = _client().get("/v1/pipelines")
    except GpuschedError as err:
        _fail(err)
    if as_json:
        render.emit_json(data)
    else:
        typer.echo(render.table(["ID", "NAME", "STATUS", "ROUNDS", "CREATED", "REASON"],
                                [[p["id"], p["name"], p["status"], p["rounds"],
                                  render.ago(p["created_at"]), p["reason"] or ""]
                                 for p in data]) if data else "no pipelines")


admin_app = typer.Typer(help="Database backups and restores (root).", no_args_is_help=True)
app.add_typer(admin_app, name="admin")


@admin_app.command("backup")
def admin_backup(state_dir: Annotated[Path | None, typer.Option(help="State directory.")] = None
                 ) -> None:
    """Write an online backup of the database now (the daemon also does so every
    backup.interval_s); prints its path."""
    from gpusched import admin
    from gpusched.config import load_settings

    try:
        settings = load_settings(state_dir=state_dir)
        typer.echo(admin.backup(settings))
    except GpuschedError as err:
        _fail(err)


@admin_app.command("restore")
def admin_restore(
    backup: Annotated[Path, typer.Argument(help="A backup file (state_dir/backups/...).")],
    state_dir: Annotated[Path | None, typer.Option(help="State directory.")] = None,
) -> None:
    """Replace the database with a checked backup. The daemon must be stopped; the current
    database is kept beside it as gpusched.db.pre-restore-<time>."""
    from gpusched import admin
    from gpusched.config import load_settings

    try:
        settings = load_settings(state_dir=state_dir)
        kept = admin.restore(settings, backup)
        typer.echo(f"restored {backup} into {settings.db_path}"
                   + (f"; the old database is {kept}" if kept else " (there was none before)"))
    except GpuschedError as err:
        _fail(err)


@admin_app.command("init")
def admin_init(
    state_dir: Annotated[Path | None, typer.Option(help="State directory.")] = None,
) -> None:
    """Start with an empty queue on purpose when the database is missing or empty: moves logs/
    and runs/ aside and creates an empty database (backups are kept). The daemon must be
    stopped."""
    from gpusched import admin
    from gpusched.config import load_settings

    try:
        settings = load_settings(state_dir=state_dir)
        moved = admin.init_fresh(settings)
        typer.echo(f"created an empty database {settings.db_path}"
                   + "".join(f"; moved {p.name.split('.')[0]}/ aside to {p}" for p in moved))
    except GpuschedError as err:
        _fail(err)


@app.command()
def demo(keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary state "
                                            "directory.")] = False) -> None:
    """Run the demo: a daemon on two simulated GPUs in a temporary state directory."""
    from gpusched.demo import main as run_demo

    raise typer.Exit(run_demo(keep=keep, out=typer.echo))


@app.command()
def simulate(
    trace: Annotated[str, typer.Option("--trace", "-t", help="seed, mixed, big (1,000 jobs) "
                                       "or a trace TOML file.")] = "seed",
    policy: Annotated[str, typer.Option("--policy", help="fifo, throughput or both.")] = "both",
    as_json: JsonOpt = False,
) -> None:
    """Replay a trace through the real planner on a fake clock (no daemon, no processes):
    makespan, mean job completion time, GPU busy fraction and a lower bound on makespan for
    each policy. The bound needs SciPy (`pip install 'tao-gpusched[sim]'`)."""
    from gpusched import simulate as sim

    policies = ["fifo", "throughput"] if policy == "both" else [policy]
    text, code = sim.run_cli(trace, policies, as_json)
    typer.echo(text, err=code == 2)
    raise typer.Exit(code)


def main() -> None:
    """``python -m gpusched.cli``: as the ``gpusched`` command (``gpusched.fastcli``), which
    answers submit and ls without building this app."""
    from gpusched.fastcli import run_fast

    if not run_fast(sys.argv[1:]):
        app()


if __name__ == "__main__":
    main()
