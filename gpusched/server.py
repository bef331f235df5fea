"""The API: HTTP/1.1 with JSON bodies over a unix socket (``curl --unix-socket`` works).

The caller's identity is the socket peer's uid (SO_PEERCRED), never anything in the payload.
Every body is validated by pydantic before anything is stored.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import logging
import math
import os
import pwd
import re
import socket
import socketserver
import stat
import struct
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)

from gpusched.clock import iso
from gpusched.errors import (
    Conflict,
    DuplicateSubmission,
    GpuschedError,
    NotFound,
    PermissionDenied,
    SpecError,
    explain_validation,
)
from gpusched.models import GpuRequest, JobSpec, JobView, Mount
from gpusched.states import JobStatus
from gpusched.store import Row

if TYPE_CHECKING:
    from gpusched.service import Service

log = logging.getLogger(__name__)
LOG_CHUNK = 256 * 1024
MAX_ID = 2**63 - 1  # SQLite's INTEGER
MAX_IDS = 1000  # ?ids=...
MAX_BATCH = 10_000  # jobs of one POST /v1/jobs/batch (--array, --from-file); = cli_submit.MAX_BATCH
MAX_ARRAY_INDEX = 1_000_000
MAX_HEAD = 100_000  # ?head=: queued/held rows of one listing page
ARRAY_INDEX_ENV = "GPUSCHED_ARRAY_INDEX"  # each --array job's index, as SLURM_ARRAY_TASK_ID
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
STATUSES = frozenset(s.value for s in JobStatus)
HIDDEN = "(details hidden: not your job)"
#: reasons other users may read whole (or by the matched prefix): they say what happened,
#: never what the job runs, where, or with which environment
_PUBLIC_REASONS = [re.compile(p) for p in (
    r"exit code -?\d+( \((command not found|command not executable|killed by SIG[A-Z0-9]+)\))?",
    r"killed: out of memory", r"submitted", r"cancel requested", r"requeue",
    r"(cancelled|held|released) by [\w.@-]+", r"cancelled", r"lost", r"container disappeared",
    r"dependency job \d+ (failed|cancelled|lost); not run",
    r"GPU \d+ failed \([^()]{0,200}\); queued again", r"runner reachable again",
    r"(docker|local) (unreachable|unavailable)",
    r"the daemon stopped before the attempt started", r"time limit( \([\d.e+]+ s\))?",
)]
_RETRY_SUFFIX = re.compile(r"; retrying \(\d+ retries left\)$")


class PipelineBody(BaseModel):
    definition: dict[str, Any]  # the TOML document
    base_dir: str  # the file's directory: relative paths resolve here
    mounts: list[Mount] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class BatchBody(BaseModel):
    """POST /v1/jobs/batch: one job per array index (``spec`` has the command; each job gets
    GPUSCHED_ARRAY_INDEX) or one per command (``spec`` has none; ``lines``, the commands' line
    numbers in the user's file, only label errors)."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any]
    array: list[Annotated[StrictInt, Field(ge=0, le=MAX_ARRAY_INDEX)]] | None = Field(
        default=None, min_length=1, max_length=MAX_BATCH)
    commands: list[list[StrictStr]] | None = Field(default=None, min_length=1,
                                                   max_length=MAX_BATCH)
    lines: list[Annotated[StrictInt, Field(ge=1, le=MAX_ID)]] | None = None

    def check(self) -> None:
        """What pydantic's types do not say, as messages that say what to do."""
        if (self.array is None) == (self.commands is None):
            raise SpecError("a batch gives either array (indices, with spec.command) or "
                            "commands (one per job, spec without command)")
        if self.array is not None:
            if len(set(self.array)) != len(self.array):
                raise SpecError("--array lists an index twice: give each index once")
            if "command" not in self.spec:
                raise SpecError("an --array batch needs a command: `-- CMD [ARGS]...`")
            env = self.spec.get("env")
            if isinstance(env, dict) and ARRAY_INDEX_ENV in env:
                raise SpecError(f"{ARRAY_INDEX_ENV} is set by gpusched for each job of an "
                                "--array: do not set it (--env, --export)")
        if self.commands is not None and "command" in self.spec:
            raise SpecError("--from-file gives every job its command: the spec takes none")
        if self.lines is not None and len(self.lines) != len(self.commands or []):
            raise SpecError("a batch's lines give one line number per command")


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


def public_reason(reason: str | None) -> str | None:
    """What another user may read of a job's reason: a known, harmless outcome ("exit code 1",
    "cancelled by alice"), or that there is one they may not read (free text can quote the
    command, paths or TAO's output)."""
    if not reason:
        return reason
    suffix = ""
    m = _RETRY_SUFFIX.search(reason)
    if m:
        reason, suffix = reason[:m.start()], m.group(0)
    for pattern in _PUBLIC_REASONS:
        hit = pattern.match(reason)
        if hit:
            return hit.group(0) + suffix
    return HIDDEN


def redact(view: JobView) -> JobView:
    """A job as users other than its owner (and root, the admin group) see it: who, what state,
    which GPUs, when; not its command, environment, paths, logs or free-text reasons."""
    return view.model_copy(update={"command": [], "log_path": None, "redacted": True,
                                   "reason": public_reason(view.reason)})


def _fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        ("GET", re.compile(r"/v1/health"), "health"),
        ("GET", re.compile(r"/v1/gpus"), "gpus"),
        ("GET", re.compile(r"/v1/cluster"), "cluster"),
        ("POST", re.compile(r"/v1/gpus/(?P<ref>[^/]+)/drain"), "drain"),
        ("POST", re.compile(r"/v1/gpus/(?P<ref>[^/]+)/resume"), "resume"),
        ("GET", re.compile(r"/v1/jobs"), "list_jobs"),
        ("POST", re.compile(r"/v1/jobs"), "submit"),
        ("POST", re.compile(r"/v1/jobs/batch"), "submit_batch"),
        ("GET", re.compile(r"/v1/jobs/(?P<id>\d+)"), "show"),
        ("GET", re.compile(r"/v1/jobs/(?P<id>\d+)/log"), "log"),
        ("POST", re.compile(r"/v1/jobs/(?P<id>\d+)/(?P<action>cancel|hold|release|requeue)"),
         "action"),
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

    def setup(self) -> None:
        # a read or write that waits longer than this drops the connection: an idle or slow
        # client (headers, then a body that never comes) must not hold a server thread
        super().setup()
        self.connection.settimeout(self.server.service.settings.api.idle_timeout_s)

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

    def _content_length(self) -> int:
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        texts = {v.strip() for v in values}
        text = texts.pop()
        if texts or not (text.isascii() and text.isdigit()) or len(text) > 18:
            self.close_connection = True  # the body's end is unknown: never read past it
            raise SpecError(f"bad Content-Length header {', '.join(values)[:40]!r}: give one "
                            "non-negative integer")
        return int(text)

    def _body(self) -> Any:
        self._body_read = True
        length = self._content_length()
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
        self._body_read = False
        try:
            self._route(method)
        except TimeoutError:
            # a client that announced a body and stopped sending: answer if it still listens,
            # then drop it
            self.close_connection = True
            log.debug("api: %s %s: the client stopped sending; connection dropped", method,
                      self.path)
            with contextlib.suppress(OSError):
                self._send(408, {"error": "timed out reading the request", "type": "SpecError"})
            return
        except OSError as err:  # the client went away mid-request
            self.close_connection = True
            log.debug("api: %s %s: connection lost (%s)", method, self.path, err)
            return
        if not self._body_read and self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True  # an unread body must not be parsed as a request

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(SpecError("Transfer-Encoding is not supported: send a Content-Length"))
            return
        for m, pattern, name in self.ROUTES:
            match = pattern.fullmatch(url.path)
            if match and m == method:
                try:
                    _, uid, _ = self._peer()
                    query = {k: v[-1] for k, v in parse_qs(url.query,
                                                           keep_blank_values=True).items()}
                    status, payload = getattr(self, f"do_{name}")(uid, query, **match.groupdict())
                    self._send(status, payload)
                except GpuschedError as err:
                    self._error(err)
                except ValidationError as err:
                    self._error(SpecError(_validation_message(err)))
                except OSError:
                    raise
                except Exception as err:  # never a traceback to the client
                    log.exception("API %s %s failed", method, url.path)
                    self._send(500, {"error": f"internal error: {err}", "type": "GpuschedError"})
                return
        self._send(404, {"error": f"no such endpoint: {method} {url.path}", "type": "NotFound"})

    # -- request values -------------------------------------------------------------------

    @staticmethod
    def _int(query: dict[str, str], name: str, *, minimum: int = 0) -> int | None:
        text = query.get(name)
        if text is None or text == "":
            return None
        t = text.strip()
        if not (t.lstrip("-").isascii() and t.lstrip("-").isdigit()) or len(t) > 19 or (
                int(t) < minimum or int(t) > MAX_ID):
            raise SpecError(f"bad ?{name}={text[:40]!r}: give an integer >= {minimum}")
        return int(t)

    @staticmethod
    def _float(query: dict[str, str], name: str) -> float | None:
        text = query.get(name)
        if text is None or text == "":
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SpecError(f"bad ?{name}={text[:40]!r}: give a number (seconds since the epoch)")
        return value

    @staticmethod
    def _ids(query: dict[str, str], name: str = "ids") -> list[int] | None:
        text = query.get(name)
        if not text:
            return None
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) > MAX_IDS:
            raise SpecError(f"bad ?{name}=: at most {MAX_IDS} job ids")
        bad = [p for p in parts if not (p.isascii() and p.isdigit() and len(p) <= 18)]
        if bad:
            raise SpecError(f"bad ?{name}={text[:40]!r}: give job ids like 12,13 "
                            f"({bad[0][:20]!r} is not one)")
        return [int(p) for p in parts]

    @staticmethod
    def _job_id(text: str) -> int:
        if len(text) > 18:
            raise NotFound(f"no job {text[:30]}")
        return int(text)

    def _idempotency(self, body: Any) -> tuple[str, str] | None:
        """(key, fingerprint of the body) when the client sent an Idempotency-Key."""
        key = self.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return None
        key = key.strip()
        if not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise SpecError(f"bad {IDEMPOTENCY_HEADER} header: give 8 to 128 letters, digits, "
                            "- or _ (a uuid4)")
        return key, _fingerprint(body)

    # -- who sees what --------------------------------------------------------------------

    def _sees_all(self, uid: int, owner_uid: int) -> bool:
        return owner_uid == uid or self.server.service.is_admin(uid)

    def _views(self, uid: int, rows: list[Row]) -> list[JobView]:
        admin = self.server.service.is_admin(uid)
        return [v if admin or v.owner_uid == uid else redact(v)
                for v in self.server.service.views(rows)]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- endpoints ------------------------------------------------------------------------

    def do_health(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.service.health()

    def do_gpus(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        d = self.server.service.daemon
        return 200, [g.model_dump() for g in d.gpu_states()]  # lock-free: reads never wait

    def do_cluster(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """The Slurm cluster's nodes and GPUs (asked outside the daemon's lock)."""
        try:
            nodes = self.server.service.daemon.slurm_nodes()
        except GpuschedError as err:
            return 200, {"slurm": None, "error": err.message}
        return 200, {"slurm": nodes, "error": None}

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

    def _repeat(self, uid: int, idem: tuple[str, str] | None) -> Row | None:
        """The submission an earlier request with this Idempotency-Key made (a retry after a
        lost reply), or None. The same key with another body is refused."""
        if idem is None:
            return None
        row = self.server.service.store.find_submission(uid, idem[0])
        if row is not None and row["fingerprint"] != idem[1]:
            raise Conflict(f"{IDEMPOTENCY_HEADER} {idem[0]} was already used for a different "
                           "request: use a new key for a new submission")
        return row

    @staticmethod
    def _job_spec(body: Any) -> JobSpec:
        """A plain job's spec from a request body (pydantic's checks, then ours)."""
        spec = JobSpec.model_validate(body)
        if spec.kind != "job" or spec.stage is not None:
            # a TAO stage is built by the daemon (POST /v1/stages, pipelines): a forged kind
            # would claim a short stage's place in the queue, a forged stage feeds the planner
            # and the progress readers fields no validation ever saw
            raise SpecError("kind and stage are set by the daemon for TAO stages: queue a stage "
                            "with `gpusched tao` (POST /v1/stages) or a pipeline")
        return spec

    def _admitted(self, spec: JobSpec, uid: int) -> JobSpec:
        """The spec as it will be stored, once the daemon's policy admits it."""
        spec = self.server.service.with_notify_default(spec)
        self.server.service.validate_spec(spec, uid)
        return spec

    def do_submit(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        body = self._body()
        idem = self._idempotency(body)
        spec = self._job_spec(body)
        svc = self.server.service
        if (prev := self._repeat(uid, idem)) is not None:
            return 200, {"id": prev["job_id"], "status": "held" if spec.hold else "queued"}
        spec = self._admitted(spec, uid)
        job_id, created = svc.store.submit_once(spec, owner_uid=uid, owner=user_name(uid),
                                                now=svc.clock.now(), idempotency=idem)
        svc.daemon.wake()
        return 201 if created else 200, {"id": job_id,
                                         "status": "held" if spec.hold else "queued"}

    def do_submit_batch(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """Many jobs in one request and one transaction (``--array``, ``--from-file``): each
        validated exactly as POST /v1/jobs validates one, the first bad one refusing the
        whole batch (nothing stored); an Idempotency-Key makes a retry return the same ids."""
        body = self._body()
        idem = self._idempotency(body)
        req = BatchBody.model_validate(body)
        req.check()
        svc = self.server.service
        items = _batch_items(req)
        if (prev := self._repeat(uid, idem)) is not None:
            if prev["job_id"] is None:
                raise Conflict(f"{IDEMPOTENCY_HEADER} {prev['key']} was already used for a "
                               "pipeline: use a new key for a new submission")
            first, count = int(prev["job_id"]), int(prev["job_count"] or 1)
            hold = self._job_spec(items[0][1]).hold
            return 200, _batch_reply(list(range(first, first + count)), hold)
        specs = []
        for label, item in items:
            try:
                specs.append(self._admitted(self._job_spec(item), uid))
            except ValidationError as err:
                raise SpecError(f"{label}: {_validation_message(err)}") from err
            except GpuschedError as err:
                raise _relabel(err, label) from err
        ids, created = svc.store.submit_many(specs, owner_uid=uid, owner=user_name(uid),
                                             now=svc.clock.now(), idempotency=idem)
        svc.daemon.wake()
        return 201 if created else 200, _batch_reply(ids, specs[0].hold)

    def do_stage(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """Queue a TAO stage (``gpusched tao ...``): validated and built here, with the
        daemon's TAO settings, before anything is stored."""
        from gpusched.stages import StageRequest, build_job

        svc = self.server.service
        body = self._body()
        idem = self._idempotency(body)
        req = StageRequest.model_validate(body)
        if (prev := self._repeat(uid, idem)) is not None:
            first = json.loads(svc.store.get_job(prev["job_id"])["spec"])
            return 200, {"id": prev["job_id"], "status": "held" if req.hold else "queued",
                         "command": first["command"]}
        spec = svc.with_notify_default(build_job(req, svc.settings, owner_uid=uid))
        svc.validate_spec(spec, uid)
        job_id, created = svc.store.submit_once(spec, owner_uid=uid, owner=user_name(uid),
                                                now=svc.clock.now(), idempotency=idem)
        if not created:
            spec = JobSpec.model_validate_json(svc.store.get_job(job_id)["spec"])
        svc.daemon.wake()
        return 201 if created else 200, {"id": job_id,
                                         "status": "held" if spec.hold else "queued",
                                         "command": spec.command}

    def do_pipeline_run(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """Queue a whole pipeline; returns at once with the pipeline id and its jobs."""
        from gpusched.pipelines import load

        svc = self.server.service
        raw = self._body()
        idem = self._idempotency(raw)
        body = PipelineBody.model_validate(raw)
        pdef = load(body.definition, body.base_dir)
        if (prev := self._repeat(uid, idem)) is not None:
            return 200, self._pipeline(uid, prev["pipeline_id"])
        # No daemon lock here: building and checking the stages takes time and must not stop
        # the tick. The pipeline, its key and its jobs commit in one transaction, and a retry
        # that raced its first try finds the key inside it (DuplicateSubmission).
        try:
            pid = svc.daemon.pipelines.submit(pdef, owner_uid=uid, owner=user_name(uid),
                                              now=svc.clock.now(), mounts=body.mounts,
                                              env=body.env, idempotency=idem,
                                              validate=lambda s: svc.validate_spec(s, uid))
        except DuplicateSubmission as dup:
            if dup.pipeline_id is None:
                raise
            return 200, self._pipeline(uid, dup.pipeline_id)
        svc.daemon.wake()
        return 201, self._pipeline(uid, pid)

    def do_pipeline_list(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        svc = self.server.service
        return 200, [self._pipeline(uid, r["id"], jobs=False) for r in svc.store.pipelines()]

    def do_pipeline_show(self, uid: int, query: dict[str, str], ref: str) -> tuple[int, Any]:
        svc = self.server.service
        return 200, self._pipeline(uid, svc.store.get_pipeline(ref)["id"])

    def _pipeline(self, uid: int, pid: int, jobs: bool = True) -> dict[str, Any]:
        svc = self.server.service
        row = svc.store.get_pipeline(pid)
        mine = self._sees_all(uid, row["owner_uid"])
        out: dict[str, Any] = {
            "id": row["id"], "name": row["name"], "status": row["status"], "owner": row["owner"],
            "rounds": row["rounds"],
            "reason": row["reason"] if mine else public_reason(row["reason"]),
            "summary": json.loads(row["summary"]) if row["summary"] and mine else None,
            "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"])}
        if not mine:
            out["redacted"] = True
        if jobs:
            out["jobs"] = [v.model_dump() for v in self._views(uid, svc.store.pipeline_jobs(pid))]
        return out

    def do_list_jobs(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """The jobs a filter matches: a list (every match, or the newest ``?limit=``), or with
        ``?head=N`` one page, ``{"jobs": [...], "more": {status: count left out}}``: the
        starting/running/unknown jobs, the first N queued/held ones in planning order (and of
        ended statuses asked for, the newest N). Views are built only for the rows returned."""
        svc = self.server.service
        statuses = None
        if query.get("status"):
            statuses = [s.strip() for s in query["status"].split(",") if s.strip()]
            unknown = sorted(set(statuses) - STATUSES)
            if unknown:
                raise SpecError(f"bad ?status={query['status'][:60]!r}: {unknown[0][:20]!r} is "
                                f"not a status (use {', '.join(sorted(STATUSES))})")
        elif query.get("all", "") not in ("1", "true", "0", "false", ""):
            raise SpecError(f"bad ?all={query['all'][:20]!r}: give 1 or 0")
        elif query.get("all") not in ("1", "true"):
            statuses = ["queued", "held", "starting", "running", "unknown"]
        head = self._int(query, "head", minimum=1)
        filters: dict[str, Any] = {"ids": self._ids(query), "name": query.get("name") or None,
                                   "owner_uid": self._int(query, "owner")}
        more: dict[str, int] | None = None
        if head is not None:
            if head > MAX_HEAD:
                raise SpecError(f"bad ?head={head}: at most {MAX_HEAD:,} rows a page")
            rows, more = svc.store.list_page(statuses=statuses or sorted(STATUSES), head=head,
                                             **filters)
        else:
            rows = svc.store.list_jobs(statuses=statuses,
                                       limit=self._int(query, "limit", minimum=1), **filters)
        waiting = self._waiting_reasons(rows)
        jobs = [{**v.model_dump(), "waiting_reason": waiting.get(v.id)}
                for v in self._views(uid, rows)]
        return 200, jobs if more is None else {"jobs": jobs, "more": more}

    def _waiting_reasons(self, rows: list[Row]) -> dict[int, str]:
        """Why each queued job waits: the planner's reason, or, for the jobs it does not
        consider, that their runner is unavailable or which ``--after`` jobs (pipeline
        stages: the upstream stage) have not succeeded yet. Nothing waits silently."""
        svc = self.server.service
        # copies made in one step each (the tick replaces these dicts, or changes them
        # under the GIL): an API read never waits for a tick, nor a tick for it
        waiting = dict(svc.daemon.waiting)
        degraded = dict(svc.daemon.degraded)
        runners = set(svc.daemon.runners)
        queued = [r for r in rows if r["status"] == "queued" and r["id"] not in waiting]
        deps = svc.store.unmet_dependencies([r["id"] for r in queued])
        for r in queued:
            if r["runner"] not in runners:
                waiting[r["id"]] = f"the {r['runner']} runner is not enabled on this daemon"
            elif r["runner"] in degraded:
                waiting[r["id"]] = f"the {r['runner']} runner is unavailable: {degraded[r['runner']]}"
            elif r["id"] in deps:
                ups = deps[r["id"]]
                named = ", ".join(f"job {d['after_id']}" + _upstream_name(r["name"], d["name"])
                                  + f" ({d['status']})" for d in ups[:3])
                more = f" and {len(ups) - 3} more" if len(ups) > 3 else ""
                waiting[r["id"]] = f"after {named}{more}"
        return waiting

    def do_show(self, uid: int, query: dict[str, str], id: str) -> tuple[int, Any]:
        svc = self.server.service
        job_id = self._job_id(id)
        row = svc.store.get_job(job_id)
        mine = self._sees_all(uid, row["owner_uid"])
        view = self._views(uid, [row])[0].model_dump()
        events = [{**e, "at": iso(e["at"])} for e in svc.store.events(job_id)]
        attempts = [{k: (iso(v) if k.endswith("_at") else v) for k, v in a.items()}
                    for a in svc.store.attempts(job_id)]
        if not mine:
            events = [{**e, "reason": public_reason(e["reason"])} for e in events]
            attempts = [{k: (public_reason(v) if k == "reason" else v) for k, v in a.items()
                         if k in ("job_id", "n", "runner", "state", "gpus", "started_at",
                                  "ended_at", "exit_code", "reason", "oom")} for a in attempts]
        view["events"], view["attempts"] = events, attempts
        starts = {}
        if row["status"] == "queued":
            starts = svc.queue_starts(svc.store.list_jobs(
                statuses=["starting", "running", "unknown"]))
        view["expected_start_s"] = starts.get(job_id)
        view["waiting_reason"] = _with_start(self._waiting_reasons([row]).get(job_id),
                                             starts.get(job_id))
        view["spec"] = json.loads(row["spec"]) if mine else None
        # what its end sends (--notify, --notify-url, --output): delivered, failed, and why
        view["notifications"] = ([{k: (iso(v) if k.endswith("_at") else v) for k, v in n.items()
                                   if k not in ("job_id", "next_at")}
                                  for n in svc.store.notifications(job_id)] if mine else [])
        view["artifacts"] = ([{**a, "created_at": iso(a["created_at"])}
                              for a in svc.store.artifacts(job_id)] if mine else [])
        return 200, view

    def do_log(self, uid: int, query: dict[str, str], id: str) -> tuple[int, Any]:
        svc = self.server.service
        job_id = self._job_id(id)
        row = svc.store.get_job(job_id)
        self._need_owner(uid, row, "read the logs of")
        want, offset = self._int(query, "attempt", minimum=1), self._int(query, "offset") or 0
        attempts = svc.store.attempts(job_id)
        if not attempts:
            return 200, {"data": "", "offset": 0, "attempt": 0, "done": row["status"] in
                         ("succeeded", "failed", "cancelled", "lost"), "status": row["status"]}
        n = want or attempts[-1]["n"]
        att = next((a for a in attempts if a["n"] == n), None)
        if att is None:
            raise NotFound(f"job {id} has no attempt {n}")
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
                     "path": att["log_path"], "mine": row["owner_uid"] == uid}

    def do_action(self, uid: int, query: dict[str, str], id: str, action: str) -> tuple[int, Any]:
        svc = self.server.service
        job_id = self._job_id(id)
        row = svc.store.get_job(job_id)
        self._need_owner(uid, row, f"{action}")
        now, actor = svc.clock.now(), user_name(uid)
        if action == "cancel":
            result = svc.store.request_cancel(job_id, actor=actor, now=now)
        elif (row["runner"] == "slurm" and row["status"] in ("running", "unknown") and
              (slurm := svc.daemon.slurm_hold(job_id, release=action == "release",
                                              actor=actor, now=now)) is not None):
            result = slurm  # handed to Slurm already: Slurm holds it (while still pending)
        elif action == "hold":
            svc.store.hold(job_id, actor=actor, now=now)
            result = "held"
        elif action == "requeue":
            svc.store.requeue(job_id, actor=actor, now=now)
            result = "queued"
        else:
            svc.store.release(job_id, actor=actor, now=now)
            result = "queued"
        svc.daemon.wake()
        return 200, {"id": job_id, "result": result}

    def do_artifacts(self, uid: int, query: dict[str, str], id: str) -> tuple[int, Any]:
        svc = self.server.service
        job_id = self._job_id(id)
        self._need_owner(uid, svc.store.get_job(job_id), "read the artifacts of")
        return 200, [{**a, "created_at": iso(a["created_at"])}
                     for a in svc.store.artifacts(job_id)]

    def do_epochs(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """Epoch timings of every job (the throughput report is about the host's GPUs); the
        metrics of other users' jobs, and the workload names of their plain jobs, are
        theirs."""
        svc = self.server.service
        rows = svc.store.epochs(since=self._float(query, "since"),
                                workload=query.get("workload") or None,
                                job_id=self._int(query, "job"))
        if svc.is_admin(uid):
            return 200, rows
        owners = svc.store.job_owners({r["job_id"] for r in rows})
        for r in rows:
            owner_uid, _name, kind = owners.get(r["job_id"], (None, None, ""))
            if owner_uid != uid:
                r.update(loss=None, lr=None, map=None)
                if not str(kind).startswith("tao:"):
                    # a TAO workload names a network, input size, batch size and dataset
                    # folder, shared so the team sees one table; a plain job's is its name
                    r["workload"] = f"job {r['job_id']}"
        return 200, rows

    def do_spans(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        svc = self.server.service
        return 200, svc.spans(self._float(query, "since") or 0.0)

    def do_top(self, uid: int, query: dict[str, str]) -> tuple[int, Any]:
        """One frame for `gpusched top`: GPUs, active jobs with progress, the queue's head."""
        svc = self.server.service
        gpus = [g.model_dump() for g in svc.daemon.gpu_states()]
        # the active jobs and the head of the queue (not all 100,000 queued rows)
        rows, _ = svc.store.list_page(
            statuses=["starting", "running", "unknown", "queued", "held"], head=200)
        rows = rows[:200]
        waiting = self._waiting_reasons(rows)
        starts = svc.queue_starts(rows)
        jobs = []
        for v in self._views(uid, rows):
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


def _upstream_name(name: str | None, upstream: str | None) -> str:
    """`` NAME`` of an upstream job; a stage of the same pipeline by its stage alone
    (``retrain[threshold=0.2]``, not ``ssd_resnet18_kitti/retrain[threshold=0.2]``)."""
    if not upstream:
        return ""
    pipe, sep, stage = upstream.partition("/")
    if sep and name and name.startswith(pipe + "/"):
        return f" {stage}"
    return f" {upstream}"


def _with_start(reason: str | None, start_s: float | None) -> str | None:
    if reason is None or start_s is None:
        return reason
    mins = start_s / 60
    when = f"{start_s:.0f} s" if start_s < 120 else f"{mins:.0f} min"
    return f"{reason}; expected to start in about {when}"


def _batch_items(req: BatchBody) -> list[tuple[str, dict[str, Any]]]:
    """(label for errors, single-submission body) of each job of a batch."""
    out = []
    for k in range(len(req.array or req.commands or [])):
        item = dict(req.spec)
        if req.array is not None:
            label = f"array index {req.array[k]}"
            env = item.get("env", {})
            if isinstance(env, dict):  # anything else: JobSpec says what is wrong
                item["env"] = {**env, ARRAY_INDEX_ENV: str(req.array[k])}
        else:
            assert req.commands is not None
            label = f"line {req.lines[k]}" if req.lines is not None else f"command {k + 1}"
            item["command"] = req.commands[k]
        out.append((label, item))
    return out


def _batch_reply(ids: list[int], hold: bool) -> dict[str, Any]:
    return {"ids": ids, "count": len(ids), "first": ids[0], "last": ids[-1],
            "status": "held" if hold else "queued"}


def _relabel(err: GpuschedError, label: str) -> GpuschedError:
    """The same error, naming the batch's job it is about."""
    try:
        return type(err)(f"{label}: {err.message}")
    except TypeError:
        return SpecError(f"{label}: {err.message}")


def _validation_message(err: ValidationError) -> str:
    return explain_validation(err, "invalid request")


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, at most ``api.max_connections`` of them (and
    ``api.max_connections_per_user`` per uid): a connection over either cap is answered 503 at
    once and closed, so idle connections can neither exhaust the daemon's threads and file
    descriptors nor lock other users out."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # a burst of CLI calls waits in the backlog, not in ECONNREFUSED

    def __init__(self, path: Path, service: Service) -> None:
        self.service = service
        self.path = path
        self._conn_lock = threading.Lock()
        self._active: dict[int, int] = {}  # uid -> open connections
        self._swap_lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()  # the flock proved no other daemon owns it
        super().__init__(str(path), Handler)
        os.chmod(path, 0o666)  # any local user may talk; identity comes from SO_PEERCRED
        self._bound = self._identity(os.stat(path))

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    # -- connection caps ------------------------------------------------------------------

    def active_connections(self) -> int:
        with self._conn_lock:
            return sum(self._active.values())

    def process_request(self, request: Any, client_address: Any) -> None:
        api = self.service.settings.api
        try:
            creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
        except OSError:
            self.shutdown_request(request)
            return
        with self._conn_lock:
            total, mine = sum(self._active.values()), self._active.get(uid, 0)
            over = total >= api.max_connections or mine >= api.max_connections_per_user
            if not over:
                self._active[uid] = mine + 1
        if over:
            self._refuse(request, uid, total, mine)
            return
        try:
            threading.Thread(target=self._serve_one, args=(request, client_address, uid),
                             name="api-conn", daemon=True).start()
        except BaseException:
            self._release(uid)
            self.shutdown_request(request)
            raise

    def _serve_one(self, request: Any, client_address: Any, uid: int) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._release(uid)

    def _release(self, uid: int) -> None:
        with self._conn_lock:
            n = self._active.get(uid, 0) - 1
            if n > 0:
                self._active[uid] = n
            else:
                self._active.pop(uid, None)

    def _refuse(self, request: socket.socket, uid: int, total: int, mine: int) -> None:
        api = self.service.settings.api
        which = (f"{mine} connections of uid {uid} are open (limit "
                 f"api.max_connections_per_user = {api.max_connections_per_user})"
                 if mine >= api.max_connections_per_user else
                 f"{total} connections are open (limit api.max_connections = "
                 f"{api.max_connections})")
        body = json.dumps({"error": f"the daemon is busy: {which}; retry in a moment",
                           "type": "DaemonUnavailable"}).encode()
        reply = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
        log.debug("api: refused a connection of uid %s: %s", uid, which)
        with contextlib.suppress(OSError):
            request.setblocking(False)  # never block the accept loop on a client
            # read what was sent: closing over unread data would reset the connection and
            # the client might lose our answer
            request.recv(65536)
        with contextlib.suppress(OSError):
            request.send(reply)
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; a client that hangs up is routine
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            log.debug("api: connection error: %s", err)
        else:
            log.exception("api: the request handler failed")

    # -- the socket file ------------------------------------------------------------------

    def ensure_socket(self) -> bool:
        """Put the socket file back if it is gone or is no longer ours (someone removed it,
        or replaced it): bind a fresh listening socket beside it, rename it into place, and
        swap it under the serving thread (``dup2`` onto the listening fd, which
        ``serve_forever`` polls by number). True when it was recreated."""
        with self._swap_lock:
            try:
                st = os.lstat(self.path)
                if stat.S_ISSOCK(st.st_mode) and self._identity(st) == self._bound:
                    return False
            except FileNotFoundError:
                pass
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                fresh.bind(str(tmp))
                os.chmod(tmp, 0o666)
                fresh.listen(self.request_queue_size)
                os.rename(tmp, self.path)  # atomic: the path is never missing once it is back
                self._bound = self._identity(os.stat(self.path))
                os.dup2(fresh.fileno(), self.socket.fileno(), inheritable=False)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            finally:
                fresh.close()
            log.warning("the API socket %s was missing or replaced; recreated it", self.path)
            return True


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
