"""The node's view of the cluster (a typed Snapshot) kept current from the datastore watch,
and the consumers that react to it.

As in Calico, one syncer feeds every part of the node: confd (BIRD's configuration) and
Felix-style dataplane managers. The syncer turns the watch's updates (libcalico's
watch.py: Resync, Changes, Lost) into immutable Snapshots, one per batch of changes; each
consumer runs in its own thread and always works on the latest snapshot, so a slow one
(a BIRD reload, a netlink batch) neither blocks the watch nor the others, and a burst of
changes costs it one apply, not one per change.

A consumer's `apply` converges its concern to the snapshot and must be idempotent: it is
called again after it fails (with backoff), whenever a newer snapshot arrives, every
`refresh_interval` seconds if set (repair of state someone changed behind its back), and
when something calls `kick()` (a netlink event, say). Snapshots reach consumers only once
the first complete listing arrived: nothing is rendered from half a cluster. While the
datastore is lost, consumers keep the last snapshot (`in_sync` False): routes stay.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from libcalico.datastore.base import KVPair
from libcalico.datastore.watch import Changes, Lost, Resync, Update, Watcher, WatchEvent
from libcalico.model import (
    AllocationBlock,
    BGPConfiguration,
    BGPPeer,
    BlockAffinity,
    BlockAffinityKey,
    BlockAffinityListOptions,
    BlockKey,
    BlockListOptions,
    ClusterInformation,
    FelixConfiguration,
    IPNetwork,
    IPPool,
    Key,
    ListOptions,
    Node,
    ResourceKey,
    ResourceListOptions,
)

log = logging.getLogger("syncer")

RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0

# Snapshot field for each resource kind the node follows.
_RESOURCE_FIELDS = {
    "Node": "nodes",
    "IPPool": "pools",
    "BGPConfiguration": "bgp_configurations",
    "BGPPeer": "bgp_peers",
    "FelixConfiguration": "felix_configurations",
    "ClusterInformation": "cluster_informations",
}
SELECTIONS: tuple[ListOptions, ...] = (
    BlockListOptions(),
    BlockAffinityListOptions(),
    *(ResourceListOptions(kind) for kind in _RESOURCE_FIELDS),
)


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """What the node knows of the cluster at one moment; never changed once built (the
    syncer builds a new one per batch, sharing the mappings that did not change)."""

    nodes: Mapping[str, Node] = field(default_factory=_empty)
    pools: Mapping[str, IPPool] = field(default_factory=_empty)
    blocks: Mapping[IPNetwork, AllocationBlock] = field(default_factory=_empty)
    affinities: Mapping[BlockAffinityKey, BlockAffinity] = field(default_factory=_empty)
    bgp_configurations: Mapping[str, BGPConfiguration] = field(default_factory=_empty)
    bgp_peers: Mapping[str, BGPPeer] = field(default_factory=_empty)
    felix_configurations: Mapping[str, FelixConfiguration] = field(default_factory=_empty)
    cluster_informations: Mapping[str, ClusterInformation] = field(default_factory=_empty)
    generation: int = 0
    in_sync: bool = False  # False while the datastore is lost: the data is the last known

    @staticmethod
    def _slot(key: Key) -> tuple[str, Any] | None:
        match key:
            case BlockKey(cidr):
                return "blocks", cidr
            case BlockAffinityKey(host, cidr, "host"):
                return "affinities", BlockAffinityKey(host, cidr)
            case ResourceKey(kind, name) if kind in _RESOURCE_FIELDS:
                return _RESOURCE_FIELDS[kind], name
        return None

    @classmethod
    def from_pairs(cls, pairs: Iterable[KVPair], generation: int) -> Snapshot:
        fields: dict[str, dict[Any, Any]] = {}
        for pair in pairs:
            slot = cls._slot(pair.key)
            if slot is not None:
                fields.setdefault(slot[0], {})[slot[1]] = pair.value
        frozen = {name: MappingProxyType(items) for name, items in fields.items()}
        return cls(**frozen, generation=generation, in_sync=True)

    def with_events(self, events: Iterable[WatchEvent], generation: int) -> Snapshot:
        changed: dict[str, dict[Any, Any]] = {}
        for event in events:
            slot = self._slot(event.key)
            if slot is None:
                continue
            name, item = slot
            items = changed.setdefault(name, dict(getattr(self, name)))
            if event.value is None:
                items.pop(item, None)
            else:
                items[item] = event.value
        frozen = {name: MappingProxyType(items) for name, items in changed.items()}
        return replace(self, **frozen, generation=generation, in_sync=True)

    # -- what consumers ask most

    def bgp_configuration(self, name: str) -> dict[str, Any]:
        """The spec of BGPConfiguration `name` (`default`, `node.<node>`), {} if absent."""
        config = self.bgp_configurations.get(name)
        return dict(config.spec) if config is not None else {}

    def felix_configuration(self, name: str) -> dict[str, Any]:
        config = self.felix_configurations.get(name)
        return dict(config.spec) if config is not None else {}

    def affine_blocks(self, host: str) -> list[tuple[IPNetwork, BlockAffinity]]:
        """The blocks `host` claims, in CIDR order."""
        found = [(k.cidr, v) for k, v in self.affinities.items() if k.host == host]
        return sorted(found, key=lambda item: (item[0].version, item[0]))


class Consumer(ABC):
    """One concern that follows the snapshot (confd; a Felix-style manager)."""

    name = "consumer"
    # Re-apply this often even without a new snapshot (repair); None: only on changes.
    refresh_interval: float | None = None

    @abstractmethod
    def apply(self, snapshot: Snapshot) -> None:
        """Converge this concern to `snapshot`; raise to be retried with backoff."""

    def stop(self) -> None:  # noqa: B027 (optional hook)
        """The daemon is stopping: release what this consumer runs."""

    def request_apply(self) -> None:  # noqa: B027 (the runner binds it)
        """Ask to be applied again soon with the latest snapshot (a netlink monitor saw
        state change behind our back, say); safe from any thread."""


class ConsumerRunner:
    """A consumer's thread: it applies the latest snapshot when a newer one arrives, when
    kicked, every refresh interval and, after a failure, again with backoff."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        consumer.request_apply = self.kick  # type: ignore[method-assign]
        self.applied_generation = -1  # the last generation applied without error
        self.last_error = ""
        self._latest: Snapshot | None = None
        self._tried_generation = -1
        self._kicked = False
        self._stopping = False
        self._retry_at: float | None = None
        self._applied_at = 0.0
        self._wake = threading.Condition()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._loop, name=f"consumer-{self.consumer.name}", daemon=True
        )
        self.thread.start()

    def offer(self, snapshot: Snapshot) -> None:
        with self._wake:
            self._latest = snapshot
            self._wake.notify()

    def kick(self) -> None:
        """Apply again soon, with the latest snapshot."""
        with self._wake:
            self._kicked = True
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self.thread is not None:
            self.thread.join(30)
        self.consumer.stop()

    @property
    def healthy(self) -> bool:
        return not self.last_error and self.applied_generation >= 0

    def _deadline(self) -> float | None:
        """When to apply again without news: the retry after a failure, else the refresh."""
        if self._retry_at is not None:
            return self._retry_at
        interval = self.consumer.refresh_interval
        if interval is None or self.applied_generation < 0:
            return None
        return self._applied_at + interval

    def _next(self) -> Snapshot | None:
        """Wait until there is something to apply; None when stopping."""
        with self._wake:
            while not self._stopping:
                latest, deadline, now = self._latest, self._deadline(), time.monotonic()
                if latest is not None and (
                    self._kicked
                    or latest.generation != self._tried_generation
                    or (deadline is not None and now >= deadline)
                ):
                    self._kicked = False
                    self._tried_generation = latest.generation
                    return latest
                self._wake.wait(None if deadline is None else max(0.0, deadline - now))
            return None

    def _loop(self) -> None:
        delay = RETRY_MIN_S
        while (snapshot := self._next()) is not None:
            try:
                self.consumer.apply(snapshot)
            except Exception as err:
                self.last_error = f"{type(err).__name__}: {err}"
                log.exception(
                    "%s failed to apply snapshot %d", self.consumer.name, snapshot.generation
                )
                self._retry_at = time.monotonic() + delay
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.last_error = ""
            self.applied_generation = snapshot.generation
            self._applied_at = time.monotonic()
            self._retry_at, delay = None, RETRY_MIN_S


