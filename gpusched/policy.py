"""What users may ask of the daemon's root-equivalent power: images, mounts, paths, identities.

Pure checks (only ``os.path`` look-ups for paths, and the passwd/group database for who a
container may run as); each refusal is a SpecError whose message says
what was refused and what is allowed. runc CVE-2024-21626 leaked host file descriptors through a
``/proc/self/fd/N`` working directory, so workdirs and mount targets stay out of /proc, /sys, /dev.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import re
from pathlib import PurePosixPath
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from gpusched.config import DockerSettings
from gpusched.errors import SpecError, validation_lines
from gpusched.models import ENV_KEY_RE, JobSpec, Mount, parse_size_bytes

FORBIDDEN_TREES = ("/proc", "/sys", "/dev")
_USER_RE = re.compile(r"^\d{1,10}(:\d{1,10})?$")
# Set by the runner from the allocation; a user's value would widen what the container sees.
RESERVED_ENV = ("NVIDIA_VISIBLE_DEVICES",)


def is_under(path: str, root: str) -> bool:
    """Component-wise containment: /data/x is under /data, /data2 is not."""
    return PurePosixPath(path).is_relative_to(PurePosixPath(root))


def _in_forbidden_tree(path: str) -> str | None:
    return next((t for t in FORBIDDEN_TREES if is_under(path, t)), None)


def _check_clean_abs(path: str, what: str) -> None:
    """Absolute, no NUL, no '.'/'..' components, no doubled slashes: one spelling per path."""
    if "\x00" in path:
        raise SpecError(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise SpecError(f"{what} {path!r} must be an absolute path")
    parts = path.split("/")[1:]
    if path != "/" and path.endswith("/"):
        parts = parts[:-1]
    if any(p in ("..", ".") for p in parts):
        raise SpecError(f"{what} {path!r} must not contain '.' or '..' components")
    if any(p == "" for p in parts):
        raise SpecError(f"{what} {path!r} must not contain '//'")


def _norm(path: str) -> str:
    return os.path.normpath(path)


def check_image(image: str | None, settings: DockerSettings) -> None:
    if not image:
        raise SpecError("a docker job needs an image")
    if not any(fnmatch.fnmatchcase(image, pat) for pat in settings.images):
        allowed = ", ".join(settings.images) or "(none configured)"
        raise SpecError(
            f"image {image!r} is not allowed on this host; allowed images: {allowed} "
            "(an admin sets them in [docker] images)"
        )


def check_mount_source(src: str, settings: DockerSettings) -> str:
    """The resolved path of an allowed mount source (SpecError when it is not allowed)."""
    _check_clean_abs(src, "mount source")
    real = os.path.realpath(src)
    roots = [os.path.realpath(r) for r in settings.mount_roots]
    if not any(is_under(real, r) for r in roots):
        shown = f"{src!r}" if real == _norm(src) else f"{src!r} (resolves to {real!r})"
        raise SpecError(
            f"mount source {shown} is outside the allowed mount roots: "
            f"{', '.join(settings.mount_roots) or '(none configured)'}"
        )
    if _in_forbidden_tree(real):
        raise SpecError(f"mount source {src!r} resolves into {_in_forbidden_tree(real)}")
    return real


def check_mount(mount: Mount, settings: DockerSettings) -> str:
    """Check a mount; returns its source resolved (what must be handed to Docker)."""
    dst = mount.target
    real = check_mount_source(mount.source, settings)
    _check_clean_abs(dst, "mount target")
    if _norm(dst) == "/":
        raise SpecError("a mount cannot cover the container's root directory /")
    tree = _in_forbidden_tree(_norm(dst))
    if tree:
        raise SpecError(f"mount target {dst!r} is under {tree}, which is not allowed")
    return real


def resolve_mounts(spec: JobSpec, settings: DockerSettings) -> JobSpec:
    """A copy of ``spec`` whose mount sources are checked and replaced by their resolved paths.

    A symlink is followed once, here: what is stored (and later handed to Docker) is the real
    directory that passed the check, so swapping a component for a symlink after the check
    cannot redirect the mount (the runner refuses a source that no longer resolves to
    itself). Call it on every spec built after submission (a TAO stage rebuilt at launch)."""
    targets: set[str] = set()
    mounts = []
    for m in spec.mounts:
        real = check_mount(m, settings)
        t = _norm(m.target)
        if t in targets:
            raise SpecError(f"mount target {m.target!r} is given twice")
        targets.add(t)
        mounts.append(m if real == m.source else
                      Mount(source=real, target=m.target, read_only=m.read_only))
    return spec.model_copy(update={"mounts": mounts})


def check_container_workdir(workdir: str) -> None:
    _check_clean_abs(workdir, "working directory")
    tree = _in_forbidden_tree(_norm(workdir))
    if tree:
        raise SpecError(f"working directory {workdir!r} is under {tree}, which is not allowed")


def check_user(user: str) -> None:
    if not _USER_RE.match(user):
        raise SpecError(f"bad user {user!r}: use a numeric uid or uid:gid, e.g. 1000:1000")


def groups_of(uid: int) -> tuple[int | None, list[int]]:
    """(primary gid, every gid) of a host user; (None, []) for a uid without a passwd entry."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return None, []
    try:
        gids = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError:
        gids = [pw.pw_gid]
    return pw.pw_gid, sorted(set(gids))


