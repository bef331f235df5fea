"""safefs: files users control are read without blocking, without following their symlinks and
(with ``owner_uid``) only when that user could read them too."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.safefs import (
    UnsafeFile,
    list_user_dir,
    open_in_daemon_dir,
    open_user_file,
    read_user_bytes,
    read_user_file,
    user_file_size,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to other uids")
OTHER = 54321  # a uid (and gid) with no passwd entry: no groups


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A 0755 directory every user may search (pytest's tmp_path sits under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="gssafefs", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def untrusted(d: Path) -> Path:
    """A directory anyone may change (like /tmp or a user's results directory)."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o1777)
    return d


def test_reads_a_regular_file_up_to_the_cap_from_an_offset(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    assert read_user_file(f, max_bytes=4) == b"0123"
    assert read_user_file(f, max_bytes=100, offset=7) == b"789"
    assert read_user_file(str(f), max_bytes=0) == b""
    assert read_user_file(tmp_path / "missing", max_bytes=10) is None
    assert read_user_file(None, max_bytes=10) is None
    with pytest.raises(FileNotFoundError):
        read_user_bytes(tmp_path / "missing", max_bytes=10)
    assert user_file_size(f) == 10


def test_relative_paths_and_dot_dot_are_walked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path / "a")
    assert read_user_file("../f", max_bytes=10) == b"x"
    assert read_user_file(f"{tmp_path}/a/./../f", max_bytes=10) == b"x"


def test_a_fifo_is_refused_at_once_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(read_user_file(fifo, max_bytes=10)),
                         daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the thread before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert result == [None]
    with pytest.raises(UnsafeFile, match="not a regular file"):
        open_user_file(fifo)


def test_directories_and_sockets_are_not_regular_files(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFile, match="not a regular file"):
        open_user_file(tmp_path)
    assert read_user_file("/dev/null", max_bytes=10) is None


def test_a_symlink_in_a_directory_users_control_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("secret")
    place = untrusted(tmp_path / "results")
    (place / "status.json").symlink_to(target)
    with pytest.raises(UnsafeFile, match="symlink"):
        open_user_file(place / "status.json")
    assert read_user_file(place / "status.json", max_bytes=100) is None
    # nor as a directory on the way
    (place / "weights").symlink_to(tmp_path)
    assert read_user_file(place / "weights" / "secret", max_bytes=100) is None
    assert list_user_dir(place / "weights") is None
    assert user_file_size(place / "status.json") is None


def test_a_symlink_nobody_else_can_change_is_followed(tmp_path: Path) -> None:
    """Like a distro's /home -> /usr/home: the link and its directory are ours (or root's) and
    no one else may write the directory."""
    os.chmod(tmp_path, 0o755)
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_text("ok")
    (tmp_path / "alias").symlink_to("real")
    (tmp_path / "abs").symlink_to(real / "f")
    assert read_user_file(tmp_path / "alias" / "f", max_bytes=10) == b"ok"
    assert read_user_file(tmp_path / "abs", max_bytes=10) == b"ok"
    assert list_user_dir(tmp_path / "alias") == ["f"]
    # a link loop ends with a refusal, not a hang
    (tmp_path / "loop").symlink_to("loop")
    assert read_user_file(tmp_path / "loop", max_bytes=10) is None


@needs_root
def test_a_directory_owned_by_a_user_is_not_trusted_for_symlinks(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    (tmp_path / "f").write_text("root's")
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, OTHER, OTHER)
    (home / "link").symlink_to(tmp_path / "f")
    assert read_user_file(home / "link", max_bytes=10) is None
    # a root-owned symlink inside the user's directory is no better: they may replace it
    os.lchown(home / "link", 0, 0)
    assert read_user_file(home / "link", max_bytes=10) is None


@needs_root
def test_with_owner_uid_only_what_that_user_could_read(open_dir: Path) -> None:
    tmp_path = open_dir
    root_only = tmp_path / "shadow"
    root_only.write_text("root")
    os.chmod(root_only, 0o600)
    assert read_user_file(root_only, max_bytes=10) == b"root"  # for the daemon itself
    with pytest.raises(UnsafeFile, match="may not read"):
        open_user_file(root_only, owner_uid=OTHER)
    # the user's own 0600 file: yes; the owner's bits decide even when others' would allow
    mine = tmp_path / "mine"
    mine.write_text("mine")
    os.chown(mine, OTHER, OTHER)
    os.chmod(mine, 0o600)
    assert read_user_file(mine, max_bytes=10, owner_uid=OTHER) == b"mine"
    os.chmod(mine, 0o044)
    assert read_user_file(mine, max_bytes=10, owner_uid=OTHER) is None
    # group bits for a member of the file's group, other bits for the rest
    grp = tmp_path / "grp"
    grp.write_text("grp")
    os.chown(grp, 0, OTHER)
    os.chmod(grp, 0o640)
    assert read_user_file(grp, max_bytes=10, owner_uid=OTHER) is None  # no passwd: no groups
    os.chmod(grp, 0o604)
    assert read_user_file(grp, max_bytes=10, owner_uid=OTHER) == b"grp"
    # a readable file inside a directory the user may not search
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "f").write_text("x")
    os.chmod(closed / "f", 0o644)
    with pytest.raises(UnsafeFile, match="may not search"):
        open_user_file(closed / "f", owner_uid=OTHER)
    assert list_user_dir(closed, owner_uid=OTHER) is None
    assert list_user_dir(closed) == ["f"]
    assert read_user_file(closed / "f", max_bytes=10, owner_uid=0) == b"x"


