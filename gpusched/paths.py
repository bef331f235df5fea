"""Default locations, standard library only (shared by the settings and the fast CLI path)."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/gpusched/gpusched.toml")
SYSTEM_STATE_DIR = Path("/var/lib/gpusched")
SYSTEM_SOCKET = Path("/run/gpusched/gpusched.sock")


def config_path() -> Path:
    return Path(os.environ.get("GPUSCHED_CONFIG") or DEFAULT_CONFIG)


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpusched"


def default_socket() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "gpusched.sock"
    return default_state_dir() / "gpusched.sock"


def client_socket() -> Path:
    """The socket the CLI talks to: $GPUSCHED_SOCKET, the config's ``socket``, a socket beside
    $GPUSCHED_STATE_DIR, the user's own daemon, else the system daemon's."""
    if os.environ.get("GPUSCHED_SOCKET"):
        return Path(os.environ["GPUSCHED_SOCKET"])
    if os.environ.get("GPUSCHED_STATE_DIR"):
        return Path(os.environ["GPUSCHED_STATE_DIR"]) / "gpusched.sock"
    try:
        with open(config_path(), "rb") as fh:
            conf = tomllib.load(fh)
        if conf.get("socket"):
            return Path(conf["socket"])
        if conf.get("state_dir"):
            return Path(conf["state_dir"]) / "gpusched.sock"
    except (OSError, tomllib.TOMLDecodeError):
        pass
    own = default_socket()
    if own.exists() or not SYSTEM_SOCKET.exists():
        return own
    return SYSTEM_SOCKET


# -- modes of the state directory (issue 11): only the daemon, and each job's owner for their own
# job's files, may read what lies there. Directories users must pass through (to reach the
# socket, their own run directory and log file) are 0711: searchable, not listable.
STATE_DIR_MODE = 0o711  # state_dir, logs/, runs/, logs/<job>/, runs/<job>/
PRIVATE_DIR_MODE = 0o700  # backups/
PRIVATE_FILE_MODE = 0o600  # gpusched.db(-wal, -shm), backups, daemon.lock, logs
#: the daemon's umask: new files 0600 and new directories 0711 unless a mode is set explicitly
DAEMON_UMASK = 0o066


def ensure_mode(path: Path, mode: int) -> bool:
    """Give ``path`` exactly ``mode`` (no symlink followed); False where it is missing or not
    ours to change."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return False
        if (st.st_mode & 0o7777) != mode:
            os.chmod(path, mode)
        return True
    except OSError:  # gone, or owned by someone else (a daemon that is not root)
        return False


def ensure_dir(path: Path, mode: int) -> Path:
    """Create ``path`` (and parents) if missing, then give it ``mode`` whatever the umask."""
    path.mkdir(parents=True, exist_ok=True)
    ensure_mode(path, mode)
    return path


def process_uid(pid: int) -> int | None:
    """The real uid a process runs as (None when it is gone)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