def _group_names(gids: list[int]) -> str:
    def name(g: int) -> str:
        try:
            return f"{g} ({grp.getgrgid(g).gr_name})"
        except KeyError:
            return str(g)
    return ", ".join(name(g) for g in gids) or "none"


def check_container_user(user: str, settings: DockerSettings, *, uid: int,
                         is_admin: bool) -> str:
    """Who the container may run as; returns ``uid:gid`` (a bare uid of one's own gets one's
    primary gid: Docker would otherwise pick the image's, often 0).

    uid 0, or any other uid, in a container with a bind mount is that uid on the host files:
    a plain user may only be themself, with their primary gid or one of their groups."""
    check_user(user)
    want_uid, _, want_gid = user.partition(":")
    primary, gids = groups_of(uid)
    own_gid = (primary is not None) if not want_gid else int(want_gid) in gids
    if int(want_uid) == uid and own_gid:
        return f"{uid}:{want_gid or primary}"
    if uid == 0 or (is_admin and settings.allow_user_override):
        return user  # root may; the admin group only where the admin made it root-equivalent
    if is_admin:
        raise SpecError(
            f"container user {user!r} refused: docker.allow_user_override is false on this "
            f"host, so only root may run a container as another uid/gid than their own; "
            f"use {uid}:<gid> with one of your groups: {_group_names(gids)}")
    raise SpecError(
        f"container user {user!r} refused: only root (and the admin group, where "
        f"docker.allow_user_override is on) may run a container "
        f"as another uid/gid than their own (a container uid with a bind mount acts on the "
        f"host's files); you (uid {uid}) may use {uid}:<gid> with one of your groups: "
        f"{_group_names(gids)}, or leave --user out")


def validate_docker_spec(spec: JobSpec, settings: DockerSettings, *, uid: int,
                         is_admin: bool) -> None:
    """Refuse a docker job the daemon must not run (SpecError with the reason).

    ``uid`` is the submitter (from SO_PEERCRED), ``is_admin`` whether they are root or in the
    admin group. The spec is normalised in place: mount sources resolved (see
    ``resolve_mounts``) and the container user spelled ``uid:gid``."""
    check_image(spec.image, settings)
    spec.mounts = resolve_mounts(spec, settings).mounts
    if spec.workdir is not None:
        check_container_workdir(spec.workdir)
    if spec.user is not None:
        spec.user = check_container_user(spec.user, settings, uid=uid, is_admin=is_admin)
    if spec.shm_size is not None:
        parse_size_bytes(spec.shm_size)
    for key in RESERVED_ENV:
        if key in spec.env:
            raise SpecError(f"{key} is set by gpusched from the allocated GPUs; do not set it")


def validate_local_workdir(path: str) -> str:
    """The working directory of a local job: absolute, an existing directory, outside
    /proc, /sys and /dev. Returns its resolved path (what the job will run in)."""
    if "\x00" in path:
        raise SpecError(f"working directory {path!r} contains a NUL byte")
    if not os.path.isabs(path):
        raise SpecError(f"working directory {path!r} must be an absolute path")
    real = os.path.realpath(path)
    # Both spellings: /proc/self/cwd resolves elsewhere, yet means "wherever the reader is".
    tree = _in_forbidden_tree(_norm(path)) or _in_forbidden_tree(real)
    if tree:
        raise SpecError(f"working directory {path!r} resolves under {tree}, which is not allowed")
    if not os.path.exists(real):
        raise SpecError(f"working directory {path!r} does not exist")
    if not os.path.isdir(real):
        raise SpecError(f"working directory {path!r} is not a directory")
    return real


