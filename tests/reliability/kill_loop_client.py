"""A client process for test_kill9_loop: submits, cancels, releases and lists until told to stop.

    python kill_loop_client.py SOCKET OUT_JSONL SEED STOP_FILE MARKER_FILE WORKDIR DEADLINE_S [cli]

With ``cli`` the client submits, cancels and lists through the ``gpusched`` command line (exit
code 7 with one line on stderr is the retryable answer; a traceback is a failure) instead of the
``Client`` library.

Each request is one line of OUT_JSONL: ``{"op", "ok", "id"?, "cls"?, "msg"?, "token"?}``. Every
submission carries a unique token as the last argument of its command (``$0`` of ``sh -c``), and
is sent with an idempotency key that its retries reuse (the CLI retries by itself), so a
submission whose reply was lost to a kill is queued once: the test counts tokens stored under two
job ids. ``cls`` is the
error class: ``DaemonUnavailable`` is the clear, retryable answer a client gets while the daemon
is down or restarting; ``Conflict`` is an expected refusal (cancel of a job that already
succeeded, release of a job that is not held); anything else, or a traceback, is a failure.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class TruncatedReply(Exception):
    """``Client`` handed back ``None`` as if a request had succeeded: what a daemon killed
    mid-reply produced before the client checked Content-Length (counted as a failure)."""


def checked(result: Any) -> Any:
    if result is None:
        raise TruncatedReply("the client returned None for a reply cut short")
    return result


def main() -> int:
    sock, out_path, seed, stop_file, marker, workdir, deadline_s = sys.argv[1:8]
    use_cli = sys.argv[8:9] == ["cli"]
    from gpusched.client import Client
    from gpusched.errors import DaemonUnavailable, GpuschedError

    rng = random.Random(int(seed))
    client = Client(sock, timeout=15)
    acked: list[int] = []
    held: list[int] = []
    count = 0
    deadline = time.monotonic() + float(deadline_s)
    with open(out_path, "a", buffering=1) as out:
        def record(op: str, **kw: object) -> None:
            out.write(json.dumps({"op": op, **kw}) + "\n")

        while not Path(stop_file).exists() and time.monotonic() < deadline:
            r = rng.random()
            down = False
            op = ("submit" if r < 0.55 or not acked else "cancel" if r < 0.70 else
                  "release" if r < 0.75 and held else "list" if r < 0.90 else "show")
            count += 1
            token = f"tok-{seed}-{count}"
            if use_cli and op in ("submit", "cancel", "list"):
                down = cli_op(op, rng, acked, sock, marker, workdir, seed, record, token)
                # a CLI call costs ~0.2 s of CPU: pace it so the daemon's restarts keep up
                time.sleep(rng.uniform(0.05, 0.1) if down else rng.uniform(0.2, 0.5))
                continue
            try:
                if op == "submit":
                    hold = rng.random() < 0.05
                    body = {
                        "command": ["sh", "-c", f'echo "$GPUSCHED_JOB_ID $GPUSCHED_ATTEMPT" >> '
                                                f'{marker}; sleep 0.0{rng.randint(1, 9)}', token],
                        "gpus": {"count": rng.choice((1, 1, 2))}, "workdir": workdir,
                        "hold": hold, "name": f"c{seed}"}
                    # a lost reply is retried with the same idempotency key (for up to 10 s)
                    res = checked(client.submit("/v1/jobs", body))
                    job_id = int(res["id"])
                    acked.append(job_id)
                    if hold:
                        held.append(job_id)
                    record("submit", ok=True, id=job_id, hold=hold, token=token)
                elif op == "cancel":
                    job_id = rng.choice(acked[-50:])
                    res = checked(client.post(f"/v1/jobs/{job_id}/cancel"))
                    record("cancel", ok=True, id=job_id, result=res["result"])
                elif op == "release":
                    job_id = held.pop(rng.randrange(len(held)))
                    checked(client.post(f"/v1/jobs/{job_id}/release"))
                    record("release", ok=True, id=job_id)
                elif op == "list":
                    rows = checked(client.get("/v1/jobs"))
                    record("list", ok=True, n=len(rows))
                else:
                    job_id = rng.choice(acked)
                    row = checked(client.get(f"/v1/jobs/{job_id}"))
                    record("show", ok=True, id=job_id, status=row["status"])
            except GpuschedError as err:
                # NotConnected and ReplyLost are the client's kinds of DaemonUnavailable
                down = isinstance(err, DaemonUnavailable)
                record(op, ok=False, cls="DaemonUnavailable" if down else type(err).__name__,
                       msg=err.message[:300])
            except TruncatedReply as err:
                record(op, ok=False, cls="TruncatedReply", msg=str(err))
            except Exception as err:  # a failure of the client library: the test reports it
                record(op, ok=False, cls=type(err).__name__, msg=str(err)[:300],
                       tb=traceback.format_exc())
            time.sleep(rng.uniform(0.02, 0.08) if down else rng.uniform(0.05, 0.25))
    return 0


CLI_CODES = {"submit": (0,), "cancel": (0, 5), "list": (0,)}  # 5: the job already ended


def cli_op(op: str, rng: random.Random, acked: list[int], sock: str, marker: str, workdir: str,
           seed: str, record: Callable[..., None], token: str) -> bool:
    """One operation through the CLI; returns True when the daemon was unavailable."""
    env = {**os.environ, "GPUSCHED_SOCKET": sock}
    if op == "submit":
        script = f'echo "$GPUSCHED_JOB_ID $GPUSCHED_ATTEMPT" >> {marker}; sleep 0.0{rng.randint(1, 9)}'
        argv = ["submit", "--gpus", str(rng.choice((1, 2))), "--workdir", workdir, "--name",
                f"c{seed}", "--", "sh", "-c", script, token]
    elif op == "cancel":
        target = rng.choice(acked[-50:])
        argv = ["cancel", str(target)]
    else:
        argv = ["ls", "--json"]
    try:
        r = subprocess.run([sys.executable, "-m", "gpusched.cli", *argv], env=env,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        record(op, ok=False, cls="CliTimeout", msg=" ".join(argv))
        return False
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        record(op, ok=False, cls="CliTraceback", msg=r.stderr[-300:],
               tb=r.stderr)
        return False
    if r.returncode == 7:
        record(op, ok=False, cls="DaemonUnavailable", msg=r.stderr.strip()[:300])
        return True
    if r.returncode == 5 and op == "cancel":
        record(op, ok=False, cls="Conflict", msg=r.stderr.strip()[:300])
        return False
    if r.returncode not in CLI_CODES[op]:
        record(op, ok=False, cls=f"CliExit{r.returncode}",
               msg=(r.stderr or r.stdout)[-300:])
        return False
    if op == "submit":
        try:
            job_id = int(r.stdout.strip())
        except ValueError:
            record(op, ok=False, cls="CliBadOutput", msg=r.stdout[-300:])
            return False
        acked.append(job_id)
        record(op, ok=True, id=job_id, hold=False, via="cli", token=token)
    elif op == "cancel":
        record(op, ok=True, id=target, via="cli", result=r.stdout.strip().split(": ")[-1])
    else:
        record(op, ok=True, via="cli")
    return False


if __name__ == "__main__":
    sys.exit(main())
