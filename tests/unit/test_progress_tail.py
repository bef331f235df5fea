"""How the daemon follows a job's log: only what is new, and no open for what cannot be new."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gpusched.progress as progress
from gpusched.progress import _Tail


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the tail opens, by the way it opens them."""
    seen: list[str] = []
    real_daemon, real_user = progress.open_in_daemon_dir, progress.open_user_file

    def daemon_dir(path: os.PathLike[str] | str) -> int:
        seen.append(f"daemon:{os.fspath(path)}")
        return real_daemon(path)

    def user_file(path: os.PathLike[str] | str, **kw: int | None) -> int:
        seen.append(f"user:{os.fspath(path)}")
        return real_user(path, **kw)

    monkeypatch.setattr(progress, "open_in_daemon_dir", daemon_dir)
    monkeypatch.setattr(progress, "open_user_file", user_file)
    return seen


def test_a_log_is_opened_only_when_it_may_hold_something_new(tmp_path: Path,
                                                             opens: list[str]) -> None:
    log = tmp_path / "1.log"
    log.touch()
    tail = _Tail(log, own=True)
    assert tail.read() == [] and opens == []  # a new, empty log: nothing to open
    log.write_text("epoch 1\npart")
    assert tail.read() == ["epoch 1"]
    assert opens == [f"daemon:{log}"]
    assert tail.read() == [] and len(opens) == 1  # not grown: skipped after one lstat
    with log.open("a") as fh:
        fh.write("ial\n")
    assert tail.read() == ["partial"] and len(opens) == 2
    log.write_text("new\n")  # truncated and written again: from the start
    assert tail.read() == ["new"]


def test_a_users_file_is_walked_as_that_user(tmp_path: Path, opens: list[str]) -> None:
    status = tmp_path / "status.json"
    status.write_text('{"epoch": 1}\n')
    assert _Tail(status, owner_uid=os.getuid()).read() == ['{"epoch": 1}']
    assert opens == [f"user:{status}"]


def test_a_file_not_of_the_daemons_making_is_walked_even_without_an_owner(
        tmp_path: Path, opens: list[str]) -> None:
    """The folder-only check is for the daemon's own log folders: a user's status.json read
    for a job without a recorded owner is still walked from / (a symlink above its folder
    would otherwise be followed)."""
    status = tmp_path / "status.json"
    status.write_text('{"epoch": 2}\n')
    assert _Tail(status).read() == ['{"epoch": 2}']
    assert opens == [f"user:{status}"]
