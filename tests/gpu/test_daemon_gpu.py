"""The real daemon on real NVML: inventory, isolation, foreign processes, release, drain and a
real PyTorch workload, all through the real CLI of a daemon subprocess (local runner, Docker off).

Skipped where nvidia-smi or NVML is missing (see conftest.py); the tests that run a GPU workload
also need a Python that imports torch with CUDA. Every job gets ``GPUSCHED_TEST_TAG`` so teardown
can end exactly the processes this test started (a daemon's jobs outlive it by design) and wait
until NVML no longer lists them, so the next test's daemon (whose job ids start at 1 again)
never sees a leftover process as its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gpusched.clock import parse_iso
from gpusched.gpus import NvmlInventory, job_of_pid
from gpusched.testing.harness import DaemonProcess, short_tmpdir

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "examples" / "train_synthetic.py")
TERMINAL = {"succeeded", "failed", "cancelled", "lost"}
# NVLink multicast stays off in everything a test starts (it can take a shared host's GPUs
# out of service); these reach jobs through --env and the foreign holder through its env.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
POLL_S = 0.5  # gpus.poll_interval_s for these daemons: NVML is read twice a second

# Holds GPU memory outside gpusched (or, inside a job, after the job itself ended).
HOLD = """
import sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * 1024**3), dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
if sys.argv[2] == "-":
    print("ready", flush=True)
else:
    open(sys.argv[2], "w").close()
