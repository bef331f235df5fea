"""The CLI's Slurm habits through the real API server (a unix socket, in this process) and
the tick on a FakeClock: --gpu-mem and the deprecated --mem, -n, --export, --wrap, --time,
wait's exit code 3, cancel/hold/release by filter, requeue."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpusched.cli import app
from gpusched.models import JobSpec
from gpusched.server import ApiServer
from gpusched.service import Service
from gpusched.testing.harness import short_tmpdir
from gpusched.testing.ticks import ended, run_until, status


@pytest.fixture
def api(service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    path = short_tmpdir("gscli") / "api.sock"
    server = ApiServer(path, service)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    monkeypatch.setenv("GPUSCHED_SOCKET", str(path))
    monkeypatch.chdir(service.settings.state_dir)
    service.daemon.refresh_inventory(service.clock.now())
    yield service
    server.shutdown()
    server.server_close()


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def submitted(svc: Service, *args: str) -> tuple[int, JobSpec]:
    r = cli("submit", *args)
    assert r.exit_code == 0, r.output
    job_id = int(r.stdout.strip().splitlines()[-1])
    return job_id, JobSpec.model_validate_json(svc.store.get_job(job_id)["spec"])


def test_gpu_mem_and_the_deprecated_mem(api: Service) -> None:
    _, spec = submitted(api, "--gpu-mem", "4G", "--", "true")
    assert spec.gpus.mem_mib == 4096
    r = cli("submit", "--mem", "2G", "--", "true")
    assert r.exit_code == 0 and "--mem is deprecated" in r.stderr and "--gpu-mem" in r.stderr
    spec = JobSpec.model_validate_json(api.store.get_job(int(r.stdout))["spec"])
    assert spec.gpus.mem_mib == 2048
    r = cli("submit", "--gpu-mem", "100G", "--", "true")
    assert r.exit_code == 2 and "--gpu-mem 102400 MiB is more than the largest" in r.stderr


def test_dash_n_is_not_a_silent_name(api: Service) -> None:
    r = cli("submit", "-n", "2", "--", "true")
    assert r.exit_code == 2
    assert "-n is not --name" in r.stderr and "--gpus N" in r.stderr
    assert api.store.list_jobs() == []
    r = cli("tao", "-n", "2", "ssd", "train", "-e", "spec.txt", "-r", "out")
    assert r.exit_code == 2 and "-n is not --name" in r.stderr


def test_wrap_runs_through_sh(api: Service) -> None:
    j, spec = submitted(api, "--wrap", "echo a && echo b | tr b c")
    assert spec.command == ["/bin/sh", "-c", "echo a && echo b | tr b c"]
    run_until(api, ended(api, j))
    log = Path(api.store.attempt(j, 1)["log_path"]).read_text()  # type: ignore[index]
    assert log.split() == ["a", "c"]
    r = cli("submit", "--wrap", "true", "--", "false")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_export_all_none_and_a_list(api: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_PREFIX", "/opt/conda/envs/x")
    monkeypatch.setenv("VIRTUAL_ENV", "/home/u/venv")
    monkeypatch.setenv("GPUSCHED_JOB_ID", "99")  # a submission from inside a job
    monkeypatch.setenv("BASH_FUNC_f%%", "() { :; }")  # an exported bash function
    j, spec = submitted(api, "--", "sh", "-c", "echo $CONDA_PREFIX $GPUSCHED_JOB_ID")
    assert spec.env["CONDA_PREFIX"] == "/opt/conda/envs/x"
    assert spec.env["PATH"] == os.environ["PATH"]
    assert "GPUSCHED_JOB_ID" not in spec.env and "BASH_FUNC_f%%" not in spec.env
    assert spec.env["GPUSCHED_SOCKET"] == os.environ["GPUSCHED_SOCKET"]  # nested submissions
    run_until(api, ended(api, j))
    log = Path(api.store.attempt(j, 1)["log_path"]).read_text()  # type: ignore[index]
    assert log.split() == ["/opt/conda/envs/x", str(j)]
    _, spec = submitted(api, "--export", "NONE", "--", "true")
    assert spec.env == {}
    _, spec = submitted(api, "--export", "VIRTUAL_ENV,EXTRA=1,NOT_SET", "-e", "K=V", "--",
                        "true")
    assert spec.env == {"VIRTUAL_ENV": "/home/u/venv", "EXTRA": "1", "K": "V"}
    _, spec = submitted(api, "--export", "ALL,EXTRA=2", "--", "true")
    assert spec.env["EXTRA"] == "2" and spec.env["VIRTUAL_ENV"] == "/home/u/venv"


def test_containers_get_no_submitter_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpusched import cli as cli_mod

    got: list[dict[str, Any]] = []
    monkeypatch.setattr(cli_mod, "_submit", lambda path, body: got.append(body) or {"id": 1})
    monkeypatch.setenv("VIRTUAL_ENV", "/home/u/venv")
    assert cli("submit", "--image", "img", "--", "true").exit_code == 0
    assert cli("submit", "--image", "img", "--export", "VIRTUAL_ENV", "--",
               "true").exit_code == 0
    assert [b["env"] for b in got] == [{}, {"VIRTUAL_ENV": "/home/u/venv"}]
    r = cli("submit", "--image", "img", "--export", "ALL", "--", "true")
    assert r.exit_code == 2 and "--export ALL is for local jobs" in r.stderr


def test_time_takes_slurm_formats_and_is_the_limit(api: Service) -> None:
    for text, seconds in (("20", 1200), ("5:30", 330), ("1:02:03", 3723), ("2-3", 183600),
                          ("1-0:30", 88200), ("1-00:00:10", 86410), ("90s", 90), ("2h", 7200)):
        _, spec = submitted(api, "--time", text, "--hold", "--", "true")
        assert (spec.time_limit_s, spec.est_runtime_s) == (seconds, seconds), text
    for bad in ("", "abc", "1:2:3:4", "0", "-5", "1-"):
        r = cli("submit", "--time", bad, "--", "true")
        assert r.exit_code == 2 and "bad --time" in r.stderr, (bad, r.output)


def test_wait_exits_3_for_an_unknown_job(api: Service) -> None:
    r = cli("wait", "424242")
    assert r.exit_code == 3 and "no job 424242" in r.stderr


def test_cancel_hold_release_by_filter_match_only_own_jobs(api: Service) -> None:
    """A filter without --all matches the caller's jobs only; --all (root here) every user's."""
    mine = [submitted(api, "--name", "sweep", "--hold", "--", "true")[0] for _ in range(2)]
    other_spec = JobSpec(command=["true"], name="sweep", hold=True)
    other = api.store.submit(other_spec, owner_uid=54321, owner="someone", now=0)
    keep = submitted(api, "--name", "keep", "--hold", "--", "true")[0]
    r = cli("release", "--name", "sweep")
    assert r.exit_code == 0, r.output
    assert [status(api, j) for j in mine] == ["queued", "queued"]
    assert status(api, other) == "held" and status(api, keep) == "held"
    r = cli("hold", "--mine", "--status", "queued")
    assert [status(api, j) for j in mine] == ["held", "held"]
    r = cli("cancel", "--name", "sweep", "--json")
    assert sorted(x["id"] for x in json.loads(r.stdout)) == mine
    assert status(api, other) == "held"
    r = cli("cancel", "--all", "--name", "sweep")  # root is an admin
    assert r.exit_code == 0 and status(api, other) == "cancelled"
    assert status(api, keep) == "held"
    r = cli("cancel")
    assert r.exit_code == 2 and "give job ids or a filter" in r.stderr
    r = cli("cancel", str(keep), "--mine")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_requeue_from_the_cli(api: Service) -> None:
    j, _ = submitted(api, "--", "true")
    run_until(api, ended(api, j))
    r = cli("requeue", str(j))
    assert r.exit_code == 0 and f"{j}: queued" in r.stdout
    run_until(api, ended(api, j))
    assert api.store.get_job(j)["attempt"] == 2
    hold = submitted(api, "--hold", "--", "true")[0]
    r = cli("requeue", str(hold))
    assert r.exit_code == 5 and "only ended jobs" in r.stderr


def test_host_mem_is_for_containers_only(api: Service) -> None:
    r = cli("submit", "--host-mem", "8G", "--", "true")
    assert r.exit_code == 2 and "--host-mem" in r.stderr and "not limited" in r.stderr
    with pytest.raises(ValueError, match="containers only"):
        JobSpec(command=["true"], host_mem_mib=1024)
    spec = JobSpec(command=["true"], runner="docker", image="i", host_mem_mib=1024)
    assert spec.host_mem_mib == 1024


def test_show_lists_what_the_end_sent_and_time_limit_reasons_are_public(api: Service,
                                                                         tmp_path: Path) -> None:
    from gpusched.server import public_reason

    j, _ = submitted(api, "--notify", "exit 5", "--output", str(tmp_path / "o-%j"), "--",
                     "true")
    run_until(api, lambda: len(api.store.notifications(j, "failed")) == 1
              and len(api.store.notifications(j, "done")) == 1)
    shown = json.loads(cli("show", str(j), "--json").stdout)["notifications"]
    assert [(n["kind"], n["state"], n["last_error"]) for n in shown] == [
        ("output", "done", None), ("cmd", "failed", "exit code 5")]
    assert public_reason("time limit (1200 s)") == "time limit (1200 s)"


def test_tao_stages_take_time_notify_and_gpu_mem(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from gpusched import cli as cli_mod
    from gpusched.config import DockerSettings, Settings, TaoSettings
    from gpusched.stages import StageRequest, build_job

    spec_file = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"
    got: list[dict[str, Any]] = []
    monkeypatch.setattr(cli_mod, "_submit", lambda path, body: got.append(body) or {"id": 1})
    monkeypatch.setenv("HOME", "/nonexistent-gpusched-home")
    r = cli("tao", "--time", "1-00", "--notify", "echo done", "--notify-url", "http://h/x",
            "--mem", "4G", "ssd", "train", "-e", str(spec_file), "-r", str(tmp_path / "r"))
    assert r.exit_code == 0, r.output
    assert "--mem is deprecated" in r.stderr
    body = got[0]
    assert (body["time_limit_s"], body["notify_cmd"], body["notify_url"], body["mem_mib"]) == (
        86400, "echo done", "http://h/x", 4096)
    settings = Settings(docker=DockerSettings(mount_roots=[str(tmp_path), str(spec_file.parent)]),
                        tao=TaoSettings(runner="local", local_command=["fake-tao"]))
    job = build_job(StageRequest.model_validate(body), settings, owner_uid=os.getuid())
    assert (job.time_limit_s, job.notify_cmd, job.notify_url) == (86400, "echo done",
                                                                  "http://h/x")
    r = cli("tao", "ssd", "train", "-e", str(spec_file), "--time", "10")
    assert r.exit_code == 2 and "--time" in r.stderr  # a gpusched option after ssd: misplaced
