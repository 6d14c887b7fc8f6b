"""Following the `local` SQLite datastore by its data version.

SQLite has no change feed, but `PRAGMA data_version` on a connection changes whenever any
other connection (this process's CNI server included) has committed, and costs a few
microseconds, so it is polled. On a change, one read transaction gives what changed: rows
whose revision is above the last one seen (the revision counter never goes backwards,
local.py) are new or updated; keys known before but no longer listed were deleted. Only
the selected key ranges are read, keys only for the deletions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from libcalico.datastore.base import DatastoreCorrupt, DatastoreUnavailable, KVPair
from libcalico.datastore.watch import Watcher, WatchEvent
from libcalico.model import ListOptions, decode_value, key_from_path, key_path, list_prefix

POLL_S = 0.02


@dataclass
class _Position:
    data_version: int
    revision: int
    paths: set[str]


class LocalWatcher(Watcher):
    def __init__(self, path: str, selections: Sequence[ListOptions]) -> None:
        super().__init__(selections)
        self.path = path
        self._conn: sqlite3.Connection | None = None
        prefixes = sorted({list_prefix(options) for options in selections})
        # Nested prefixes would be read twice: keep the outermost.
        self._prefixes = [
            p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes)
        ]

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                # Never opened by hand (local.py: closing our own descriptor would drop
                # the POSIX locks of the process's other connections).
                self._conn = sqlite3.connect(
                    f"file:{self.path}?mode=rw", uri=True, timeout=30, isolation_level=None
                )
            except sqlite3.Error as err:
                raise DatastoreUnavailable(f"local datastore {self.path}: {err}") from err
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            self.close()
            raise DatastoreUnavailable(f"local datastore {self.path}: {err}") from err
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as err:
            self.close()
            raise DatastoreCorrupt(f"local datastore {self.path} is corrupt: {err}") from err

    def _rows(
        self, conn: sqlite3.Connection, columns: str, where: str = "", args: tuple = ()
    ) -> Iterator[tuple]:
        for prefix in self._prefixes:
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            yield from conn.execute(
                f"SELECT {columns} FROM kv WHERE key >= ? AND key < ? {where}",
                (prefix, upper, *args),
            )

    def _pair(self, path: str, value: str, rev: int) -> KVPair | None:
        key = key_from_path(path)
        if not self.selected(key):
            return None
        return KVPair(key, decode_value(key, value), str(rev))

    def list_state(self) -> tuple[list[KVPair], _Position]:
        with self._read() as conn:
            (data_version,) = conn.execute("PRAGMA data_version").fetchone()
            (revision,) = conn.execute("SELECT rev FROM revision").fetchone()
            pairs = [p for row in self._rows(conn, "key, value, rev") if (p := self._pair(*row))]
        return pairs, _Position(data_version, revision, {key_path(p.key) for p in pairs})

    def follow(self, position: _Position, emit: Callable[[list[WatchEvent]], None]) -> None:
        while not self._stop.wait(POLL_S):
            conn = self._connection()
            try:
                (data_version,) = conn.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error as err:
                self.close()
                raise DatastoreUnavailable(f"local datastore {self.path}: {err}") from err
            if data_version == position.data_version:
                continue
            events = self._changes(position)
            position.data_version = data_version
            if events:
                emit(events)

    def _changes(self, position: _Position) -> list[WatchEvent]:
        with self._read() as conn:
            (revision,) = conn.execute("SELECT rev FROM revision").fetchone()
            changed = [
                p
                for row in self._rows(conn, "key, value, rev", "AND rev > ?", (position.revision,))
                if (p := self._pair(*row))
            ]
            present = {path for (path,) in self._rows(conn, "key")}
        events = []
        for path in sorted(position.paths - present):
            key = key_from_path(path)
            if key is not None:
                events.append(WatchEvent(key, None))
        for pair in sorted(changed, key=lambda p: int(p.revision or 0)):
            events.append(WatchEvent(pair.key, pair.value))
            position.paths.add(key_path(pair.key))
        position.paths &= present
        position.revision = revision
        return events

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