time.sleep(float(sys.argv[3]))
"""
# The job's own command returns at once but leaves HOLD running in the background: the job
# ends while its process still holds the GPU. $0 python, $1 HOLD, $2 GiB, $3 ready file, $4 s.
LINGER_SH = ('"$0" -c "$1" "$2" "$3" "$4" & i=0; '
             'while [ ! -e "$3" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; '
             'echo "job exits, holder pid $!"')

T = TypeVar("T")


def until(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _tagged_pids(tag: str) -> list[int]:
    needle = f"GPUSCHED_TEST_TAG={tag}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:
            continue
    return pids


def _wait_gone_from_nvml(inventory: NvmlInventory, pids: set[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {p.pid for g in inventory.snapshot(job_of_pid) for p in g.processes}
        if not listed & pids:
            return
        time.sleep(0.2)


class GpuDaemon:
    """A real daemon on NVML plus the CLI calls the tests make."""

    def __init__(self, d: DaemonProcess, tag: str) -> None:
        self.d = d
        self.tag = tag

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.d.cli(*args, timeout=timeout)

    def cli_json(self, *args: str) -> Any:
        r = self.cli(*args, "--json")
        assert r.returncode == 0, f"gpusched {' '.join(args)}: rc {r.returncode}\n{r.stderr}"
        return json.loads(r.stdout)

    def submit(self, *args: str) -> int:
        """``submit [options] -- cmd...``: options go before the ``--`` in ``args``."""
        cut = args.index("--")
        env = [f"--env={k}={v}" for k, v in {**SAFE_ENV, "GPUSCHED_TEST_TAG": self.tag}.items()]
        r = self.cli("submit", *args[:cut], *env, "--workdir", str(REPO), *args[cut:])
        assert r.returncode == 0, f"submit failed: {r.stderr}"
        return int(r.stdout.strip())

    def show(self, jid: int) -> dict[str, Any]:
        return dict(self.cli_json("show", str(jid)))

    def gpus(self) -> list[dict[str, Any]]:
        return list(self.cli_json("gpus"))

    def api_gpus(self) -> list[dict[str, Any]]:
        """The same data as `gpusched gpus --json`, without a CLI process (fast sampling)."""
        return list(self.d.client().get("/v1/gpus"))

    def wait(self, jid: int, timeout: float = 180) -> dict[str, Any]:
        r = self.cli("wait", str(jid), "--timeout", str(timeout), timeout=timeout + 30)
        job = self.show(jid)
        assert job["status"] in TERMINAL, f"job {jid} still {job['status']} (wait rc {r.returncode})"
        return job

    def logs(self, jid: int) -> str:
        r = self.cli("logs", str(jid))
        assert r.returncode == 0, r.stderr
        return r.stdout

    def sees(self, jid: int) -> dict[str, Any]:
        line = next((ln for ln in self.logs(jid).splitlines() if ln.startswith("GPUSCHED_SEES ")),
                    None)
        assert line is not None, f"job {jid} printed no GPUSCHED_SEES line:\n{self.logs(jid)}"
        return dict(json.loads(line.split(" ", 1)[1]))

    def allocation(self, gpu_uuid: str) -> dict[str, Any] | None:
        """The allocation row of a GPU, read-only from the daemon's database (WAL readers never
        block the daemon)."""
        conn = sqlite3.connect(f"file:{self.d.state_dir / 'gpusched.db'}?mode=ro", uri=True,
                               timeout=5)
        try:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM allocations WHERE gpu_uuid = ?",
                               (gpu_uuid,)).fetchone()
            return dict(row) if row else None
        finally:
            conn.close()


@pytest.fixture
def make_daemon(request: pytest.FixtureRequest,
                inventory: NvmlInventory) -> Iterator[Callable[..., GpuDaemon]]:
    started: list[GpuDaemon] = []

    def make(**settings: str) -> GpuDaemon:
        state = short_tmpdir("gsgpu")
        env = {"GPUSCHED_GPUS__POLL_INTERVAL_S": str(POLL_S), "GPUSCHED_DOCKER__ENABLED": "false",
               **settings}
        d = DaemonProcess(state, simulate=None, env=env)
        g = GpuDaemon(d, state.name)
        started.append(g)
        d.start(timeout=60)
        return g

    yield make

    rep = getattr(request.node, "rep_call", None)
    for g in started:
        pids = set(_tagged_pids(g.tag))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if rep is not None and rep.failed:
            print(f"--- daemon log ({g.d.state_dir}) ---\n{g.d.log()}")
        g.d.stop()
        _wait_gone_from_nvml(inventory, pids)
        shutil.rmtree(g.d.state_dir, ignore_errors=True)


@pytest.fixture
def holder(torch_python: str) -> Iterator[Callable[[str, float], subprocess.Popen[str]]]:
    """Start a PyTorch process outside gpusched (no GPUSCHED_JOB_ID) holding GiB on a GPU."""
    children: list[subprocess.Popen[str]] = []

    def start(gpu_uuid: str, gib: float) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCHED_")}
        env.update(SAFE_ENV, CUDA_VISIBLE_DEVICES=gpu_uuid)
        child = subprocess.Popen([torch_python, "-c", HOLD, str(gib), "-", "3600"], env=env,
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "ready", f"holder exited {child.poll()} before allocating"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()


def _proc_on(gpus: list[dict[str, Any]], pid: int | None = None,
             job_id: int | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    for g in gpus:
        for p in g["processes"]:
            if (pid is not None and p["pid"] == pid) or (job_id is not None and p["job_id"] == job_id):
                return g, p
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _json_list(value: Any) -> list[Any]:
    return list(json.loads(value) if isinstance(value, str) else value)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- inventory ---------------------------------------------------------------------------------


def test_gpus_json_matches_nvidia_smi(make_daemon: Callable[..., GpuDaemon], nvidia_smi: str) -> None:
    d = make_daemon()
    out = subprocess.run(
        [nvidia_smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    rows = [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]
    gpus = d.gpus()
    print("nvidia-smi:", rows)
    print("gpusched gpus --json:", [(g["index"], g["uuid"], g["name"], g["memory_total_mib"],
                                     g["state"]) for g in gpus])
    assert len(gpus) == len(rows) > 0
    for g, (index, uuid, name, total) in zip(gpus, rows, strict=True):
        assert g["index"] == int(index)
        assert g["uuid"] == uuid
        assert g["name"] == name
        assert g["memory_total_mib"] == int(total)
        assert g["simulated"] is False
        assert g["health"] == "ok"
        assert g["state"] in ("idle", "foreign")  # nothing of ours runs yet
    health = d.cli_json("health")
    assert health["checks"]["gpus"]["ok"], health
    assert "through NVML" in health["checks"]["gpus"]["detail"]


# -- isolation and attribution -----------------------------------------------------------------


def test_job_sees_only_its_gpu_and_is_listed_as_ours(make_daemon: Callable[..., GpuDaemon],
                                                     torch_python: str) -> None:
    d = make_daemon()
    jid = d.submit("--name", "iso", "--", torch_python, TRAIN, "--epochs", "4", "--steps", "300")

    def ours_listed() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        job = d.show(jid)
        assert job["status"] not in TERMINAL, (
            f"job {jid} ended ({job['status']}, {job['reason']}) before NVML listed its "
            f"process:\n{d.logs(jid)}")
        found = _proc_on(d.gpus(), job_id=jid) if job["status"] == "running" else None
        return (job, *found) if found else None

    job, gpu, proc = until(ours_listed, 120, f"job {jid}'s process in `gpusched gpus --json`", 0.3)
    print(f"job {jid} running on {job['gpus']}; gpus --json: state {gpu['state']}, "
          f"job_id {gpu['job_id']}, process {proc}")
    assert job["gpus"] == [gpu["uuid"]]
    assert gpu["state"] == "busy" and gpu["job_id"] == jid
    assert proc["foreign"] is False and proc["job_id"] == jid
    assert proc["used_memory_mib"] is None or proc["used_memory_mib"] > 0
    assert "train_synthetic.py" in _cmdline(proc["pid"])
    assert not [p for p in gpu["processes"] if p["foreign"]], gpu["processes"]

    done = d.wait(jid)
    assert done["status"] == "succeeded", d.logs(jid)
    sees = d.sees(jid)
    print(f"job {jid} saw {sees}; allocated {done['gpus']}")
    assert sees["device_count"] == 1
    assert sees["uuids"] == done["gpus"]


# -- foreign processes and --mem ---------------------------------------------------------------


def test_foreign_process_memory_and_waiting_job(
    make_daemon: Callable[..., GpuDaemon],
    holder: Callable[[str, float], subprocess.Popen[str]],
    torch_python: str,
) -> None:
    d = make_daemon()
    gpu0 = d.gpus()[0]
    foreign = holder(gpu0["uuid"], 20)

    def holding() -> tuple[dict[str, Any], dict[str, Any]] | None:
        # NVML lists the process as soon as its CUDA context exists, before the 20 GiB
        # allocation lands: wait for the memory, not just the pid
        found = _proc_on(d.gpus(), pid=foreign.pid)
        return found if found and (found[1]["used_memory_mib"] or 0) >= 20 * 1024 else None

    g, p = until(holding, 60, f"foreign pid {foreign.pid} holding 20 GiB in `gpusched gpus`")
    print(f"foreign pid {foreign.pid}: {p}; GPU state {g['state']}, free {g['memory_free_mib']} "
          f"of {g['memory_total_mib']} MiB")
    assert p["foreign"] is True and p["job_id"] is None
    assert p["used_memory_mib"] is not None and p["used_memory_mib"] >= 20 * 1024
    assert g["state"] == "foreign"
    assert g["memory_free_mib"] <= g["memory_total_mib"] - 20 * 1024

    big_mib = g["memory_total_mib"] - 4 * 1024  # fits the GPU, not beside 20 GiB of foreign use
    assert big_mib > g["memory_free_mib"]
    big = d.submit("--name", "big", "--gpu-mem", f"{big_mib}M", "--",
                   "sh", "-c", 'echo "big ran on $CUDA_VISIBLE_DEVICES"')
    waiting = until(lambda: d.show(big).get("waiting_reason"), 15, f"job {big}'s waiting reason")
    print(f"big job {big} (--gpu-mem {big_mib}M) waits: {waiting}")
    assert "MiB free" in waiting and str(big_mib) in waiting
    time.sleep(4 * POLL_S + 1)  # several ticks and NVML polls
    assert d.show(big)["status"] == "queued"

    # At the head of the queue the big job holds a reservation with no known start (the foreign
    # process may never end): an equal-priority job behind it waits (no starvation). A job of
    # higher priority is looked at first and runs beside the foreign process.
    same = d.submit("--name", "same-prio", "--gpu-mem", "1G", "--", "true")
    reason = until(lambda: d.show(same).get("waiting_reason"), 15, f"job {same}'s waiting reason")
    print(f"equal-priority small job {same} waits: {reason}")
    assert d.show(same)["status"] == "queued" and f"reserved for job {big}" in reason
    assert d.cli("cancel", str(same)).returncode == 0

    small = d.submit("--name", "small", "--priority", "1", "--gpu-mem", "1G", "--",
                     torch_python, TRAIN, "--epochs", "3", "--steps", "300")

    def both_listed() -> tuple[dict[str, Any], dict[str, Any]] | None:
        job = d.show(small)
        assert job["status"] not in TERMINAL, f"job {small} ended early:\n{d.logs(small)}"
        gpus = d.gpus()
        mine, theirs = _proc_on(gpus, job_id=small), _proc_on(gpus, pid=foreign.pid)
        return (mine[0], job) if mine and theirs else None

    gpu, job = until(both_listed, 120, f"job {small} and foreign pid {foreign.pid} on the GPU", 0.3)
    print(f"small job {small} runs beside the foreign process: state {gpu['state']}, job_id "
          f"{gpu['job_id']}, processes {gpu['processes']}")
    assert job["status"] == "running" and job["gpus"] == [gpu0["uuid"]]
    assert gpu["state"] == "busy" and gpu["job_id"] == small
    assert {p["pid"]: p["foreign"] for p in gpu["processes"]}[foreign.pid] is True
    assert d.show(big)["status"] == "queued"

    foreign.kill()
    foreign.wait(timeout=30)
    gone_at = time.time()
    assert d.wait(small)["status"] == "succeeded", d.logs(small)
    done = d.wait(big, timeout=120)
    print(f"big job {big}: {done['status']}, started {done['started_at']} "
          f"(foreign process killed at {gone_at:.3f}); log: {d.logs(big).strip()}")
    assert done["status"] == "succeeded"
    assert parse_iso(done["started_at"]) >= gone_at
    assert done["gpus"] == [gpu0["uuid"]]


# -- release only once NVML shows the job's processes gone ------------------------------------


def _linger_job(d: GpuDaemon, torch_python: str, seconds: float) -> tuple[int, Path]:
    ready = d.d.state_dir / "holder-ready"
    jid = d.submit("--name", "linger", "--", "sh", "-c", LINGER_SH, torch_python, HOLD, "1",
                   str(ready), str(seconds))
    return jid, ready


def test_gpu_released_only_after_nvml_shows_job_processes_gone(
    make_daemon: Callable[..., GpuDaemon], torch_python: str
) -> None:
    d = make_daemon()
    linger_s = 8.0
    jid, _ = _linger_job(d, torch_python, linger_s)
    job = d.wait(jid, timeout=120)
    ended = time.time()
    assert job["status"] == "succeeded", d.logs(jid)
    (uuid,) = job["gpus"]

    samples: list[dict[str, Any]] = []
    holder_pid: int | None = None
    last_alive = ended
    deadline = time.monotonic() + linger_s + 30
    while time.monotonic() < deadline:
        (g,) = [g for g in d.api_gpus() if g["uuid"] == uuid]
        alloc = d.allocation(uuid)
        now = time.time()
        pids = [p["pid"] for p in g["processes"] if p["job_id"] == jid]
        if pids and holder_pid is None:
            holder_pid = pids[0]
        if holder_pid is not None and _alive(holder_pid):
            last_alive = now
        samples.append({"t": now, "state": g["state"], "job_id": g["job_id"], "pids": pids,
                        "alloc": alloc})
        if g["state"] == "idle":
            break
        time.sleep(0.1)

    def what(s: dict[str, Any]) -> str:
        a = s["alloc"]
        return (f"{s['state']:<5} job {s['job_id']} pids {s['pids']} "
                f"alloc {'-' if a is None else 'releasing' if a['releasing_since'] else 'held'}")

    def brief(s: dict[str, Any]) -> str:
        return f"+{s['t'] - ended:5.2f}s {what(s)}"

    changes = [s for i, s in enumerate(samples) if i == 0 or what(s) != what(samples[i - 1])]
    print(f"job {jid} ended; GPU {uuid} after the end ({len(samples)} samples, changes only):")
    print("\n".join(brief(s) for s in changes))
    assert holder_pid is not None, "NVML never listed the job's lingering process"
    held = [s for s in samples if s["pids"]]
    assert held, "no sample saw the lingering process"
    for s in held:  # the job ended, its process still holds the GPU: stays allocated
        assert s["state"] == "busy" and s["job_id"] == jid, brief(s)
        assert s["alloc"] is not None and s["alloc"]["releasing_since"] is not None, brief(s)
    for s in samples:
        assert not (s["state"] == "idle" and s["pids"]), f"idle while listed: {brief(s)}"
    assert samples[-1]["state"] == "idle", "the GPU never came back"
    assert samples[-1]["alloc"] is None
    first_idle = samples[-1]["t"]
    assert first_idle >= last_alive, "released while the job's process was still alive"
    assert first_idle - ended >= linger_s - 2  # the holder slept linger_s after the job ended
    assert first_idle - last_alive < 4 * POLL_S + 3, "release lagged far behind NVML"


def test_lingering_job_process_drains_gpu_after_release_timeout(
    make_daemon: Callable[..., GpuDaemon], torch_python: str
) -> None:
    d = make_daemon(GPUSCHED_GPUS__RELEASE_TIMEOUT_S="2")
    jid, _ = _linger_job(d, torch_python, 15)
    assert d.wait(jid, timeout=120)["status"] == "succeeded", d.logs(jid)
    g = until(lambda: next((g for g in d.gpus() if g["state"] == "drained"), None), 20,
              "the GPU drained after release_timeout_s")
    print(f"GPU {g['index']} drained: {g['drain_reason']}")
    assert f"of finished job {jid} still hold the GPU" in (g["drain_reason"] or "")
    nxt = d.submit("--", "sh", "-c", "echo ran on $CUDA_VISIBLE_DEVICES")
    time.sleep(3)
    assert d.show(nxt)["status"] == "queued"
    assert d.cli("resume", str(g["index"])).returncode == 0
    assert d.wait(nxt, timeout=60)["status"] == "succeeded"


# -- drain -------------------------------------------------------------------------------------


def test_drained_gpu_is_never_used(make_daemon: Callable[..., GpuDaemon]) -> None:
    d = make_daemon()
    gpus = d.gpus()
    r = d.cli("drain", "0", "--reason", "test")
    assert r.returncode == 0, r.stderr
    g0 = d.gpus()[0]
    assert g0["state"] == "drained" and g0["drain_reason"] == "test"
    jid = d.submit("--gpus", "0,", "--", "sh", "-c", 'echo "ran on $CUDA_VISIBLE_DEVICES"')
    reason = until(lambda: d.show(jid).get("waiting_reason"), 15, f"job {jid}'s waiting reason")
    print(f"job {jid} on drained GPU 0 waits: {reason}")
    time.sleep(4 * POLL_S + 1)
    job = d.show(jid)
    assert job["status"] == "queued" and job["attempts"] == [], job
    assert "GPU 0 is not usable" in (job["waiting_reason"] or "")
    if len(gpus) == 1:
        anyone = d.submit("--", "true")  # any 1 GPU: none usable on a one-GPU host
        time.sleep(2)
        assert d.show(anyone)["status"] == "queued"
    r = d.cli("resume", "0")
    assert r.returncode == 0, r.stderr
    done = d.wait(jid, timeout=60)
    assert done["status"] == "succeeded" and done["gpus"] == [g0["uuid"]]
    assert d.logs(jid).strip() == f"ran on {g0['uuid']}"


# -- a real workload ---------------------------------------------------------------------------


def test_synthetic_training_records_epochs_on_the_gpu(make_daemon: Callable[..., GpuDaemon],
                                                      torch_python: str) -> None:
    d = make_daemon()
    # --name: the workload key; without it a `python script.py` job is keyed by "python3"
    jid = d.submit("--name", "train_synthetic", "--", torch_python, TRAIN, "--epochs", "5")
    job = d.wait(jid, timeout=240)
    assert job["status"] == "succeeded", d.logs(jid)
    (uuid,) = job["gpus"]
    (gpu,) = [g for g in d.gpus() if g["uuid"] == uuid]
    rows = d.d.client().get(f"/v1/epochs?job={jid}")
    print(f"job {jid} on {gpu['name']} {uuid}: {len(rows)} epoch rows")
    for r in rows:
        print(f"  epoch {r['epoch']}/{r['max_epoch']} {r['seconds']} s loss {r['loss']} "
              f"gpus {r['gpu_uuids']} {r['gpu_models']}")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    # a plain job's workload is its name and its owner's: epochs reported under another
    # user's workload name never steer that user's placement (issue 12)
    workload = f"train_synthetic [{pwd.getpwuid(os.getuid()).pw_name}]"
    for r in rows:
        assert _json_list(r["gpu_uuids"]) == [uuid]
        assert _json_list(r["gpu_models"]) == [gpu["name"]]
        assert r["workload"] == workload
        assert r["seconds"] and r["seconds"] > 0 and r["loss"] is not None
    rep = d.cli("report", "throughput", "--format", "json")
    assert rep.returncode == 0, rep.stderr
    sets = json.loads(rep.stdout)["sets"]
    print("report throughput sets:", json.dumps(sets))
    (s,) = [s for s in sets if s["workload"] == workload]
    assert s["gpu_set"] == gpu["name"] and s["gpu_set"].startswith("NVIDIA H")
    assert s["gpu_count"] == 1 and s["samples"] >= 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
