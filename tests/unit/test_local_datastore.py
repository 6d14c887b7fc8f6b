"""The SQLite `local` datastore, and the Calico etcd format of what it stores.

The contract every backend keeps (CAS, NotFound, list order, large lists) runs against
SQLite, etcd and Kubernetes alike in tests/test_datastore_contract.py. Here: the SQLite
file itself (modes, corruption, locking), the Calico format, the inspect views, and many
processes (concurrent writers, SIGKILL).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import multiprocessing
import os
import signal
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam_plugin.engine import IPAM, AutoAssignRequest
from ipam_plugin.inspect import assignment, check_consistency, ipam_config, pool_usage
from libcalico.datastore.base import (
    DatastoreCorrupt,
    DatastoreUnavailable,
    KVPair,
)
from libcalico.datastore.local import LocalDatastore
from libcalico.model import (
    AllocationBlock,
    BlockAffinity,
    BlockAffinityKey,
    BlockKey,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPAMHandle,
    IPPool,
    ResourceKey,
    ValidationError,
    key_from_path,
    key_path,
)
from tests.ipam_support import results_of_processes

NET = ipaddress.ip_network


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "calico.db")


@pytest.fixture
def store(db_path: str) -> Iterator[LocalDatastore]:
    with LocalDatastore(db_path) as datastore:
        yield datastore


def add_pool(store: LocalDatastore, name: str, cidr: str, **spec: Any) -> None:
    doc = {"metadata": {"name": name}, "spec": {"cidr": cidr, **spec}}
    store.create(KVPair(ResourceKey("IPPool", name), IPPool.from_json(doc)))


def raw_rows(path: str) -> dict[str, Any]:
    with sqlite3.connect(path) as conn:
        return {key: json.loads(value) for key, value in conn.execute("SELECT key, value FROM kv")}


# ---------------------------------------------------------------- files


def test_new_database_is_private(store: LocalDatastore, db_path: str) -> None:
    store.create(KVPair(HandleKey("h"), IPAMHandle({"10.0.0.0/26": 1})))
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(db_path)).st_mode) == 0o700
    for suffix in ("-wal", "-shm"):
        assert stat.S_IMODE(os.stat(db_path + suffix).st_mode) == 0o600


def test_data_survives_reopening(db_path: str) -> None:
    with LocalDatastore(db_path) as first:
        first.create(KVPair(HandleKey("h"), IPAMHandle({"10.0.0.0/26": 2})))
    with LocalDatastore(db_path) as second:
        assert second.get(HandleKey("h")).value == IPAMHandle({"10.0.0.0/26": 2})


def test_corrupt_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "calico.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(DatastoreCorrupt) as err:
        LocalDatastore(str(path))
    assert str(path) in str(err.value)
    assert "corrupt" in str(err.value)


def test_truncated_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "calico.db"
    with LocalDatastore(str(path)) as store:
        for i in range(200):
            store.create(KVPair(HandleKey(f"handle-{i}"), IPAMHandle({"10.0.0.0/26": i + 1})))
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[:4096] + os.urandom(len(data) - 4096))
    with pytest.raises(DatastoreCorrupt) as err, LocalDatastore(str(path)) as store:
        store.list(HandleListOptions())
    assert str(path) in str(err.value)


def _visit_and_leave(path: str, queue: Any) -> None:
    """Another process's whole visit: open, read, close (its close may checkpoint)."""
    with LocalDatastore(path) as other:
        queue.put(len(other.list(HandleListOptions())))


def test_commits_stay_visible_while_one_process_holds_several_connections(
    db_path: str,
) -> None:
    """The node agent holds connections open across requests and opens more; opening one
    must not drop the others' locks, or another process's close deletes the WAL they
    still write to, and their commits vanish."""
    kept = LocalDatastore(db_path)
    kept.create(KVPair(HandleKey("h1"), IPAMHandle({"10.0.0.0/26": 1})))
    LocalDatastore(db_path).close()  # a later request's own connection, in this process
    assert results_of_processes(_visit_and_leave, [(db_path,)]) == [1]
    kept.create(KVPair(HandleKey("h2"), IPAMHandle({"10.0.0.0/26": 1})))
    assert results_of_processes(_visit_and_leave, [(db_path,)]) == [2]
    kept.close()


