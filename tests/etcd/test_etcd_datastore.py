"""What only the etcd datastore has: Calico's raw key layout and JSON values, other
writers' keys and values, and one round trip per operation.

The contract every backend keeps (CAS, NotFound, list order, large lists) runs against
etcd, SQLite and Kubernetes alike in tests/test_datastore_contract.py.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from libcalico.datastore.base import (
    AlreadyExists,
    Conflict,
    DatastoreCorrupt,
    KVPair,
    NotFound,
)
from libcalico.datastore.etcd import Endpoint, EtcdDatastore
from libcalico.model import (
    BlockAffinity,
    BlockAffinityKey,
    BlockKey,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    IPAMHandle,
)
from tests.etcd_fixture import EtcdCluster

NET = ipaddress.ip_network


def etcd_store(cluster: EtcdCluster) -> EtcdDatastore:
    return EtcdDatastore([Endpoint.parse(url) for url in cluster.endpoints.split(",")])


def test_values_are_calicos_json_at_calicos_keys(clean_etcd: EtcdCluster) -> None:
    with etcd_store(clean_etcd) as store:
        store.create(KVPair(HandleKey("k8s-pod-network.abc"), IPAMHandle({"10.0.0.0/26": 2})))
        store.create(KVPair(BlockAffinityKey("node1", NET("10.0.0.0/26")), BlockAffinity()))
    assert clean_etcd.raw_json() == {
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
