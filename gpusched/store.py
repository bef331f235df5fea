"""The SQLite store: the only importer of sqlite-utils, and the only place SQL lives.

WAL, ``synchronous=FULL`` and a busy timeout. Every write runs under ``BEGIN IMMEDIATE`` (the
write lock is taken at the start, so a claim cannot interleave with another writer), and every
status change is a guarded ``UPDATE ... WHERE status IN (allowed)`` plus a ``job_events`` row in
the same transaction. ``allocations.gpu_uuid`` is the primary key: a GPU cannot be allocated
twice, whatever the code above does.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import sqlite_utils

from gpusched.errors import (
    Conflict,
    CorruptDatabase,
    DuplicateSubmission,
    NotFound,
    SpecError,
    StorageFull,
    StoreError,
)
from gpusched.models import JobSpec
from gpusched.states import ACTIVE, ALLOWED_FROM, TERMINAL, JobStatus

Row = dict[str, Any]
FAILED_STATUSES = frozenset({"failed", "cancelled", "lost"})
#: the planner's order of the queue (daemon.runnable), served by the jobs_queue_order index
QUEUE_ORDER = "priority DESC, submitted_at, id"
#: statuses a paged listing always shows whole: the jobs that hold or may hold GPUs
ACTIVE_LISTED = ("starting", "running", "unknown")


def _v1(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT,
            owner_uid INTEGER NOT NULL,
            owner TEXT NOT NULL,
            status TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            runner TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT 'job',
            spec TEXT NOT NULL,
            request TEXT NOT NULL,
            submitted_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            exit_code INTEGER,
            reason TEXT,
            attempt INTEGER NOT NULL DEFAULT 0,
            retries_left INTEGER NOT NULL DEFAULT 0,
            cancel_requested_at REAL,
            cancel_by TEXT,
            pipeline_id INTEGER,
            updated_at REAL NOT NULL
        );
        CREATE INDEX jobs_status ON jobs(status);
        CREATE TABLE job_deps (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            after_id INTEGER NOT NULL REFERENCES jobs(id),
            PRIMARY KEY (job_id, after_id)
        );
        CREATE INDEX job_deps_after ON job_deps(after_id);
        CREATE TABLE attempts (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            n INTEGER NOT NULL,
            runner TEXT NOT NULL,
            state TEXT NOT NULL,          -- starting, live, ended
            gpus TEXT NOT NULL,           -- JSON list of UUIDs
            pid INTEGER,
            pid_start INTEGER,            -- /proc start time, so a reused pid is not adopted
            container_id TEXT,
            container_name TEXT,
            log_path TEXT NOT NULL,
            run_dir TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            exit_code INTEGER,
            reason TEXT,
            oom INTEGER NOT NULL DEFAULT 0,
            log_offset INTEGER NOT NULL DEFAULT 0,
            kill_sent_at REAL,
            PRIMARY KEY (job_id, n)
        );
        CREATE INDEX attempts_state ON attempts(state);
        CREATE TABLE allocations (
            gpu_uuid TEXT PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            allocated_at REAL NOT NULL,
            releasing_since REAL
        );
        CREATE TABLE job_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            at REAL NOT NULL,
            from_status TEXT,
            to_status TEXT NOT NULL,
            reason TEXT,
            actor TEXT NOT NULL
        );
        CREATE INDEX job_events_job ON job_events(job_id);
        CREATE TABLE gpus (
            uuid TEXT PRIMARY KEY,
            idx INTEGER NOT NULL,
            name TEXT NOT NULL,
            memory_total_mib INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            drained INTEGER NOT NULL DEFAULT 0,
            drain_reason TEXT,
            drained_at REAL,
            drained_by TEXT
        );
        CREATE TABLE epochs (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            max_epoch INTEGER,
            started_at REAL,
            ended_at REAL NOT NULL,
            seconds REAL,
            gpu_uuids TEXT NOT NULL,
            gpu_models TEXT NOT NULL,
            gpu_count INTEGER NOT NULL,
            workload TEXT,
            loss REAL,
            lr REAL,
            map REAL,
            validated INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job_id, attempt, epoch)
        );
        CREATE TABLE artifacts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            kind TEXT NOT NULL,
            path TEXT,
            epoch INTEGER,
            metrics TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        );
        CREATE INDEX artifacts_job ON artifacts(job_id);
        CREATE TABLE pipelines (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            owner_uid INTEGER NOT NULL,
            owner TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        """
    )


def _v2(db: sqlite_utils.Database) -> None:
    """Pipelines remember their gate rounds, result and summary table."""
    table = db["pipelines"]
    table.add_column("rounds", int, not_null_default=1)  # type: ignore[union-attr]
    table.add_column("reason", str)  # type: ignore[union-attr]
    table.add_column("summary", str)  # type: ignore[union-attr]
    db.executescript("CREATE INDEX IF NOT EXISTS jobs_pipeline ON jobs(pipeline_id);")


def _v3(db: sqlite_utils.Database) -> None:
    """An infrastructure failure (GPU lost) requeues the job without using a retry."""
    db["jobs"].add_column("requeue_reason", str)  # type: ignore[union-attr]


def _v4(db: sqlite_utils.Database) -> None:
    """Submissions remember the client's idempotency key: a retried request (its reply was
    lost) gets the first job instead of a second one."""
    db.executescript(
        """
        CREATE TABLE submissions (
            owner_uid INTEGER NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,    -- sha256 of the request body
            job_id INTEGER REFERENCES jobs(id),
            pipeline_id INTEGER REFERENCES pipelines(id),
            created_at REAL NOT NULL,
            PRIMARY KEY (owner_uid, key)
        );
        """
    )


def _v5(db: sqlite_utils.Database) -> None:
    """An attempt remembers the command it ran when that differs from the job's (a TAO stage's
    --gpu_index and resume flags are chosen at launch)."""
    db["attempts"].add_column("command", str)  # type: ignore[union-attr]


def _v6(db: sqlite_utils.Database) -> None:
    """What runs when a job ends (--notify, --notify-url, --output): one row each, made at
    submission, due once the job ended, done once delivered (so a restart neither loses nor,
    past one delivery in flight, repeats one)."""
    db.executescript(
        """
        CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            kind TEXT NOT NULL,           -- cmd, url, output
            target TEXT NOT NULL,         -- the command line, the URL, the path
            state TEXT NOT NULL,          -- waiting (job not ended), pending, sending, done, failed
            tries INTEGER NOT NULL DEFAULT 0,
            next_at REAL,
            last_error TEXT,
            done_at REAL
        );
        CREATE INDEX notifications_state ON notifications(state);
        """
    )


def _v7(db: sqlite_utils.Database) -> None:
    """An attempt handed to Slurm remembers its Slurm job id (adoption, cancel, hold)."""
    db["attempts"].add_column("slurm_job_id", str)  # type: ignore[union-attr]


