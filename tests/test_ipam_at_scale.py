"""Concurrent ADDs and DELs on three nodes of a nearly full pool, on every datastore.

The pool is seeded (through the engine, in bulk) to 27 of its 32 blocks, every one full
but a few scattered addresses; then each node runs the calico-ipam executable (under the
node's IPAM lock, with the node's hints file) and, at the same time, an engine of its own
in another process (no lock, hints of its own: the way real Calico's plugin on the node
would race ours). Together they ask for nearly every free address, so nodes race for the
last free CIDRs and then borrow from each other's blocks: every hint is soon wrong, and
every answer must still be right.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ipam_plugin.engine import IPAM, AutoAssignRequest
from ipam_plugin.inspect import check_consistency, pool_usage
from libcalico.datastore.base import Datastore, KVPair
from libcalico.datastore.config import DatastoreSettings
from libcalico.model import (
    BlockAffinityListOptions,
    BlockListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPPool,
    ResourceKey,
)
from tests.etcd.conftest import clean_etcd, shared_etcd
from tests.harness import calico_conf, unique
from tests.ipam_support import results_of_processes, run_ipam
from tests.k8s.k8s_support import cluster, needs_apiserver, wipe_calico

__all__ = ["clean_etcd", "cluster", "shared_etcd"]

POOL = "10.61.0.0/23"  # 32 blocks of 16
BLOCK = 16
SEEDED_BLOCKS = 9  # per node: 27 of the pool's 32
FREED = 4  # scattered free addresses per node
REQUESTS = 14  # per node and worker: 84 of the 92 free addresses


@pytest.fixture(params=["local", "etcd", pytest.param("kubernetes", marks=needs_apiserver)])
def datastore(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Netconf keys for an empty datastore of each backend, and its three nodes."""
    nodes = [unique("hf-node") for _ in range(3)]
    if request.param == "local":
        keys: dict[str, Any] = {
            "datastore_type": "local",
            "local_datastore_path": str(tmp_path / "calico.db"),
        }
        admin = keys
    elif request.param == "etcd":
        keys = admin = request.getfixturevalue("clean_etcd").netconf()
    else:
        kube = request.getfixturevalue("cluster")
        wipe_calico(kube)
        for node in nodes:
            kube.create_node(node)
        keys = {
            "datastore_type": "kubernetes",
            "kubernetes": {"kubeconfig": str(kube.cni_kubeconfig)},
        }
        admin = {
            "datastore_type": "kubernetes",
            "kubernetes": {"kubeconfig": str(kube.admin_kubeconfig)},
        }
    yield {"keys": keys, "admin": admin, "nodes": nodes, "kind": request.param}


def kube_keys(kubeconfig: Path) -> dict[str, Any]:
    return {"datastore_type": "kubernetes", "kubernetes": {"kubeconfig": str(kubeconfig)}}


def open_store(keys: dict[str, Any]) -> Datastore:
    return DatastoreSettings.resolve(keys, environ={}).open()


