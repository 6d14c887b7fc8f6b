"""The datastore contract, run against a real etcd and against the local SQLite backend.

Both backends must answer every operation the same way, since the IPAM engine's
correctness across nodes rests on these answers (CAS conflicts above all).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipam_plugin.datastore.base import (
    AlreadyExists,
    Conflict,
    Datastore,
    DatastoreCorrupt,
    KVPair,
    NotFound,
)
from ipam_plugin.datastore.etcd import Endpoint, EtcdDatastore
from ipam_plugin.datastore.local import LocalDatastore
from ipam_plugin.model import (
    BlockAffinity,
    BlockAffinityKey,
    BlockAffinityListOptions,
    BlockKey,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    IPAMHandle,
    IPPool,
    ResourceKey,
    ResourceListOptions,
)
from tests.etcd_fixture import EtcdCluster

NET = ipaddress.ip_network


def etcd_store(cluster: EtcdCluster) -> EtcdDatastore:
    return EtcdDatastore([Endpoint.parse(url) for url in cluster.endpoints.split(",")])


@pytest.fixture(params=["etcd", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Datastore]:
    if request.param == "etcd":
        datastore: Datastore = etcd_store(request.getfixturevalue("clean_etcd"))
    else:
        datastore = LocalDatastore(str(tmp_path / "calico.db"))
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


def test_stale_revision_conflicts_on_update_and_delete(store: Datastore) -> None:
    stale = store.create(KVPair(HandleKey("h"), IPAMHandle({"a": 1})))
    store.update(KVPair(stale.key, IPAMHandle({"a": 2}), stale.revision))
    with pytest.raises(Conflict):
        store.update(KVPair(stale.key, IPAMHandle({"a": 3}), stale.revision))
    with pytest.raises(Conflict):
        store.delete(stale)
    assert store.get(stale.key).value.block == {"a": 2}


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


def test_no_revision_means_unconditional(store: Datastore) -> None:
    first = store.create(KVPair(HandleKey("h"), IPAMHandle({"a": 1})))
    store.update(KVPair(first.key, IPAMHandle({"a": 2}), first.revision))
    forced = store.update(KVPair(first.key, IPAMHandle({"a": 9})))
    assert store.get(first.key) == forced
    store.delete(KVPair(first.key, None))
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


# ------------------------------------------------------------ etcd specifics


def test_values_are_calicos_json_at_calicos_keys(clean_etcd: EtcdCluster) -> None:
    with etcd_store(clean_etcd) as store:
        store.create(KVPair(HandleKey("k8s-pod-network.abc"), IPAMHandle({"10.0.0.0/26": 2})))
        store.create(KVPair(BlockAffinityKey("node1", NET("10.0.0.0/26")), BlockAffinity()))
    assert {k: json.loads(v) for k, v in clean_etcd.raw_items("/calico/").items()} == {
        "/calico/ipam/v2/handle/k8s-pod-network.abc": {
            "block": {"10.0.0.0/26": 2},
            "deleted": False,
        },
        "/calico/ipam/v2/host/node1/ipv4/block/10.0.0.0-26": {
            "state": "confirmed",
            "deleted": False,
        },
    }


def test_reads_what_another_writer_put_and_its_revision_guards_updates(
    clean_etcd: EtcdCluster,
) -> None:
    clean_etcd.raw_put("/calico/ipam/v2/handle/h", '{"block":{"10.0.0.0/26":1}}')
    with etcd_store(clean_etcd) as store:
        seen = store.get(HandleKey("h"))
        assert seen.value == IPAMHandle({"10.0.0.0/26": 1})
        clean_etcd.raw_put("/calico/ipam/v2/handle/h", '{"block":{"10.0.0.0/26":2}}')
        with pytest.raises(Conflict):
            store.update(seen)
    assert json.loads(clean_etcd.raw_items()["/calico/ipam/v2/handle/h"])["block"] == {
        "10.0.0.0/26": 2
    }


def test_keys_that_are_not_calico_objects_are_skipped_by_list(clean_etcd: EtcdCluster) -> None:
    clean_etcd.raw_put("/calico/ipam/v2/assignment/ipv4/block/not-a-cidr", "{}")
    clean_etcd.raw_put("/calico/ipam/v2/assignment/ipv4/blockx", "{}")
    with etcd_store(clean_etcd) as store:
        assert store.list(BlockListOptions()) == []


def test_a_value_that_is_not_calico_json_is_reported_corrupt(clean_etcd: EtcdCluster) -> None:
    path = "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26"
    clean_etcd.raw_put(path, "not json")
    with etcd_store(clean_etcd) as store, pytest.raises(DatastoreCorrupt) as err:
        store.get(BlockKey(NET("10.0.0.0/26")))
    assert path in str(err.value)


def test_each_operation_is_one_round_trip(clean_etcd: EtcdCluster) -> None:
    """Including the failures: NotFound vs Conflict is learnt inside the same txn."""
    with etcd_store(clean_etcd) as store:
        kvp = store.create(KVPair(HandleKey("h"), IPAMHandle({"a": 1})))
        store.get(kvp.key)
        store.list(HandleListOptions())
        fresh = store.update(kvp)
        for failing in (
            lambda: store.update(kvp),
            lambda: store.delete(KVPair(HandleKey("nope"), None, "1")),
            lambda: store.create(kvp),
        ):
            with pytest.raises((Conflict, NotFound, AlreadyExists)):
                failing()
        store.delete(fresh)
        assert store.round_trips == 8


def test_a_large_list_comes_back_whole_and_in_key_order(store: Datastore) -> None:
    """Big enough that etcd sends the reply chunked rather than with a Content-Length."""
    names = [f"k8s-pod-network.{i:064x}" for i in range(300)]
    for name in reversed(names):
        store.create(KVPair(HandleKey(name), IPAMHandle({"10.0.0.0/26": 1})))
    listed = store.list(HandleListOptions())
    assert [kvp.key.handle_id for kvp in listed] == names
    assert all(kvp.value == IPAMHandle({"10.0.0.0/26": 1}) for kvp in listed)
