"""Issue 15: ``submit --array`` / ``--from-file`` (one request, one transaction, every job
checked as a single submission, all or nothing, idempotent) and the paged ``ls``, against the
real daemon as a subprocess through the real CLI."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpusched.errors import Conflict, SpecError
from gpusched.testing.harness import DaemonProcess


def _cli(d: DaemonProcess, *args: str, stdin: str | None = None,
         cwd: str = "/tmp") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpusched.cli", *args], env=d.env, cwd=cwd,
                          capture_output=True, text=True, timeout=120, input=stdin)


def _count(d: DaemonProcess) -> int:
    with sqlite3.connect(d.state_dir / "gpusched.db") as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


def _ids(r: subprocess.CompletedProcess[str]) -> list[int]:
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


def _post(d: DaemonProcess, path: str, body: Any, key: str) -> tuple[int, Any]:
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(d.socket))
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nIdempotency-Key: "
                  f"{key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body_bytes = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body_bytes)


def test_an_array_runs_one_job_per_index_with_its_index(daemon: DaemonProcess) -> None:
    r = _cli(daemon, "submit", "--gpus", "0", "--name", "sweep", "--array", "0-10:5", "--",
             "sh", "-c", "echo index=$GPUSCHED_ARRAY_INDEX")
    ids = _ids(r)
    assert len(ids) == 3 and ids == list(range(ids[0], ids[0] + 3))
    w = _cli(daemon, "wait", *map(str, ids), "--timeout", "60")
    assert w.returncode == 0, w.stdout + w.stderr
    for jid, index in zip(ids, (0, 5, 10), strict=True):
        assert _cli(daemon, "logs", str(jid)).stdout == f"index={index}\n"
        job = daemon.show(jid)
        assert job["name"] == "sweep" and job["status"] == "succeeded"


def test_the_other_options_apply_to_every_job_of_a_batch(daemon: DaemonProcess) -> None:
    r = _cli(daemon, "submit", "--hold", "--priority", "7", "--gpus", "0", "--env", "X=1",
             "--array", "1,3", "--json", "--", "true")
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["count"] == 2 and reply["status"] == "held"
    assert reply["ids"] == [reply["first"], reply["last"]]
    with sqlite3.connect(daemon.state_dir / "gpusched.db") as db:
        rows = db.execute("SELECT status, priority, spec FROM jobs ORDER BY id").fetchall()
    assert [(s, p) for s, p, _ in rows] == [("held", 7), ("held", 7)]
    envs = [json.loads(spec)["env"] for _, _, spec in rows]
    assert [(e["X"], e["GPUSCHED_ARRAY_INDEX"]) for e in envs] == [("1", "1"), ("1", "3")]


def test_from_file_queues_each_line_split_as_a_shell_would(daemon: DaemonProcess,
                                                           tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# the sweep\n\necho 'a b' c\n  # off\nprintf '%s\\n' x\n")
    ids = _ids(_cli(daemon, "submit", "--gpus", "0", "--from-file", str(jobs)))
    ids += _ids(_cli(daemon, "submit", "--gpus", "0", "--from-file", "-", stdin="echo stdin\n"))
    assert len(ids) == 3
    assert _cli(daemon, "wait", *map(str, ids), "--timeout", "60").returncode == 0
    assert [_cli(daemon, "logs", str(i)).stdout for i in ids] == ["a b c\n", "x\n", "stdin\n"]


def test_one_bad_job_refuses_the_whole_batch(daemon: DaemonProcess, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("true\n\n# two good, then an empty program\ntrue\n''\n")
    r = _cli(daemon, "submit", "--gpus", "0", "--from-file", str(jobs))
    assert r.returncode == 2
    assert f"--from-file {jobs}, line 5:" in r.stderr and "program is empty" in r.stderr
    r = _cli(daemon, "submit", "--gpus", "9", "--array", "0-2", "--", "true")
    assert r.returncode == 2 and "array index 0:" in r.stderr, r.stderr
    r = _cli(daemon, "submit", "--array", "0-3", "--env", "GPUSCHED_ARRAY_INDEX=9", "--", "true")
    assert r.returncode == 2 and "GPUSCHED_ARRAY_INDEX is set by gpusched" in r.stderr
    assert _count(daemon) == 0  # nothing of any of them was stored


def test_a_hostile_batch_is_refused_and_stores_nothing(daemon: DaemonProcess) -> None:
    c = daemon.client()
    base = {"command": ["true"], "gpus": {"count": 0}, "workdir": "/tmp"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"spec": base, "array": [1, 1]}, "index twice"),
        ({"spec": base, "array": [-1]}, "array"),
        ({"spec": base, "array": ["1"]}, "array"),
        ({"spec": base, "array": list(range(10_001))}, "array"),
        ({"spec": base, "array": []}, "array"),
        ({"spec": base, "array": [0], "commands": [["x"]]}, "either array"),
        ({"spec": base}, "either array"),
        ({"spec": base, "commands": [["true"]]}, "takes none"),
        ({"spec": {"gpus": {"count": 0}}, "commands": [["true"], [1]]}, "commands"),
        ({"spec": {**base, "owner_uid": 0}, "array": [0]}, "owner_uid"),
        ({"spec": {**base, "kind": "tao:train"}, "array": [0]}, "set by the daemon"),
        ({"spec": {**base, "workdir": "/proc/self/cwd"}, "array": [0]}, "array index 0"),
        ({"spec": {"gpus": {"count": 0}, "workdir": "/tmp"},
          "commands": [["true"], ["true"]], "lines": [1]}, "one line number per command"),
        ({"spec": base, "array": [0], "extra": 1}, "extra"),
    ]
    for body, says in bad:
        with pytest.raises(SpecError, match=says):
            c.submit("/v1/jobs/batch", body)
    assert _count(daemon) == 0


def test_a_retried_batch_is_queued_once(daemon: DaemonProcess) -> None:
    body = {"spec": {"command": ["true"], "gpus": {"count": 0}, "workdir": "/tmp",
                     "hold": True}, "array": [0, 1, 2]}
    first = _post(daemon, "/v1/jobs/batch", body, "batch-key-000001")
    again = _post(daemon, "/v1/jobs/batch", body, "batch-key-000001")
    assert first[0] == 201 and again[0] == 200 and first[1] == again[1]
    assert first[1]["status"] == "held" and len(first[1]["ids"]) == 3
    assert _count(daemon) == 3
    with pytest.raises(Conflict, match="already used"):
        daemon.client().submit("/v1/jobs/batch", {**body, "array": [5]}, key="batch-key-000001")
    with pytest.raises(Conflict, match="already used"):  # a single submit with a batch's key
        daemon.client().submit("/v1/jobs", body["spec"], key="batch-key-000001")
    assert _count(daemon) == 3


def test_ls_shows_running_jobs_and_the_head_of_the_queue(daemon: DaemonProcess) -> None:
    blocker = _ids(_cli(daemon, "submit", "--gpus", "2", "--", "sleep", "600"))[0]
    try:
        daemon.wait_status(blocker, ["running"])
        low = _ids(_cli(daemon, "submit", "--array", "0-39", "--", "true"))
        held = _ids(_cli(daemon, "submit", "--hold", "--array", "0-4", "--", "true"))
        high = _ids(_cli(daemon, "submit", "--priority", "5", "--array", "0-1", "--", "true"))
        r = _cli(daemon, "ls")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        shown = [int(x.split()[0]) for x in lines[1:-1]]
        # running first, then the queue in planning order: priority 5 before the rest
        assert shown == [blocker, *high, *low[:28]]
        assert lines[-1].startswith("... 12 more queued, 5 held not shown (above: the first 30")
        assert "`gpusched ls --limit N`" in lines[-1]
        r = _cli(daemon, "ls", "--limit", "45", "--json")
        listed = [j["id"] for j in json.loads(r.stdout)]
        assert listed == [blocker, *high, *low, *held[:3]]
        assert "2 more held not shown" in r.stderr
        assert len(json.loads(_cli(daemon, "ls", "--all", "--json").stdout)) == 48
        page = daemon.client().get("/v1/jobs?head=1&status=held")
        assert [j["id"] for j in page["jobs"]] == held[:1] and page["more"] == {"held": 4}
        with pytest.raises(SpecError, match="head"):
            daemon.client().get("/v1/jobs?head=0")
    finally:
        _cli(daemon, "cancel", "--mine")


def test_a_batch_larger_than_the_request_limit_says_how_to_split_it(state_dir: Path) -> None:
    with DaemonProcess(state_dir, env={"GPUSCHED_API__MAX_BODY_BYTES": "4096"}) as d:
        lines = "".join(f"python train.py --seed {i}\n" for i in range(400))
        r = _cli(d, "submit", "--export", "NONE", "--from-file", "-", stdin=lines)
        assert r.returncode == 2, r.stdout
        assert "larger than the limit (4096)" in r.stderr
        assert "split the batch into smaller ones" in r.stderr
        assert _count(d) == 0
