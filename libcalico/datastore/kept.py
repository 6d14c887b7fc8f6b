"""Datastore clients the node agent keeps open between requests.

A one-shot plugin opens its datastore once and exits. The agent serves request after
request, and reopening costs every time: SQLite's open plus the WAL checkpoint its last
close runs (~2 ms measured per request), or a TCP (and TLS) connection to etcd. A request
borrows an idle client for the same datastore, and `close()` hands it back instead.

"The same datastore" includes the identity of what was opened (the SQLite file's inode,
the mtimes of etcd's TLS files), so a file an operator moves aside or a rotated
certificate is never served by an old client. A client that failed to reach its datastore
is closed, not kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from libcalico.datastore.base import Answer, Datastore, DatastoreUnavailable, KVPair, Read
from libcalico.model import Key, ListOptions

MAX_IDLE = 16


class KeptClients:
    """Idle clients by identity; thread-safe (the agent serves requests on many threads)."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self.max_idle = max_idle
        self._idle: list[tuple[Hashable, Datastore]] = []
        self._lock = threading.Lock()

    def borrow(self, identity: Hashable, connect: Callable[[], Datastore]) -> Datastore:
        with self._lock:
            for i, (kept_identity, client) in enumerate(self._idle):
                if kept_identity == identity:
                    del self._idle[i]
                    return Borrowed(self, identity, client)
        return Borrowed(self, identity, connect())

    def give_back(self, identity: Hashable, client: Datastore) -> None:
        with self._lock:
            self._idle.append((identity, client))
            evicted = self._idle[: -self.max_idle] if len(self._idle) > self.max_idle else []
            del self._idle[: len(evicted)]
        for _, old in evicted:
            old.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, client in idle:
            client.close()


class Borrowed(Datastore):
    """A kept client lent to one request: its `close()` returns the client to the pool."""

    def __init__(self, pool: KeptClients, identity: Hashable, client: Datastore) -> None:
        self._pool = pool
        self._identity = identity
        self._client: Datastore | None = client
        self._healthy = True

    def _call(self, method: str, *args: Any) -> Any:
        if self._client is None:
            raise DatastoreUnavailable("datastore client used after close")
        try:
            return getattr(self._client, method)(*args)
        except DatastoreUnavailable:
            self._healthy = False
            raise

    def get(self, key: Key) -> KVPair:
        return self._call("get", key)

    def list(self, options: ListOptions) -> list[KVPair]:
        return self._call("list", options)

    def read_many(self, reads: Sequence[Read]) -> list[Answer]:
        return self._call("read_many", reads)

    def revisions(self, keys: Sequence[Key]) -> dict[Key, str]:
        return self._call("revisions", keys)

    def create(self, kvp: KVPair) -> KVPair:
        return self._call("create", kvp)

    def update(self, kvp: KVPair) -> KVPair:
        return self._call("update", kvp)

    def delete(self, kvp: KVPair) -> None:
        self._call("delete", kvp)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._healthy:
            self._pool.give_back(self._identity, client)
        else:
            client.close()
