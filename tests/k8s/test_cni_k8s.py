"""`calico` with the Kubernetes datastore on simulated nodes against a real kube-apiserver.

The plugin runs inside node netns with the CNI identity's kubeconfig (not admin), pods are
created in the API first as kubelet would find them, and what it leaves behind is read back
through the API: the pod's annotations and Calico's CRD objects (calico-behaviour.md §3.3-3.6,
§4.8).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ALL_VERSIONS, REPO, CNIResult, Netns, Node, pod_args, result_ips, unique
from tests.k8s.fixture import KubeCluster, kube_binaries
from tests.k8s.k8s_support import (
    CONTAINER_ID,
    NETWORK,
    POD_IP,
    POD_IPS,
    add_pool,
    allocations,
    api_requests,
    assert_nothing_allocated,
    cluster,
    container_id,
    ctl,
    delete_pods,
    k8s_conf,
    needs_apiserver,
    objects,
    pod_annotations,
    reachable_from,
    wipe_calico,
)
from tests.root.checks import (
    assert_pod_gone,
    assert_pod_networking,
    assert_result_shape,
    expected_host_veth,
)

__all__ = ["cluster"]
pytestmark = [needs_apiserver, pytest.mark.root]
NS = "web"
POOL = "10.70.0.0/16"
ERR_TRY_AGAIN_LATER = 11


@pytest.fixture(scope="module")
def k8s_nodes(cluster: KubeCluster) -> None:
    """The cluster's Nodes as kube-controller-manager leaves them, and one namespace."""
    cluster.create_namespace(NS)
    cluster.create_node("node1", ["10.244.1.0/24", "fd00:244:1::/64"], {"zone": "a"})
    cluster.create_node("node2", ["10.244.2.0/24"], {"zone": "b"})
    cluster.create_node("node3", ["10.244.3.0/24"], {"zone": "b"})
    cluster.create_node("bare", [], {})


@pytest.fixture
def kube(cluster: KubeCluster, k8s_nodes: None, node: Node) -> Iterator[KubeCluster]:
    """A clean Calico datastore with the default pool, reachable from the node netns, and
    no pods of earlier tests (`ipam check` counts the addresses pods record)."""
    delete_pods(cluster)
    wipe_calico(cluster)
    add_pool(cluster, "default-ipv4-ippool", POOL, blockSize=26, natOutgoing=True)
    with reachable_from(cluster, node):
        yield cluster


@pytest.fixture
def pod_name(cluster: KubeCluster, k8s_nodes: None) -> str:
    name = unique("pod")
    cluster.create_pod(NS, name, "node1")
    return name


def force_delete(cluster: KubeCluster, pod: str) -> None:
    """What a StatefulSet controller does, without waiting out the grace period."""
    path = f"/api/v1/namespaces/{NS}/pods/{pod}"
    cluster.admin.request("DELETE", path, {"gracePeriodSeconds": 0})


def add(node: Node, conf: dict[str, Any], pod: str, cid: str, netns: Netns) -> CNIResult:
    return node.run("ADD", conf, cid, netns.path, args=pod_args(pod, NS))


def delete(node: Node, conf: dict[str, Any], pod: str, cid: str, netns: Netns) -> CNIResult:
    return node.run("DEL", conf, cid, netns.path, args=pod_args(pod, NS))


# ---------------------------------------------------------------- lifecycles


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_lifecycle_with_calico_ipam(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path, version: str
) -> None:
    conf = k8s_conf(kube, tmp_path, version)
    pod, cid = node.new_pod(), container_id()
    added = add(node, conf, pod_name, cid, pod)
    assert added.code == 0, added
    host_if = expected_host_veth(NS, pod_name)
    (address,) = assert_result_shape(added.json, version, pod, host_if, [4])
    assert ipaddress.ip_interface(address).ip in ipaddress.ip_network(POOL)
    assert_pod_networking(node, pod, host_if, [address])

    ip = str(ipaddress.ip_interface(address).ip)
    assert pod_annotations(kube, NS, pod_name) == {
        POD_IP: f"{ip}/32",
        POD_IPS: f"{ip}/32",
        CONTAINER_ID: cid,
    }
    block = ipaddress.ip_network(f"{ip}/26", strict=False)
    block_name = str(block).replace(".", "-").replace("/", "-")
    assert set(objects(kube, "ipamblocks")) == {block_name}
    assert objects(kube, "ipamblocks")[block_name]["spec"]["affinity"] == "host:node1"
    assert set(objects(kube, "blockaffinities")) == {f"node1-{block_name}"}
    handle = f"{NETWORK}.{cid}"
    assert objects(kube, "ipamhandles")[handle.lower()]["spec"]["handleID"] == handle
    assert allocations(kube) == {ip: handle}

    removed = delete(node, conf, pod_name, cid, pod)
    assert removed.code == 0, removed
    assert_pod_gone(node, pod, host_if, [address])
    assert pod_annotations(kube, NS, pod_name) == {POD_IP: "", POD_IPS: "", CONTAINER_ID: cid}
    assert_nothing_allocated(kube)
    again = delete(node, conf, pod_name, cid, pod)
    assert again.code == 0, again


