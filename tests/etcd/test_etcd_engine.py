"""The IPAM engine on a real etcd: Calico's key layout, round trips, many processes."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from ipam_plugin.engine import IPAM, AutoAssignRequest
from ipam_plugin.inspect import check_consistency, pool_usage
from libcalico.datastore.base import KVPair
from libcalico.datastore.config import DatastoreSettings
from libcalico.model import IPAMConfig, IPAMConfigKey, IPPool, ResourceKey
from tests.etcd_fixture import EtcdCluster
from tests.ipam_support import results_of_processes

POOL_PATH = "/calico/resources/v3/projectcalico.org/ippools/default"


def seed(cluster: EtcdCluster, cidr: str, hosts: list[str]) -> None:
    with cluster.open_store() as store:
        doc = {"metadata": {"name": "default"}, "spec": {"cidr": cidr}}
        store.create(KVPair(ResourceKey("IPPool", "default"), IPPool.from_json(doc)))
        ipam = IPAM(store)
        for host in hosts:
            ipam.ensure_node(host)


def test_allocation_is_stored_in_calicos_etcd_layout(clean_etcd: EtcdCluster) -> None:
    seed(clean_etcd, "10.244.0.0/16", ["node1"])
    with clean_etcd.open_store() as store:
        v4, _ = IPAM(store).auto_assign(
            AutoAssignRequest("k8s-pod-network.c1", "node1", {"node": "node1", "pod": "p"})
        )
    [ip] = v4.ips
    block = ip.network
    assert block.prefixlen == 26 and block.subnet_of(ipaddress.ip_network("10.244.0.0/16"))
    segment = str(block).replace("/", "-")
    rows = clean_etcd.raw_json()
    assert set(rows) == {
        POOL_PATH,
        "/calico/resources/v3/projectcalico.org/nodes/node1",
        f"/calico/ipam/v2/assignment/ipv4/block/{segment}",
        f"/calico/ipam/v2/host/node1/ipv4/block/{segment}",
        "/calico/ipam/v2/handle/k8s-pod-network.c1",
    }
    stored_block = rows[f"/calico/ipam/v2/assignment/ipv4/block/{segment}"]
    assert stored_block["cidr"] == str(block)
    assert stored_block["affinity"] == "host:node1"
    ordinal = int(ip.ip) - int(block.network_address)
    assert stored_block["allocations"][ordinal] == 0
    assert sum(a is not None for a in stored_block["allocations"]) == 1
    assert ordinal not in stored_block["unallocated"]
    assert stored_block["attributes"] == [
        {"handle_id": "k8s-pod-network.c1", "secondary": {"node": "node1", "pod": "p"}}
    ]
    assert rows[f"/calico/ipam/v2/host/node1/ipv4/block/{segment}"] == {
        "state": "confirmed",
        "deleted": False,
    }
    assert rows["/calico/ipam/v2/handle/k8s-pod-network.c1"] == {
        "block": {str(block): 1},
        "deleted": False,
    }
    assert rows[POOL_PATH]["kind"] == "IPPool"
    assert rows[POOL_PATH]["apiVersion"] == "projectcalico.org/v3"
    assert rows[POOL_PATH]["spec"]["cidr"] == "10.244.0.0/16"
    assert rows[POOL_PATH]["spec"]["blockSize"] == 26


def test_release_by_handle_removes_the_handle_and_frees_the_ordinal(
    clean_etcd: EtcdCluster,
) -> None:
    seed(clean_etcd, "10.244.0.0/24", ["node1"])
    with clean_etcd.open_store() as store:
        ipam = IPAM(store)
        v4, _ = ipam.auto_assign(AutoAssignRequest("net.c1", "node1", {}, num_v4=2))
        assert "/calico/ipam/v2/handle/net.c1" in clean_etcd.raw_json()
        released = ipam.release_by_handle("net.c1")
    assert sorted(released) == sorted(ip.ip for ip in v4.ips)
    rows = clean_etcd.raw_json()
    assert "/calico/ipam/v2/handle/net.c1" not in rows
    [block_path] = [path for path in rows if "/assignment/" in path]
    assert rows[block_path]["allocations"] == [None] * 64
    assert rows[block_path]["attributes"] == []
    assert sorted(rows[block_path]["unallocated"]) == list(range(64))


def test_round_trips_are_counted_per_assign_and_release(clean_etcd: EtcdCluster) -> None:
    """The counter is what a bench reports; steady state never re-lists the whole block set."""
    seed(clean_etcd, "10.244.0.0/16", ["node1"])
    with clean_etcd.open_store() as store:
        ipam = IPAM(store)
        ipam.auto_assign(AutoAssignRequest("net.first", "node1", {}))
        before = store.round_trips
        ipam.auto_assign(AutoAssignRequest("net.second", "node1", {}))
        assign = store.round_trips - before
        before = store.round_trips
        ipam.release_by_handle("net.second")
        release = store.round_trips - before
    print(f"round trips: auto-assign into an affine block {assign}, release-by-handle {release}")
    assert 0 < assign <= 10
    assert 0 < release <= 6


def _allocate(netconf: dict[str, str], host: str, count: int, queue: Any) -> None:
    with DatastoreSettings.resolve(netconf, environ={}).open() as store:
        ipam = IPAM(store)
        ips = []
        for i in range(count):
            v4, _ = ipam.auto_assign(AutoAssignRequest(f"{host}-{os.getpid()}-{i}", host, {}))
            ips += [str(ip.ip) for ip in v4.ips]
        queue.put(ips)


def test_concurrent_processes_on_two_nodes_never_share_an_ip(etcd: EtcdCluster) -> None:
    seed(etcd, "10.244.0.0/24", ["node1", "node2"])
    hosts = ("node1", "node1", "node2", "node2")
    results = results_of_processes(_allocate, [(etcd.netconf(), host, 20) for host in hosts])
    ips = [ip for result in results for ip in result]
    assert len(ips) == 80
    assert len(set(ips)) == 80
    with etcd.open_store() as store:
        report = check_consistency(store)
        assert report.ok, report
        assert pool_usage(store)[0].in_use == 80


def test_round_trips_do_not_grow_with_the_nodes_blocks(clean_etcd: EtcdCluster) -> None:
    """Real Calico reads two keys per full block before the one with room (ipam-scale.md):
    ~630 round trips on a node with 313 blocks. Here: one batched read, then the writes."""
    seed(clean_etcd, "10.244.0.0/16", ["small", "large"])
    trips = {}
    with clean_etcd.open_store() as store:
        config = KVPair(IPAMConfigKey(), IPAMConfig(strict_affinity=True, max_blocks_per_host=100))
        store.create(config)
        ipam = IPAM(store)
        for host, blocks in (("small", 2), ("large", 40)):
            ipam.auto_assign(AutoAssignRequest(f"fill.{host}", host, {}, num_v4=blocks * 64 - 8))
            ipam.auto_assign(AutoAssignRequest(f"warm.{host}", host, {}))
            before = store.round_trips
            v4, _ = ipam.auto_assign(AutoAssignRequest(f"net.{host}", host, {}))
            assert len(v4.ips) == 1
            trips[host] = store.round_trips - before
    assert trips == {"small": 3, "large": 3}
