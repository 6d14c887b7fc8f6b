"""The datastore contract, kept by every backend: local SQLite, a real etcd, and the
Calico CRDs on a real kube-apiserver.

Every backend must answer every operation the same way, since the IPAM engine's
correctness across nodes rests on these answers (CAS conflicts above all). What only one
backend has stays beside it: tests/unit/test_local_datastore.py (SQLite files, SIGKILL,
corruption), tests/etcd/test_etcd_datastore.py (raw key layout, round trips) and
tests/k8s/test_k8s_datastore.py (CRD names, two-step delete, paging, auth errors).

The kubernetes backend is skipped exactly when tests/k8s is: `needs_apiserver`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from libcalico.datastore.base import AlreadyExists, Conflict, Datastore, KVPair, NotFound
from libcalico.datastore.local import LocalDatastore
from libcalico.model import (
    BlockAffinity,
    BlockAffinityKey,
    BlockAffinityListOptions,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPAMHandle,
    IPPool,
    ResourceKey,
    ResourceListOptions,
)
from tests.etcd.conftest import clean_etcd, shared_etcd
from tests.etcd.test_etcd_datastore import etcd_store
from tests.k8s.k8s_support import cluster, cni_store, needs_apiserver, wipe_calico

# Fixtures used through `request.getfixturevalue`, only by the backend that needs them.
__all__ = ["clean_etcd", "cluster", "shared_etcd"]

NET = ipaddress.ip_network


@pytest.fixture(
    params=["local", "etcd", pytest.param("kubernetes", marks=needs_apiserver)],
)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Datastore]:
    """An empty datastore of each backend; etcd and the API server are shared per module."""
    datastore: Datastore
    if backend == "local":
        datastore = LocalDatastore(str(tmp_path / "calico.db"))
    elif backend == "etcd":
        datastore = etcd_store(request.getfixturevalue("clean_etcd"))
    else:
        kube = request.getfixturevalue("cluster")
        wipe_calico(kube)
        datastore = cni_store(kube)
    with datastore:
        yield datastore


def test_create_get_update_delete(store: Datastore) -> None:
    key = HandleKey("h")
    created = store.create(KVPair(key, IPAMHandle({"10.0.0.0/26": 1})))
    assert store.get(key) == created
    created.value.block["10.0.0.0/26"] = 2
    updated = store.update(created)
    assert updated.revision != created.revision
    assert store.get(key) == updated
    assert store.get(key).value.block == {"10.0.0.0/26": 2}
    store.delete(updated)
    with pytest.raises(NotFound):
        store.get(key)


def test_create_of_an_existing_key_fails_and_keeps_the_value(store: Datastore) -> None:
    store.create(KVPair(HandleKey("h"), IPAMHandle({"a": 1})))
    with pytest.raises(AlreadyExists):
        store.create(KVPair(HandleKey("h"), IPAMHandle({"b": 1})))
    assert store.get(HandleKey("h")).value.block == {"a": 1}


@pytest.mark.parametrize(
    ("key", "first", "second"),
    [
        (HandleKey("h"), IPAMHandle({"a": 1}), IPAMHandle({"a": 2})),
        (BlockAffinityKey("node1", NET("10.0.0.0/26")), BlockAffinity("pending"), BlockAffinity()),
        (IPAMConfigKey(), IPAMConfig(), IPAMConfig(strict_affinity=True)),
    ],
    ids=["handle", "affinity", "ipamconfig"],
)
def test_stale_revision_conflicts_on_update_and_delete(
    store: Datastore, key: object, first: object, second: object
) -> None:
    stale = store.create(KVPair(key, first))
    store.update(KVPair(key, second, stale.revision))
    with pytest.raises(Conflict):
        store.update(KVPair(key, first, stale.revision))
    with pytest.raises(Conflict):
        store.delete(stale)
    assert store.get(key).value == second


def test_update_or_delete_of_a_missing_key_is_not_found(store: Datastore) -> None:
    with pytest.raises(NotFound):
        store.get(HandleKey("nope"))
    for revision in ("1", None):
        with pytest.raises(NotFound):
            store.update(KVPair(HandleKey("nope"), IPAMHandle(), revision))
        with pytest.raises(NotFound):
            store.delete(KVPair(HandleKey("nope"), IPAMHandle(), revision))
    with pytest.raises(NotFound):
        store.get(HandleKey("nope"))


def test_no_revision_means_unconditional(store: Datastore, backend: str) -> None:
    first = store.create(KVPair(HandleKey("h"), IPAMHandle({"a": 1})))
    store.update(KVPair(first.key, IPAMHandle({"a": 2}), first.revision))
    forced = store.update(KVPair(first.key, IPAMHandle({"a": 9})))
    assert store.get(first.key) == forced
    # etcd and SQLite delete by key alone; the kubernetes two-step delete first writes the
    # value back marked `deleted`, so it is given one.
    value = IPAMHandle({"a": 9}) if backend == "kubernetes" else None
    store.delete(KVPair(first.key, value))
    with pytest.raises(NotFound):
        store.get(first.key)


def test_revision_is_never_reused_after_delete_and_recreate(store: Datastore) -> None:
    """Otherwise a reader holding the old revision could overwrite the new object (ABA)."""
    old = store.create(KVPair(HandleKey("h"), IPAMHandle({"a": 1})))
    store.delete(old)
    store.create(KVPair(HandleKey("h"), IPAMHandle({"b": 1})))
    with pytest.raises(Conflict):
        store.update(KVPair(old.key, IPAMHandle({"a": 5}), old.revision))


def test_list_filters_and_sorts_like_etcd(store: Datastore) -> None:
    for host, cidr in [
        ("node2", "10.0.0.64/26"),
        ("node1", "fd00::/122"),
        ("node1", "10.0.0.0/26"),
        ("node10", "10.0.1.0/26"),
    ]:
        store.create(KVPair(BlockAffinityKey(host, NET(cidr)), BlockAffinity()))
    store.create(KVPair(HandleKey("node1"), IPAMHandle({"a": 1})))
    listed = store.list(BlockAffinityListOptions("node1", 4))
    assert [kvp.key for kvp in listed] == [BlockAffinityKey("node1", NET("10.0.0.0/26"))]
    every = store.list(BlockAffinityListOptions())
    assert [(kvp.key.host, str(kvp.key.cidr)) for kvp in every] == [
        ("node1", "10.0.0.0/26"),
        ("node1", "fd00::/122"),
        ("node10", "10.0.1.0/26"),
        ("node2", "10.0.0.64/26"),
    ]
    assert all(kvp.revision == store.get(kvp.key).revision for kvp in every)
    assert [kvp.key for kvp in store.list(HandleListOptions())] == [HandleKey("node1")]
    assert store.list(BlockListOptions()) == []


def test_list_of_resources(store: Datastore) -> None:
    for name in ("b-pool", "a-pool"):
        doc = {"metadata": {"name": name}, "spec": {"cidr": "10.1.0.0/16"}}
        store.create(KVPair(ResourceKey("IPPool", name), IPPool.from_json(doc)))
    listed = store.list(ResourceListOptions("IPPool"))
    assert [kvp.value.name for kvp in listed] == ["a-pool", "b-pool"]
    assert store.list(ResourceListOptions("IPReservation")) == []


def test_a_large_list_comes_back_whole_and_in_key_order(store: Datastore) -> None:
    """Big enough that etcd sends the reply chunked rather than with a Content-Length."""
    names = [f"k8s-pod-network.{i:064x}" for i in range(300)]
    for name in reversed(names):
        store.create(KVPair(HandleKey(name), IPAMHandle({"10.0.0.0/26": 1})))
    listed = store.list(HandleListOptions())
    assert [kvp.key.handle_id for kvp in listed] == names
    assert all(kvp.value == IPAMHandle({"10.0.0.0/26": 1}) for kvp in listed)


def test_read_many_answers_gets_and_lists_in_order(store: Datastore) -> None:
    store.create(KVPair(HandleKey("h"), IPAMHandle({"10.0.0.0/26": 1})))
    store.create(KVPair(BlockAffinityKey("node1", NET("10.0.0.0/26")), BlockAffinity()))
    doc = {"metadata": {"name": "p"}, "spec": {"cidr": "10.1.0.0/16"}}
    store.create(KVPair(ResourceKey("IPPool", "p"), IPPool.from_json(doc)))
    reads = [
        HandleKey("h"),
        HandleKey("missing"),
        ResourceListOptions("IPPool"),
        BlockAffinityListOptions("node1", 4),
        ResourceListOptions("IPReservation"),
        IPAMConfigKey(),
    ]
    answers = store.read_many(reads)
    pools, affinities = store.list(reads[2]), store.list(reads[3])
    assert answers == [store.get(HandleKey("h")), None, pools, affinities, [], None]
    assert len(pools) == len(affinities) == 1
    assert store.read_many([]) == []


def test_read_many_of_more_reads_than_one_etcd_transaction_holds(store: Datastore) -> None:
    keys = [HandleKey(f"h{i:03d}") for i in range(300)]
    for key in keys[::2]:
        store.create(KVPair(key, IPAMHandle({"10.0.0.0/26": 1})))
    answers = store.read_many(keys)
    assert [kvp is not None for kvp in answers] == [i % 2 == 0 for i in range(300)]
    assert all(kvp.key == key for kvp, key in zip(answers, keys, strict=True) if kvp)


def test_revisions_tell_present_keys_and_their_current_revision(store: Datastore) -> None:
    first = store.create(KVPair(HandleKey("a"), IPAMHandle({"10.0.0.0/26": 1})))
    second = store.create(KVPair(HandleKey("b"), IPAMHandle({"10.0.0.0/26": 1})))
    second = store.update(KVPair(second.key, IPAMHandle({"10.0.0.0/26": 2}), second.revision))
    keys = [HandleKey("a"), HandleKey("b"), HandleKey("gone"), *map(HandleKey, "cdefg")]
    assert store.revisions(keys) == {first.key: first.revision, second.key: second.revision}
    store.delete(first)
    assert store.revisions(keys) == {second.key: second.revision}
