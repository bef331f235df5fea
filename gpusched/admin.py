"""Offline administration of the state directory: backups and restores."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

from gpusched.config import Settings
from gpusched.errors import AlreadyRunning, CorruptDatabase, GpuschedError, NotFound
from gpusched.service import lock_state_dir
from gpusched.store import Store


def newest_backup(settings: Settings) -> Path | None:
    found = sorted(settings.backups_dir.glob("gpusched-*.db"))
    return found[-1] if found else None


def corrupt_message(settings: Settings, detail: str) -> str:
    newest = newest_backup(settings)
    how = (f"the newest backup is {newest}; stop gpusched and run `gpusched admin restore "
           f"{newest}`" if newest else f"no backup exists in {settings.backups_dir}")
    return f"the state database {settings.db_path} is corrupt ({detail}); {how}"


def backup(settings: Settings) -> Path:
    if not settings.db_path.exists():
        raise NotFound(f"no database at {settings.db_path}")
    store = Store(settings.db_path)
    try:
        return store.backup(settings.backups_dir, keep=settings.backup.keep, now=time.time())
    finally:
        store.close()


def restore(settings: Settings, backup_path: Path) -> Path:
    """Swap the database for a checked backup; returns where the old database went."""
    if not backup_path.is_file():
        raise NotFound(f"no backup file {backup_path}")
    try:
        conn = sqlite3.connect(f"file:{backup_path}?mode=ro", uri=True)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise CorruptDatabase(f"{backup_path} is not a usable database: {err}") from err
    if check != "ok":
        raise CorruptDatabase(f"{backup_path} fails quick_check ({check}); pick another backup")
    try:
        fd = lock_state_dir(settings.state_dir)
    except AlreadyRunning as err:
        raise AlreadyRunning("the daemon is running: stop it first "
                             "(sudo systemctl stop gpusched)") from err
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = settings.db_path.with_name(f"gpusched.db.replaced-{stamp}")
        if settings.db_path.exists():
            settings.db_path.replace(kept)
        for suffix in ("-wal", "-shm"):
            Path(str(settings.db_path) + suffix).unlink(missing_ok=True)
        tmp = settings.db_path.with_name("gpusched.db.restoring")
        shutil.copyfile(backup_path, tmp)
        os.replace(tmp, settings.db_path)
        return kept
    except OSError as err:
        raise GpuschedError(f"restore failed: {err}") from err
    finally:
        os.close(fd)
