"""Read files that users control, as root, without being tricked.

The daemon runs as root and reads files inside places its users own: a job's exit file in its
run directory, TAO's status.json and logs in a results directory, a stage's spec file. A user
can put a FIFO there (a plain ``open()`` blocks the daemon for good), a symlink to a file only
root may read (``/etc/shadow``, another user's 0600 file), or swap a directory for a symlink
between a check and a use. So every path is walked one component at a time with ``openat``
and ``O_NOFOLLOW``: a symlink is followed only where neither the link nor its directory can be
changed by anyone but root (or the daemon's own user): ``/home -> /usr/home`` on some distros.
The file is opened ``O_NONBLOCK`` (a FIFO opens at once and is then refused), must be a regular
file, and is read up to a cap. With ``owner_uid`` it must also be a file that user could read
themselves (search permission on every directory, read permission on the file).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

__all__ = ["UnsafeFile", "list_user_dir", "open_in_daemon_dir", "open_user_file",
           "read_user_bytes", "read_user_file", "user_file_size"]

MAX_SYMLINKS = 40
_BASE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW


class UnsafeFile(OSError):
    """The path was refused: a symlink in a user-owned place, not a regular file, or not
    readable by the user on whose behalf it is read. ``str()`` is the reason."""

    def __init__(self, errno_: int, reason: str) -> None:
        super().__init__(errno_, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _trusted_owner(uid: int) -> bool:
    return uid == 0 or uid == os.geteuid()


def _trusted_dir(st: os.stat_result) -> bool:
    """Nobody but root (or us) can add, remove or replace entries of this directory."""
    return _trusted_owner(st.st_uid) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class _Access:
    """Permission bits as seen by one user (the first matching class decides, as in POSIX)."""

    def __init__(self, uid: int) -> None:
        self.uid = uid
        try:
            pw = pwd.getpwuid(uid)
            self.groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except KeyError:
            self.groups = set()

    def allows(self, st: os.stat_result, want: int) -> bool:
        """``want`` is 4 (read) or 1 (search/execute)."""
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool((st.st_mode >> 6) & want)
        if st.st_gid in self.groups:
            return bool((st.st_mode >> 3) & want)
        return bool(st.st_mode & want)


def _walk(path: str | os.PathLike[str], owner_uid: int | None, directory: bool) -> int:
    """An fd of ``path`` opened without following untrusted symlinks (see the module doc)."""
    text = os.fspath(path)
    if not text:
        raise FileNotFoundError(errno.ENOENT, "empty path")
    access = _Access(owner_uid) if owner_uid is not None else None
    parts = text.split("/") if text.startswith("/") else os.getcwd().split("/") + text.split("/")
    todo = [p for p in parts if p not in ("", ".")]
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    links = 0
    try:
        while True:
            here = os.fstat(fd)
            if not todo:
                break
            if access is not None and not access.allows(here, 1):
                raise UnsafeFile(errno.EACCES, f"{text}: uid {access.uid} may not search a "
                                               "directory on the way")
            name = todo.pop(0)
            last = not todo
            flags = _BASE | (os.O_DIRECTORY if not last or directory else 0)
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(lst.st_mode):
                    raise
                if not (_trusted_dir(here) and _trusted_owner(lst.st_uid)):
                    raise UnsafeFile(errno.ELOOP, f"{text}: {name} is a symlink in a directory "
                                                  "users control; not followed") from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnsafeFile(errno.ELOOP, f"{text}: too many symlinks") from None
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                continue
            os.close(fd)
            fd = nfd
        if not directory and not stat.S_ISREG(here.st_mode):
            raise UnsafeFile(errno.EINVAL, f"{text} is not a regular file")
        if access is not None and not access.allows(here, 4):
            raise UnsafeFile(errno.EACCES, f"{text}: uid {access.uid} may not read it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_user_file(path: str | os.PathLike[str], *, owner_uid: int | None = None) -> int:
    """A read-only fd of the regular file ``path`` (close it). Raises FileNotFoundError and
    other OSErrors as ``open`` would, and UnsafeFile when the path is refused."""
    return _walk(path, owner_uid, directory=False)


def open_in_daemon_dir(path: str | os.PathLike[str]) -> int:
    """``open_user_file`` for a user's file in a folder of the daemon's own making (a job's
    log folder): the path up to that folder is the daemon's, so only the folder and the file
    are checked, in five system calls where the walk from / makes three per component. The
    folder is opened without following a symlink and must be trusted (root's or ours, writable
    by nobody else), so nobody else can have put the file's name there; the file is opened as
    open_user_file opens it (no symlink, never blocking, a regular file). A folder that is not
    trusted, or a symlink on the way, is walked from / instead (the walk decides)."""
    folder, name = os.path.split(os.fspath(path))
    if not folder or name in ("", ".", ".."):
        return _walk(path, None, directory=False)
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(name, _BASE, dir_fd=dfd) if _trusted_dir(os.fstat(dfd)) else -1
        finally:
            os.close(dfd)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise
        fd = -1  # a symlink on the way: the walk decides whether it may be followed
    if fd < 0:
        return _walk(path, None, directory=False)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeFile(errno.EINVAL, f"{os.fspath(path)} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_user_bytes(path: str | os.PathLike[str], *, max_bytes: int, offset: int = 0,
                    owner_uid: int | None = None) -> bytes:
    """Up to ``max_bytes`` of the regular file from ``offset``. Raises as ``open_user_file``."""
    fd = open_user_file(path, owner_uid=owner_uid)
    try:
        return _read(fd, max_bytes, offset)
    finally:
        os.close(fd)


def read_user_file(path: str | os.PathLike[str] | None, *, max_bytes: int, offset: int = 0,
                   owner_uid: int | None = None) -> bytes | None:
    """Up to ``max_bytes`` of the file from ``offset``; None when it is missing, unreadable or
    refused (callers treat all three as "no file")."""
    if not path:
        return None
    try:
        return read_user_bytes(path, max_bytes=max_bytes, offset=offset, owner_uid=owner_uid)
    except OSError:
        return None


def _read(fd: int, max_bytes: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    left = max_bytes
    while left > 0:
        data = os.pread(fd, min(left, 1 << 20), offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
        left -= len(data)
    return b"".join(chunks)


def list_user_dir(path: str | os.PathLike[str] | None, *, owner_uid: int | None = None,
                  max_entries: int = 10_000) -> list[str] | None:
    """The entry names of a directory reached safely, or None (missing, refused); at most
    ``max_entries`` of them (the daemon lists results directories inside its tick)."""
    if not path:
        return None
    try:
        fd = _walk(path, owner_uid, directory=True)
    except OSError:
        return None
    try:
        if owner_uid is not None and not _Access(owner_uid).allows(os.fstat(fd), 4):
            return None
        names = []
        with os.scandir(fd) as entries:  # a user's directory may hold millions of entries
            for entry in entries:
                names.append(entry.name)
                if len(names) >= max_entries:
                    break
        return sorted(names)
    except OSError:
        return None
    finally:
        os.close(fd)


def user_file_size(path: str | os.PathLike[str] | None, *,
                   owner_uid: int | None = None) -> int | None:
    """The size of a regular file reached safely, or None."""
    if not path:
        return None
    try:
        fd = open_user_file(path, owner_uid=owner_uid)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