@pytest.mark.parametrize("version", [v for v in ALL_VERSIONS if v != "1.1.0"])
def test_lifecycle_with_host_local_and_use_pod_cidr(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path, version: str
) -> None:
    ranges = [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]
    if version in ("0.1.0", "0.2.0"):
        ranges = ranges[:1]  # host-local's DEL refuses two ranges for these versions
    ipam = {"type": "host-local", "ranges": ranges, "dataDir": str(tmp_path / "host-local")}
    conf = k8s_conf(kube, tmp_path, version, ipam=ipam)  # Debian's host-local stops at 1.0.0
    pod, cid = node.new_pod(), container_id()
    added = add(node, conf, pod_name, cid, pod)
    assert added.code == 0, added
    ips = result_ips(added.json, version)
    assert len(ips) == len(ranges)
    networks = {4: "10.244.1.0/24", 6: "fd00:244:1::/64"}
    for address in ips:
        iface = ipaddress.ip_interface(address)
        assert iface.ip in ipaddress.ip_network(networks[iface.version])
    assert_pod_networking(node, pod, expected_host_veth(NS, pod_name), ips)
    assert objects(kube, "ipamblocks") == {}  # host-local: nothing in Calico's IPAM
    removed = delete(node, conf, pod_name, cid, pod)
    assert removed.code == 0, removed
    reserved = os.listdir(tmp_path / "host-local" / NETWORK)
    assert [f for f in reserved if not f.startswith(("lock", "last_reserved_ip"))] == []


def test_calico_ipam_range_mode_uses_the_nodes_pod_cidr(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path
) -> None:
    ipam = {"type": "calico-ipam", "subnet": "usePodCidr", "dataDir": str(tmp_path / "ranges")}
    conf = k8s_conf(kube, tmp_path, ipam=ipam, node="node1")
    pod, cid = node.new_pod(), container_id()
    added = add(node, conf, pod_name, cid, pod)
    assert added.code == 0, added
    (address,) = result_ips(added.json, "1.0.0")
    assert ipaddress.ip_interface(address).ip in ipaddress.ip_network("10.244.1.0/24")
    assert delete(node, conf, pod_name, cid, pod).code == 0


@pytest.mark.parametrize(
    ("node_name", "subnet", "message"),
    [
        ("bare", "usePodCidr", "no podCidr for node bare"),
        ("node2", "usePodCidrIPv6", "usePodCidrIPv6 found but there is no IPv6 CIDR configured"),
    ],
)
def test_use_pod_cidr_without_a_matching_cidr_fails_cleanly(
    node: Node,
    kube: KubeCluster,
    pod_name: str,
    tmp_path: Path,
    node_name: str,
    subnet: str,
    message: str,
) -> None:
    ipam = {"type": "host-local", "subnet": subnet, "dataDir": str(tmp_path / "hl")}
    conf = k8s_conf(kube, tmp_path, ipam=ipam, node=node_name)
    pod = node.new_pod()
    added = add(node, conf, pod_name, container_id(), pod)
    assert added.code != 0 and message in added.json["msg"], added
    assert node.host_veths() == [] and pod.link("eth0") is None


# ------------------------------------------------------------ annotations


