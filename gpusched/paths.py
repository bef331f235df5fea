"""Default locations, standard library only (shared by the settings and the fast CLI path)."""

from __future__ import annotations

import os
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
