"""Following the Kubernetes datastore with the API server's watch, one per collection.

Each selected kind is its own collection (ipamblocks, blockaffinities, ippools, nodes...)
with its own resourceVersion, so each is listed and then watched from its list's version
by its own thread; their events meet in one queue, which `follow` drains in order of
arrival. A watch the server ends (its timeout) is resumed from the last version seen,
bookmarks keep that version fresh; a 410 Gone (the version was compacted) makes the
whole state be listed again. An object marked deleted by Calico's two-step delete counts
as deleted.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from libcalico.datastore.base import DatastoreError, DatastoreUnavailable, KVPair
from libcalico.datastore.http11 import BadResponse, Connection
from libcalico.datastore.kubernetes import KubernetesDatastore
from libcalico.datastore.watch import Watcher, WatchEvent, WatchExpired
from libcalico.model import ListOptions

WATCH_TIMEOUT_S = 300  # the server ends each watch after this; it is resumed at once
POLL_S = 0.5


class _Failed:
    def __init__(self, error: DatastoreError) -> None:
        self.error = error


class KubernetesWatcher(Watcher):
    def __init__(self, settings: Any, selections: Sequence[ListOptions]) -> None:
        super().__init__(selections)
        self._store: KubernetesDatastore = settings.connect()
        self._streams: set[Connection] = set()
        self._lock = threading.Lock()
        self._generation = 0  # bumped per follow: older threads stop feeding the queue

    def list_state(self) -> tuple[list[KVPair], list[tuple[ListOptions, int, str]]]:
        """The pairs, and what to watch: (selection, target index, resourceVersion)."""
        pairs: list[KVPair] = []
        targets = []
        for options in self.selections:
            found, versions = self._store.list_versioned(options)
            pairs += found
            targets += [(options, i, version) for i, version in enumerate(versions)]
        return pairs, targets

    def follow(
        self, position: list[tuple[ListOptions, int, str]], emit: Callable[[list[WatchEvent]], None]
    ) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
        events: queue.Queue[WatchEvent | _Failed] = queue.Queue()
        threads = [
            threading.Thread(
                target=self._watch_one,
                args=(options, target, version, events, generation),
                name=f"k8s-watch-{i}",
                daemon=True,
            )
            for i, (options, target, version) in enumerate(position)
        ]
        for thread in threads:
            thread.start()
        try:
            while not self.stopping:
                try:
                    item = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                batch = [item]
                while not events.empty() and len(batch) < 1000:
                    batch.append(events.get_nowait())
                failed = next((i for i in batch if isinstance(i, _Failed)), None)
                changes = [i for i in batch if isinstance(i, WatchEvent)]
                if changes:
                    emit(changes)
                if failed is not None:
                    raise failed.error
        finally:
            with self._lock:
                self._generation += 1  # the threads of this follow stop
            self.interrupt()
            for thread in threads:
                thread.join(5)

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self.stopping

    def _watch_one(
        self,
        options: ListOptions,
        target: int,
        version: str,
        events: queue.Queue[WatchEvent | _Failed],
        generation: int,
    ) -> None:
        path, selector = self._store.watch_targets(options)[target]
        try:
            while self._current(generation):
                query = {
                    "watch": "1",
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": str(WATCH_TIMEOUT_S),
                    "resourceVersion": version,
                }
                if selector:
                    query["labelSelector"] = selector
                text = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
                conn, lines = self._store.client.stream(path, text)
                with self._lock:
                    self._streams.add(conn)
                try:
                    for line in lines:
                        if not self._current(generation):
                            return
                        version = self._event(options, target, line, version, events)
                except (OSError, BadResponse, ValueError) as err:
                    if self._current(generation):
                        raise DatastoreUnavailable(
                            f"Kubernetes watch of {path} broken: {err}"
                        ) from err
                finally:
                    with self._lock:
                        self._streams.discard(conn)
                    conn.close()
        except DatastoreError as err:
            if self._current(generation):
                events.put(_Failed(err))

    def _event(
        self,
        options: ListOptions,
        target: int,
        line: bytes,
        version: str,
        events: queue.Queue[WatchEvent | _Failed],
    ) -> str:
        """Queue one watch event; returns the resourceVersion to resume from."""
        event = json.loads(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(obj.get("message") or "resourceVersion too old")
            raise DatastoreUnavailable(f"Kubernetes watch error: {obj.get('message') or obj}")
        version = (obj.get("metadata") or {}).get("resourceVersion") or version
        if kind == "BOOKMARK":
            return version
        kvp = self._store.decode_watched(options, target, obj)
        if kvp is not None:
            value = None if kind == "DELETED" else kvp.value
            events.put(WatchEvent(kvp.key, value))
        return version

    def interrupt(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for conn in streams:
            conn.interrupt()

    def close(self) -> None:
        self._store.close()
