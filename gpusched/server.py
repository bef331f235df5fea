"""The API: HTTP/1.1 with JSON bodies over a unix socket (``curl --unix-socket`` works).

The caller's identity is the socket peer's uid (SO_PEERCRED), never anything in the payload.
Every body is validated by pydantic before anything is stored.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import socket
import socketserver
import struct
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from pydantic import BaseModel, Field, ValidationError

from gpusched.clock import iso
from gpusched.errors import GpuschedError, NotFound, PermissionDenied, SpecError
from gpusched.models import GpuRequest, JobSpec, JobView, Mount
from gpusched.store import Row

if TYPE_CHECKING:
    from gpusched.service import Service

log = logging.getLogger(__name__)
LOG_CHUNK = 256 * 1024


class PipelineBody(BaseModel):
    definition: dict[str, Any]  # the TOML document
    base_dir: str  # the file's directory: relative paths resolve here
    mounts: list[Mount] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class DrainBody(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def job_view(row: Row, index_of: dict[str, int], attempt: Row | None = None,
             progress: dict[str, Any] | None = None) -> JobView:
    spec = json.loads(row["spec"])
    gpus = json.loads(attempt["gpus"]) if attempt else []
    return JobView(
        id=row["id"], name=row["name"], status=row["status"], exit_code=row["exit_code"],
        reason=row["reason"], attempt=row["attempt"], gpus=gpus,
        gpu_indices=[index_of[u] for u in gpus if u in index_of], owner=row["owner"],
        owner_uid=row["owner_uid"], submitted_at=iso(row["submitted_at"]) or "",
        started_at=iso(row["started_at"]), ended_at=iso(row["ended_at"]),
        priority=row["priority"], runner=row["runner"], command=spec["command"],
        after=spec.get("after", []), request=GpuRequest.model_validate_json(row["request"]),
        kind=row["kind"], progress=progress, log_path=attempt["log_path"] if attempt else None,
    )


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        ("GET", re.compile(r"/v1/health"), "health"),
        ("GET", re.compile(r"/v1/gpus"), "gpus"),
        ("POST", re.compile(r"/v1/gpus/(?P<ref>[^/]+)/drain"), "drain"),
        ("POST", re.compile(r"/v1/gpus/(?P<ref>[^/]+)/resume"), "resume"),
        ("GET", re.compile(r"/v1/jobs"), "list_jobs"),
        ("POST", re.compile(r"/v1/jobs"), "submit"),
        ("GET", re.compile(r"/v1/jobs/(?P<id>\d+)"), "show"),
        ("GET", re.compile(r"/v1/jobs/(?P<id>\d+)/log"), "log"),
        ("POST", re.compile(r"/v1/jobs/(?P<id>\d+)/(?P<action>cancel|hold|release)"), "action"),
        ("GET", re.compile(r"/v1/jobs/(?P<id>\d+)/artifacts"), "artifacts"),
        ("GET", re.compile(r"/v1/epochs"), "epochs"),
        ("GET", re.compile(r"/v1/spans"), "spans"),
        ("GET", re.compile(r"/v1/top"), "top"),
        ("POST", re.compile(r"/v1/stages"), "stage"),
        ("POST", re.compile(r"/v1/pipelines"), "pipeline_run"),
        ("GET", re.compile(r"/v1/pipelines"), "pipeline_list"),
        ("GET", re.compile(r"/v1/pipelines/(?P<ref>[^/]+)"), "pipeline_show"),
    ]

    # -- plumbing -------------------------------------------------------------------------

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def _peer(self) -> tuple[int, int, int]:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return pid, uid, gid

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: GpuschedError) -> None:
        self._send(err.http_status, {"error": err.message, "type": type(err).__name__})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.service.settings.api.max_body_bytes:
            self.close_connection = True
            if length <= 64 * 1024 * 1024:  # read and drop it, so the client sees our answer
                while length > 0:
                    length -= len(self.rfile.read(min(length, 1 << 20)) or b"x" * length)
            raise SpecError(f"request body of {length} bytes is larger than the limit "
                            f"({self.server.service.settings.api.max_body_bytes})")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SpecError(f"the request body is not valid JSON: {err}") from err

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        for m, pattern, name in self.ROUTES:
            match = pattern.fullmatch(url.path)
            if match and m == method:
                try:
                    _, uid, _ = self._peer()
                    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                    status, payload = getattr(self, f"do_{name}")(uid, query, **match.groupdict())
                    self._send(status, payload)
                except GpuschedError as err:
                    self._error(err)
                except ValidationError as err:
                    self._error(SpecError(_validation_message(err)))
                except Exception as err:  # never a traceback to the client
                    log.exception("API %s %s failed", method, self.path)
                    self._send(500, {"error": f"internal error: {err}", "type": "GpuschedError"})
                return
        self._send(404, {"error": f"no such endpoint: {method} {url.path}", "type": "NotFound"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- endpoints ------------------------------------------------------------------------

    def do_health(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.service.health()

    def do_gpus(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        d = self.server.service.daemon
        with d.lock:
            return 200, [g.model_dump() for g in d.gpu_states()]

    def do_drain(self, uid: int, query: dict[str, str], ref: str) -> tuple[int, Any]:
        self._need_admin(uid, "drain a GPU")
        body = DrainBody.model_validate(self._body())
        svc = self.server.service
        gpu = svc.resolve_gpu(ref)
        svc.store.drain(gpu, reason=body.reason, by=user_name(uid), now=svc.clock.now())
        svc.daemon.wake()
        return 200, {"uuid": gpu, "state": "drained", "reason": body.reason}

    def do_resume(self, uid: int, query: dict[str, str], ref: str) -> tuple[int, Any]:
        self._need_admin(uid, "resume a GPU")
        svc = self.server.service
        gpu = svc.resolve_gpu(ref)
        svc.store.resume(gpu)
        svc.daemon.wake()
        return 200, {"uuid": gpu, "state": "resumed"}

    def do_submit(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        spec = JobSpec.model_validate(self._body())
        svc = self.server.service
        svc.validate_spec(spec, uid)
        job_id = svc.store.submit(spec, owner_uid=uid, owner=user_name(uid), now=svc.clock.now())
        svc.daemon.wake()
        return 201, {"id": job_id, "status": "held" if spec.hold else "queued"}

    def do_stage(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """Queue a TAO stage (``gpusched tao ...``): validated and built here, with the
        daemon's TAO settings, before anything is stored."""
        from gpusched.stages import StageRequest, build_job

        svc = self.server.service
        req = StageRequest.model_validate(self._body())
        spec = build_job(req, svc.settings)
        svc.validate_spec(spec, uid)
        job_id = svc.store.submit(spec, owner_uid=uid, owner=user_name(uid), now=svc.clock.now())
        svc.daemon.wake()
        return 201, {"id": job_id, "status": "held" if spec.hold else "queued",
                     "command": spec.command}

    def do_pipeline_run(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """Queue a whole pipeline; returns at once with the pipeline id and its jobs."""
        from gpusched.pipelines import load

        svc = self.server.service
        body = PipelineBody.model_validate(self._body())
        pdef = load(body.definition, body.base_dir)
        with svc.daemon.lock:
            pid = svc.daemon.pipelines.submit(pdef, owner_uid=uid, owner=user_name(uid),
                                              now=svc.clock.now(), mounts=body.mounts,
                                              env=body.env,
                                              validate=lambda s: svc.validate_spec(s, uid))
        svc.daemon.wake()
        return 201, self._pipeline(pid)

    def do_pipeline_list(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        svc = self.server.service
        return 200, [self._pipeline(r["id"], jobs=False) for r in svc.store.pipelines()]

    def do_pipeline_show(self, uid: int, query: dict[str, str], ref: str) -> tuple[int, Any]:
        svc = self.server.service
        return 200, self._pipeline(svc.store.get_pipeline(ref)["id"])

    def _pipeline(self, pid: int, jobs: bool = True) -> dict[str, Any]:
        svc = self.server.service
        row = svc.store.get_pipeline(pid)
        out: dict[str, Any] = {
            "id": row["id"], "name": row["name"], "status": row["status"], "owner": row["owner"],
            "rounds": row["rounds"], "reason": row["reason"],
            "summary": json.loads(row["summary"]) if row["summary"] else None,
            "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"])}
        if jobs:
            out["jobs"] = [v.model_dump() for v in svc.views(svc.store.pipeline_jobs(pid))]
        return out

    def do_list_jobs(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        svc = self.server.service
        statuses = None
        if query.get("status"):
            statuses = query["status"].split(",")
        elif query.get("all") not in ("1", "true"):
            statuses = ["queued", "held", "starting", "running", "unknown"]
        ids = [int(i) for i in query["ids"].split(",") if i] if query.get("ids") else None
        rows = svc.store.list_jobs(statuses=statuses, ids=ids, name=query.get("name"),
                                   owner_uid=int(query["owner"]) if query.get("owner") else None,
                                   limit=int(query["limit"]) if query.get("limit") else None)
        return 200, [v.model_dump() for v in svc.views(rows)]

    def do_show(self, uid: int, query: dict[str, str], id: str) -> tuple[int, Any]:
        svc = self.server.service
        row = svc.store.get_job(int(id))
        view = svc.views([row])[0].model_dump()
        view["events"] = [{**e, "at": iso(e["at"])} for e in svc.store.events(int(id))]
        view["attempts"] = [{k: (iso(v) if k.endswith("_at") else v) for k, v in a.items()}
                            for a in svc.store.attempts(int(id))]
        starts = {}
        if row["status"] == "queued":
            with svc.daemon.lock:
                starts = svc.queue_starts(svc.store.list_jobs(
                    statuses=["starting", "running", "unknown"]))
        view["expected_start_s"] = starts.get(int(id))
        view["waiting_reason"] = _with_start(svc.daemon.waiting.get(int(id)),
                                             starts.get(int(id)))
        view["spec"] = json.loads(row["spec"])
        view["artifacts"] = [{**a, "created_at": iso(a["created_at"])}
                             for a in svc.store.artifacts(int(id))]
        return 200, view

    def do_log(self, uid: int, query: dict[str, str], id: str) -> tuple[int, Any]:
        svc = self.server.service
        row = svc.store.get_job(int(id))
        self._need_owner(uid, row, "read the logs of")
        attempts = svc.store.attempts(int(id))
        if not attempts:
            return 200, {"data": "", "offset": 0, "attempt": 0, "done": row["status"] in
                         ("succeeded", "failed", "cancelled", "lost"), "status": row["status"]}
        n = int(query.get("attempt") or attempts[-1]["n"])
        att = next((a for a in attempts if a["n"] == n), None)
        if att is None:
            raise NotFound(f"job {id} has no attempt {n}")
        offset = int(query.get("offset") or 0)
        data = b""
        try:
            with open(att["log_path"], "rb") as fh:
                fh.seek(offset)
                data = fh.read(LOG_CHUNK)
        except FileNotFoundError:
            pass
        done = att["state"] == "ended" and len(data) < LOG_CHUNK
        return 200, {"data": data.decode(errors="replace"), "offset": offset + len(data),
                     "attempt": n, "done": done, "status": row["status"],
                     "path": att["log_path"]}

    def do_action(self, uid: int, query: dict[str, str], id: str, action: str) -> tuple[int, Any]:
        svc = self.server.service
        row = svc.store.get_job(int(id))
        self._need_owner(uid, row, f"{action}")
        now, actor = svc.clock.now(), user_name(uid)
        if action == "cancel":
            result = svc.store.request_cancel(int(id), actor=actor, now=now)
        elif action == "hold":
            svc.store.hold(int(id), actor=actor, now=now)
            result = "held"
        else:
            svc.store.release(int(id), actor=actor, now=now)
            result = "queued"
        svc.daemon.wake()
        return 200, {"id": int(id), "result": result}

    def do_artifacts(self, uid: int, query: dict[str, str], id: str) -> tuple[int, Any]:
        svc = self.server.service
        svc.store.get_job(int(id))
        return 200, [{**a, "created_at": iso(a["created_at"])}
                     for a in svc.store.artifacts(int(id))]

    def do_epochs(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        svc = self.server.service
        since = float(query["since"]) if query.get("since") else None
        return 200, svc.store.epochs(since=since, workload=query.get("workload"),
                                     job_id=int(query["job"]) if query.get("job") else None)

    def do_spans(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        svc = self.server.service
        return 200, svc.spans(float(query.get("since") or 0))

    def do_top(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """One frame for `gpusched top`: GPUs, active jobs with progress, the queue's head."""
        svc = self.server.service
        with svc.daemon.lock:
            gpus = [g.model_dump() for g in svc.daemon.gpu_states()]
            waiting = dict(svc.daemon.waiting)
        rows = svc.store.list_jobs(statuses=["starting", "running", "unknown", "queued", "held"])
        with svc.daemon.lock:
            starts = svc.queue_starts(rows)
        jobs = []
        for v in svc.views(rows[:200]):
            d = v.model_dump()
            d["waiting_reason"] = _with_start(waiting.get(v.id), starts.get(v.id))
            d["expected_start_s"] = starts.get(v.id)
            jobs.append(d)
        return 200, {"gpus": gpus, "jobs": jobs}

    # -- permissions ----------------------------------------------------------------------

    def _need_admin(self, uid: int, what: str) -> None:
        if not self.server.service.is_admin(uid):
            raise PermissionDenied(f"only root or members of group "
                                   f"{self.server.service.settings.api.admin_group!r} may {what}")

    def _need_owner(self, uid: int, row: Row, what: str) -> None:
        if row["owner_uid"] != uid and not self.server.service.is_admin(uid):
            raise PermissionDenied(f"job {row['id']} belongs to {row['owner']}: only its owner, "
                                   f"root or the admin group may {what} it")


def _with_start(reason: str | None, start_s: float | None) -> str | None:
    if reason is None or start_s is None:
        return reason
    mins = start_s / 60
    when = f"{start_s:.0f} s" if start_s < 120 else f"{mins:.0f} min"
    return f"{reason}; expected to start in about {when}"


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "invalid request: " + "; ".join(parts)


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, service: Service) -> None:
        self.service = service
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()  # the flock proved no other daemon owns it
        super().__init__(str(path), Handler)
        os.chmod(path, 0o666)  # any local user may talk; identity comes from SO_PEERCRED


def admin_uids(group: str) -> tuple[set[int], int | None]:
    """Members of the admin group (by name) and the group's gid."""
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return set(), None
    uids = set()
    for name in g.gr_mem:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return uids, g.gr_gid
