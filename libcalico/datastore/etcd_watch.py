"""Following etcd with its watch: one stream over `/calico/` from the listed revision on.

The listing pins every range to one revision (the first range's), so the state is
consistent, and the watch starts right after it: no change is missed or seen twice. The
gateway's `/v3/watch` answers with newline-delimited JSON messages on one long response;
a PUT event has no `type` (protobuf leaves the default out), a DELETE says so. Keys that
are not selected (handles, workload endpoints) are skipped before their values are decoded.
A compacted start revision cancels the watch: WatchExpired, and the loop lists again.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

from libcalico.datastore.base import DatastoreCorrupt, DatastoreUnavailable, KVPair
from libcalico.datastore.etcd import EtcdDatastore, _b64, _prefix_end
from libcalico.datastore.http11 import BadResponse, Connection
from libcalico.datastore.watch import Watcher, WatchEvent, WatchExpired
from libcalico.model import ListOptions, decode_value, key_from_path

ROOT = "/calico/"


class EtcdWatcher(Watcher):
    def __init__(self, settings: Any, selections: Sequence[ListOptions]) -> None:
        super().__init__(selections)
        self._store: EtcdDatastore = settings.connect()
        self._stream: Connection | None = None
        self._stream_lock = threading.Lock()

    def list_state(self) -> tuple[list[KVPair], str]:
        pairs: list[KVPair] = []
        revision = ""
        for options in self.selections:
            found, revision = self._store.list_at(options, revision)
            pairs += found
        return pairs, revision

    def follow(self, position: str, emit: Callable[[list[WatchEvent]], None]) -> None:
        request = {
            "create_request": {
                "key": _b64(ROOT),
                "range_end": _prefix_end(ROOT),
                "start_revision": str(int(position) + 1),
            }
        }
        conn, lines = self._store.gateway.open_stream("/v3/watch", request)
        with self._stream_lock:
            self._stream = conn
        try:
            if self.stopping:
                return
            for line in lines:
                events = self._events(line)
                if events:
                    emit(events)
        except (OSError, BadResponse, ValueError) as err:
            if not self.stopping:
                raise DatastoreUnavailable(f"etcd watch broken: {err}") from err
        finally:
            with self._stream_lock:
                self._stream = None
            conn.close()
        if not self.stopping:
            raise DatastoreUnavailable("etcd closed the watch stream")

    def _events(self, line: bytes) -> list[WatchEvent]:
        try:
            message = json.loads(line)
        except ValueError as err:
            raise DatastoreCorrupt(f"etcd watch sent invalid JSON: {line[:200]!r}") from err
        if "error" in message:
            raise DatastoreUnavailable(f"etcd watch failed: {message['error']}")
        result = message.get("result") or {}
        if int(result.get("compact_revision") or 0):
            raise WatchExpired(f"revision compacted to {result['compact_revision']}")
        if result.get("canceled"):
            raise DatastoreUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason')}")
        events = []
        for event in result.get("events") or []:
            kv = event.get("kv") or {}
            key = key_from_path(base64.b64decode(kv.get("key", "")).decode(errors="replace"))
            if not self.selected(key):
                continue
            if event.get("type") == "DELETE":
                events.append(WatchEvent(key, None))
                continue
            try:
                value = decode_value(key, base64.b64decode(kv.get("value", "")).decode())
            except (ValueError, KeyError, TypeError) as err:
                raise DatastoreCorrupt(f"etcd key for {key} holds no Calico object: {err}") from err
            events.append(WatchEvent(key, value))
        return events

    def interrupt(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._stream.interrupt()

    def close(self) -> None:
        self._store.close()
