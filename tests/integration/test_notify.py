"""--notify and --notify-url against real receivers: a real process as the command, a real
HTTP server on 127.0.0.1 (also a failing and a slow one), with the tick on a FakeClock."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.config import Settings
from gpusched.errors import SpecError
from gpusched.gpus import SimulatedInventory
from gpusched.models import JobSpec
from gpusched.runners.local import LocalRunner
from gpusched.service import Service
from gpusched.testing.clock import FakeClock
from gpusched.testing.harness import SIM_GPUS
from gpusched.testing.receiver import Receiver
from gpusched.testing.ticks import ended, restarted, run_until, submit


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def make_service(state_dir: Path, **notify: Any) -> Service:
    settings = Settings(state_dir=state_dir, socket=state_dir / "gpusched.sock",
                        gpus={"simulate": SIM_GPUS}, docker={"enabled": False},
                        scheduler={"kill_grace_s": 2},
                        notify={"retry_backoff_s": 5, "timeout_s": 5, **notify})
    return Service(settings, inventory=SimulatedInventory(SIM_GPUS),
                   runners={"local": LocalRunner.of(settings)}, clock=FakeClock())


@pytest.fixture
def svc(state_dir: Path) -> Iterator[Service]:
    s = make_service(state_dir, retries=2)
    yield s
    s.close()


def notes(svc: Service, job_id: int, state: str | None = None) -> list[dict[str, Any]]:
    return svc.store.notifications(job_id, state)


def test_notify_runs_a_real_command_with_the_jobs_outcome(svc: Service, tmp_path: Path) -> None:
    out = tmp_path / "notified"
    j = submit(svc, "sh", "-c", "exit 3", name="nightly", env={"KEEP": "kept", "ENV": "/x"},
               notify_cmd=f'env | grep "^GPUSCHED_\\|^KEEP=\\|^ENV=" | sort > {out}; '
                          f'id -u >> {out}; pwd >> {out}')
    run_until(svc, lambda: bool(notes(svc, j, "done")))
    lines = out.read_text().splitlines()
    assert f"GPUSCHED_JOB_ID={j}" in lines
    assert "GPUSCHED_JOB_STATUS=failed" in lines
    assert "GPUSCHED_EXIT_CODE=3" in lines
    assert "GPUSCHED_JOB_NAME=nightly" in lines
    assert "GPUSCHED_JOB_REASON=exit code 3" in lines
    assert "KEEP=kept" in lines and "ENV=/x" not in lines  # the job's env, as its shim got it
    assert lines[-2:] == [str(__import__("os").getuid()), str(svc.settings.state_dir)]


def test_a_failing_or_slow_notify_command_never_blocks_the_tick(state_dir: Path) -> None:
    svc = make_service(state_dir, command_timeout_s=30)
    try:
        a = submit(svc, "true", notify_cmd="sleep 1000")
        b = submit(svc, "true", notify_cmd="exit 7")
        run_until(svc, lambda: bool(notes(svc, b, "failed")))
        assert notes(svc, b)[0]["last_error"] == "exit code 7"
        assert notes(svc, a, "sending")  # still sleeping; the tick went on
        later = submit(svc, "true")
        t = time.monotonic()
        run_until(svc, ended(svc, later), step=0.5)
        assert time.monotonic() - t < 10
        svc.clock.advance(30)  # type: ignore[attr-defined]
        run_until(svc, lambda: bool(notes(svc, a, "failed")))
        assert notes(svc, a)[0]["last_error"] == "timed out; killed"
    finally:
        svc.close()


def test_notify_url_posts_the_jobs_json(svc: Service, receiver: Receiver) -> None:
    j = submit(svc, "sh", "-c", "echo secret-output; exit 0", notify_url=receiver.url,
               env={"TOKEN": "s3cret"})
    run_until(svc, lambda: bool(notes(svc, j, "done")))
    [body] = receiver.bodies
    assert (body["id"], body["status"], body["exit_code"]) == (j, "succeeded", 0)
    assert "command" not in body and "s3cret" not in json.dumps(body)
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert receiver.headers[0]["X-Gpusched-Delivery"] == str(notes(svc, j)[0]["id"])


def test_a_failing_receiver_is_retried_with_backoff_then_given_up(state_dir: Path) -> None:
    # one spare retry: a loaded CI machine once dropped a connection before the reply
    # (RemoteDisconnected), which is retried like any failure but consumes no code
    flaky, dead = Receiver(codes=[500, 503]), Receiver(codes=[500] * 10)
    svc = make_service(state_dir, retries=3)
    try:
        j = submit(svc, "true", notify_url=flaky.url)
        k = submit(svc, "true", notify_url=dead.url)
        run_until(svc, lambda: bool(notes(svc, j, "done")) and bool(notes(svc, k, "failed")),
                  step=1)
        # delivered on the third answer it got (500, 503, then 200), each failure retried
        assert len(flaky.bodies) == 3 and notes(svc, j)[0]["tries"] >= 3
        # given up after the first POST and notify.retries = 3 more, whatever the network did
        assert notes(svc, k)[0]["tries"] == 4 and 1 <= len(dead.bodies) <= 4
        assert notes(svc, k)[0]["last_error"]
    finally:
        svc.close()
        flaky.close()
        dead.close()


def test_a_slow_receiver_times_out_is_retried_and_the_tick_goes_on(state_dir: Path) -> None:
    slow = Receiver(hold=True)
    svc = make_service(state_dir, timeout_s=0.5, retries=1)
    try:
        j = submit(svc, "true", notify_url=slow.url)
        run_until(svc, lambda: slow.arrived.is_set())
        other = submit(svc, "true")
        run_until(svc, ended(svc, other))  # the POST hangs; the tick does not
        run_until(svc, lambda: notes(svc, j)[0]["state"] == "pending")
        assert "timed out" in notes(svc, j)[0]["last_error"]
        slow.hold = False
        slow.release.set()
        run_until(svc, lambda: bool(notes(svc, j, "done")), step=1)
        assert notes(svc, j)[0]["tries"] == 2
    finally:
        svc.close()
        slow.close()


def test_a_restart_neither_loses_nor_repeats_more_than_the_post_in_flight(
        state_dir: Path, receiver: Receiver) -> None:
    """A delivered notification is not sent again after a restart; a POST in flight when the
    daemon stops is sent again (at least once: receivers dedupe on X-Gpusched-Delivery)."""
    slow = Receiver(hold=True)
    svc = make_service(state_dir)
    try:
        done_job = submit(svc, "true", notify_url=receiver.url)
        run_until(svc, lambda: bool(notes(svc, done_job, "done")))
        j = submit(svc, "true", notify_url=slow.url)
        run_until(svc, slow.arrived.is_set)
        assert notes(svc, j)[0]["state"] == "sending"
        with restarted(svc) as svc2:
            slow.hold = False
            slow.release.set()
            run_until(svc2, lambda: bool(notes(svc2, j, "done")))
            svc2.daemon.tick(svc2.clock.now())
        assert [b["id"] for b in receiver.bodies] == [done_job]
        assert [b["id"] for b in slow.bodies] == [j, j]
        assert len({h["X-Gpusched-Delivery"] for h in slow.headers}) == 1
    finally:
        slow.close()


def test_notify_urls_are_http_only_and_the_allowlist_holds(state_dir: Path) -> None:
    for bad in ("file:///etc/passwd", "ftp://h/x", "gopher://127.0.0.1:25/", "http:///x"):
        with pytest.raises(ValueError, match="http:// or https://"):
            JobSpec(command=["true"], notify_url=bad)
    svc = make_service(state_dir, allowed_hosts=["hooks.example.com", "*.chat.example"])
    try:
        svc.daemon.refresh_inventory(svc.clock.now())
        for url in ("http://127.0.0.1:9090/", "http://metadata.internal/"):
            with pytest.raises(SpecError, match=r"not in notify\.allowed_hosts"):
                svc.validate_spec(JobSpec(command=["true"], notify_url=url), 0)
        for url in ("https://hooks.example.com/x", "http://team.chat.example/y"):
            svc.validate_spec(JobSpec(command=["true"], notify_url=url), 0)
    finally:
        svc.close()


def test_notify_url_default_from_the_config(state_dir: Path, receiver: Receiver) -> None:
    svc = make_service(state_dir, url=receiver.url, allowed_hosts=["hooks.example.com"])
    try:
        spec = svc.with_notify_default(JobSpec(command=["true"]))
        assert spec.notify_url == receiver.url
        svc.validate_spec(spec, 0)  # the admin's own URL needs no allowlist entry
        j = svc.store.submit(spec, owner_uid=0, owner="root", now=svc.clock.now())
        run_until(svc, lambda: bool(notes(svc, j, "done")))
        assert [b["id"] for b in receiver.bodies] == [j]
        own = svc.with_notify_default(JobSpec(command=["true"], notify_url="http://x/"))
        assert own.notify_url == "http://x/"
    finally:
        svc.close()


def test_the_notifier_skips_its_query_only_while_no_write_could_open_one(
        svc: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Most ticks have no notification to deliver: the notifier asks the store once, then
    not again until a write (this process's, or another process's commit) could have made
    one open. Every such write is seen by the very next tick."""
    asked: list[int] = []
    real = svc.store.notifications_open

    def counted() -> bool:
        asked.append(1)
        return real()
    monkeypatch.setattr(svc.store, "notifications_open", counted)
    now = svc.clock.now
    svc.daemon.tick(now())
    assert asked == [1]
    plain = submit(svc, "true")
    run_until(svc, ended(svc, plain))
    asked.clear()
    svc.daemon.tick(now())
    assert asked == [], "nothing could have opened a notification, yet the store was asked"
    out = tmp_path / "notified"
    j = submit(svc, "true", notify_cmd=f"echo $GPUSCHED_JOB_STATUS > {out}")
    svc.daemon.tick(now())
    assert asked, "a job submitted with --notify must make the notifier look again"
    run_until(svc, lambda: bool(notes(svc, j, "done")))
    assert out.read_text().strip() == "succeeded"
    svc.daemon.tick(now())
    asked.clear()
    svc.daemon.tick(now())
    assert asked == []
    # another process's commit (a tool writing the file): the store cannot know what it did
    other = sqlite3.connect(str(svc.store.path))
    try:
        with other:
            other.execute("UPDATE notifications SET state = 'pending', next_at = 0"
                          " WHERE job_id = ?", (j,))
    finally:
        other.close()
    svc.daemon.tick(now())
    assert asked, "another process's commit must make the notifier look again"
    run_until(svc, lambda: bool(notes(svc, j, "done")))