def test_pools_follow_node_labels_then_namespace_then_pod_annotations(
    node: Node, kube: KubeCluster, k8s_nodes: None, tmp_path: Path
) -> None:
    add_pool(kube, "zone-b", "10.71.0.0/24", nodeSelector="zone == 'b'")
    add_pool(kube, "team", "10.72.0.0/24", nodeSelector="all()")
    add_pool(kube, "special", "10.73.0.0/24", nodeSelector="all()")
    namespace = unique("ns")
    kube.admin.create(
        "/api/v1/namespaces",
        {
            "metadata": {
                "name": namespace,
                "annotations": {"cni.projectcalico.org/ipv4pools": '["team"]'},
            }
        },
    )
    plain, override = "plain", "override"
    kube.create_pod(namespace, plain, "node2")
    kube.create_pod(
        namespace,
        override,
        "node2",
        annotations={"cni.projectcalico.org/ipv4pools": '["10.73.0.0/24"]'},
    )
    by_selector = unique("sel")
    kube.create_pod(NS, by_selector, "node2")
    conf = k8s_conf(kube, tmp_path, node="node2")
    got = {}
    for ns, pod_name in ((NS, by_selector), (namespace, plain), (namespace, override)):
        result = node.run(
            "ADD", conf, container_id(), node.new_pod().path, args=pod_args(pod_name, ns)
        )
        assert result.code == 0, result
        got[pod_name] = ipaddress.ip_interface(result_ips(result.json, "1.0.0")[0]).ip
    # node2 is in zone b: the default pool and zone-b both select it; namespace and pod
    # annotations narrow the choice, the pod's winning over its namespace's.
    assert any(got[by_selector] in ipaddress.ip_network(p) for p in (POOL, "10.71.0.0/24"))
    assert got[plain] in ipaddress.ip_network("10.72.0.0/24")
    assert got[override] in ipaddress.ip_network("10.73.0.0/24")


def test_requested_addresses_are_given_exactly_or_refused_cleanly(
    node: Node, kube: KubeCluster, tmp_path: Path
) -> None:
    conf = k8s_conf(kube, tmp_path)

    def pod_asking(ips: str) -> str:
        name = unique("fixed")
        kube.create_pod(NS, name, "node1", annotations={"cni.projectcalico.org/ipAddrs": ips})
        return name

    first, cid = pod_asking('["10.70.5.5"]'), container_id()
    ok = add(node, conf, first, cid, node.new_pod())
    assert ok.code == 0, ok
    assert result_ips(ok.json, "1.0.0") == ["10.70.5.5/32"]
    assert pod_annotations(kube, NS, first)[POD_IP] == "10.70.5.5/32"
    before = allocations(kube)

    for ips, message in (
        ('["10.70.5.5"]', "already"),  # taken by the first pod
        ('["192.0.2.1"]', "not in a configured pool"),
        ('["10.70.0.1", "10.70.0.2"]', "cannot have more than one IPv4 address"),
        ('["not-an-ip"]', "invalid IP format: not-an-ip"),
        ("10.70.0.9", "failed to parse '10.70.0.9' as JSON"),
    ):
        pod = node.new_pod()
        refused = add(node, conf, pod_asking(ips), container_id(), pod)
        assert refused.code != 0 and message in refused.json["msg"], (ips, refused)
        assert pod.link("eth0") is None
    assert allocations(kube) == before
    assert node.host_veths() == [expected_host_veth(NS, first)]


def test_ip_addrs_no_ipam_needs_the_feature_flag(
    node: Node, kube: KubeCluster, tmp_path: Path
) -> None:
    name = unique("noipam")
    kube.create_pod(
        NS, name, "node1", annotations={"cni.projectcalico.org/ipAddrsNoIpam": '["10.99.0.7"]'}
    )
    refused = add(node, k8s_conf(kube, tmp_path), name, container_id(), node.new_pod())
    assert refused.code != 0
    assert "requested feature is not enabled: ip_addrs_no_ipam" in refused.json["msg"]
    conf = k8s_conf(kube, tmp_path, feature_control={"ip_addrs_no_ipam": True})
    pod, cid = node.new_pod(), container_id()
    added = add(node, conf, name, cid, pod)
    assert added.code == 0, added
    assert result_ips(added.json, "1.0.0") == ["10.99.0.7/32"]
    assert_nothing_allocated(kube)  # nothing recorded in IPAM
    assert delete(node, conf, name, cid, pod).code == 0