class Syncer:
    """Runs the watch and hands every new snapshot to each consumer's runner."""

    def __init__(self, watcher: Watcher, consumers: Iterable[Consumer] = ()) -> None:
        self.watcher = watcher
        self.runners = [ConsumerRunner(c) for c in consumers]
        self.snapshot: Snapshot | None = None  # None until the first complete listing
        self._generation = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for runner in self.runners:
            runner.start()
        self._thread = threading.Thread(
            target=self.watcher.run, args=(self._on_update,), name="syncer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.watcher.stop()
        if self._thread is not None:
            self._thread.join(30)
        for runner in self.runners:
            runner.stop()

    def alive(self) -> bool:
        """The watch thread and every consumer's thread still run."""
        threads = [self._thread, *(r.thread for r in self.runners)]
        return all(t is not None and t.is_alive() for t in threads)

    @property
    def in_sync(self) -> bool:
        return self.snapshot is not None and self.snapshot.in_sync

    def _on_update(self, update: Update) -> None:
        self._generation += 1
        match update:
            case Resync(pairs):
                snapshot = Snapshot.from_pairs(pairs, self._generation)
                log.info("in sync with the datastore (%d objects)", len(pairs))
            case Changes(events) if self.snapshot is not None:
                snapshot = self.snapshot.with_events(events, self._generation)
            case Lost(_) if self.snapshot is not None:
                if not self.snapshot.in_sync:
                    return
                snapshot = replace(self.snapshot, in_sync=False, generation=self._generation)
            case _:
                return
        self.snapshot = snapshot
        if snapshot.in_sync:
            for runner in self.runners:
                runner.offer(snapshot)
