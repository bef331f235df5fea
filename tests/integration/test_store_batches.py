"""Store.submit_many (one transaction, all or nothing) and the paged listing's queries (the v8
migration's indexes: the head of the queue is read in planning order without a sort)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gpusched.errors import SpecError
from gpusched.models import GpuRequest, JobSpec
from gpusched.store import MIGRATIONS, QUEUE_ORDER, Store
from gpusched.testing.harness import database_at


def _spec(**kw: object) -> JobSpec:
    return JobSpec.model_validate({"command": ["true"], "workdir": "/tmp", **kw})


def test_a_batch_is_stored_whole_with_consecutive_ids(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    try:
        before = store.submit(_spec(), owner_uid=1, owner="a", now=1.0)
        ids, created = store.submit_many([_spec(name=f"j{i}", after=[before]) for i in range(5)],
                                         owner_uid=1, owner="a", now=2.0,
                                         idempotency=("key-00000001", "fp"))
        assert created and ids == list(range(before + 1, before + 6))
        assert [r["name"] for r in store.list_jobs()][1:] == [f"j{i}" for i in range(5)]
        assert len(store.query("SELECT * FROM job_deps")) == 5
        assert len(store.query("SELECT * FROM job_events")) == 6
        again = store.submit_many([_spec()], owner_uid=1, owner="a", now=3.0,
                                  idempotency=("key-00000001", "fp"))
        assert again == (ids, False)
    finally:
        store.close()


def test_one_bad_job_stores_nothing_of_the_batch(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    try:
        with pytest.raises(SpecError, match="do not exist"):
            store.submit_many([_spec(), _spec(), _spec(after=[999])], owner_uid=1, owner="a",
                              now=1.0, idempotency=("key-00000002", "fp"))
        assert store.list_jobs() == [] and store.query("SELECT * FROM job_events") == []
        assert store.find_submission(1, "key-00000002") is None
    finally:
        store.close()


def test_the_queue_head_and_counts_use_indexes(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    try:
        plans = {
            f"SELECT * FROM jobs WHERE status = 'queued' ORDER BY {QUEUE_ORDER} LIMIT 30": "",
            "SELECT * FROM jobs WHERE status = 'queued' AND owner_uid = 5 ORDER BY "
            f"{QUEUE_ORDER} LIMIT 30": "",
            "SELECT status, count(*) FROM jobs WHERE status IN ('queued', 'held') "
            "GROUP BY status": "",
            # jobs_status (v11 dropped it) served these before: the queue order's index must
            "SELECT 1 FROM jobs WHERE status IN ('queued', 'starting', 'running', 'unknown') "
            "LIMIT 1": "",
            "SELECT id FROM jobs WHERE status IN ('queued', 'held', 'starting', 'running', "
            "'unknown') AND kind LIKE 'tao:%'": "",
        }
        for sql in plans:
            plan = " / ".join(r["detail"] for r in store.query("EXPLAIN QUERY PLAN " + sql))
            assert "USING" in plan and "INDEX" in plan, plan
            if "LIMIT" in sql and "owner_uid" not in sql:
                assert "TEMP B-TREE" not in plan, plan  # no sort of the whole queue
    finally:
        store.close()


def test_the_paged_listing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    try:
        low = [store.submit(_spec(), owner_uid=1, owner="a", now=float(i)) for i in range(5)]
        high = store.submit(_spec(priority=3), owner_uid=2, owner="b", now=9.0)
        held = store.submit(_spec(hold=True), owner_uid=1, owner="a", now=10.0)
        rows, more = store.list_page(statuses=["queued", "held", "running"], head=3)
        assert [r["id"] for r in rows] == [high, low[0], low[1]]
        assert more == {"queued": 3, "held": 1}
        rows, more = store.list_page(statuses=["queued", "held"], head=10, owner_uid=1)
        assert [r["id"] for r in rows] == [*low, held] and more == {}
        assert store.count_jobs(statuses=["queued", "held"]) == {"queued": 6, "held": 1}
    finally:
        store.close()


def test_a_v7_database_gains_the_v8_indexes_and_column(tmp_path: Path) -> None:
    path = tmp_path / "db"
    database_at(path, 7)
    Store(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        cols = {r[1] for r in conn.execute("PRAGMA table_info(submissions)")}
    assert {"jobs_queue_order", "jobs_owner_status"} <= names and "job_count" in cols


def test_a_v10_database_loses_the_status_index_the_queue_order_covers(tmp_path: Path) -> None:
    path = tmp_path / "db"
    database_at(path, 10)
    with sqlite3.connect(path) as conn:
        before = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    Store(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        after = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "jobs_status" in before and before - after == {"jobs_status"}


def test_after_any_jobs_stored_before_v9_keep_waiting_after_the_upgrade(tmp_path: Path) -> None:
    """v9 keeps --after-any as rows (the planner no longer parses every queued spec): a job a
    v8 gpusched stored with --after-any must still wait for its job after the upgrade."""
    path = tmp_path / "db"
    database_at(path, 8)  # then the rows a v8 gpusched wrote: job 2 waits for job 1
    now = time.time()
    with sqlite3.connect(path) as conn:
        spec = JobSpec(command=["true"]).model_dump_json()
        for status in ("running", "queued"):
            conn.execute(
                "INSERT INTO jobs (owner_uid, owner, status, priority, runner, kind, spec,"
                " request, submitted_at, updated_at) VALUES (0, 'root', ?, 0, 'local', 'job',"
                " ?, ?, ?, ?)", (status, spec if status == "running" else
                                 JobSpec(command=["true"], after_any=[1]).model_dump_json(),
                                 GpuRequest(count=1).model_dump_json(), now, now))
    store = Store(path)
    try:
        assert [(r["job_id"], r["after_id"]) for r in store.query(
            "SELECT * FROM job_after_any")] == [(2, 1)]
        fresh = store.submit(JobSpec(command=["true"], after_any=[1, 2]), owner_uid=0,
                             owner="root", now=now)
        assert [r["after_id"] for r in store.query(
            "SELECT after_id FROM job_after_any WHERE job_id = ? ORDER BY after_id",
            [fresh])] == [1, 2]
    finally:
        store.close()