class _TaoMount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: StrictStr = Field(min_length=1)
    destination: StrictStr = Field(min_length=1)
    read_only: StrictBool = False


class _TaoEnv(BaseModel):
    variable: StrictStr = Field(pattern=ENV_KEY_RE.pattern)
    value: Any

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ValueError("must be a string or a number")
        if "\x00" in str(v):
            raise ValueError("contains a NUL byte")
        return str(v)


class _TaoDockerOptions(BaseModel):
    """The options gpusched understands; TAO's others (``ports``, ``tty``) are ignored."""

    user: StrictStr | None = None
    shm_size: Any = None
    ulimits: dict[StrictStr, StrictInt] | None = None
    privileged: StrictBool | None = None
    network: StrictStr | None = None

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER_RE.match(v):
            raise ValueError(f"bad user {v!r}: use a numeric uid or uid:gid, e.g. 1000:1000")
        return v

    @field_validator("shm_size", mode="before")
    @classmethod
    def _shm_size(cls, v: Any) -> str | int | None:
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, str | int):
                raise ValueError("must be a size like '16G'")
            try:
                parse_size_bytes(str(v))
            except SpecError as err:
                raise ValueError(err.message) from None
        return v


class TaoMounts(BaseModel):
    """TAO's ``~/.tao_mounts.json``: ``{"Mounts": [{"source", "destination"}], "Envs":
    [{"variable", "value"}], "DockerOptions": {...}}`` (other top-level keys are ignored)."""

    Mounts: list[_TaoMount] = Field(default_factory=list, max_length=100)
    Envs: list[_TaoEnv] = Field(default_factory=list, max_length=1000)
    DockerOptions: _TaoDockerOptions = _TaoDockerOptions()


#: hints for the fields of ~/.tao_mounts.json
TAO_MOUNTS_HINTS = {
    "Mounts": 'a list of {"source": HOST_PATH, "destination": CONTAINER_PATH}',
    "Envs": 'a list of {"variable": NAME, "value": VALUE}',
    "variable": "a name of letters, digits and _, not starting with a digit",
    "ulimits": 'names to integers, e.g. {"memlock": -1, "stack": 67108864}',
    "read_only": "true or false", "privileged": "true or false",
}


def validate_notify_url(url: str, allowed_hosts: list[str]) -> None:
    """A --notify-url is POSTed by the daemon (root): http or https only (the model checks
    that), and a host that ``notify.allowed_hosts`` lets through when it is set."""
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    if allowed_hosts and not any(fnmatch.fnmatch(host, p.lower()) for p in allowed_hosts):
        raise SpecError(f"--notify-url host {host!r} is not in notify.allowed_hosts "
                        f"({', '.join(allowed_hosts)})")


def parse_tao_mounts(text: str) -> tuple[list[Mount], dict[str, str], dict[str, Any]]:
    """Parse a user's ``~/.tao_mounts.json``: (mounts, environment, docker options).

    Only the options gpusched understands are returned ("user", "shm_size", "ulimits",
    "privileged", "network"); the CLI refuses a file that asks for privileged or host-network
    containers, which no job can have.
    """
    try:
        data = TaoMounts.model_validate_json(text)
    except ValidationError as err:
        bad_json = [e for e in err.errors() if e["type"] == "json_invalid"]
        if bad_json:
            raise SpecError(f"~/.tao_mounts.json is not valid JSON: {bad_json[0]['msg']}") from None
        if any(e["type"] == "model_type" and not e["loc"] for e in err.errors()):
            raise SpecError("~/.tao_mounts.json must hold a JSON object") from None
        raise SpecError("\n".join(f"~/.tao_mounts.json: {line}"
                                   for line in validation_lines(err, TAO_MOUNTS_HINTS))) from None
    mounts = [Mount(source=m.source, target=m.destination, read_only=m.read_only)
              for m in data.Mounts]
    env = {e.variable: e.value for e in data.Envs}
    options = data.DockerOptions.model_dump(exclude_unset=True)
    return mounts, env, options
