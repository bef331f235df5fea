"""What a user may ask of the daemon's root-equivalent power (promise 9, scenario 15)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gpusched import policy
from gpusched.config import DockerSettings
from gpusched.errors import SpecError
from gpusched.models import JobSpec, Mount
from gpusched.policy import (
    parse_tao_mounts,
    resolve_mounts,
    validate_docker_spec,
    validate_local_workdir,
)


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    data, data2, outside = tmp_path / "data", tmp_path / "data2", tmp_path / "outside"
    for d in (data, data2, outside):
        d.mkdir()
    (data / "ds").mkdir()
    (data / "escape").symlink_to(outside)
    (data / "inner").symlink_to(data / "ds")
    return {"data": data, "data2": data2, "outside": outside}


ROOT: dict[str, Any] = {"uid": 0, "is_admin": True}  # the submitter: root


def settings(roots: dict[str, Path], **kw: Any) -> DockerSettings:
    return DockerSettings(images=["nvcr.io/nvidia/tao/*", "local/tao:5.?"],
                          mount_roots=[str(roots["data"])], **kw)


def spec(**kw: Any) -> JobSpec:
    kw.setdefault("image", "nvcr.io/nvidia/tao/tao-toolkit:5.0.0-tf1.15.5")
    return JobSpec(command=["ssd", "train"], runner="docker", **kw)


def test_allowed_spec_passes(roots: dict[str, Path]) -> None:
    d = roots["data"]
    validate_docker_spec(spec(
        mounts=[Mount(source=str(d / "ds"), target="/workspace/ds", read_only=True),
                Mount(source=str(d / "inner"), target="/workspace/inner"),
                Mount(source=str(d / "not-yet"), target="/results")],
        workdir="/workspace", user="1000:1000", shm_size="16G",
    ), settings(roots), **ROOT)
    validate_docker_spec(spec(image="local/tao:5.1", user="1000"), settings(roots), **ROOT)


@pytest.mark.parametrize("image", [
    "nvcr.io/nvidia/pytorch:24.01", "docker.io/nvcr.io/nvidia/tao/x", "local/tao:5.10", "evil",
])
def test_image_off_the_allowlist_is_refused(roots: dict[str, Path], image: str) -> None:
    with pytest.raises(SpecError, match=r"not allowed.*nvcr\.io/nvidia/tao/\*, local/tao:5\.\?"):
        validate_docker_spec(spec(image=image), settings(roots), **ROOT)


def test_symlink_out_of_a_root_is_refused(roots: dict[str, Path]) -> None:
    src = str(roots["data"] / "escape")
    with pytest.raises(SpecError, match=r"resolves to .*outside the allowed mount roots"):
        validate_docker_spec(spec(mounts=[Mount(source=src, target="/x")]), settings(roots), **ROOT)


def test_symlinked_root_is_compared_resolved(roots: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link-to-data"
    link.symlink_to(roots["data"])
    s = DockerSettings(images=["*"], mount_roots=[str(link)])
    validate_docker_spec(spec(mounts=[Mount(source=str(roots["data"] / "ds"), target="/x")]), s, **ROOT)


@pytest.mark.parametrize("source", [
    "{data}/../outside", "{data}/ds/../../outside", "{data}/./ds", "relative/path",
    "{data}//ds", "/etc", "{data2}", "{data2}/x", "{outside}",
])
def test_bad_mount_sources_are_refused(roots: dict[str, Path], source: str) -> None:
    src = source.format(**{k: str(v) for k, v in roots.items()})
    with pytest.raises(SpecError, match="mount source"):
        validate_docker_spec(spec(mounts=[Mount(source=src, target="/x")]), settings(roots), **ROOT)


def test_prefix_is_not_containment(roots: dict[str, Path]) -> None:
    # /data2 shares the string prefix /data but is not under it.
    assert str(roots["data2"]).startswith(str(roots["data"]))
    with pytest.raises(SpecError, match="outside the allowed mount roots"):
        validate_docker_spec(spec(mounts=[Mount(source=str(roots["data2"]), target="/x")]),
                             settings(roots), **ROOT)


@pytest.mark.parametrize("target", [
    "/", "relative", "/proc", "/proc/sys", "/sys/kernel", "/dev", "/dev/shm", "/a/../proc", "//x",
])
def test_bad_mount_targets_are_refused(roots: dict[str, Path], target: str) -> None:
    m = Mount(source=str(roots["data"] / "ds"), target=target)
    with pytest.raises(SpecError, match=r"mount|root directory"):
        validate_docker_spec(spec(mounts=[m]), settings(roots), **ROOT)


def test_duplicate_mount_target_is_refused(roots: dict[str, Path]) -> None:
    src = str(roots["data"] / "ds")
    mounts = [Mount(source=src, target="/x"), Mount(source=src, target="/x/")]
    with pytest.raises(SpecError, match="given twice"):
        validate_docker_spec(spec(mounts=mounts), settings(roots), **ROOT)


@pytest.mark.parametrize("workdir", [
    "/proc/self/fd/3", "/proc/self/cwd", "/sys", "/dev/fd/5", "relative", "/work/../proc/1",
    "/work/./x", "/a//b",
])
def test_bad_container_workdirs_are_refused(roots: dict[str, Path], workdir: str) -> None:
    with pytest.raises(SpecError, match="working directory"):
        validate_docker_spec(spec(workdir=workdir), settings(roots), **ROOT)


def test_trailing_slash_workdir_is_fine(roots: dict[str, Path]) -> None:
    validate_docker_spec(spec(workdir="/workspace/"), settings(roots), **ROOT)


@pytest.mark.parametrize("user", ["root", "1000:", ":1000", "1000:1000:1", "-1", "1000:abc", " 1"])
def test_bad_user_is_refused(roots: dict[str, Path], user: str) -> None:
    with pytest.raises(SpecError, match="bad user"):
        validate_docker_spec(spec(user=user), settings(roots), **ROOT)


def test_bad_shm_size_is_refused(roots: dict[str, Path]) -> None:
    with pytest.raises(SpecError, match="bad size"):
        validate_docker_spec(spec(shm_size="lots"), settings(roots), **ROOT)


def test_user_cannot_choose_visible_gpus(roots: dict[str, Path]) -> None:
    with pytest.raises(SpecError, match="NVIDIA_VISIBLE_DEVICES"):
        validate_docker_spec(spec(env={"NVIDIA_VISIBLE_DEVICES": "all"}), settings(roots), **ROOT)


# -- issue 11: who a container may run as, and what a mount is at launch ---------------------

PLAIN: dict[str, Any] = {"uid": 1000, "is_admin": False}


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """uid 1000: primary gid 1000, also in group 27; every other uid has no passwd entry."""
    monkeypatch.setattr(policy, "groups_of",
                        lambda uid: (1000, [27, 1000]) if uid == 1000 else (None, []))


@pytest.mark.parametrize(("user", "stored"), [
    ("1000:1000", "1000:1000"), ("1000:27", "1000:27"), ("1000", "1000:1000"),
])
def test_plain_user_may_be_themself_with_one_of_their_groups(
        roots: dict[str, Path], groups: None, user: str, stored: str) -> None:
    s = spec(user=user)
    validate_docker_spec(s, settings(roots), **PLAIN)
    assert s.user == stored  # a bare uid gets the primary gid, never the image's (often 0)


@pytest.mark.parametrize("user", ["0:0", "0", "1001:1000", "1000:0", "1000:1001"])
def test_plain_user_cannot_choose_another_uid_or_gid(
        roots: dict[str, Path], groups: None, user: str) -> None:
    with pytest.raises(SpecError, match=(
            rf"container user '{user}' refused: only root \(and the admin group, where "
            r"docker.allow_user_override is on\) may run a container as another uid/gid.*"
            r"you \(uid 1000\) may use 1000:<gid> with one of "
            r"your groups: 27.*1000")):
        validate_docker_spec(spec(user=user), settings(roots), **PLAIN)
    # the check does not depend on the override switch: plain users never may
    with pytest.raises(SpecError, match=r"only root \(and the admin group"):
        validate_docker_spec(spec(user=user), settings(roots, allow_user_override=True), **PLAIN)


def test_admin_may_choose_another_user_only_while_the_override_is_on(
        roots: dict[str, Path], groups: None) -> None:
    s = spec(user="0:0")
    validate_docker_spec(s, settings(roots, allow_user_override=True), uid=1000, is_admin=True)
    assert s.user == "0:0"
    with pytest.raises(SpecError, match=r"'0:0' refused: docker.allow_user_override is false"):
        validate_docker_spec(spec(user="0:0"), settings(roots), uid=1000, is_admin=True)
    as_root = spec(user="1000:1000")  # root always may (the override is off by default)
    validate_docker_spec(as_root, settings(roots), uid=0, is_admin=True)
    assert as_root.user == "1000:1000"
    ok = spec(user="1000:27")  # being oneself needs no override
    validate_docker_spec(ok, settings(roots, allow_user_override=False), uid=1000, is_admin=True)
    assert ok.user == "1000:27"


def test_groups_of_reads_the_host_databases() -> None:
    primary, gids = policy.groups_of(0)
    assert primary == 0 and 0 in gids
    assert policy.groups_of(2**31 - 7) == (None, [])


def test_mount_sources_are_stored_resolved(roots: dict[str, Path]) -> None:
    d = roots["data"]
    s = spec(mounts=[Mount(source=str(d / "inner"), target="/a", read_only=True),
                     Mount(source=str(d / "ds"), target="/b"),
                     Mount(source=str(d / "inner" / "not-yet"), target="/c")])
    validate_docker_spec(s, settings(roots), **ROOT)
    assert s.mounts == [Mount(source=str(d / "ds"), target="/a", read_only=True),
                        Mount(source=str(d / "ds"), target="/b"),
                        Mount(source=str(d / "ds" / "not-yet"), target="/c")]


def test_resolve_mounts_is_a_checked_copy(roots: dict[str, Path]) -> None:
    d = roots["data"]
    original = spec(mounts=[Mount(source=str(d / "inner"), target="/a")])
    resolved = resolve_mounts(original, settings(roots))
    assert resolved.mounts == [Mount(source=str(d / "ds"), target="/a")]
    assert original.mounts == [Mount(source=str(d / "inner"), target="/a")]
    assert resolved.model_dump(exclude={"mounts"}) == original.model_dump(exclude={"mounts"})
    with pytest.raises(SpecError, match=r"resolves to .*outside the allowed mount roots"):
        resolve_mounts(spec(mounts=[Mount(source=str(d / "escape"), target="/x")]),
                       settings(roots))
    with pytest.raises(SpecError, match="given twice"):
        resolve_mounts(spec(mounts=[Mount(source=str(d / "ds"), target="/x"),
                                    Mount(source=str(d / "inner"), target="/x/")]),
                       settings(roots))


def test_local_workdir(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "f").write_text("")
    (tmp_path / "l").symlink_to(tmp_path / "w")
    assert validate_local_workdir(str(tmp_path / "w")) == str(tmp_path / "w")
    assert validate_local_workdir(str(tmp_path / "l")) == os.path.realpath(tmp_path / "w")
    with pytest.raises(SpecError, match="absolute"):
        validate_local_workdir("w")
    with pytest.raises(SpecError, match="does not exist"):
        validate_local_workdir(str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="not a directory"):
        validate_local_workdir(str(tmp_path / "f"))


@pytest.mark.parametrize("path", ["/proc/self/fd/3", "/proc/self/cwd", "/sys", "/dev/shm"])
def test_local_workdir_in_proc_sys_dev_is_refused(path: str) -> None:
    with pytest.raises(SpecError, match="not allowed"):
        validate_local_workdir(path)


def test_local_workdir_symlink_into_proc_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sneaky").symlink_to("/proc/self")
    with pytest.raises(SpecError, match="under /proc"):
        validate_local_workdir(str(tmp_path / "sneaky"))


TAO_MOUNTS = {
    "Mounts": [
        {"source": "/data/tao/ds", "destination": "/workspace/ds"},
        {"source": "/data/tao/results", "destination": "/workspace/results"},
    ],
    "Envs": [{"variable": "TELEMETRY_OPT_OUT", "value": "yes"}, {"variable": "N", "value": 3}],
    "DockerOptions": {
        "shm_size": "16G", "ulimits": {"memlock": -1, "stack": 67108864}, "user": "1000:1000",
        "ports": {"8888": 8888}, "tty": True,
    },
}


def test_tao_mounts_good() -> None:
    mounts, env, opts = parse_tao_mounts(json.dumps(TAO_MOUNTS))
    assert mounts == [Mount(source="/data/tao/ds", target="/workspace/ds"),
                      Mount(source="/data/tao/results", target="/workspace/results")]
    assert env == {"TELEMETRY_OPT_OUT": "yes", "N": "3"}
    assert opts == {"shm_size": "16G", "ulimits": {"memlock": -1, "stack": 67108864},
                    "user": "1000:1000"}


def test_tao_mounts_empty_object() -> None:
    assert parse_tao_mounts("{}") == ([], {}, {})


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"Mounts": {}}', "Mounts: Input should be a valid array"),
    ('{"Mounts": ["/a:/b"]}', r"Mounts\.0: Input should be an object"),
    ('{"Mounts": [{"source": "/a"}]}', "destination"),
    ('{"Mounts": [{"source": "", "destination": "/b"}]}', "source"),
    ('{"Mounts": [{"source": "/a", "destination": "/b", "propagation": "shared"}]}',
     "Mounts.0.propagation: Extra inputs are not permitted"),
    ('{"Envs": [{"variable": "A B", "value": "x"}]}', "Envs.0.variable: String should match"),
    ('{"Envs": [{"variable": "A", "value": "a\\u0000b"}]}', "NUL byte"),
    ('{"Envs": [{"variable": "A", "value": null}]}', "string or a number"),
    ('{"Envs": [{"variable": "A", "value": true}]}', "string or a number"),
    ('{"DockerOptions": []}', "DockerOptions: Input should be an object"),
    ('{"DockerOptions": {"user": "root"}}', "bad user"),
    ('{"DockerOptions": {"shm_size": "huge"}}', "bad size"),
    ('{"DockerOptions": {"ulimits": {"memlock": "unlimited"}}}', "ulimits"),
    ('{"DockerOptions": {"privileged": "yes"}}', "privileged"),
    ("[" * 100000, "not valid JSON"),
])
def test_tao_mounts_malformed(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_tao_mounts(text)


def test_tao_mounts_errors_are_one_line_each_with_the_field() -> None:
    bad = {"Mounts": [{"source": "/a"}], "Envs": [{"variable": "A", "value": None}],
           "DockerOptions": {"ulimits": {"stack": "big"}, "shm_size": "16G", "tty": True}}
    with pytest.raises(SpecError) as err:
        parse_tao_mounts(json.dumps(bad))
    lines = err.value.message.split("\n")
    assert [line.split(": ", 2)[1] for line in lines] == [
        "Mounts.0.destination", "Envs.0.value", "DockerOptions.ulimits.stack"]
    assert all(line.startswith("~/.tao_mounts.json: ") for line in lines)
    assert lines[2].endswith('names to integers, e.g. {"memlock": -1, "stack": 67108864}')
    assert not any("pydantic" in line for line in lines)


def test_tao_mounts_is_a_pydantic_model() -> None:
    """The file is validated by a model like the other specs, not by hand."""
    from pydantic import BaseModel

    assert issubclass(policy.TaoMounts, BaseModel)
    assert policy.TaoMounts.model_validate(TAO_MOUNTS).DockerOptions.user == "1000:1000"


def test_tao_mounts_privileged_and_host_network_are_returned_for_refusal() -> None:
    _, _, opts = parse_tao_mounts('{"DockerOptions": {"privileged": true, "network": "host"}}')
    assert opts == {"privileged": True, "network": "host"}