@pytest.mark.parametrize("layout", ["parent-is-a-file", "path-is-a-directory"])
def test_unusable_path_gives_a_clear_error(tmp_path: Path, layout: str) -> None:
    if layout == "parent-is-a-file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "calico.db"
    else:
        path = tmp_path / "dir"
        path.mkdir()
    with pytest.raises(DatastoreUnavailable) as err:
        LocalDatastore(str(path))
    assert str(path) in str(err.value)


def test_a_writer_holding_the_lock_too_long_means_unavailable(db_path: str) -> None:
    LocalDatastore(db_path).close()
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with LocalDatastore(db_path, busy_timeout=0.1) as store:
            with pytest.raises(DatastoreUnavailable) as err:
                store.create(KVPair(HandleKey("h"), IPAMHandle({"10.0.0.0/26": 1})))
            assert db_path in str(err.value)
            assert isinstance(err.value, DatastoreUnavailable)
            assert not isinstance(err.value, DatastoreCorrupt)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


# ------------------------------------------------------------ Calico format


@pytest.mark.parametrize(
    ("key", "path"),
    [
        (BlockKey(NET("10.0.0.64/26")), "/calico/ipam/v2/assignment/ipv4/block/10.0.0.64-26"),
        (BlockKey(NET("fd00::40/122")), "/calico/ipam/v2/assignment/ipv6/block/fd00::40-122"),
        (
            BlockAffinityKey("node1", NET("10.0.0.64/26")),
            "/calico/ipam/v2/host/node1/ipv4/block/10.0.0.64-26",
        ),
        (HandleKey("k8s-pod-network.3f2c"), "/calico/ipam/v2/handle/k8s-pod-network.3f2c"),
        (IPAMConfigKey(), "/calico/ipam/v2/config"),
        (
            ResourceKey("IPPool", "default"),
            "/calico/resources/v3/projectcalico.org/ippools/default",
        ),
        (ResourceKey("Node", "n1"), "/calico/resources/v3/projectcalico.org/nodes/n1"),
        (
            ResourceKey("ClusterInformation", "default"),
            "/calico/resources/v3/projectcalico.org/clusterinformations/default",
        ),
    ],
)
def test_keys_map_to_calicos_etcd_paths(key: Any, path: str) -> None:
    assert key_path(key) == path
    assert key_from_path(path) == key


def test_engine_writes_calico_shaped_values(store: LocalDatastore, db_path: str) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    ipam = IPAM(store)
    ipam.ensure_node("node1")
    v4, _ = ipam.auto_assign(AutoAssignRequest("net.c1", "node1", {"node": "node1"}))
    cidr = str(v4.ips[0].network)
    rows = raw_rows(db_path)
    block = rows[f"/calico/ipam/v2/assignment/ipv4/block/{cidr.replace('/', '-')}"]
    assert set(block) == {
        "cidr",
        "affinity",
        "affinity_claim_time",
        "allocations",
        "unallocated",
        "attributes",
        "deleted",
        "sequenceNumber",
        "sequenceNumberForAllocation",
    }
    assert block["affinity"] == "host:node1"
    assert block["attributes"] == [{"handle_id": "net.c1", "secondary": {"node": "node1"}}]
    assert len(block["allocations"]) == 64 and block["allocations"][0] == 0
    assert rows["/calico/ipam/v2/handle/net.c1"] == {"block": {cidr: 1}, "deleted": False}
    affinity_path = f"/calico/ipam/v2/host/node1/ipv4/block/{cidr.replace('/', '-')}"
    assert rows[affinity_path] == {"state": "confirmed", "deleted": False}
    assert rows["/calico/resources/v3/projectcalico.org/ippools/default"] == {
        "kind": "IPPool",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "default"},
        "spec": {
            "cidr": "10.0.0.0/24",
            "vxlanMode": "Never",
            "ipipMode": "Never",
            "blockSize": 26,
            "nodeSelector": "all()",
            "allowedUses": ["Workload", "Tunnel"],
            "assignmentMode": "Automatic",
        },
    }


