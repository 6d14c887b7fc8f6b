"""The syncer: watch updates become immutable snapshots; consumers get the latest one in
their own thread, again after a failure, on kick and on their refresh interval, and only
once the first complete listing arrived; the local datastore's watch sees every change."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from calico_node.syncer import SELECTIONS, Consumer, Snapshot, Syncer
from libcalico.datastore.base import KVPair
from libcalico.datastore.local import LocalDatastore
from libcalico.datastore.local_watch import LocalWatcher
from libcalico.datastore.watch import Changes, Lost, Resync, Sink, Watcher, WatchEvent
from libcalico.model import (
    BlockAffinity,
    BlockAffinityKey,
    HandleKey,
    IPAMHandle,
    Node,
    ObjectMeta,
    ResourceKey,
)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def node_pair(name: str) -> KVPair:
    return KVPair(ResourceKey("Node", name), Node(ObjectMeta(name)))


class Scripted(Watcher):
    """Plays the updates a test feeds it."""

    def __init__(self) -> None:
        super().__init__(SELECTIONS)
        self.sink: Sink | None = None
        self.ready = threading.Event()

    def list_state(self) -> tuple[list[KVPair], Any]:
        raise NotImplementedError

    def follow(self, position: Any, emit: Any) -> None:
        raise NotImplementedError

    def run(self, sink: Sink) -> None:
        self.sink = sink
        self.ready.set()
        self._stop.wait()


class Recorder(Consumer):
    name = "recorder"

    def __init__(self, fail_times: int = 0, refresh: float | None = None) -> None:
        self.applied: list[Snapshot] = []
        self.fail_times = fail_times
        self.refresh_interval = refresh

    def apply(self, snapshot: Snapshot) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("not yet")
        self.applied.append(snapshot)


def started(*consumers: Consumer) -> tuple[Syncer, Scripted]:
    watcher = Scripted()
    syncer = Syncer(watcher, consumers)
    syncer.start()
    watcher.ready.wait(10)
    return syncer, watcher


def test_snapshots_follow_updates_and_stay_immutable() -> None:
    recorder = Recorder()
    syncer, watcher = started(recorder)
    assert watcher.sink is not None
    try:
        watcher.sink(Changes([WatchEvent(ResourceKey("Node", "early"), None)]))
        assert syncer.snapshot is None  # no listing yet: nothing to hand out
        watcher.sink(Resync([node_pair("a")]))
        wait_until(lambda: len(recorder.applied) == 1)
        first = recorder.applied[0]
        cidr = ipaddress.ip_network("10.0.0.0/26")
        watcher.sink(Changes([
            WatchEvent(ResourceKey("Node", "b"), Node(ObjectMeta("b"))),
            WatchEvent(BlockAffinityKey("a", cidr), BlockAffinity()),
            WatchEvent(ResourceKey("Node", "a"), None),
        ]))  # fmt: skip
        wait_until(lambda: len(recorder.applied) == 2)
        second = recorder.applied[1]
        assert sorted(first.nodes) == ["a"] and sorted(second.nodes) == ["b"]
        assert second.affine_blocks("a") == [(cidr, BlockAffinity())]
        assert first.affinities is not second.affinities and not first.affinities
        watcher.sink(Lost("etcd down"))
        wait_until(lambda: syncer.snapshot is not None and not syncer.in_sync)
        assert sorted(syncer.snapshot.nodes) == ["b"]  # the last known state is kept
        assert len(recorder.applied) == 2  # consumers keep what they did
    finally:
        syncer.stop()


def test_failed_apply_is_retried_and_kick_reapplies() -> None:
    recorder = Recorder(fail_times=2)
    syncer, watcher = started(recorder)
    assert watcher.sink is not None
    try:
        watcher.sink(Resync([node_pair("a")]))
        wait_until(lambda: len(recorder.applied) == 1, 30)
        runner = syncer.runners[0]
        assert runner.healthy and runner.applied_generation == recorder.applied[0].generation
        recorder.request_apply()
        wait_until(lambda: len(recorder.applied) == 2)
        assert recorder.applied[1] is recorder.applied[0]  # the same, latest snapshot
    finally:
        syncer.stop()


def test_refresh_interval_reapplies_without_changes() -> None:
    recorder = Recorder(refresh=0.05)
    syncer, watcher = started(recorder)
    assert watcher.sink is not None
    try:
        watcher.sink(Resync([node_pair("a")]))
        wait_until(lambda: len(recorder.applied) >= 3)
    finally:
        syncer.stop()


def test_local_watch_sees_creates_updates_deletes(tmp_path: Path) -> None:
    store = LocalDatastore(str(tmp_path / "calico.db"))
    store.create(node_pair("a"))
    recorder = Recorder()
    syncer = Syncer(LocalWatcher(store.path, SELECTIONS), [recorder])
    syncer.start()
    try:
        wait_until(lambda: recorder.applied and "a" in recorder.applied[-1].nodes)
        store.create(node_pair("b"))
        store.create(KVPair(HandleKey("unselected"), IPAMHandle()))
        kvp = store.get(ResourceKey("Node", "a"))
        kvp.value.metadata.labels = {"x": "y"}
        store.update(kvp)
        wait_until(lambda: recorder.applied[-1].nodes.get("a") is not None
                   and recorder.applied[-1].nodes["a"].metadata.labels == {"x": "y"}
                   and "b" in recorder.applied[-1].nodes)  # fmt: skip
        store.delete(store.get(ResourceKey("Node", "b")))
        wait_until(lambda: "b" not in recorder.applied[-1].nodes)
    finally:
        syncer.stop()
        store.close()