def test_ip_families_annotation_asks_for_ipv6_too(
    node: Node, kube: KubeCluster, tmp_path: Path
) -> None:
    add_pool(kube, "default-ipv6-ippool", "fd00:70::/64")
    name = unique("dual")
    kube.create_pod(
        NS, name, "node1", annotations={"cni.projectcalico.org/ipFamilies": '["IPv4","IPv6"]'}
    )
    added = add(node, k8s_conf(kube, tmp_path), name, container_id(), node.new_pod())
    assert added.code == 0, added
    assert sorted(ipaddress.ip_interface(a).version for a in result_ips(added.json, "1.0.0")) == [
        4,
        6,
    ]
    bad = unique("bad")
    kube.create_pod(NS, bad, "node1", annotations={"cni.projectcalico.org/ipFamilies": '["IPv5"]'})
    refused = add(node, k8s_conf(kube, tmp_path), bad, container_id(), node.new_pod())
    assert refused.code != 0 and "error parsing ipFamilies" in refused.json["msg"]


def test_hw_addr_annotation_sets_the_pod_mac(node: Node, kube: KubeCluster, tmp_path: Path) -> None:
    name = unique("mac")
    mac = "0a:58:0a:f4:00:2a"
    kube.create_pod(NS, name, "node1", annotations={"cni.projectcalico.org/hwAddr": mac.upper()})
    netns = node.new_pod()
    added = add(node, k8s_conf(kube, tmp_path), name, container_id(), netns)
    assert added.code == 0, added
    assert added.json["interfaces"][1]["mac"] == mac
    assert netns.link("eth0")["address"] == mac


@pytest.mark.parametrize(
    "conflist", ["10-calico-k8s.conflist", "10-calico-k8s-host-local.conflist"]
)
def test_shipped_conflists_work(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path, conflist: str
) -> None:
    """conf/'s conflists, as an operator installs them, with only paths filled in."""
    calico = json.loads((REPO / "conf" / conflist).read_text())["plugins"][0]
    calico.update(
        name=NETWORK,
        cniVersion="1.0.0",
        nodename="node1",
        log_file_path=str(tmp_path / "cni.log"),
        ipam_lock_file=str(tmp_path / "ipam.lock"),
        kubernetes={"kubeconfig": str(kube.cni_kubeconfig)},
    )
    if calico["ipam"]["type"] == "host-local":
        calico["ipam"]["dataDir"] = str(tmp_path / "ipam")
    pod, cid = node.new_pod(), container_id()
    added = add(node, calico, pod_name, cid, pod)
    assert added.code == 0, added
    (address,) = result_ips(added.json, "1.0.0")
    expected = POOL if calico["ipam"]["type"] == "calico-ipam" else "10.244.1.0/24"
    assert ipaddress.ip_interface(address).ip in ipaddress.ip_network(expected)
    assert pod_annotations(kube, NS, pod_name)[POD_IP] == address
    assert delete(node, calico, pod_name, cid, pod).code == 0
    assert_nothing_allocated(kube)


# ---------------------------------------------------------- the mismatch rule


def test_late_del_of_a_recreated_statefulset_pod_keeps_the_new_pod(
    node: Node, kube: KubeCluster, tmp_path: Path
) -> None:
    """web-0 is deleted and recreated; the old sandbox's DEL arrives after the new ADD."""
    conf = k8s_conf(kube, tmp_path)
    name = unique("web-0")
    kube.create_pod(NS, name, "node1")
    old_pod, old_cid = node.new_pod(), container_id()
    assert add(node, conf, name, old_cid, old_pod).code == 0
    force_delete(kube, name)
    kube.create_pod(NS, name, "node1")
    # The old sandbox's interface is gone with its netns on the real node.
    old_pod.delete()
    new_pod, new_cid = node.new_pod(), container_id()
    added = add(node, conf, name, new_cid, new_pod)
    assert added.code == 0, added
    (new_address,) = result_ips(added.json, "1.0.0")
    new_ip = str(ipaddress.ip_interface(new_address).ip)

    late = delete(node, conf, name, old_cid, old_pod)
    assert late.code == 0, late
    assert pod_annotations(kube, NS, name) == {
        POD_IP: f"{new_ip}/32",
        POD_IPS: f"{new_ip}/32",
        CONTAINER_ID: new_cid,
    }
    assert allocations(kube) == {new_ip: f"{NETWORK}.{new_cid}"}
    assert_pod_networking(node, new_pod, expected_host_veth(NS, name), [new_address])


