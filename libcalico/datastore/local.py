"""The `local` datastore: one SQLite file holding Calico's etcd keys and JSON values.

Every CNI ADD opens this file from a fresh process, so opening costs one header read
(`PRAGMA user_version`) plus one pragma; the schema is created only the first time.
Writes are `BEGIN IMMEDIATE` transactions, which makes compare-and-swap atomic across
processes and leaves the file consistent if a writer is killed mid-transaction.
Revisions come from one counter that never goes backwards, so a key that is deleted and
re-created never repeats a revision a reader may still hold.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from libcalico.datastore.base import (
    AlreadyExists,
    Answer,
    Conflict,
    Datastore,
    DatastoreCorrupt,
    DatastoreUnavailable,
    KVPair,
    NotFound,
    Read,
)
from libcalico.model import (
    Key,
    ListOptions,
    decode_value,
    encode_value,
    key_from_path,
    key_path,
    list_matches,
    list_prefix,
)

SCHEMA_VERSION = 1
# Keys per `IN (...)` query of a batched read, well under SQLite's bound-parameter limit.
_IN_CHUNK = 500
_creating = threading.Lock()
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
    " rev INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0),"
    " rev INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO revision (id, rev) VALUES (0, 0)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class LocalDatastore(Datastore):
    def __init__(self, path: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self._conn = self._open(busy_timeout)

    # -- connection

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        self._prepare_file()
        with self._translated("open"):
            # The node agent hands a kept connection from one request's thread to the next
            # (never to two at once: datastore/kept.py).
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                self._check_schema(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _prepare_file(self) -> None:
        """Create the parent (0700) and the file (0600) ourselves: SQLite would use 0644,
        and its -wal/-shm files copy the main file's mode.

        Only a file that does not exist yet is opened here: closing any descriptor of the
        database drops every POSIX lock this process holds on it, including the locks of
        the node agent's other open connections. Without its shared lock, another process
        closing its last connection would checkpoint and delete the WAL under them, and
        their later commits would go to the deleted file. The lock makes a concurrent
        open in this process wait until the new file's descriptor is closed.
        """
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            with _creating:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
        except OSError as err:
            raise DatastoreUnavailable(
                f"local datastore {self.path} cannot be opened: {err.strerror}"
            ) from err

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        elif version != SCHEMA_VERSION:
            raise DatastoreCorrupt(
                f"local datastore {self.path} has unknown schema version {version}"
            )
        # WAL + NORMAL survives a killed process; only power loss can drop the last commit.
        conn.execute("PRAGMA synchronous = NORMAL")

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Turn sqlite/JSON failures into datastore errors that name the file."""
        try:
            yield
        except sqlite3.OperationalError as err:
            raise DatastoreUnavailable(
                f"local datastore {self.path} unusable during {action}: {err}"
            ) from err
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as err:
            raise DatastoreCorrupt(
                f"local datastore {self.path} is corrupt or not a Calico datastore "
                f"({action}: {err})"
            ) from err

    @contextmanager
    def _write_transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._translated(action):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _next_revision(self) -> int:
        return self._conn.execute("UPDATE revision SET rev = rev + 1 RETURNING rev").fetchone()[0]

    def _exists(self, path: str) -> bool:
        return self._conn.execute("SELECT 1 FROM kv WHERE key = ?", (path,)).fetchone() is not None

    # -- Datastore

    def get(self, key: Key) -> KVPair:
        path = key_path(key)
        with self._translated(f"get {path}"):
            row = self._conn.execute("SELECT value, rev FROM kv WHERE key = ?", (path,)).fetchone()
            if row is None:
                raise NotFound(path)
            return KVPair(key, decode_value(key, row[0]), str(row[1]))

    def list(self, options: ListOptions) -> list[KVPair]:
        prefix = list_prefix(options)
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        with self._translated(f"list {prefix}"):
            rows = self._conn.execute(
                "SELECT key, value, rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, upper),
            ).fetchall()
            pairs = []
            for path, value, rev in rows:
                key = key_from_path(path)
                if key is not None and list_matches(options, key):
                    pairs.append(KVPair(key, decode_value(key, value), str(rev)))
            return pairs

    def read_many(self, reads: Sequence[Read]) -> list[Answer]:
        """The gets in one query per _IN_CHUNK keys, the lists one query each."""
        keys = [read for read in reads if not isinstance(read, ListOptions)]
        found = {}
        for path, key, value, rev in self._rows(keys, "value, rev"):
            with self._translated(f"get {path}"):
                found[key] = KVPair(key, decode_value(key, value), str(rev))
        return [
            self.list(read) if isinstance(read, ListOptions) else found.get(read) for read in reads
        ]

    def revisions(self, keys: Sequence[Key]) -> dict[Key, str]:
        return {key: str(rev) for _, key, rev in self._rows(keys, "rev")}

    def _rows(self, keys: Sequence[Key], columns: str) -> Iterator[tuple[Any, ...]]:
        """(path, key, *columns) of each stored key, in chunks of bound parameters."""
        by_path = {key_path(key): key for key in keys}
        paths = list(by_path)
        for start in range(0, len(paths), _IN_CHUNK):
            chunk = paths[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._translated(f"get {chunk[0]} and {len(chunk) - 1} more"):
                rows = self._conn.execute(
                    f"SELECT key, {columns} FROM kv WHERE key IN ({marks})", chunk
                ).fetchall()
            for path, *values in rows:
                yield (path, by_path[path], *values)

    def create(self, kvp: KVPair) -> KVPair:
        path = key_path(kvp.key)
        value = encode_value(kvp.value)
        with self._write_transaction(f"create {path}") as conn:
            revision = self._next_revision()
            inserted = conn.execute(
                "INSERT OR IGNORE INTO kv (key, value, rev) VALUES (?, ?, ?)",
                (path, value, revision),
            ).rowcount
            if not inserted:
                raise AlreadyExists(path)
        return KVPair(kvp.key, kvp.value, str(revision))

    def update(self, kvp: KVPair) -> KVPair:
        path = key_path(kvp.key)
        value = encode_value(kvp.value)
        with self._write_transaction(f"update {path}") as conn:
            revision = self._next_revision()
            if kvp.revision is None:
                changed = conn.execute(
                    "UPDATE kv SET value = ?, rev = ? WHERE key = ?", (value, revision, path)
                ).rowcount
            else:
                changed = conn.execute(
                    "UPDATE kv SET value = ?, rev = ? WHERE key = ? AND rev = ?",
                    (value, revision, path, int(kvp.revision)),
                ).rowcount
            if not changed:
                raise Conflict(path) if self._exists(path) else NotFound(path)
        return KVPair(kvp.key, kvp.value, str(revision))

    def delete(self, kvp: KVPair) -> None:
        path = key_path(kvp.key)
        with self._translated(f"delete {path}"):
            if kvp.revision is None:
                deleted = self._conn.execute("DELETE FROM kv WHERE key = ?", (path,)).rowcount
            else:
                deleted = self._conn.execute(
                    "DELETE FROM kv WHERE key = ? AND rev = ?", (path, int(kvp.revision))
                ).rowcount
            if not deleted:
                raise Conflict(path) if self._exists(path) else NotFound(path)

    def close(self) -> None:
        self._conn.close()