def _v8_batches_and_queue_order(db: sqlite_utils.Database) -> None:
    """Bulk submission and a paged ``ls`` (issue 15): a batch's idempotency key remembers how
    many jobs it made (its first job is ``job_id``, the others follow it); the queue's planning
    order (priority, submission) and each owner's jobs are indexed, so the head of a 100,000-job
    queue and its counts are read without sorting or scanning it. Written to be safe to apply
    under another number (IF NOT EXISTS, the column only where missing)."""
    if "job_count" not in db["submissions"].columns_dict:
        db["submissions"].add_column("job_count", int)  # type: ignore[union-attr]
    db.executescript(
        """
        CREATE INDEX IF NOT EXISTS jobs_queue_order ON jobs(status, priority DESC,
                                                             submitted_at, id);
        CREATE INDEX IF NOT EXISTS jobs_owner_status ON jobs(owner_uid, status);
        """
    )


def _v9_after_any_table(db: sqlite_utils.Database) -> None:
    """``--after-any`` dependencies as rows, like ``--after``'s job_deps: the planner's query
    of the queue's head checked them by parsing every candidate's JSON spec (json_each), a
    third of its cost on every tick. Jobs stored before are filled in from their specs."""
    db.executescript(
        """
        CREATE TABLE IF NOT EXISTS job_after_any (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            after_id INTEGER NOT NULL,
            PRIMARY KEY (job_id, after_id)
        );
        INSERT OR IGNORE INTO job_after_any (job_id, after_id)
            SELECT j.id, CAST(e.value AS INTEGER) FROM jobs j, json_each(j.spec, '$.after_any') e;
        """
    )


def _v10_after_any_index(db: sqlite_utils.Database) -> None:
    """An end checks whether any job waits on it (Store.queue_version): by after_id, in both
    dependency tables."""
    db.executescript(
        "CREATE INDEX IF NOT EXISTS job_after_any_after ON job_after_any(after_id);")


def _v11_drop_status_index(db: sqlite_utils.Database) -> None:
    """jobs_status (status) is a prefix of jobs_queue_order (status, priority, ...), which
    answers every query by status as well: the second index only cost writes, a delete and
    an insert in its B-tree at each of a job's status changes (three per job at least)."""
    db.executescript("DROP INDEX IF EXISTS jobs_status;")


#: versioned migrations: MIGRATIONS[i] brings the schema from version i to i+1
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8_batches_and_queue_order, _v9_after_any_table,
    _v10_after_any_index, _v11_drop_status_index]


def _wrap(err: sqlite3.Error) -> StoreError:
    text = str(err).lower()
    if "full" in text:
        return StorageFull()
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return CorruptDatabase(f"the state database is corrupt ({err})")
    return StoreError(f"state database error: {err}")


def _where(**filters: Any) -> tuple[str, list[Any]]:
    """AND of column filters: a scalar is ``col = ?``, an iterable ``col IN (...)``, None is
    no filter."""
    clauses, params = ["1=1"], []
    for col, value in filters.items():
        if value is None:
            continue
        if isinstance(value, str | int | float):
            clauses.append(f"{col} = ?")
            params.append(value)
        else:
            values = list(value)
            clauses.append(f"{col} IN ({','.join('?' * len(values)) or 'NULL'})")
            params += values
    return " AND ".join(clauses), params