def test_add_for_a_pod_recreated_meanwhile_is_not_recorded_on_the_new_pod(
    node: Node, kube: KubeCluster, tmp_path: Path
) -> None:
    """The status patch carries the UID the ADD read: another pod of the same name is
    never patched, and the ADD's address is given back."""
    from cni_plugin.k8s import Pod, record_pod_ips
    from cni_plugin.types import CNIError
    from libcalico.datastore.k8s_client import KubeAccess, KubeClient

    name = unique("racy")
    first = kube.create_pod(NS, name, "node1")
    force_delete(kube, name)
    kube.create_pod(NS, name, "node1")
    stale = Pod(NS, name, first["metadata"]["uid"])
    access = KubeAccess.from_kubeconfig(str(kube.cni_kubeconfig))
    with KubeClient(access) as client, pytest.raises(CNIError):
        record_pod_ips(client, stale, "c1", [ipaddress.ip_interface("10.70.0.9/32")])
    assert POD_IP not in pod_annotations(kube, NS, name)


# ------------------------------------------------------------ many nodes


def test_three_nodes_twenty_concurrent_adds_each(
    cluster: KubeCluster, k8s_nodes: None, cni_path: str, tmp_path: Path
) -> None:
    wipe_calico(cluster)
    add_pool(cluster, "default-ipv4-ippool", POOL, blockSize=26)
    nodes = {name: Node.create(cni_path) for name in ("node1", "node2", "node3")}
    try:
        with reachable_from(cluster, *nodes.values()):
            work = []
            for name, sim in nodes.items():
                conf = k8s_conf(cluster, tmp_path, node=name)
                for _ in range(20):
                    pod_name = unique(f"burst-{name}")
                    cluster.create_pod(NS, pod_name, name)
                    work.append((sim, conf, pod_name, container_id(), sim.new_pod()))
            with ThreadPoolExecutor(12) as pool:
                added = list(pool.map(lambda w: add(*w), work))
            assert all(r.code == 0 for r in added), [r for r in added if r.code][:2]
            ips = [result_ips(r.json, "1.0.0")[0] for r in added]
            assert len(set(ips)) == 60
            owners = {
                b["spec"]["cidr"]: b["spec"]["affinity"]
                for b in objects(cluster, "ipamblocks").values()
            }
            for (_, conf, _, _, _), address in zip(work, ips, strict=True):
                ip = ipaddress.ip_interface(address).ip
                block = next(c for c in owners if ip in ipaddress.ip_network(c))
                assert owners[block] == f"host:{conf['nodename']}"  # per-node blocks
            assert len(objects(cluster, "ipamhandles")) == 60
            with ThreadPoolExecutor(12) as pool:
                removed = list(pool.map(lambda w: delete(*w), work))
            assert all(r.code == 0 for r in removed), [r for r in removed if r.code][:2]
            assert_nothing_allocated(cluster)
    finally:
        for sim in nodes.values():
            sim.destroy()


def test_api_server_stopped_mid_burst_fails_with_11_and_recovers(
    node: Node, kube: KubeCluster, tmp_path: Path
) -> None:
    conf = k8s_conf(kube, tmp_path)
    apiserver = kube.pids[-1]
    work = []
    for _ in range(8):
        name = unique("burst")
        kube.create_pod(NS, name, "node1")
        work.append((node, conf, name, container_id(), node.new_pod()))
    with ThreadPoolExecutor(4) as pool:
        early = [pool.submit(add, *w) for w in work[:4]]
        done = [f.result() for f in early]
        os.kill(apiserver, signal.SIGSTOP)
        try:
            late = list(pool.map(lambda w: add(*w), work[4:]))
        finally:
            os.kill(apiserver, signal.SIGCONT)
    assert all(r.code == 0 for r in done), done
    assert all(r.json["code"] == ERR_TRY_AGAIN_LATER for r in late), late
    assert all(w[4].link("eth0") is None for w in work[4:])
    # Recovery: kubelet retries the failed ADDs' DELs and then ADDs them again.
    for w in work[4:]:
        assert delete(*w).code == 0
        assert add(*w).code == 0
    for w in work:
        assert delete(*w).code == 0
    assert_nothing_allocated(kube)
    assert node.host_veths() == []


