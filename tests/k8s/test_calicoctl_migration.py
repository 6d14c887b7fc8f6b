"""`calicoctl datastore migrate` with live pods: the embedded local datastore to etcd, then
etcd to the Kubernetes datastore, with `ipam check` clean at each step, real calicoctl
reading the result, and the CNI DEL of the old pods, run against the new datastore,
releasing their addresses."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.calicoctl_support import Calicoctl
from tests.etcd.cni_support import reachable_from as etcd_reachable_from
from tests.etcd_fixture import EtcdCluster, start_etcd
from tests.harness import Node, calico_conf, pod_args, unique
from tests.k8s.fixture import STRATEGIC_MERGE_PATCH, KubeCluster
from tests.k8s.k8s_support import (
    allocations,
    assert_nothing_allocated,
    cluster,
    container_id,
    k8s_conf,
    needs_apiserver,
    reachable_from,
)
from tests.k8s.test_calicoctl_k8s import _reset
from tests.root.checks import assert_pod_gone, expected_host_veth

__all__ = ["cluster"]
pytestmark = [needs_apiserver, pytest.mark.root]
POOL = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: default-ipv4-ippool}
spec: {cidr: 10.244.0.0/16, blockSize: 26, natOutgoing: true}
"""
PODS = 3
KUBE_CONTROLLERS = """\
apiVersion: projectcalico.org/v3
kind: KubeControllersConfiguration
metadata: {name: default}
spec: {controllers: {node: {reconcilerPeriod: 5m0s}}}
"""


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    running = start_etcd(tmp_path / "etcd")
    yield running
    running.stop()


def _move(source: Calicoctl, target: Calicoctl) -> None:
    source.ok("datastore", "migrate", "lock")
    exported = source.ok("datastore", "migrate", "export")
    imported = target.ok("datastore", "migrate", "import", "-f", "-", stdin=exported)
    assert imported.startswith("Successfully imported")
    assert target.ok("datastore", "migrate", "unlock") == "Datastore unlocked.\n"
    source.ok("datastore", "migrate", "unlock")


