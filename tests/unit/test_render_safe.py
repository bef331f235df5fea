"""Issue 11, point 9: nothing a user put in a job reaches another user's terminal raw."""

from __future__ import annotations

from gpusched import render
from gpusched.server import HIDDEN, public_reason

EVIL = "\x1b[2J\x1b]0;pwned\x07\r\b\x9b31m\u202egnp.exe\x00\x7f"


def test_safe_escapes_c0_c1_del_and_bidi_controls() -> None:
    out = render.safe(EVIL)
    assert out == "\\x1b[2J\\x1b]0;pwned\\x07\\r\\x08\\x9b31m\\u202egnp.exe\\x00\\x7f"
    assert render.safe("plain ünïcode, 日本語 ok") == "plain ünïcode, 日本語 ok"
    assert render.safe(None) == ""


def job(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": 7, "name": EVIL, "status": "failed", "exit_code": 1, "reason": "exit code 1\r",
        "attempt": 1, "gpus": [], "gpu_indices": [], "owner": "eve", "owner_uid": 1001,
        "submitted_at": "2026-01-01T00:00:00+00:00", "started_at": None, "ended_at": None,
        "priority": 0, "runner": "local", "command": ["echo", "a\rb"], "after": [],
        "request": {"count": 1, "ids": None}, "kind": "job",
        "events": [{"at": "t", "from_status": None, "to_status": "queued", "actor": "e\x1bve",
                    "reason": "x\x07"}]}
    base.update(kw)
    return base


def test_every_table_and_detail_view_escapes() -> None:
    texts = [render.jobs_table([job()]), render.job_detail(job()),
             render.pipeline_detail({"id": 1, "name": EVIL, "status": "failed", "rounds": 1,
                                     "reason": "r\x1b", "jobs": [job()]}),
             render.table(["A"], [[EVIL]])]
    for text in texts:
        assert not any(c in text for c in "\x1b\x07\r\x9b\u202e\x00"), repr(text)
    assert "(hidden" in render.job_detail(job(command=[], redacted=True))


def test_public_reasons_keep_outcomes_and_hide_free_text() -> None:
    assert public_reason("exit code 3") == "exit code 3"
    assert public_reason("exit code 137 (killed by SIGKILL)") == "exit code 137 (killed by SIGKILL)"
    assert public_reason("exit code 1 (TAO: cannot open /home/a/secret.yaml)") == "exit code 1"
    assert public_reason("cancelled by alice") == "cancelled by alice"
    assert public_reason("killed: out of memory; retrying (2 retries left)") == (
        "killed: out of memory; retrying (2 retries left)")
    assert public_reason("could not start: [Errno 2] No such file: '/home/a/x'") == HIDDEN
    assert public_reason(None) is None


def test_tick_line_names_the_busiest_steps_without_their_parts() -> None:
    tick = {"ticks": 40, "median_ms": 1.25, "p95_ms": 3.0, "over_last": 40,
            "seconds_by_step": {"plan_and_launch": 3.0, "plan_and_launch.start": 2.5,
                                "reap": 1.0, "commit": 0.5, "notify": 0.25, "cancels": 0.0}}
    assert render.tick_line(tick) == (
        "median 1.2 ms, p95 3.0 ms over the last 40 of 40 ticks; time by step: "
        "plan_and_launch 63%, reap 21%, commit 11%")
    assert render.tick_line({"ticks": 0}) == ""  # no tick timed yet
    idle = {**tick, "seconds_by_step": dict.fromkeys(tick["seconds_by_step"], 0.0)}
    assert render.tick_line(idle).endswith("40 ticks")  # nothing to rank