def test_reads_blocks_written_by_calico() -> None:
    doc = {
        "cidr": "10.0.0.0/30",
        "affinity": None,
        "hostAffinity": "host:old",
        "strictAffinity": False,
        "allocations": [0, None, None, 0],
        "unallocated": [1, 2],
        "attributes": [{"handle_id": "h", "secondary": None, "alternateOwnerAttrs": {"x": "y"}}],
        "deleted": False,
        "sequenceNumber": 7,
        "sequenceNumberForAllocation": {"0": 3, "3": 5},
    }
    block = AllocationBlock.from_json(doc)
    assert block.affinity == "host:old"
    assert block.ordinals_for_handle("h") == [0, 3]
    assert block.attributes[0].to_json() == {
        "handle_id": "h",
        "secondary": {},
        "alternateOwnerAttrs": {"x": "y"},
    }
    assert AllocationBlock.from_json(block.to_json()) == block


def test_ipam_config_defaults_and_omitempty() -> None:
    assert IPAMConfig() == IPAMConfig(False, True, 0)
    assert IPAMConfig().to_json() == {"auto_allocate_blocks": True}
    stored = {"strict_affinity": True, "maxBlocksPerHost": 4, "ipCooldownSeconds": 5}
    config = IPAMConfig.from_json(stored)
    assert (config.strict_affinity, config.auto_allocate_blocks, config.max_blocks_per_host) == (
        True,
        False,
        4,
    )
    assert config.to_json() == stored


@pytest.mark.parametrize(("cidr", "block_size"), [("10.0.0.0/16", 26), ("fd00::/48", 122)])
def test_ippool_defaults(cidr: str, block_size: int) -> None:
    pool = IPPool.from_json({"metadata": {"name": "p"}, "spec": {"cidr": cidr}})
    assert pool.spec.block_size == block_size
    assert pool.spec.node_selector == "all()"
    assert pool.spec.allowed_uses == ["Workload", "Tunnel"]
    assert pool.spec.assignment_mode == "Automatic"
    assert (pool.spec.ipip_mode, pool.spec.vxlan_mode) == ("Never", "Never")
    pool.validate()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"cidr": "10.0.0.0/16", "blockSize": 33}, "spec.blockSize"),
        ({"cidr": "10.0.0.0/16", "blockSize": 19}, "spec.blockSize"),
        ({"cidr": "fd00::/48", "blockSize": 115}, "spec.blockSize"),
        ({"cidr": "10.0.0.0/28", "blockSize": 26}, "spec.cidr"),  # pool smaller than a block
        ({"cidr": "10.0.0.1/16"}, "spec.cidr"),
        ({"cidr": "not-a-cidr"}, "spec.cidr"),
        ({}, "spec.cidr"),
        ({"cidr": "10.0.0.0/16", "ipipMode": "Sometimes"}, "spec.ipipMode"),
        ({"cidr": "10.0.0.0/16", "vxlanMode": "always"}, "spec.vxlanMode"),
        ({"cidr": "10.0.0.0/16", "ipipMode": "Always", "vxlanMode": "Always"}, "spec.ipipMode"),
        ({"cidr": "fd00::/48", "ipipMode": "Always"}, "spec.ipipMode"),
        ({"cidr": "10.0.0.0/16", "allowedUses": ["Pods"]}, "spec.allowedUses"),
        ({"cidr": "10.0.0.0/16", "assignmentMode": "Auto"}, "spec.assignmentMode"),
        ({"cidr": "10.0.0.0/16", "nodeSelector": "zone =="}, "spec.nodeSelector"),
        ({"cidr": "10.0.0.0/16", "namespaceSelector": "has("}, "spec.namespaceSelector"),
        ({"cidr": "10.0.0.0/16", "blockSize": "26"}, "spec.blockSize"),
        ({"cidr": "10.0.0.0/16", "natOutgoing": "yes"}, "spec.natOutgoing"),
    ],
)
def test_invalid_ippool_is_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        IPPool.from_json({"metadata": {"name": "p"}, "spec": spec}).validate()
    assert err.value.field_path == field
    assert str(err.value).startswith(field)


# ---------------------------------------------------------------- inspect


