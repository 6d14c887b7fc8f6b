"""Following the datastore: the whole state of some kinds, then every change to them.

calico-node wants "the current nodes, pools, blocks, BGP settings..., and tell me when they
change" (libcalico-go's syncers). Each backend learns of changes its own way: etcd's watch
stream (`etcd_watch.py`), the Kubernetes API's watch (`kubernetes_watch.py`), and for the
SQLite file its data version (`local_watch.py`). `Watcher.run` puts one loop over them:

    Resync(every selected pair) -> Changes(events) ... -> Lost(why) -> backoff -> Resync ...

A consumer keeps what it has through a `Lost` (the datastore is down, not empty) and
replaces it wholesale at the next `Resync`. These modules are for long-running processes
only; the CNI path never imports them.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from libcalico.datastore.base import DatastoreError, KVPair
from libcalico.model import Key, ListOptions, Value, list_matches

log = logging.getLogger("watch")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class WatchEvent:
    """One key changed: its new value, or None when it was deleted."""

    key: Key
    value: Value | None


@dataclass(frozen=True)
class Resync:
    """The complete state of the selected kinds; replaces whatever was known before."""

    pairs: list[KVPair]


@dataclass(frozen=True)
class Changes:
    """Changes since the last Resync or Changes, in the datastore's order."""

    events: list[WatchEvent]


@dataclass(frozen=True)
class Lost:
    """The datastore cannot be followed now; a Resync follows once it can."""

    error: str


Update = Resync | Changes | Lost
Sink = Callable[[Update], None]


class WatchExpired(DatastoreError):
    """The position to follow from is gone (etcd compaction, Kubernetes 410): list again."""


class Watcher(ABC):
    """Follows the pairs that `selections` select (the ListOptions `Datastore.list` takes)."""

    def __init__(self, selections: Sequence[ListOptions]) -> None:
        self.selections = tuple(selections)
        self._stop = threading.Event()

    def selected(self, key: Key | None) -> bool:
        return key is not None and any(list_matches(opt, key) for opt in self.selections)

    @abstractmethod
    def list_state(self) -> tuple[list[KVPair], Any]:
        """Every selected pair, consistent at one moment, and where to follow from."""

    @abstractmethod
    def follow(self, position: Any, emit: Callable[[list[WatchEvent]], None]) -> None:
        """Emit batches of changes after `position` until stopped (return) or the
        datastore fails (raise DatastoreError, WatchExpired)."""

    def interrupt(self) -> None:  # noqa: B027 (optional hook)
        """Wake a blocked `follow` (called from another thread by `stop`)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    def stop(self) -> None:
        self._stop.set()
        self.interrupt()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, sink: Sink) -> None:
        """List, follow, and start over after a failure, until `stop`."""
        delay = BACKOFF_MIN_S
        try:
            while not self._stop.is_set():
                try:
                    pairs, position = self.list_state()
                    if self._stop.is_set():
                        return
                    sink(Resync(pairs))
                    delay = BACKOFF_MIN_S
                    self.follow(position, lambda events: sink(Changes(events)))
                except WatchExpired as err:
                    log.info("watch position expired (%s); listing again", err)
                except DatastoreError as err:
                    if self._stop.is_set():
                        return
                    log.warning("datastore watch lost: %s; retrying in %.1fs", err, delay)
                    sink(Lost(str(err)))
                    self._stop.wait(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
        finally:
            self.close()