def test_a_stale_token_is_reported_unauthorized_naming_the_kubeconfig(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path
) -> None:
    stale = tmp_path / "calico-kubeconfig"
    stale.write_text(kube.cni_kubeconfig.read_text().replace(kube.cni_token, "f" * 32))
    pod = node.new_pod()
    result = add(node, k8s_conf(kube, tmp_path, kubeconfig=stale), pod_name, container_id(), pod)
    assert result.json["code"] == ERR_TRY_AGAIN_LATER, result
    assert "connection is unauthorized: Unauthorized" in result.json["msg"]
    assert str(stale) in result.json["msg"]
    assert node.host_veths() == [] and pod.link("eth0") is None


def test_add_is_refused_while_the_datastore_is_not_ready(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path
) -> None:
    kube.admin.create(
        "/apis/crd.projectcalico.org/v1/clusterinformations",
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "ClusterInformation",
            "metadata": {"name": "default"},
            "spec": {"datastoreReady": False},
        },
    )
    result = add(node, k8s_conf(kube, tmp_path), pod_name, container_id(), node.new_pod())
    assert result.json["code"] == ERR_TRY_AGAIN_LATER
    assert result.json["msg"] == "Calico is currently not ready to process requests"
    assert_nothing_allocated(kube)


# ------------------------------------------------------- operator's view


def test_admin_commands_work_on_the_kubernetes_datastore(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path
) -> None:
    conf = k8s_conf(kube, tmp_path)
    cid, pod = container_id(), node.new_pod()
    assert add(node, conf, pod_name, cid, pod).code == 0
    pools = ctl(kube, "ctl", "get", "ippools")
    assert pools.returncode == 0 and "default-ipv4-ippool" in pools.stdout, pools
    show = ctl(kube, "ipam", "show", "--show-blocks")
    assert show.returncode == 0 and POOL in show.stdout, show
    check = ctl(kube, "ipam", "check")
    assert check.returncode == 0 and "found 0 problems" in check.stdout, check.stdout
    assert delete(node, conf, pod_name, cid, pod).code == 0


def test_kubectl_lists_pools_applied_with_calico_ctl(kube: KubeCluster, tmp_path: Path) -> None:
    """The CRDs are what kubectl sees: a pool applied with `calico ctl` is a real IPPool."""
    kubectl = str(kube_binaries("kubectl")["kubectl"])  # built at the API server's version
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        (REPO / "conf" / "ippool-default.yaml")
        .read_text()
        .replace("default-ipv4-ippool", "seen-by-kubectl")
        .replace("10.244.0.0/16", "10.71.0.0/16")
    )
    applied = ctl(kube, "ctl", "apply", "-f", str(pool))
    assert applied.returncode == 0, applied
    jsonpath = 'jsonpath={range .items[*]}{.metadata.name} {.spec.cidr}{"\\n"}{end}'
    listed = subprocess.run(
        [kubectl, "--kubeconfig", str(kube.admin_kubeconfig), "get", "ippools", "-o", jsonpath],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "seen-by-kubectl 10.71.0.0/16" in listed.stdout.splitlines()


def test_report_round_trips_per_add_and_del(
    node: Node, kube: KubeCluster, pod_name: str, tmp_path: Path, capsys
) -> None:
    conf = k8s_conf(kube, tmp_path)
    cid, pod = container_id(), node.new_pod()
    warm = unique("warm")
    kube.create_pod(NS, warm, "node1")
    assert add(node, conf, warm, container_id(), node.new_pod()).code == 0  # block claimed
    before = api_requests(kube)
    assert add(node, conf, pod_name, cid, pod).code == 0
    middle = api_requests(kube)
    assert delete(node, conf, pod_name, cid, pod).code == 0
    after = api_requests(kube)
    add_trips, del_trips = middle - before - 1, after - middle - 1
    with capsys.disabled():
        print(f"\nAPI round trips: ADD {add_trips}, DEL {del_trips} (block already claimed)")
    assert 0 < add_trips <= 20 and 0 < del_trips <= 15
