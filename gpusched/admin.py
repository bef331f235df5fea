"""Offline administration of the state directory: backups, restores and a deliberate fresh
start."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from gpusched.config import Settings
from gpusched.errors import AlreadyRunning, CorruptDatabase, GpuschedError, NotFound, StoreError
from gpusched.paths import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, ensure_dir, ensure_mode
from gpusched.service import lock_state_dir
from gpusched.store import MIGRATIONS, Store

_JOB_DIR = re.compile(r"^[0-9]+$")


def newest_backup(settings: Settings) -> Path | None:
    found = sorted(settings.backups_dir.glob("gpusched-*.db"))
    return found[-1] if found else None


def _restore_hint(settings: Settings) -> str:
    newest = newest_backup(settings)
    return (f"the newest backup is {newest}; stop gpusched and run `gpusched admin restore "
            f"{newest}`" if newest else f"no backup exists in {settings.backups_dir}")


def corrupt_message(settings: Settings, detail: str) -> str:
    return f"the state database {settings.db_path} is corrupt ({detail}); {_restore_hint(settings)}"


def job_dirs(settings: Settings) -> list[Path]:
    """The per-job directories (logs/<id>, runs/<id>) earlier jobs left behind."""
    out: list[Path] = []
    for top in (settings.logs_dir, settings.runs_dir):
        with contextlib.suppress(OSError):
            out += [Path(e.path) for e in os.scandir(top)
                    if _JOB_DIR.match(e.name) and e.is_dir(follow_symlinks=False)]
    return out


def earlier_state(settings: Settings) -> str | None:
    """What in the state directory shows that jobs ran here before (None: nothing)."""
    found = []
    backups = sorted(settings.backups_dir.glob("gpusched-*.db"))
    if backups:
        found.append(f"{len(backups)} backup(s) in {settings.backups_dir}")
    dirs = job_dirs(settings)
    if dirs:
        found.append(f"the logs or run directories of {len({d.name for d in dirs})} earlier "
                     f"job(s) in {settings.logs_dir} and {settings.runs_dir}")
    return " and ".join(found) or None


def reset_message(settings: Settings, what: str, evidence: str) -> str:
    """Why the daemon refuses to start on a missing or empty database, and the ways out."""
    hint = _restore_hint(settings)
    return (f"the state database {settings.db_path} is {what}, but the state directory holds "
            f"{evidence}: refusing to start with an empty queue (new jobs would reuse old job "
            f"ids). {hint[0].upper()}{hint[1:]}. To start with an empty queue on "
            f"purpose, run `gpusched admin init` (it moves logs/ and runs/ aside and creates an "
            f"empty database; backups are kept)")


def backup(settings: Settings) -> Path:
    if not settings.db_path.exists():
        raise NotFound(f"no database at {settings.db_path}")
    ensure_dir(settings.backups_dir, PRIVATE_DIR_MODE)
    store = Store(settings.db_path)
    try:
        path = store.backup(settings.backups_dir, keep=settings.backup.keep, now=time.time())
    finally:
        store.close()
    ensure_mode(path, PRIVATE_FILE_MODE)
    return path


def check_database(path: Path) -> None:
    """Refuse a file that is not a gpusched database this version can open: not SQLite, fails
    quick_check, has no jobs table, or has a newer schema. Opens it read-only."""
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            check = "; ".join(str(r[0]) for r in conn.execute("PRAGMA quick_check"))
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            has_jobs = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                    "name = 'jobs'").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise CorruptDatabase(f"{path} is not a usable database: {err}") from err
    if check != "ok":
        raise CorruptDatabase(f"{path} fails quick_check ({check}); pick another backup")
    if not has_jobs or version < 1:
        raise CorruptDatabase(f"{path} is not a gpusched database (no jobs table)")
    if version > len(MIGRATIONS):
        raise StoreError(f"{path} has schema version {version}, newer than this gpusched knows "
                         f"({len(MIGRATIONS)}): restore it with a newer gpusched")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _max_job_dir(settings: Settings) -> int:
    return max((int(d.name) for d in job_dirs(settings)), default=0)


def _skip_used_ids(db: Path, floor: int) -> None:
    """New jobs of a restored (older) database must not reuse the ids of jobs that ran after
    the backup: their logs and run directories are still there."""
    if floor <= 0:
        return
    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        if row is None:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (floor,))
        elif int(row[0]) < floor:
            conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", (floor,))
        conn.execute("COMMIT")
    finally:
        conn.close()


def restore(settings: Settings, backup_path: Path) -> Path | None:
    """Swap the database for a checked backup; returns where the old database went (None when
    there was none). The candidate is checked first and copied beside the database, and only an
    atomic rename replaces the live file, so the state directory always has a database."""
    db = settings.db_path
    if not backup_path.is_file():
        raise NotFound(f"no backup file {backup_path}")
    if db.exists() and os.path.samefile(backup_path, db):
        raise GpuschedError(f"{backup_path} is the live database itself; name a backup "
                            f"(in {settings.backups_dir})")
    check_database(backup_path)
    try:
        fd = lock_state_dir(settings.state_dir)
    except AlreadyRunning as err:
        raise AlreadyRunning("the daemon is running: stop it first "
                             "(sudo systemctl stop gpusched)") from err
    tmp = db.with_name("gpusched.db.restoring")
    try:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
        with open(backup_path, "rb") as src, \
                open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE),
                     "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        check_database(tmp)  # the copy, as it will be used
        _skip_used_ids(tmp, _max_job_dir(settings))
        kept: Path | None = None
        if db.exists():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            kept = db.with_name(f"gpusched.db.pre-restore-{stamp}")
            try:  # a second name for the old file: gpusched.db itself never goes missing
                os.link(db, kept)
            except OSError:
                shutil.copy2(db, kept)
            wal = Path(f"{db}-wal")
            if wal.exists():  # the old database's recent commits belong with the kept copy
                wal.replace(Path(f"{kept}-wal"))
        Path(f"{db}-shm").unlink(missing_ok=True)
        os.replace(tmp, db)
        _fsync_dir(settings.state_dir)
        return kept
    except OSError as err:
        raise GpuschedError(f"restore failed: {err}") from err
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        os.close(fd)


def init_fresh(settings: Settings) -> list[Path]:
    """Start with an empty queue on purpose, when the database is missing or empty: move
    logs/ and runs/ aside (new jobs start at id 1 again) and create an empty database.
    Backups stay. Returns the directories moved aside."""
    db = settings.db_path
    if db.exists() and db.stat().st_size > 0:
        raise GpuschedError(f"{db} exists and is not empty: `admin init` only starts afresh "
                            "when the database is missing or empty; to discard it, move it "
                            "aside first (or restore a backup with `gpusched admin restore`)")
    try:
        fd = lock_state_dir(settings.state_dir)
    except AlreadyRunning as err:
        raise AlreadyRunning("the daemon is running: stop it first "
                             "(sudo systemctl stop gpusched)") from err
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = []
        for top in (settings.logs_dir, settings.runs_dir):
            if top.exists() and any(top.iterdir()):
                aside = top.with_name(f"{top.name}.before-init-{stamp}")
                top.rename(aside)
                moved.append(aside)
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{db}{suffix}")
            if p.exists():
                p.rename(Path(f"{db}.empty-{stamp}{suffix}"))
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
        Store(db).close()
        _fsync_dir(settings.state_dir)
        return moved
    except OSError as err:
        raise GpuschedError(f"init failed: {err}") from err
    finally:
        os.close(fd)