class Store:
    """The daemon's database. Thread-safe: one writing connection behind a lock, and a small
    pool of read-only connections for reads made outside a write (WAL: a reader never waits
    for the writer, nor the writer for a reader), so the API's reads do not queue behind the
    daemon's tick and the tick does not queue behind them."""

    #: idle read connections kept for reuse (the API serves each request on its own thread)
    READERS_KEPT = 8

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._busy_ms = int(busy_timeout_s * 1000)
        try:
            self.conn = sqlite3.connect(
                str(self.path), isolation_level=None, timeout=busy_timeout_s,
                check_same_thread=False,
            )
            self.conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            # statement journals (every savepoint, every multi-row UPDATE) in memory, not in
            # a temporary file: the drain wrote one such file about 11 times per tick. They
            # only undo a statement or savepoint inside a transaction; durability is the WAL's
            self.conn.execute("PRAGMA temp_store=MEMORY")
        except sqlite3.Error as err:
            raise _wrap(err) from err
        self.db = sqlite_utils.Database(self.conn)
        self.lock = threading.RLock()
        self._depth = 0  # nesting of write() in the thread holding the lock
        self._writer: int | None = None  # the thread inside write(), if any
        self._broken: StoreError | None = None  # the open write lost its transaction
        self._batch: int | None = None  # the thread inside batch(), if any
        self._batch_open = False  # that batch has a transaction open
        self._readers: list[sqlite3.Connection] = []
        #: bumped by every change that may change which queued jobs are runnable, or their
        #: order (a job queued, or leaving the queue other than by a claim; an end that a
        #: dependent waits on); see queue_state, which the daemon's plan window is checked
        #: against (Daemon._runnable_window). A claim does not bump it: the tick that claims
        #: drops the job from its window itself.
        self.queue_version = 0
        #: bumped by every write that may make a notification open (a job submitted with one,
        #: a requeue, a delivery's state): see notify_state, which lets the notifier skip its
        #: query on the ticks (nearly all) where none can be open
        self.notify_version = 0
        self._unsettled = 0  # queue_state's answers while another thread writes: -1, -2...
        self._readers_lock = threading.Lock()
        self._closed = False
        self._migrate()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            with self._readers_lock:
                readers, self._readers = self._readers, []
            for r in readers:
                with suppress(sqlite3.Error):
                    r.close()
            self.conn.close()

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction under BEGIN IMMEDIATE; sqlite errors become StoreErrors.

        Writes nest: one opened inside another (same thread, the lock is held) is a SAVEPOINT
        of it. An inner write that fails is rolled back to its savepoint alone, so a caller
        that contains the error (one job's part of a tick) keeps the others' writes, and
        everything commits together with the outer write: one fsync for a whole tick's
        claims, say, or a pipeline and all its jobs. Should SQLite drop the transaction
        itself (it may on a full disk or an I/O error), every later write of the batch and
        the outer commit fail: nothing runs outside a transaction.

        ``durable=False`` commits without its own fsync (``synchronous=NORMAL`` in WAL: the
        next durable commit makes it durable). Only for facts the daemon re-learns after a
        crash or power loss: epoch rows, which are re-read from the job's output files."""
        with self.lock:
            if not self._depth and self._batch == threading.get_ident():
                self._open_batch()
            if self._depth:  # inside an open write (or batch): a savepoint of it
                yield from self._nested()
                return
            try:
                if not durable:
                    self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                self._durable()
                raise _wrap(err) from err
            self._depth, self._writer, self._broken = 1, threading.get_ident(), None
            try:
                yield self.conn
                if self._broken is not None:
                    raise self._broken
                self.conn.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise
                if isinstance(exc, sqlite3.Error):
                    raise _wrap(exc) from exc
                raise
            finally:
                self._depth, self._writer, self._broken = 0, None, None
                if not durable:
                    self._durable()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group this thread's writes into as few commits as it asks for: the first write
        inside opens one transaction, which stays open (holding the write lock) until
        ``commit_batch()`` or the end of the batch; each write is a savepoint of it. The
        daemon's tick runs in one, so the ends, epochs and claims of a tick cost one fsync.
        Between commits the lock is free: other threads' writes wait only while a
        transaction is open, never while the batch's owner does other work."""
        if self._batch is not None:
            raise RuntimeError("Store.batch() does not nest")
        self._batch = threading.get_ident()
        try:
            yield
            self.commit_batch()
        finally:
            self._batch = None
            if self._batch_open:  # an exception: what the batch wrote is not saved
                self._end_batch("ROLLBACK")

    @contextmanager
    def unbatched(self) -> Iterator[None]:
        """Inside a batch, commit it and make each write its own transaction again for a
        while (for work that waits on the outside world between its writes)."""
        saved = self._batch
        if saved is not None:
            if self._batch_open:  # its owner commits it first (Daemon.commit: callbacks)
                raise RuntimeError("Store.unbatched() with the batch's transaction open")
            self._batch = None
        try:
            yield
        finally:
            self._batch = saved

    def commit_batch(self) -> bool:
        """Commit the batch's open transaction, if any. True when something was committed;
        a StoreError says nothing of it was saved (and the transaction is gone)."""
        if not self._batch_open:
            return False
        if self._depth > 1:
            raise RuntimeError("Store.commit_batch() inside one of the batch's writes")
        if self._broken is not None:
            broken = self._broken
            self._end_batch("ROLLBACK")
            raise broken
        try:
            self._end_batch("COMMIT")
        except sqlite3.Error as err:
            raise _wrap(err) from err
        return True

    def _open_batch(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise _wrap(err) from err
        self.lock.acquire()  # held until the batch's transaction ends
        self._depth, self._writer, self._broken, self._batch_open = (
            1, threading.get_ident(), None, True)

    def _end_batch(self, how: str) -> None:
        try:
            if how == "COMMIT" or self.conn.in_transaction:
                self.conn.execute(how)
        except sqlite3.Error:
            if how == "COMMIT":
                with suppress(sqlite3.Error):
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
            raise
        finally:
            self._depth, self._writer, self._broken, self._batch_open = 0, None, None, False
            self.lock.release()

    def _nested(self) -> Iterator[sqlite3.Connection]:
        if self._broken is not None:
            raise self._broken
        name = f"w{self._depth}"
        try:
            self.conn.execute(f"SAVEPOINT {name}")
        except sqlite3.Error as err:
            raise self._lost(err) from err
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            if not self.conn.in_transaction:
                self._lost(None)
            else:
                try:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                except sqlite3.Error as err:  # its part may stay: the whole write must fail
                    self._lost(err)
            raise
        else:
            try:
                self.conn.execute(f"RELEASE {name}")
            except sqlite3.Error as err:
                raise self._lost(err) from err
        finally:
            self._depth -= 1

    def _lost(self, err: sqlite3.Error | None) -> StoreError:
        """The open write can no longer commit as one: remember why, for all that follows."""
        if self._broken is None:
            self._broken = (_wrap(err) if err is not None else
                            StoreError("the database dropped a transaction in progress; "
                                       "nothing of it was saved"))
        return self._broken

    def queue_state(self) -> tuple[int, int]:
        """What the daemon's plan window is checked against: queue_version, for this
        process's writes (all made through the one writing connection, under the lock), and
        SQLite's data_version of that connection, which moves whenever another connection
        (another process: a restore, a tool writing the file) commits. While another thread
        is inside a write the answer is one never given before: that write may change the
        queue once it commits, so the caller must read it again (and never waits for it)."""
        return self._state("queue_version")

    def notify_state(self) -> tuple[int, int]:
        """What the notifier's "none open" answer is checked against, as queue_state is for
        the plan window: notify_version and the connection's data_version."""
        return self._state("notify_version")

    def _state(self, counter: str) -> tuple[int, int]:
        if not self.lock.acquire(blocking=False):
            self._unsettled -= 1
            return getattr(self, counter), self._unsettled
        try:
            return getattr(self, counter), int(
                self.conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as err:
            raise _wrap(err) from err
        finally:
            self.lock.release()

    def _durable(self) -> None:
        with suppress(sqlite3.Error):
            self.conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """The connection a read uses: the writer's inside this thread's open write (it must
        see what the write did so far), else a pooled read-only one (the committed state)."""
        if self._writer == threading.get_ident() or str(self.path) == ":memory:":
            with self.lock:
                yield self.conn
            return
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   timeout=self._busy_ms / 1000, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
                conn.execute("PRAGMA query_only=ON")
            except sqlite3.Error:
                conn.close()
                raise
        ok = False
        try:
            yield conn
            ok = True
        finally:
            with self._readers_lock:
                if ok and not self._closed and len(self._readers) < self.READERS_KEPT:
                    self._readers.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        try:
            with self._reader() as conn:
                cur = conn.execute(sql, params)
                keys = [d[0] for d in cur.description]
                return [dict(zip(keys, row)) for row in cur]  # noqa: B905 (always as long)
        except sqlite3.Error as err:
            raise _wrap(err) from err

    def _migrate(self) -> None:
        with self.write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the state database has schema version {version}, newer than this gpusched "
                    f"knows ({len(MIGRATIONS)}): upgrade gpusched"
                )
            for i in range(version, len(MIGRATIONS)):
                MIGRATIONS[i](self.db)
            conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")

    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0]["user_version"])

    def quick_check(self) -> str:
        rows = self.query("PRAGMA quick_check")
        return "; ".join(str(next(iter(r.values()))) for r in rows)

    def integrity_check(self) -> str:
        rows = self.query("PRAGMA integrity_check")
        return "; ".join(str(next(iter(r.values()))) for r in rows)

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, spec: JobSpec, *, owner_uid: int, owner: str, now: float) -> int:
        return self.submit_once(spec, owner_uid=owner_uid, owner=owner, now=now)[0]

    def submit_once(self, spec: JobSpec, *, owner_uid: int, owner: str, now: float,
                    idempotency: tuple[str, str] | None = None) -> tuple[int, bool]:
        """Insert a job; with ``idempotency`` (key, fingerprint of the request) a key this uid
        already used returns its job instead, in the same transaction. Returns (job id,
        created)."""
        status = JobStatus.HELD if spec.hold else JobStatus.QUEUED
        with self.write() as conn:
            if idempotency is not None:
                prev = self._submission(conn, owner_uid, idempotency[0])
                if prev is not None:
                    if prev["fingerprint"] != idempotency[1] or prev["job_id"] is None:
                        raise Conflict(f"Idempotency-Key {idempotency[0]} was already used for "
                                       "a different request: use a new key")
                    return int(prev["job_id"]), False
            if spec.after or spec.after_any:
                wanted = sorted({*spec.after, *spec.after_any})
                marks = ",".join("?" * len(wanted))
                found = {r[0] for r in conn.execute(f"SELECT id FROM jobs WHERE id IN ({marks})",
                                                    wanted)}
                missing = [i for i in wanted if i not in found]
                if missing:
                    raise SpecError(f"--after/--after-any names jobs that do not exist: "
                                    f"{missing}")
            cur = conn.execute(
                "INSERT INTO jobs (name, owner_uid, owner, status, priority, runner, kind, spec,"
                " request, submitted_at, retries_left, pipeline_id, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (spec.name, owner_uid, owner, status.value, spec.priority, spec.runner, spec.kind,
                 spec.model_dump_json(), spec.gpus.model_dump_json(), now, spec.retries,
                 spec.pipeline_id, now),
            )
            job_id = int(cur.lastrowid or 0)
            conn.executemany("INSERT INTO job_deps (job_id, after_id) VALUES (?, ?)",
                             [(job_id, a) for a in sorted(set(spec.after))])
            conn.executemany("INSERT INTO job_after_any (job_id, after_id) VALUES (?, ?)",
                             [(job_id, a) for a in sorted(set(spec.after_any))])
            self._event(conn, job_id, now, None, status, "submitted", owner)
            if status is JobStatus.QUEUED:
                self.queue_version += 1
            if spec.output or spec.notify_cmd or spec.notify_url:
                self.notify_version += 1
            conn.executemany(
                "INSERT INTO notifications (job_id, kind, target, state) VALUES (?,?,?,'waiting')",
                [(job_id, kind, target) for kind, target in (
                    ("output", spec.output), ("cmd", spec.notify_cmd), ("url", spec.notify_url))
                 if target])
            if idempotency is not None:
                conn.execute("INSERT INTO submissions (owner_uid, key, fingerprint, job_id,"
                             " created_at) VALUES (?,?,?,?,?)",
                             (owner_uid, idempotency[0], idempotency[1], job_id, now))
        return job_id, True

    def submit_many(self, specs: Sequence[JobSpec], *, owner_uid: int, owner: str, now: float,
                    idempotency: tuple[str, str] | None = None) -> tuple[list[int], bool]:
        """Insert every job of a batch (``--array``, ``--from-file``) in ONE transaction: all
        of them or, on any error, none. Their ids are consecutive (one writer, AUTOINCREMENT
        inside one transaction). With ``idempotency`` a key this uid already used returns that
        batch's ids instead. Returns (job ids, created)."""
        if not specs:
            raise SpecError("a batch needs at least one job")
        with self.write() as conn:
            # each job exactly as a single submission stores it, joined to this transaction;
            # the first one also checks and records the key
            first, created = self.submit_once(specs[0], owner_uid=owner_uid, owner=owner,
                                              now=now, idempotency=idempotency)
            if not created:
                assert idempotency is not None
                prev = self._submission(conn, owner_uid, idempotency[0]) or {}
                return list(range(first, first + int(prev.get("job_count") or 1))), False
            ids = [first] + [self.submit_once(spec, owner_uid=owner_uid, owner=owner, now=now)[0]
                             for spec in specs[1:]]
            if ids != list(range(first, first + len(ids))):  # never: one writer holds the lock
                raise StoreError(f"a batch's job ids are not consecutive ({first}..{ids[-1]})")
            if idempotency is not None:
                conn.execute("UPDATE submissions SET job_count = ? WHERE owner_uid = ? AND"
                             " key = ?", (len(ids), owner_uid, idempotency[0]))
        return ids, True

    @staticmethod
    def _submission(conn: sqlite3.Connection, owner_uid: int, key: str) -> Row | None:
        cur = conn.execute("SELECT * FROM submissions WHERE owner_uid = ? AND key = ?",
                           (owner_uid, key))
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def find_submission(self, owner_uid: int, key: str) -> Row | None:
        """The submission this uid made with this idempotency key, if any."""
        try:
            with self._reader() as conn:
                return self._submission(conn, owner_uid, key)
        except sqlite3.Error as err:
            raise _wrap(err) from err

    def record_submission(self, owner_uid: int, key: str, fingerprint: str, *,
                          pipeline_id: int | None = None, job_id: int | None = None,
                          now: float) -> None:
        with self.write() as conn:
            conn.execute("INSERT OR IGNORE INTO submissions (owner_uid, key, fingerprint,"
                         " job_id, pipeline_id, created_at) VALUES (?,?,?,?,?,?)",
                         (owner_uid, key, fingerprint, job_id, pipeline_id, now))

    def job_owners(self, job_ids: Iterable[int]) -> dict[int, tuple[int, str | None, str]]:
        """job id -> (owner uid, name, kind)."""
        ids = sorted(set(job_ids))
        out: dict[int, tuple[int, str | None, str]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for r in self.query(f"SELECT id, owner_uid, name, kind FROM jobs WHERE id IN"
                                f" ({','.join('?' * len(chunk))})", chunk):
                out[r["id"]] = (r["owner_uid"], r["name"], r["kind"])
        return out

    def update_spec(self, job_id: int, spec_json: str) -> None:
        """A stage's resolved command (upstream results filled in) replaces the placeholder."""
        with self.write() as conn:
            conn.execute("UPDATE jobs SET spec = ? WHERE id = ? AND status = 'queued'",
                         (spec_json, job_id))

    def get_job(self, job_id: int) -> Row:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", [job_id])
        if not rows:
            raise NotFound(f"no job {job_id}")
        return rows[0]

    def list_jobs(
        self, *, statuses: Iterable[str] | None = None, owner_uid: int | None = None,
        name: str | None = None, limit: int | None = None, ids: Iterable[int] | None = None,
    ) -> list[Row]:
        """Matching jobs in id order (``limit``: the newest N of them)."""
        clause, params = _where(status=statuses, owner_uid=owner_uid, name=name, id=ids)
        sql = f"SELECT * FROM jobs WHERE {clause} ORDER BY id"
        if limit:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY id"
        return self.query(sql, params)

    def list_page(
        self, *, statuses: Iterable[str], head: int, owner_uid: int | None = None,
        name: str | None = None, ids: Iterable[int] | None = None,
    ) -> tuple[list[Row], dict[str, int]]:
        """One page of a listing (``gpusched ls``): every matching starting, running and
        unknown job (id order); then queued, then held jobs in the planner's order (priority,
        submission; the jobs_queue_order index) up to ``head`` rows; then ended ones, newest
        first, up to ``head``. Only the rows returned are read whole; the rest are counted:
        returns (rows, status -> how many matching jobs of that status were left out)."""
        wanted = list(dict.fromkeys(statuses))
        ids = list(ids) if ids is not None else None

        def select(status: str | list[str], order: str, limit: int | None = None) -> list[Row]:
            clause, params = _where(status=status, owner_uid=owner_uid, name=name, id=ids)
            return self.query(f"SELECT * FROM jobs WHERE {clause} ORDER BY {order}"
                              + (f" LIMIT {int(limit)}" if limit is not None else ""), params)

        active = [s for s in wanted if s in ACTIVE_LISTED]
        rows = select(active, "id") if active else []
        shown: dict[str, int] = {}
        room = head
        for status in ("queued", "held"):
            if status in wanted and room > 0:
                page = select(status, QUEUE_ORDER, room)
                rows += page
                shown[status] = len(page)
                room -= len(page)
        ended = [s for s in wanted if s not in ACTIVE_LISTED and s not in ("queued", "held")]
        if ended:
            page = select(ended, "id DESC", head)
            rows += page
            for r in page:
                shown[r["status"]] = shown.get(r["status"], 0) + 1
        paged = [s for s in wanted if s not in ACTIVE_LISTED]
        counts = (self.count_jobs(statuses=paged, owner_uid=owner_uid, name=name, ids=ids)
                  if paged else {})
        more = {s: n - shown.get(s, 0) for s, n in counts.items() if n > shown.get(s, 0)}
        return rows, more

    def count_jobs(self, *, statuses: Iterable[str] | None = None,
                   owner_uid: int | None = None, name: str | None = None,
                   ids: Iterable[int] | None = None) -> dict[str, int]:
        """status -> number of matching jobs (from the status indexes; no row is read)."""
        clause, params = _where(status=statuses, owner_uid=owner_uid, name=name, id=ids)
        return {r["status"]: r["n"] for r in self.query(
            f"SELECT status, count(*) AS n FROM jobs WHERE {clause} GROUP BY status", params)}

    def last_event_id(self) -> int:
        rows = self.query("SELECT max(id) AS id FROM job_events")
        return int(rows[0]["id"] or 0)

    def broken_dependencies(self, after_event: int = 0) -> dict[int, tuple[int, str]]:
        """Pending jobs with an ``--after`` job that failed, was cancelled or lost:
        job id -> (that dependency, its status).

        With ``after_event`` (a job_events id) only what events since then can have broken:
        dependents of jobs that failed since, and jobs queued (or released) since. That costs
        what changed, where the whole check reads every pending job (100,000 queued: 7 ms a
        tick)."""
        where = ""
        params: list[Any] = []
        if after_event:
            changed = self.query(
                "SELECT job_id, to_status FROM job_events WHERE id > ? AND to_status IN"
                " ('failed', 'cancelled', 'lost', 'queued', 'held')", [after_event])
            ended = sorted({r["job_id"] for r in changed if r["to_status"] in FAILED_STATUSES})
            pending = sorted({r["job_id"] for r in changed
                              if r["to_status"] not in FAILED_STATUSES})
            if not ended and not pending:
                return {}
            if len(ended) + len(pending) > 500:
                after_event = 0  # a burst: the whole check is cheaper than a long IN list
            else:
                where = (f" AND (d.after_id IN ({','.join('?' * len(ended))})"
                         f" OR d.job_id IN ({','.join('?' * len(pending))}))")
                params = [*ended, *pending]
        rows = self.query(
            "SELECT d.job_id, d.after_id, a.status FROM job_deps d JOIN jobs j ON j.id = d.job_id"
            " JOIN jobs a ON a.id = d.after_id WHERE j.status IN ('queued', 'held')"
            f" AND a.status IN ('failed', 'cancelled', 'lost'){where}"
            " ORDER BY d.job_id, d.after_id", params)
        out: dict[int, tuple[int, str]] = {}
        for r in rows:
            out.setdefault(r["job_id"], (r["after_id"], r["status"]))
        return out

    def unmet_dependencies(self, job_ids: Sequence[int]) -> dict[int, list[Row]]:
        """For each of these jobs, its ``--after`` jobs that have not succeeded yet:
        job id -> rows of (after_id, name, status), in id order."""
        out: dict[int, list[Row]] = {}
        ids = list(job_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for r in self.query(
                    "SELECT d.job_id, d.after_id, a.name, a.status FROM job_deps d JOIN jobs a"
                    f" ON a.id = d.after_id WHERE d.job_id IN ({','.join('?' * len(chunk))})"
                    " AND a.status != 'succeeded' ORDER BY d.job_id, d.after_id", chunk):
                out.setdefault(r["job_id"], []).append(r)
        return out

    def events(self, job_id: int) -> list[Row]:
        return self.query("SELECT * FROM job_events WHERE job_id = ? ORDER BY id", [job_id])

    @staticmethod
    def _event(conn: sqlite3.Connection, job_id: int, now: float, frm: str | None, to: str,
               reason: str | None, actor: str) -> None:
        conn.execute(
            "INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor)"
            " VALUES (?,?,?,?,?,?)", (job_id, now, frm, str(to), reason, actor),
        )

    def _transition(self, conn: sqlite3.Connection, job_id: int, to: JobStatus, now: float, *,
                    reason: str | None, actor: str, allowed: Iterable[JobStatus] | None = None,
                    fields: dict[str, Any] | None = None, claim: bool = False) -> str | None:
        """Guarded status change inside an open transaction; returns the old status or None."""
        allowed_from = frozenset(allowed) if allowed is not None else ALLOWED_FROM[to]
        allowed_from &= ALLOWED_FROM[to]
        if len(allowed_from) == 1:  # the guarded UPDATE alone tells the old status
            old = next(iter(allowed_from)).value
        else:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in allowed_from:
                return None
            old = row[0]
        sets = {"status": to.value, "updated_at": now, **(fields or {})}
        if reason is not None and "reason" not in sets:
            sets["reason"] = reason
        assign = ", ".join(f"{k} = ?" for k in sets)
        marks = ",".join("?" * len(allowed_from))
        cur = conn.execute(
            f"UPDATE jobs SET {assign} WHERE id = ? AND status IN ({marks})",
            [*sets.values(), job_id, *sorted(allowed_from)],
        )
        if cur.rowcount != 1:
            return None
        self._event(conn, job_id, now, old, to, reason, actor)
        if not claim and (old == JobStatus.QUEUED.value or to is JobStatus.QUEUED or (
                to in TERMINAL and conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM job_deps WHERE after_id = ?)"
                    " OR EXISTS (SELECT 1 FROM job_after_any WHERE after_id = ?)",
                    (job_id, job_id)).fetchone()[0])):
            self.queue_version += 1
        return str(old)

    def transition(self, job_id: int, to: JobStatus, now: float, *, reason: str | None = None,
                   actor: str = "daemon", allowed: Iterable[JobStatus] | None = None,
                   fields: dict[str, Any] | None = None) -> bool:
        with self.write() as conn:
            return self._transition(conn, job_id, to, now, reason=reason, actor=actor,
                                    allowed=allowed, fields=fields) is not None

    # -- claims and attempts --------------------------------------------------------------

    def claim(self, job_id: int, gpu_uuids: Sequence[str], *, runner: str, now: float,
              paths: Callable[[int, int], tuple[str, str]],
              reason: str | None = None) -> int | None:
        """Move a queued job to STARTING with all its GPUs, or change nothing.

        ``paths(job_id, attempt)`` gives (log_path, run_dir). Returns the attempt number, or
        None when the job was no longer queued or a GPU was taken (all or nothing)."""
        try:
            with self.write() as conn:
                row = conn.execute("SELECT attempt FROM jobs WHERE id = ? AND status = 'queued'",
                                   (job_id,)).fetchone()
                if row is None:
                    return None
                n = int(row[0]) + 1
                # the reason is the event's (why these GPUs); the job's own reason is cleared
                if self._transition(conn, job_id, JobStatus.STARTING, now, reason=reason,
                                    actor="daemon", fields={"attempt": n, "exit_code": None,
                                                            "reason": None},
                                    claim=True) is None:
                    return None
                conn.executemany(
                    "INSERT INTO allocations (gpu_uuid, job_id, attempt, allocated_at)"
                    " VALUES (?,?,?,?)", [(u, job_id, n, now) for u in gpu_uuids])
                log_path, run_dir = paths(job_id, n)
                conn.execute(
                    "INSERT INTO attempts (job_id, n, runner, state, gpus, log_path, run_dir,"
                    " started_at) VALUES (?,?,?,?,?,?,?,?)",
                    (job_id, n, runner, "starting", json.dumps(list(gpu_uuids)), log_path,
                     run_dir, now))
                return n
        except sqlite3.IntegrityError:
            return None  # a GPU was already allocated: the whole claim rolled back

    def mark_launched(self, job_id: int, n: int, *, now: float, pid: int | None = None,
                      pid_start: int | None = None, container_id: str | None = None,
                      container_name: str | None = None, slurm_job_id: str | None = None) -> bool:
        # durable: after a power loss the shim is gone too, and without this record the
        # attempt would look never started and be run again as if it had not run
        with self.write() as conn:
            conn.execute(
                "UPDATE attempts SET state='live', pid=?, pid_start=?, container_id=?,"
                " container_name=?, slurm_job_id=? WHERE job_id=? AND n=? AND state='starting'",
                (pid, pid_start, container_id, container_name, slurm_job_id, job_id, n))
            return self._transition(conn, job_id, JobStatus.RUNNING, now, reason=None,
                                    actor="daemon", allowed={JobStatus.STARTING},
                                    fields={"started_at": now}) is not None

    def update_attempt(self, job_id: int, n: int, **fields: Any) -> None:
        if not fields:
            return
        with self.write() as conn:
            assign = ", ".join(f"{k} = ?" for k in fields)
            conn.execute(f"UPDATE attempts SET {assign} WHERE job_id = ? AND n = ?",
                         [*fields.values(), job_id, n])

    def attempts(self, job_id: int) -> list[Row]:
        return self.query("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", [job_id])

    def attempt(self, job_id: int, n: int) -> Row | None:
        rows = self.query("SELECT * FROM attempts WHERE job_id = ? AND n = ?", [job_id, n])
        return rows[0] if rows else None

    def live_attempts(self, runner: str | None = None) -> list[Row]:
        sql = ("SELECT a.*, j.status AS job_status, j.cancel_requested_at, j.cancel_by,"
               " j.retries_left,"
               " j.requeue_reason, j.owner_uid, j.owner, j.spec AS job_spec FROM attempts a"
               " JOIN jobs j ON j.id = a.job_id"
               " WHERE a.state IN ('starting', 'live')")
        params: list[Any] = []
        if runner:
            sql += " AND a.runner = ?"
            params.append(runner)
        return self.query(sql + " ORDER BY a.job_id", params)

    def finish_attempt(self, job_id: int, n: int, *, to: JobStatus, now: float,
                       ended_at: float, exit_code: int | None, reason: str | None,
                       oom: bool = False, release_now: bool = True,
                       requeue: bool = False, consume_retry: bool = True) -> bool:
        """Record an attempt's end and move its job on, in one transaction.

        With ``requeue`` the job goes back to QUEUED (a retry) instead of ``to``. Allocations are
        deleted at once (``release_now``) or marked releasing until the inventory shows the GPUs
        clean of the attempt's processes. Returns False when the attempt had already ended."""
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE attempts SET state='ended', ended_at=?, exit_code=?, reason=?, oom=?"
                " WHERE job_id=? AND n=? AND state != 'ended'",
                (ended_at, exit_code, reason, int(oom), job_id, n))
            if cur.rowcount != 1:
                return False
            fields: dict[str, Any] = {"exit_code": exit_code, "cancel_requested_at": None,
                                      "requeue_reason": None}
            if requeue:
                if consume_retry:
                    conn.execute("UPDATE jobs SET retries_left = retries_left - 1 WHERE id = ?",
                                 (job_id,))
                self._transition(conn, job_id, JobStatus.QUEUED, now, reason=reason,
                                 actor="daemon", allowed=ACTIVE, fields=fields)
            else:
                fields["ended_at"] = ended_at
                self._transition(conn, job_id, to, now, reason=reason, actor="daemon",
                                 allowed=ACTIVE, fields=fields)
            if release_now:
                conn.execute("DELETE FROM allocations WHERE job_id=? AND attempt=?", (job_id, n))
            else:
                conn.execute("UPDATE allocations SET releasing_since=? WHERE job_id=? AND"
                             " attempt=?", (now, job_id, n))
            return True

    # -- allocations ----------------------------------------------------------------------

    def mark_infra_requeue(self, job_ids: Iterable[int], reason: str, now: float) -> None:
        """Ask for these active jobs to be stopped and queued again without using a retry."""
        with self.write() as conn:
            for job_id in job_ids:
                conn.execute("UPDATE jobs SET requeue_reason = ?, updated_at = ? WHERE id = ?"
                             " AND status IN ('starting', 'running', 'unknown')",
                             (reason, now, job_id))
                self._event(conn, job_id, now, None, "requeue", reason, "daemon")

    def active_results_dirs(self) -> dict[str, int]:
        """results_dir -> job id, for the TAO stages not yet ended that write one (evaluate,
        which may share a directory, left out)."""
        rows = self.query(
            "SELECT id, json_extract(spec, '$.stage.stage.results_dir') AS d FROM jobs"
            " WHERE status IN ('queued', 'held', 'starting', 'running', 'unknown')"
            " AND kind LIKE 'tao:%' AND kind != 'tao:evaluate' ORDER BY id")
        return {r["d"]: r["id"] for r in rows if r["d"]}

    def allocation_owners(self) -> dict[int, int]:
        """job id -> owner uid, for the jobs that hold (or are releasing) GPUs."""
        return {r["id"]: r["owner_uid"] for r in self.query(
            "SELECT DISTINCT j.id, j.owner_uid FROM allocations a JOIN jobs j ON j.id = a.job_id")}

    def allocations(self) -> list[Row]:
        return self.query("SELECT * FROM allocations ORDER BY gpu_uuid")

    def release_gpu(self, gpu_uuid: str) -> None:
        with self.write() as conn:
            conn.execute("DELETE FROM allocations WHERE gpu_uuid = ?", (gpu_uuid,))

    # -- user actions ---------------------------------------------------------------------

    def request_cancel(self, job_id: int, *, actor: str, now: float) -> str:
        """Cancel a job: pending jobs end at once, active ones are marked for the daemon.
        Returns 'cancelled', 'cancelling' or 'already'."""
        with self.write() as conn:
            row = conn.execute("SELECT status, cancel_requested_at FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            status = JobStatus(row[0])
            if status in (JobStatus.QUEUED, JobStatus.HELD):
                self._transition(conn, job_id, JobStatus.CANCELLED, now, reason=f"cancelled by {actor}",
                                 actor=actor, fields={"ended_at": now})
                return "cancelled"
            if status in ACTIVE:
                if row[1] is None:
                    conn.execute("UPDATE jobs SET cancel_requested_at=?, cancel_by=?, updated_at=?"
                                 " WHERE id=?", (now, actor, now, job_id))
                    self._event(conn, job_id, now, status, status, "cancel requested", actor)
                return "cancelling"
            if status == JobStatus.CANCELLED:
                return "already"
            raise Conflict(f"job {job_id} has already ended ({status.value}); nothing to cancel")

    # -- notifications --------------------------------------------------------------------

    def due_notifications(self, now: float) -> list[Row]:
        """Notifications of ended jobs not yet delivered, with their job's row (as ``job_*``):
        waiting ones whose job has ended, pending ones whose retry is due."""
        return self.query(
            "SELECT n.*, j.status AS job_status, j.owner_uid, j.owner, j.name AS job_name,"
            " j.exit_code, j.reason, j.attempt, j.submitted_at, j.started_at, j.ended_at,"
            " j.kind AS job_kind, j.runner, j.spec AS job_spec FROM notifications n"
            " JOIN jobs j ON j.id = n.job_id WHERE (n.state = 'waiting' AND j.status IN"
            " ('succeeded', 'failed', 'cancelled', 'lost')) OR (n.state = 'pending' AND"
            " n.next_at <= ?) ORDER BY n.id LIMIT 256", [now])

    def notifications_open(self) -> bool:
        """Is any notification still to deliver (waiting for its job, sending, pending)?"""
        return bool(self.query("SELECT 1 FROM notifications WHERE state IN"
                               " ('waiting', 'sending', 'pending') LIMIT 1"))

    def notifications(self, job_id: int | None = None, state: str | None = None) -> list[Row]:
        clause, params = _where(job_id=job_id, state=state)
        return self.query(f"SELECT * FROM notifications WHERE {clause} ORDER BY id", params)

    def notification(self, note_id: int) -> Row | None:
        rows = self.query("SELECT * FROM notifications WHERE id = ?", [note_id])
        return rows[0] if rows else None

    def update_notification(self, note_id: int, **fields: Any) -> None:
        assign = ", ".join(f"{k} = ?" for k in fields)
        with self.write() as conn:
            self.notify_version += 1
            conn.execute(f"UPDATE notifications SET {assign} WHERE id = ?",
                         [*fields.values(), note_id])

    def requeue_sending_notifications(self) -> int:
        """After a restart: deliveries that were in flight are due again (at least once)."""
        with self.write() as conn:
            self.notify_version += 1
            return conn.execute("UPDATE notifications SET state = 'pending', next_at = 0"
                                " WHERE state = 'sending'").rowcount

    def request_stop(self, job_id: int, *, by: str, now: float, reason: str) -> None:
        """The daemon stops an active job (its time limit): marked like a cancel, by ``by``."""
        with self.write() as conn:
            cur = conn.execute("UPDATE jobs SET cancel_requested_at=?, cancel_by=?, updated_at=?"
                               " WHERE id=? AND cancel_requested_at IS NULL AND status IN"
                               " ('starting', 'running', 'unknown')", (now, by, now, job_id))
            if cur.rowcount == 1:
                self._event(conn, job_id, now, None, "stop", reason, "daemon")

    def note(self, job_id: int, text: str, *, actor: str, now: float) -> None:
        """Record an event that changes no status (a Slurm job held or released in Slurm)."""
        with self.write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            conn.execute("UPDATE jobs SET reason = ?, updated_at = ? WHERE id = ?",
                         (text, now, job_id))
            self._event(conn, job_id, now, row[0], row[0], text, actor)

    def hold(self, job_id: int, *, actor: str, now: float) -> None:
        status = JobStatus(self.get_job(job_id)["status"])
        if status == JobStatus.HELD:
            return
        if not self.transition(job_id, JobStatus.HELD, now, reason=f"held by {actor}",
                               actor=actor, allowed={JobStatus.QUEUED}):
            raise Conflict(f"job {job_id} is {status.value}: only queued jobs can be held")

    def requeue(self, job_id: int, *, actor: str, now: float) -> None:
        """Queue an ended job again: its next attempt is a new one (its retries start over),
        and what it asked for at its end (--notify, --output) is due again then."""
        row = self.get_job(job_id)
        status = JobStatus(row["status"])
        if row["pipeline_id"] is not None:
            raise Conflict(f"job {job_id} is a stage of pipeline {row['pipeline_id']}: run the "
                           "pipeline again instead")
        retries = int(json.loads(row["spec"]).get("retries") or 0)
        with self.write() as conn:
            if self._transition(
                    conn, job_id, JobStatus.QUEUED, now, reason=f"requeued by {actor}",
                    actor=actor, allowed={JobStatus.SUCCEEDED, JobStatus.FAILED,
                                          JobStatus.CANCELLED, JobStatus.LOST},
                    fields={"ended_at": None, "exit_code": None, "cancel_requested_at": None,
                            "cancel_by": None, "requeue_reason": None,
                            "retries_left": retries}) is None:
                raise Conflict(f"job {job_id} is {status.value}: only ended jobs can be "
                               "requeued")
            self.notify_version += 1
            conn.execute("UPDATE notifications SET state = 'waiting', tries = 0, next_at = NULL"
                         " WHERE job_id = ?", (job_id,))

    def release(self, job_id: int, *, actor: str, now: float) -> None:
        status = JobStatus(self.get_job(job_id)["status"])
        if status == JobStatus.QUEUED:
            return
        if not self.transition(job_id, JobStatus.QUEUED, now, reason=f"released by {actor}",
                               actor=actor, allowed={JobStatus.HELD}):
            raise Conflict(f"job {job_id} is {status.value}: only held jobs can be released")

    # -- GPUs -----------------------------------------------------------------------------

    def upsert_gpus(self, gpus: Iterable[tuple[str, int, str, int]], now: float) -> None:
        """(uuid, index, name, memory_total_mib) for every GPU the inventory sees."""
        with self.write() as conn:
            for uuid, idx, name, mem in gpus:
                conn.execute(
                    "INSERT INTO gpus (uuid, idx, name, memory_total_mib, first_seen, last_seen)"
                    " VALUES (?,?,?,?,?,?) ON CONFLICT(uuid) DO UPDATE SET idx=excluded.idx,"
                    " name=excluded.name, memory_total_mib=excluded.memory_total_mib,"
                    " last_seen=excluded.last_seen", (uuid, idx, name, mem, now, now))

    def gpu_rows(self) -> list[Row]:
        return self.query("SELECT * FROM gpus ORDER BY idx, uuid")

    def drain(self, gpu_uuid: str, *, reason: str, by: str, now: float) -> bool:
        """Drain a GPU; returns False if it was already drained (the first reason is kept)."""
        with self.write() as conn:
            if conn.execute("SELECT 1 FROM gpus WHERE uuid = ?", (gpu_uuid,)).fetchone() is None:
                raise NotFound(f"no GPU {gpu_uuid}")
            cur = conn.execute(
                "UPDATE gpus SET drained=1, drain_reason=?, drained_at=?, drained_by=?"
                " WHERE uuid=? AND drained=0", (reason, now, by, gpu_uuid))
            return cur.rowcount == 1

    def resume(self, gpu_uuid: str) -> None:
        with self.write() as conn:
            cur = conn.execute("UPDATE gpus SET drained=0, drain_reason=NULL, drained_at=NULL,"
                               " drained_by=NULL WHERE uuid=?", (gpu_uuid,))
            if cur.rowcount != 1:
                raise NotFound(f"no GPU {gpu_uuid}")

    # -- epochs and artifacts -------------------------------------------------------------

    def record_epochs(self, job_id: int, n: int, rows: Iterable[dict[str, Any]], *,
                      gpu_uuids: Sequence[str], gpu_models: Sequence[str],
                      workload: str | None) -> None:
        """Upsert epoch rows: re-reading an attempt's output after a restart changes nothing."""
        with self.write(durable=False) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO epochs (job_id, attempt, epoch, max_epoch, started_at,"
                " ended_at, seconds, gpu_uuids, gpu_models, gpu_count, workload, loss, lr, map,"
                " validated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(job_id, n, r["epoch"], r.get("max_epoch"), r.get("started_at"), r["ended_at"],
                  r.get("seconds"), json.dumps(list(gpu_uuids)), json.dumps(list(gpu_models)),
                  len(gpu_uuids), workload, r.get("loss"), r.get("lr"), r.get("map"),
                  int(bool(r.get("validated")))) for r in rows])

    def epochs(self, *, since: float | None = None, job_id: int | None = None,
               workload: str | None = None, limit: int | None = None) -> list[Row]:
        """Epoch rows in (job, attempt, epoch) order; ``limit``: only the newest that many."""
        clause, params = _where(job_id=job_id, workload=workload)
        if since is not None:
            clause += " AND ended_at >= ?"
            params.append(since)
        if limit is not None:
            return self.query(
                f"SELECT * FROM (SELECT * FROM epochs WHERE {clause} ORDER BY rowid DESC LIMIT ?)"
                " ORDER BY job_id, attempt, epoch", [*params, int(limit)])
        return self.query(f"SELECT * FROM epochs WHERE {clause} ORDER BY job_id, attempt, epoch",
                          params)

    def spans(self, since: float) -> list[Row]:
        """Every attempt that ran in the window, with its job's name and kind (timeline)."""
        return self.query(
            "SELECT a.job_id, a.n AS attempt, j.name, j.kind, j.status, a.gpus, a.started_at,"
            " a.ended_at, a.state FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE (a.ended_at IS NULL OR a.ended_at >= ?) AND a.state != 'starting'"
            " ORDER BY a.started_at", [since])

    def record_artifacts(self, job_id: int, n: int, artifacts: Iterable[dict[str, Any]],
                         now: float) -> None:
        """Replace the attempt's artifacts (idempotent if an end is recorded twice)."""
        with self.write() as conn:
            conn.execute("DELETE FROM artifacts WHERE job_id = ? AND attempt = ?", (job_id, n))
            conn.executemany(
                "INSERT INTO artifacts (job_id, attempt, kind, path, epoch, metrics, created_at)"
                " VALUES (?,?,?,?,?,?,?)",
                [(job_id, n, a["kind"], a.get("path"), a.get("epoch"),
                  json.dumps(a.get("metrics") or {}), now) for a in artifacts])

    def artifacts(self, job_id: int) -> list[Row]:
        rows = self.query("SELECT * FROM artifacts WHERE job_id = ? AND attempt = (SELECT"
                          " attempt FROM jobs WHERE id = ?) ORDER BY id", [job_id, job_id])
        for r in rows:
            r["metrics"] = json.loads(r["metrics"])
        return rows

    # -- pipelines ------------------------------------------------------------------------

    def create_pipeline(self, name: str, *, owner_uid: int, owner: str, spec_json: str,
                        now: float, idempotency: tuple[str, str] | None = None) -> int:
        """``idempotency`` (key, fingerprint) records the client's key with the pipeline, in
        the same transaction."""
        with self.write() as conn:
            if idempotency is not None:
                prev = self._submission(conn, owner_uid, idempotency[0])
                if prev is not None:  # its first try won the race: everything rolls back
                    raise DuplicateSubmission(pipeline_id=prev["pipeline_id"])
            cur = conn.execute(
                "INSERT INTO pipelines (name, owner_uid, owner, spec, status, created_at,"
                " updated_at) VALUES (?,?,?,?,?,?,?)",
                (name, owner_uid, owner, spec_json, "running", now, now))
            pid = int(cur.lastrowid or 0)
            if idempotency is not None:
                conn.execute("INSERT INTO submissions (owner_uid, key, fingerprint,"
                             " pipeline_id, created_at) VALUES (?,?,?,?,?)",
                             (owner_uid, idempotency[0], idempotency[1], pid, now))
            return pid

    def update_pipeline(self, pid: int, *, now: float, **fields: Any) -> None:
        with self.write() as conn:
            assign = ", ".join(f"{k} = ?" for k in fields)
            conn.execute(f"UPDATE pipelines SET {assign}, updated_at = ? WHERE id = ?",
                         [*fields.values(), now, pid])

    def get_pipeline(self, ref: str | int) -> Row:
        text = str(ref)
        numeric = text.isascii() and text.isdigit() and len(text) <= 18
        rows = (self.query("SELECT * FROM pipelines WHERE id = ?", [int(text)]) if numeric
                else self.query("SELECT * FROM pipelines WHERE name = ? ORDER BY id DESC LIMIT 1",
                                [text]))
        if not rows:
            raise NotFound(f"no pipeline {ref!r}")
        return rows[0]

    def pipelines(self, status: str | None = None) -> list[Row]:
        if status:
            return self.query("SELECT * FROM pipelines WHERE status = ? ORDER BY id", [status])
        return self.query("SELECT * FROM pipelines ORDER BY id")

    def pipeline_jobs(self, pid: int) -> list[Row]:
        return self.query("SELECT * FROM jobs WHERE pipeline_id = ? ORDER BY id", [pid])

    # -- backups --------------------------------------------------------------------------

    def backup(self, dest_dir: Path, *, keep: int, now: float) -> Path:
        """An online, consistent copy (``VACUUM INTO``) in ``dest_dir``; keeps the newest
        ``keep`` copies."""
        import time as _time

        dest_dir.mkdir(parents=True, exist_ok=True)
        stamp = _time.strftime("%Y%m%dT%H%M%SZ", _time.gmtime(now))
        dest = dest_dir / f"gpusched-{stamp}.db"
        tmp = dest.with_suffix(".db.tmp")
        tmp.unlink(missing_ok=True)
        # on a connection of its own: a read snapshot, which neither waits for the daemon's
        # writes nor holds them up (VACUUM INTO needs a connection that is not query_only)
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   timeout=self._busy_ms / 1000)
            try:
                conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
                conn.execute("VACUUM INTO ?", (str(tmp),))
            finally:
                conn.close()
        except sqlite3.Error as err:
            tmp.unlink(missing_ok=True)
            raise _wrap(err) from err
        tmp.replace(dest)
        for old in sorted(dest_dir.glob("gpusched-*.db"))[:-keep]:
            old.unlink(missing_ok=True)
        return dest

    # -- counts ---------------------------------------------------------------------------

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in
                self.query("SELECT status, count(*) AS n FROM jobs GROUP BY status")}

    def has_work(self) -> bool:
        """True while any job is queued or active (``daemon --once`` runs until False)."""
        st = [JobStatus.QUEUED.value, *(s.value for s in ACTIVE)]
        rows = self.query(f"SELECT 1 FROM jobs WHERE status IN ({','.join('?' * len(st))})"
                          " LIMIT 1", st)
        return bool(rows) or bool(self.query("SELECT 1 FROM allocations LIMIT 1"))