def test_usage_and_consistency_views(store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    ipam = IPAM(store)
    ipam.ensure_node("node1")
    v4, _ = ipam.auto_assign(AutoAssignRequest("h", "node1", {}, num_v4=3))
    [usage] = pool_usage(store)
    assert (usage.total, usage.in_use, usage.free) == (256, 3, 253)
    assert [(b.total, b.in_use, b.affinity) for b in usage.blocks] == [(64, 3, "host:node1")]
    assert ipam_config(store) == IPAMConfig()
    assert assignment(store, str(v4.ips[0].ip)).handle_id == "h"
    assert check_consistency(store).ok
    # Break it in each way the check knows about.
    store.delete(store.get(HandleKey("h")))
    stray = BlockAffinityKey("node9", NET("10.9.0.0/26"))
    store.create(KVPair(stray, BlockAffinity()))
    store.create(KVPair(HandleKey("ghost"), IPAMHandle({"10.9.0.64/26": 2})))
    report = check_consistency(store)
    assert sorted(leak.ip for leak in report.leaked) == sorted(str(i.ip) for i in v4.ips)
    assert [(m.handle_id, m.recorded, m.allocated) for m in report.handle_mismatches] == [
        ("ghost", 2, 0)
    ]
    assert [(p.host, p.problem) for p in report.affinity_problems] == [("node9", "no block")]
    assert not report.ok


# ----------------------------------------------------- many processes


def _allocate_many(path: str, host: str, count: int, queue: Any) -> None:
    with LocalDatastore(path) as store:
        ipam = IPAM(store)
        ips = []
        for i in range(count):
            v4, _ = ipam.auto_assign(AutoAssignRequest(f"{host}-{os.getpid()}-{i}", host, {}))
            ips += [str(ip.ip) for ip in v4.ips]
        queue.put(ips)


def _seed(path: str, hosts: list[str]) -> None:
    with LocalDatastore(path) as store:
        add_pool(store, "default", "10.0.0.0/24")
        ipam = IPAM(store)
        for host in hosts:
            ipam.ensure_node(host)


def test_concurrent_processes_never_hand_out_an_ip_twice(db_path: str) -> None:
    _seed(db_path, ["node1", "node2"])
    hosts = ("node1", "node1", "node2", "node2")
    results = results_of_processes(_allocate_many, [(db_path, host, 25) for host in hosts])
    ips = [ip for result in results for ip in result]
    assert len(ips) == 100
    assert len(set(ips)) == 100
    with LocalDatastore(db_path) as store:
        assert check_consistency(store).ok
        assert pool_usage(store)[0].in_use == 100


def _churn(path: str) -> None:
    """Allocate and release forever; the test kills this process with SIGKILL."""
    with LocalDatastore(path) as store:
        ipam = IPAM(store)
        prefix = f"churn-{os.getpid()}"
        for i in itertools.count():
            ipam.auto_assign(AutoAssignRequest(f"{prefix}-{i}", "node1", {}, num_v4=3))
            if i >= 2:
                ipam.release_by_handle(f"{prefix}-{i - 2}")


def _writes_so_far(path: str) -> int:
    with sqlite3.connect(path, timeout=30) as conn:
        return conn.execute("SELECT rev FROM revision").fetchone()[0]


def test_sigkill_during_writes_leaves_a_usable_database(db_path: str) -> None:
    _seed(db_path, ["node1"])
    context = multiprocessing.get_context("spawn")
    for round_number in range(4):
        child = context.Process(target=_churn, args=(db_path,))
        child.start()
        target = _writes_so_far(db_path) + 40 + 13 * round_number  # vary the kill point
        while _writes_so_far(db_path) < target and child.is_alive():
            time.sleep(0.005)
        assert child.is_alive()
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL

    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with LocalDatastore(db_path) as store:
        report = check_consistency(store)
        # Calico writes the handle before the block, so a kill in between can only leave a
        # handle that over-counts; never an address without an owner or a broken block.
        assert not report.leaked and not report.malformed_blocks
        assert all(m.recorded > m.allocated for m in report.handle_mismatches)
        ipam = IPAM(store)
        before = {
            str(kvp.key.cidr): kvp.value.allocated_ordinals()
            for kvp in store.list(BlockListOptions())
        }
        v4, _ = ipam.auto_assign(AutoAssignRequest("after", "node1", {}))
        [ip] = v4.ips
        assert block_ordinal(ip) not in before.get(str(ip.network), [])
        for handle_id in ipam.list_handles():
            ipam.release_by_handle(handle_id)
        assert pool_usage(store)[0].in_use == 0
        final = check_consistency(store)
        # A half-done block claim (pending affinity) may remain until the host next uses it.
        assert not (final.leaked or final.handle_mismatches or final.malformed_blocks)


def block_ordinal(ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> int:
    return int(ip.ip) - int(ip.network.network_address)
