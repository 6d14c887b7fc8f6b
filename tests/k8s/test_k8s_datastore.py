"""The `kubernetes` datastore against a real kube-apiserver, as the CNI identity.

The contract every backend keeps (CAS above all) runs against Kubernetes, etcd and SQLite
alike in tests/test_datastore_contract.py. Here is what only this backend has: list paging,
Calico's CRD names and spec fields (calico-behaviour.md §4.6/§4.8), the two-step delete,
the real Nodes, and the errors an operator meets (stale token, server down).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import pytest

from ipam_plugin.engine import IPAM, AutoAssignRequest
from libcalico.datastore.base import (
    DatastoreError,
    DatastoreUnavailable,
    KVPair,
    NotFound,
)
from libcalico.datastore.config import DatastoreSettings
from libcalico.datastore.k8s_client import KubeAccess, KubeClient
from libcalico.datastore.kubernetes import KubernetesDatastore, affinity_name, hostname_hash
from libcalico.model import (
    BlockAffinity,
    BlockAffinityKey,
    BlockKey,
    HandleKey,
    HandleListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPAMHandle,
    IPPool,
    Node,
    ObjectMeta,
    ResourceKey,
    ResourceListOptions,
)
from tests.k8s.fixture import KubeCluster
from tests.k8s.k8s_support import (
    CRD_V1,
    add_pool,
    cluster,
    cni_store,
    needs_apiserver,
    objects,
    wipe_calico,
)

__all__ = ["cluster"]
pytestmark = needs_apiserver
NET = ipaddress.ip_network


@pytest.fixture
def store(cluster: KubeCluster) -> Iterator[KubernetesDatastore]:
    wipe_calico(cluster)
    with cni_store(cluster) as datastore:
        yield datastore


@pytest.fixture(scope="module")
def nodes(cluster: KubeCluster) -> None:
    cluster.create_node("node1", ["10.244.1.0/24"], {"zone": "a"})
    cluster.create_node("node2", ["10.244.2.0/24"], {"zone": "b"})


# ------------------------------------------------------------------- paging


def test_lists_page_through_large_collections(store: KubernetesDatastore, monkeypatch) -> None:
    monkeypatch.setattr("libcalico.datastore.kubernetes.LIST_PAGE", 3)
    ids = [f"k8s-pod-network.{i:02d}" for i in range(8)]
    for handle in ids:
        store.create(KVPair(HandleKey(handle), IPAMHandle({"10.0.0.0/26": 1})))
    assert sorted(kvp.key.handle_id for kvp in store.list(HandleListOptions())) == ids


# ------------------------------------------------------- Calico's CRD shapes


def test_objects_carry_calicos_names_and_spec_fields(
    store: KubernetesDatastore, cluster: KubeCluster
) -> None:
    store.create(KVPair(HandleKey("K8s-Pod-Network.ABC"), IPAMHandle({"10.0.0.0/26": 2})))
    store.create(KVPair(BlockAffinityKey("node1", NET("10.0.0.64/26")), BlockAffinity()))
    store.create(KVPair(BlockAffinityKey("node1", NET("fd00::40/122")), BlockAffinity("pending")))
    store.create(KVPair(IPAMConfigKey(), IPAMConfig(strict_affinity=True, max_blocks_per_host=4)))

    handle = objects(cluster, "ipamhandles")["k8s-pod-network.abc"]
    assert handle["spec"] == {
        "handleID": "K8s-Pod-Network.ABC",
        "block": {"10.0.0.0/26": 2},
        "deleted": False,
    }
    affinities = objects(cluster, "blockaffinities")
    assert set(affinities) == {"node1-10-0-0-64-26", "node1-fd00--40-122"}
    v4 = affinities["node1-10-0-0-64-26"]
    assert v4["spec"] == {
        "state": "confirmed",
        "node": "node1",
        "type": "host",
        "cidr": "10.0.0.64/26",
        "deleted": "false",
    }
    assert v4["metadata"]["labels"] == {
        "projectcalico.org/hostname-hash": hostname_hash("node1"),
        "projectcalico.org/affinity-type": "host",
        "projectcalico.org/ip-version": "4",
    }
    assert (
        affinities["node1-fd00--40-122"]["metadata"]["labels"]["projectcalico.org/ip-version"]
        == "6"
    )
    config = objects(cluster, "ipamconfigs")["default"]
    assert config["spec"] == {
        "strictAffinity": True,
        "autoAllocateBlocks": True,
        "maxBlocksPerHost": 4,
    }


def test_hostname_hash_fits_a_label_and_is_base32_sha3() -> None:
    label = hostname_hash("node1")
    assert len(label) == 52  # 256 bits in base32, no padding: under the 63-character limit
    assert set(label) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert hostname_hash("node1") != hostname_hash("node2")


def test_long_host_names_are_cut_and_hashed_to_fit_an_object_name() -> None:
    host = "n" * 250
    name = affinity_name(host, NET("10.0.0.64/26"))
    assert len(name) < 253
    assert name.endswith("-10-0-0-64-26-" + name.rsplit("-", 1)[1])
    assert affinity_name("m" + host[1:], NET("10.0.0.64/26")) != name
    assert affinity_name("node1", NET("10.0.0.64/26")) == "node1-10-0-0-64-26"


def test_engine_writes_blocks_affinities_and_handles_as_calico_does(
    store: KubernetesDatastore, cluster: KubeCluster, nodes: None
) -> None:
    add_pool(cluster, "pool-a", "10.50.0.0/16", blockSize=26)
    engine = IPAM(store)
    v4, _ = engine.auto_assign(
        AutoAssignRequest(
            handle_id="k8s-pod-network.C0FFEE",
            hostname="node1",
            attrs={"node": "node1", "namespace": "web", "pod": "nginx"},
            num_v4=1,
            num_v6=0,
        )
    )
    (ip,) = v4.ips
    block_cidr = ipaddress.ip_network(f"{ip.ip}/26", strict=False)
    block_name = str(block_cidr).replace(".", "-").replace("/", "-")
    block = objects(cluster, "ipamblocks")[block_name]["spec"]
    assert block["cidr"] == str(block_cidr)
    assert block["affinity"] == "host:node1"
    assert "affinityClaimTime" in block and "affinity_claim_time" not in block
    assert block["strictAffinity"] is False
    assert len(block["allocations"]) == 64
    ordinal = int(ip.ip) - int(block_cidr.network_address)
    attribute = block["attributes"][block["allocations"][ordinal]]
    assert attribute["handle_id"] == "k8s-pod-network.C0FFEE"
    assert attribute["secondary"]["pod"] == "nginx"
    assert objects(cluster, "blockaffinities")[f"node1-{block_name}"]["spec"]["state"] == (
        "confirmed"
    )
    assert objects(cluster, "ipamhandles")["k8s-pod-network.c0ffee"]["spec"]["block"] == {
        str(block_cidr): 1
    }
    assert engine.release_by_handle("k8s-pod-network.C0FFEE") == [ip.ip]
    assert objects(cluster, "ipamhandles") == {}


def test_pool_node_selector_uses_the_real_node_labels(
    store: KubernetesDatastore, cluster: KubeCluster, nodes: None
) -> None:
    add_pool(cluster, "zone-a", "10.60.0.0/24", nodeSelector="zone == 'a'")
    add_pool(cluster, "zone-b", "10.61.0.0/24", nodeSelector="zone == 'b'")
    engine = IPAM(store)
    for node, pool in (("node1", "10.60.0.0/24"), ("node2", "10.61.0.0/24")):
        v4, _ = engine.auto_assign(
            AutoAssignRequest(f"h-{node}", node, {"node": node}, num_v4=1, num_v6=0)
        )
        assert v4.ips[0].ip in ipaddress.ip_network(pool)


def test_nodes_are_read_from_the_cluster_and_never_written(
    store: KubernetesDatastore, nodes: None
) -> None:
    node = store.get(ResourceKey("Node", "node2")).value
    assert node.metadata.labels == {"zone": "b"}
    with pytest.raises(NotFound):
        store.get(ResourceKey("Node", "no-such-node"))
    with pytest.raises(DatastoreError):
        store.create(KVPair(ResourceKey("Node", "node3"), Node(ObjectMeta("node3"))))


def test_ippools_round_trip(store: KubernetesDatastore, cluster: KubeCluster) -> None:
    add_pool(cluster, "b-pool", "10.1.0.0/16", natOutgoing=True)
    doc = {"metadata": {"name": "a-pool"}, "spec": {"cidr": "10.2.0.0/16", "blockSize": 28}}
    store.create(KVPair(ResourceKey("IPPool", "a-pool"), IPPool.from_json(doc)))
    pools = {kvp.value.name: kvp.value for kvp in store.list(ResourceListOptions("IPPool"))}
    assert pools["b-pool"].spec.nat_outgoing is True
    assert pools["a-pool"].spec.block_size == 28
    assert objects(cluster, "ippools")["a-pool"]["spec"]["cidr"] == "10.2.0.0/16"


# ------------------------------------------------------ the two-step delete


def test_delete_marks_then_removes(store: KubernetesDatastore, cluster: KubeCluster) -> None:
    created = store.create(KVPair(BlockKey(NET("10.0.0.0/30")), _block("10.0.0.0/30")))
    store.delete(created)
    assert objects(cluster, "ipamblocks") == {}


def test_a_half_deleted_object_reads_as_absent_and_the_reader_finishes_the_delete(
    store: KubernetesDatastore, cluster: KubeCluster
) -> None:
    """A deleter killed between `deleted: true` and DELETE leaves a marked object."""
    key = HandleKey("k8s-pod-network.dead")
    created = store.create(KVPair(key, IPAMHandle({"10.0.0.0/26": 1})))
    store.update(KVPair(key, IPAMHandle({"10.0.0.0/26": 1}, deleted=True), created.revision))
    assert store.list(HandleListOptions()) == []
    with pytest.raises(NotFound):
        store.get(key)
    assert objects(cluster, "ipamhandles") == {}
    store.create(KVPair(key, IPAMHandle({"10.0.0.0/26": 3})))
    assert store.get(key).value.block == {"10.0.0.0/26": 3}


def _block(cidr: str):
    from libcalico.model import AllocationBlock

    return AllocationBlock.new(NET(cidr), "host:node1", "2024-01-01T00:00:00Z", 1)


# ---------------------------------------------------------- what goes wrong


def test_a_stale_token_is_reported_unauthorized_naming_the_kubeconfig(
    cluster: KubeCluster, tmp_path
) -> None:
    stale = tmp_path / "calico-kubeconfig"
    stale.write_text(cluster.cni_kubeconfig.read_text().replace(cluster.cni_token, "0" * 32))
    settings = DatastoreSettings.resolve(
        {"datastore_type": "kubernetes", "kubernetes": {"kubeconfig": str(stale)}}, environ={}
    )
    with settings.open() as datastore, pytest.raises(DatastoreUnavailable) as err:
        datastore.get(IPAMConfigKey())
    assert "connection is unauthorized: Unauthorized" in str(err.value)
    assert str(stale) in str(err.value)


def test_missing_rights_are_reported_unauthorized(cluster: KubeCluster) -> None:
    """The CNI role may not list namespaces: Forbidden, not a crash."""
    client = KubeClient(KubeAccess.from_kubeconfig(str(cluster.cni_kubeconfig)))
    with client, pytest.raises(DatastoreUnavailable) as err:
        client.get("/api/v1/namespaces")
    assert "connection is unauthorized: Forbidden" in str(err.value)


def test_a_missing_kubeconfig_is_unavailable_not_a_crash(tmp_path) -> None:
    settings = DatastoreSettings.resolve(
        {"datastore_type": "kubernetes", "kubernetes": {"kubeconfig": str(tmp_path / "nope")}},
        environ={},
    )
    with pytest.raises(DatastoreUnavailable) as err:
        settings.open()
    assert str(tmp_path / "nope") in str(err.value)


def test_a_server_that_does_not_answer_fails_within_the_timeouts(cluster: KubeCluster) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers TLS
        access = KubeAccess.from_kubeconfig(str(cluster.cni_kubeconfig))
        access.server = f"https://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with KubeClient(access) as client, pytest.raises(DatastoreUnavailable) as err:
            client.get("/version")
    assert "unreachable" in str(err.value)
    assert time.monotonic() - started < 30  # bounded: not a hang


def test_overrides_from_the_netconf_beat_the_kubeconfig(cluster: KubeCluster, tmp_path) -> None:
    """policy.k8s_auth_token and kubernetes.k8s_api_root, as Calico reads them."""
    wrong = tmp_path / "kubeconfig"
    wrong.write_text(
        cluster.cni_kubeconfig.read_text()
        .replace(cluster.cni_token, "bad")
        .replace(cluster.server, "https://127.0.0.1:1")
    )
    conf = {
        "kubernetes": {"kubeconfig": str(wrong), "k8s_api_root": cluster.server},
        "policy": {"k8s_auth_token": cluster.cni_token},
    }
    access = KubeAccess.resolve(conf, {})
    with KubeClient(access) as client:
        assert client.get(f"{CRD_V1}/ippools")["kind"] == "IPPoolList"