def test_a_listing_stops_at_its_cap(tmp_path: Path) -> None:
    """The daemon lists a user's weights/ inside its tick: a directory of millions of entries
    must not stall it."""
    from gpusched.safefs import list_user_dir

    for i in range(30):
        (tmp_path / f"f{i:02d}").touch()
    assert len(list_user_dir(tmp_path) or []) == 30
    capped = list_user_dir(tmp_path, max_entries=7)
    assert capped is not None and len(capped) == 7 and capped == sorted(capped)


def _read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def test_open_in_daemon_dir_takes_our_folder_as_it_is_and_refuses_what_the_walk_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's log folder is the daemon's (0711): its files are opened from it, without the
    walk from /; they must still be regular files, and are opened without blocking."""
    import gpusched.safefs as safefs

    folder = tmp_path / "logs" / "7"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o711)
    (folder / "1.exit").write_text("0\n")
    os.mkfifo(folder / "fifo")
    (folder / "sub").mkdir()

    def no_walk(*args: object, **kw: object) -> int:
        raise AssertionError("walked from /")

    with monkeypatch.context() as m:
        m.setattr(safefs, "_walk", no_walk)
        assert _read_fd(open_in_daemon_dir(folder / "1.exit")) == b"0\n"
        assert _read_fd(open_in_daemon_dir(str(folder / "1.exit"))) == b"0\n"
        with pytest.raises(UnsafeFile, match="not a regular file"):
            open_in_daemon_dir(folder / "fifo")  # at once: O_NONBLOCK
        with pytest.raises(UnsafeFile, match="not a regular file"):
            open_in_daemon_dir(folder / "sub")
        with pytest.raises(FileNotFoundError):
            open_in_daemon_dir(folder / "2.exit")
        with pytest.raises(FileNotFoundError):
            open_in_daemon_dir(tmp_path / "logs" / "8" / "1.exit")


def test_open_in_daemon_dir_leaves_a_folder_users_control_and_symlinks_to_the_walk(
        tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    secret = tmp_path / "secret"
    secret.write_text("secret")
    place = untrusted(tmp_path / "run")  # not the daemon's: anyone may add entries
    (place / "output.log").write_text("hello")
    (place / "status.json").symlink_to(secret)
    assert _read_fd(open_in_daemon_dir(place / "output.log")) == b"hello"
    with pytest.raises(UnsafeFile, match="symlink"):
        open_in_daemon_dir(place / "status.json")
    # a symlink for the folder itself, in a place users control: refused as by the walk
    (place / "logs").symlink_to(tmp_path)
    with pytest.raises(UnsafeFile, match="symlink"):
        open_in_daemon_dir(place / "logs" / "secret")
    # ours and nobody else's to change: followed, as the walk follows it
    (tmp_path / "alias").symlink_to("secret")
    assert _read_fd(open_in_daemon_dir(tmp_path / "alias")) == b"secret"


@needs_root
def test_open_in_daemon_dir_does_not_follow_a_users_symlink_even_in_our_folder(
        tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    (tmp_path / "f").write_text("root's")
    folder = tmp_path / "7"
    folder.mkdir(mode=0o711)
    (folder / "1.exit").symlink_to(tmp_path / "f")
    os.lchown(folder / "1.exit", OTHER, OTHER)
    with pytest.raises(UnsafeFile, match="symlink"):
        open_in_daemon_dir(folder / "1.exit")
    os.chown(folder, OTHER, OTHER)  # a folder of a user's: walked, and still refused
    with pytest.raises(UnsafeFile, match="symlink"):
        open_in_daemon_dir(folder / "1.exit")
