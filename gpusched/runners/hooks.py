"""What runs when a job ends: ``--notify`` commands and ``--output`` copies (processes run as
the job's owner, never as root) and ``--notify-url`` POSTs (a worker thread). Nothing here
blocks the tick: processes are started and polled, POSTs are queued and their results
collected on a later tick.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import pwd
import queue
import signal
import stat
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from gpusched.runners.local import (
    DEFAULT_PATH,
    JOB_UMASK,
    UserSwitch,
    env_memfd,
    trusted_setpriv,
    user_switch,
)

log = logging.getLogger(__name__)

# $1: the directory to run in (entered as the user; "/" when it cannot be), $2: the command
# line, run by a shell as the user asked for one
HOOK_SH = 'cd -- "$1" 2>/dev/null || cd /; exec /bin/sh -c "$2"'
# behind setpriv (see gpusched.runners.local): the export lines of the hook's environment come
# on its stdout (a memfd; stdin is the hook's own, the log for a copy, and sh names only fds
# 0-9 in a redirection), read as the user first; then stdout is /dev/null, as for every hook
HOOK_SH_SOURCING = '. /dev/fd/1; exec >/dev/null; ' + HOOK_SH
HOOK_NAME = "gpusched-hook"
# the log copy, as the owner: the daemon opens the attempt's log (its own file, in its own
# directory) as the copy's stdin; the owner's rights decide where it may go (a symlink of
# theirs is followed as them, never as root)
COPY_SH = 'cat > "$GPUSCHED_OUTPUT"'


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    deadline: float


class Hooks:
    """Processes run as a job's owner when it ends, keyed by the caller's notification id."""

    def __init__(self, *, setpriv: str | bool | None = True) -> None:
        self._running: dict[int, _Running] = {}
        # how a root daemon switches to the owner (as the local runner: setpriv, a vfork)
        self.setpriv = trusted_setpriv() if setpriv is True else setpriv or None

    def start(self, key: int, command: str, *, uid: int, workdir: str, env: dict[str, str],
              now: float, timeout_s: float, stdin_path: str | None = None) -> None:
        """Start ``command`` (a shell command line) as ``uid``, ``stdin_path`` (a file of the
        daemon's) on its stdin; raises OSError or KeyError (no such user) when it cannot
        start. A daemon that is not root runs it as itself."""
        base = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}  # ``env`` (the job's) may change them
        try:
            user = pwd.getpwuid(uid)
            base.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        except KeyError:
            if os.geteuid() == 0:
                raise
            user = None
        full_env = {**base, **env}
        switch = (user_switch(self.setpriv, user, full_env)
                  if os.geteuid() == 0 and user is not None else UserSwitch([], full_env))
        text = HOOK_SH_SOURCING if switch.exports is not None else HOOK_SH
        argv = [*switch.prefix, "/bin/sh", "-c", text, HOOK_NAME, workdir, command]
        stdin = (os.open(stdin_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                 if stdin_path else subprocess.DEVNULL)
        envfd = None
        try:
            if stdin_path and not stat.S_ISREG(os.fstat(stdin).st_mode):
                raise OSError(f"{stdin_path} is not a regular file")
            if switch.exports is not None:
                envfd = env_memfd(switch.exports)
            proc = subprocess.Popen(
                argv, stdin=stdin, stdout=subprocess.DEVNULL if envfd is None else envfd,
                stderr=subprocess.DEVNULL, cwd="/", env=switch.env, start_new_session=True,
                close_fds=True, umask=JOB_UMASK, **switch.popen)
        except subprocess.SubprocessError as err:  # the switch of user failed in the child
            raise OSError(str(err)) from err
        finally:
            if stdin_path:
                os.close(stdin)
            if envfd is not None:
                os.close(envfd)
        self._running[key] = _Running(proc, now + timeout_s)

    def running(self, key: int) -> bool:
        return key in self._running

    def poll(self, key: int, now: float) -> tuple[bool, str | None]:
        """(ended, why it failed or None). Past its timeout the process group is killed."""
        run = self._running.get(key)
        if run is None:
            return True, "not running (the daemon restarted while it ran)"
        rc = run.proc.poll()
        if rc is None:
            if now < run.deadline:
                return False, None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
            self._running.pop(key)
            return True, "timed out; killed"
        self._running.pop(key)
        return True, None if rc == 0 else f"exit code {rc}"

    def close(self) -> None:
        for run in self._running.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        self._running.clear()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is not followed: the URL checked against the allowlist is the one POSTed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True)
class Post:
    key: int
    url: str
    body: dict[str, Any]
    timeout_s: float


class Poster:
    """POSTs JSON on one worker thread; results are collected with ``results()``. Proxies
    from the daemon's environment are not used (the URL is what was checked)."""

    def __init__(self) -> None:
        self._todo: queue.Queue[Post | None] = queue.Queue()
        self._done: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   _NoRedirect())
        self._thread: threading.Thread | None = None

    def submit(self, post: Post) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="gpusched-notify",
                                            daemon=True)
            self._thread.start()
        self._todo.put(post)

    def results(self) -> list[tuple[int, str | None]]:
        """(key, None when delivered, else why not) for every POST finished since last asked."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def _work(self) -> None:
        while (post := self._todo.get()) is not None:
            self._done.put((post.key, self._send(post)))

    def _send(self, post: Post) -> str | None:
        data = json.dumps(post.body).encode()
        req = urllib.request.Request(post.url, data=data, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "gpusched",
            "X-Gpusched-Delivery": str(post.key)})
        try:
            with self._opener.open(req, timeout=post.timeout_s) as resp:
                resp.read(65536)
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            return f"HTTP {err.code}"
        except (OSError, http.client.HTTPException, ValueError) as err:
            return f"{type(err).__name__}: {err}"

    def close(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join(timeout=1.0)
            self._thread = None