def test_local_to_etcd_to_kubernetes_with_live_pods(
    node: Node, cluster: KubeCluster, etcd: EtcdCluster, tmp_path: Path
) -> None:
    _reset(cluster)
    local = Calicoctl({"LOCAL_DATASTORE_PATH": str(tmp_path / "calico.db")})
    on_etcd = Calicoctl({"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": etcd.endpoints})
    on_k8s = Calicoctl(
        {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(cluster.admin_kubeconfig)}
    )
    local.ok("apply", "-f", "-", stdin=POOL)
    conf = calico_conf(
        "1.0.0",
        {"type": "calico-ipam"},
        datastore_type="local",
        local_datastore_path=str(tmp_path / "calico.db"),
        ipam_lock_file=str(tmp_path / "ipam.lock"),
    )
    pods = []
    for _ in range(PODS):
        name, cid, netns = unique("mig"), container_id(), node.new_pod()
        added = node.run("ADD", conf, cid, netns.path, args=pod_args(name))
        assert added.code == 0, added
        address = added.json["ips"][0]["address"]
        pods.append((name, cid, netns, address))
    usage = local.ok("ipam", "show", "--show-blocks")
    pool_row = next(line for line in usage.splitlines() if "| IP Pool " in line)
    assert [cell.strip() for cell in pool_row.strip("|").split("|")] == [
        "IP Pool",
        "10.244.0.0/16",
        "65536",
        f"{PODS} (0%)",
        f"{65536 - PODS} (100%)",
    ]
    assert "Check complete; found 0 problems." in local.ok("ipam", "check")

    # Locked, the old datastore refuses new pods (try again later) while the move runs.
    local.ok("datastore", "migrate", "lock")
    refused = node.run("ADD", conf, container_id(), node.new_pod().path, args=pod_args("late"))
    assert refused.code != 0 and refused.json["code"] == 11, refused
    local.ok("datastore", "migrate", "unlock")

    _move(local, on_etcd)
    assert on_etcd.ok("ipam", "show", "--show-blocks") == usage
    assert "Check complete; found 0 problems." in on_etcd.ok("ipam", "check")
    real = on_etcd.oracle()
    assert real.ok("ipam", "show", "--show-blocks") == usage
    assert len(real.doc("get", "workloadendpoints", "-A")["items"]) == PODS

    # On Kubernetes the pods are the endpoints: they exist, with the IPs kubelet reports.
    for name, _, _, address in pods:
        cluster.create_pod("default", name, "node1")
        ip = str(ipaddress.ip_interface(address).ip)
        cluster.admin.request(
            "PATCH",
            f"/api/v1/namespaces/default/pods/{name}/status",
            {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
            STRATEGIC_MERGE_PATCH,
        )
    _move(on_etcd, on_k8s)
    assert on_k8s.ok("ipam", "show", "--show-blocks") == usage
    assert "Check complete; found 0 problems." in on_k8s.ok("ipam", "check")
    # Real calicoctl's check reads the controllers' settings (kube-controllers writes them).
    on_k8s.ok("apply", "-f", "-", stdin=KUBE_CONTROLLERS)
    assert "Check complete; found 0 problems." in on_k8s.oracle().ok(
        "ipam", "check", "--allow-version-mismatch"
    )
    assert len(allocations(cluster)) == PODS

    # The old pods' DEL, now on the Kubernetes datastore, releases what they held there.
    k8s = k8s_conf(cluster, tmp_path, "1.0.0", node="node1")
    with reachable_from(cluster, node):
        for name, cid, netns, address in pods:
            removed = node.run("DEL", k8s, cid, netns.path, args=pod_args(name))
            assert removed.code == 0, removed
            assert_pod_gone(node, netns, expected_host_veth("default", name), [address])
    assert_nothing_allocated(cluster)


def test_etcd_endpoints_of_k8s_policy_pods_carry_labels_and_uid(
    node: Node, cluster: KubeCluster, etcd: EtcdCluster, tmp_path: Path
) -> None:
    """With `policy.type: k8s` real Calico writes the pod's labels, UID and service account
    into its WorkloadEndpoint, so that policy selecting pods by label matches them."""
    _reset(cluster)
    on_etcd = Calicoctl({"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": etcd.endpoints})
    on_etcd.ok("apply", "-f", "-", stdin=POOL)
    name = unique("web")
    pod = cluster.admin.create(
        "/api/v1/namespaces/default/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "web", "tier": "front"}},
            "spec": {
                "nodeName": "node1",
                "serviceAccountName": "web-sa",
                "containers": [{"name": "main", "image": "registry.invalid/pause"}],
            },
        },
    )
    conf = calico_conf(
        "1.0.0",
        {"type": "calico-ipam"},
        ipam_lock_file=str(tmp_path / "ipam.lock"),
        policy={"type": "k8s"},
        kubernetes={"kubeconfig": str(cluster.cni_kubeconfig)},
        **etcd.netconf(),
    )
    cid, netns = container_id(), node.new_pod()
    with reachable_from(cluster, node), etcd_reachable_from(etcd, node.netns):
        added = node.run("ADD", conf, cid, netns.path, args=pod_args(name))
        assert added.code == 0, added
        for tool in (on_etcd, on_etcd.oracle()):
            (wep,) = tool.doc("get", "workloadendpoints", "-A")["items"]
            assert wep["metadata"]["uid"] == pod["metadata"]["uid"]
            assert wep["metadata"]["labels"] == {
                "app": "web",
                "tier": "front",
                "projectcalico.org/namespace": "default",
                "projectcalico.org/orchestrator": "k8s",
                "projectcalico.org/serviceaccount": "web-sa",
            }
            assert wep["spec"]["profiles"] == ["kns.default", "ksa.default.web-sa"]
            assert wep["spec"]["serviceAccountName"] == "web-sa"
        removed = node.run("DEL", conf, cid, netns.path, args=pod_args(name))
        assert removed.code == 0, removed
    assert on_etcd.doc("get", "workloadendpoints", "-A")["items"] == []