def seed(keys: dict[str, Any], nodes: list[str], kind: str) -> set[str]:
    """The pool, non-strict affinity, every node's blocks full but FREED addresses; returns
    the addresses left allocated."""
    with open_store(keys) as store:
        doc = {"metadata": {"name": "hf"}, "spec": {"cidr": POOL, "blockSize": 28}}
        store.create(KVPair(ResourceKey("IPPool", "hf"), IPPool.from_json(doc)))
        store.create(KVPair(IPAMConfigKey(), IPAMConfig()))
        ipam = IPAM(store)
        kept: set[str] = set()
        for node in nodes:
            if kind != "kubernetes":  # there the Nodes are the cluster's
                ipam.ensure_node(node)
            v4, _ = ipam.auto_assign(
                AutoAssignRequest(
                    f"seed.{node}", node, {"node": node}, num_v4=SEEDED_BLOCKS * BLOCK
                )
            )
            ips = [str(ip.ip) for ip in v4.ips]
            assert len(ips) == SEEDED_BLOCKS * BLOCK, v4.msgs
            freed = ips[5 :: len(ips) // FREED][:FREED]  # spread over the node's blocks
            assert ipam.release_ips(freed) == []
            kept |= set(ips) - set(freed)
    return kept


def engine_worker(keys: dict[str, Any], node: str, count: int, queue: Any) -> None:
    """One long-lived engine with hints of its own (another process, no node lock)."""
    with open_store(keys) as store:
        ipam = IPAM(store)
        handles, ips = [], []
        for i in range(count):
            handle = f"k8s-pod-network.engine-{node}-{os.getpid()}-{i}"
            v4, _ = ipam.auto_assign(AutoAssignRequest(handle, node, {"node": node}))
            assert len(v4.ips) == 1, v4.msgs
            handles.append(handle)
            ips.append(str(v4.ips[0].ip))
        queue.put((handles, ips))


def release_worker(keys: dict[str, Any], handles: list[str], queue: Any) -> None:
    with open_store(keys) as store:
        ipam = IPAM(store)
        queue.put(sorted(str(ip) for h in handles for ip in ipam.release_by_handle(h)))


def ipam_exec(command: str, keys: dict[str, Any], node: str, lock_dir: Path, cid: str):
    conf = calico_conf(
        "1.0.0",
        {"type": "calico-ipam"},
        nodename=node,
        ipam_lock_file=str(lock_dir / f"{node}.lock"),
        **keys,
    )
    return run_ipam(command, conf, cid)


def exec_worker(keys: dict[str, Any], node: str, lock_dir: Path, count: int) -> dict[str, str]:
    """calico-ipam ADDs one after another on the node, as kubelet's runtime calls it."""
    ips = {}
    for i in range(count):
        cid = f"exec-{node}-{i}-{uuid.uuid4().hex[:6]}"
        result = ipam_exec("ADD", keys, node, lock_dir, cid)
        assert result.code == 0, result
        ips[cid] = result.json["ips"][0]["address"].split("/")[0]
    return ips


def allocated(keys: dict[str, Any]) -> dict[str, str | None]:
    """Every allocated address in the datastore → its handle; no address twice."""
    held: dict[str, str | None] = {}
    with open_store(keys) as store:
        for kvp in store.list(BlockListOptions()):
            block = kvp.value
            for ordinal in block.allocated_ordinals():
                address = str(block.ip(ordinal))
                assert address not in held, f"{address} allocated in two blocks"
                held[address] = block.handle_of(ordinal)
    return held


def assert_consistent(keys: dict[str, Any]) -> None:
    with open_store(keys) as store:
        report = check_consistency(store)
        assert report.ok, report


def test_concurrent_adds_on_three_nodes_of_a_nearly_full_pool(
    datastore: dict[str, Any], tmp_path: Path
) -> None:
    keys, nodes = datastore["keys"], datastore["nodes"]
    seeded = seed(datastore["admin"], nodes, datastore["kind"])
    free_before = 32 * BLOCK - len(seeded)
    assert free_before == 92

    with ThreadPoolExecutor(len(nodes)) as threads:
        execs = [threads.submit(exec_worker, keys, n, tmp_path, REQUESTS) for n in nodes]
        engines = results_of_processes(engine_worker, [(keys, n, REQUESTS) for n in nodes])
        exec_ips = [future.result() for future in execs]

    handed_out = [ip for ips in exec_ips for ip in ips.values()] + [
        ip for _, ips in engines for ip in ips
    ]
    assert len(handed_out) == 2 * REQUESTS * len(nodes)
    assert len(set(handed_out)) == len(handed_out), "an address was handed out twice"
    held = allocated(keys)
    assert set(held) == seeded | set(handed_out)
    assert_consistent(keys)
    with open_store(keys) as store:
        [usage] = pool_usage(store)
        assert usage.in_use == len(seeded) + len(handed_out)
        for node in nodes:  # within Calico's default cap of 20 blocks
            assert len(store.list(BlockAffinityListOptions(node, 4))) <= 20

    engine_handles = [handles for handles, _ in engines]
    with ThreadPoolExecutor(len(nodes)) as threads:
        dels = [
            threads.submit(ipam_exec, "DEL", keys, node, tmp_path, cid)
            for node, ips in zip(nodes, exec_ips, strict=True)
            for cid in ips
        ]
        released = results_of_processes(release_worker, [(keys, h) for h in engine_handles])
        assert all(future.result().code == 0 for future in dels)
    assert sorted(ip for ips in released for ip in ips) == sorted(
        ip for _, ips in engines for ip in ips
    )
    assert set(allocated(keys)) == seeded
    assert_consistent(keys)
    with open_store(keys) as store:
        handles = {h for h in IPAM(store).list_handles() if not h.startswith("seed.")}
        assert handles == set()
    for node in nodes:  # the hints file stays beside the node's lock, private
        hints = tmp_path / f"{node}.lock.hints"
        assert hints.is_file() and (hints.stat().st_mode & 0o777) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_seed_spreads_the_free_addresses_over_the_nodes_blocks(
    datastore: dict[str, Any],
) -> None:
    """The premise of the test above: the free addresses are scattered, not in one block."""
    seeded = seed(datastore["admin"], datastore["nodes"], datastore["kind"])
    free = {str(ip) for ip in ipaddress.ip_network(POOL) if str(ip) not in seeded}
    blocks_with_room = {str(ipaddress.ip_interface(f"{ip}/28").network) for ip in free}
    assert len(blocks_with_room) >= 5 + 2 * len(datastore["nodes"])
