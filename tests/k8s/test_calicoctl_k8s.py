"""The built calicoctl on the Kubernetes datastore (a real kube-apiserver with conf/crds):
every command, bad input, what kubectl sees (Calico's CRDs, the Kubernetes Node with
Calico's annotations), pods as WorkloadEndpoints, and real calicoctl v3.31.7 reading what
ours wrote and ours reading what it wrote, outputs compared."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam_plugin.engine import IPAM, AutoAssignRequest
from tests.calicoctl_support import (
    POLICY,
    POLICY_TABLES,
    SEED,
    SEED_TABLES,
    Calicoctl,
    bad_input_changes_nothing,
    every_command,
    rows,
    same_as_real,
)
from tests.k8s.fixture import STRATEGIC_MERGE_PATCH, ApiError, KubeCluster, kube_binaries
from tests.k8s.k8s_support import CRD_V1, cluster, cni_store, needs_apiserver

__all__ = ["cluster"]
pytestmark = needs_apiserver
CLUSTER_PLURALS = (
    "ipamblocks",
    "blockaffinities",
    "ipamhandles",
    "ippools",
    "ipreservations",
    "ipamconfigs",
    "clusterinformations",
    "bgppeers",
    "bgpconfigurations",
    "felixconfigurations",
    "kubecontrollersconfigurations",
    "globalnetworkpolicies",
    "globalnetworksets",
    "tiers",
)
NAMESPACED_PLURALS = ("networkpolicies", "networksets")
# Profiles derive from the namespaces here, so both tools show the same ones.
KDD_VIEWS = (("get", "profiles", "-o", "wide"), ("get", "profile", "kns.default", "-o", "yaml"))


def _reset(cluster: KubeCluster) -> None:
    """No Calico objects, no pods, and a bare Node `node1`, as kubelet registered it."""
    for plural in CLUSTER_PLURALS:
        cluster.admin.request("DELETE", f"{CRD_V1}/{plural}")
    for plural in NAMESPACED_PLURALS:
        cluster.admin.request("DELETE", f"{CRD_V1}/namespaces/default/{plural}")
    # No kubelet finishes a graceful delete here: remove the pods at once.
    now = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    cluster.admin.request("DELETE", "/api/v1/namespaces/default/pods", now)
    try:
        cluster.admin.request("DELETE", "/api/v1/nodes/node1")
    except ApiError as err:
        if err.status != 404:
            raise
    cluster.create_node("node1", labels={"kubernetes.io/hostname": "node1"})


@pytest.fixture
def kube(cluster: KubeCluster) -> Iterator[KubeCluster]:
    _reset(cluster)
    yield cluster


@pytest.fixture
def ctl(kube: KubeCluster) -> Calicoctl:
    return Calicoctl({"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(kube.admin_kubeconfig)})


def kubectl(kube: KubeCluster, *argv: str) -> str:
    """kubectl, built at the API server's version, as the cluster's admin."""
    binary = str(kube_binaries("kubectl")["kubectl"])
    result = subprocess.run(
        [binary, "--kubeconfig", str(kube.admin_kubeconfig), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_command_on_kubernetes(ctl: Calicoctl, kube: KubeCluster, tmp_path: Path) -> None:
    every_command(ctl)
    # The Calico Node is the Kubernetes Node, with Calico's settings as annotations.
    node = json.loads(kubectl(kube, "get", "node", "node1", "-o", "json"))
    annotations = node["metadata"]["annotations"]
    assert annotations["projectcalico.org/IPv4Address"] == "192.168.10.26/24"
    assert annotations["projectcalico.org/RouteReflectorClusterID"] == "1.1.1.1"
    assert json.loads(annotations["projectcalico.org/labels"]) == {"route-reflector": "true"}
    assert node["metadata"]["labels"] == {"kubernetes.io/hostname": "node1"}
    # The other resources are Calico's CRDs, as kubectl lists them.
    jsonpath = "jsonpath={range .items[*]}{.metadata.name} {.spec.asNumber}{'\\n'}{end}"
    assert kubectl(kube, "get", "bgpconfigurations", "-o", jsonpath) == "default 63400\n"
    assert "peer-with-route-reflectors" in kubectl(kube, "get", "bgppeers")
    policy = json.loads(
        kubectl(kube, "get", "networkpolicies.crd.projectcalico.org", "-n", "default", "-o", "json")
    )
    (item,) = policy["items"]
    assert item["metadata"]["name"] == "default.allow-tcp-6379"
    stash = json.loads(item["metadata"]["annotations"]["projectcalico.org/metadata"])
    assert stash["name"] == "allow-tcp-6379"
    assert "default" in kubectl(kube, "get", "tiers")
    # A Node exists only as kubelet registered it: calicoctl cannot create one here.
    other = SEED.split("---\n")[1].replace("node1", "node9")
    assert "not supported on Node" in ctl.fails("apply", "-f", "-", stdin=other)


def test_bad_input_on_kubernetes(ctl: Calicoctl, kube: KubeCluster) -> None:
    ctl.ok("apply", "-f", "-", stdin=SEED)
    before = kube.admin.request("GET", f"{CRD_V1}/ippools")["items"]
    bad_input_changes_nothing(ctl)
    assert kube.admin.request("GET", f"{CRD_V1}/ippools")["items"] == before


def _pods(kube: KubeCluster, count: int) -> None:
    """Pods on node1 with addresses from Calico IPAM, annotated as the CNI plugin does."""
    with cni_store(kube) as store:
        engine = IPAM(store)
        for index in range(count):
            pod = f"web-{index}"
            kube.create_pod("default", pod, "node1", labels={"app": "web"})
            attrs = {"node": "node1", "pod": pod, "namespace": "default"}
            handle = f"k8s-pod-network.c{index}"
            v4, _ = engine.auto_assign(AutoAssignRequest(handle, "node1", attrs, num_v4=1))
            ip = ipaddress.ip_interface(f"{v4.ips[0].ip}/32")
            kube.admin.request(
                "PATCH",
                f"/api/v1/namespaces/default/pods/{pod}/status",
                {
                    "metadata": {
                        "annotations": {
                            "cni.projectcalico.org/podIP": str(ip),
                            "cni.projectcalico.org/podIPs": str(ip),
                            "cni.projectcalico.org/containerID": f"c{index}",
                        }
                    }
                },
                STRATEGIC_MERGE_PATCH,
            )


def test_pods_are_workload_endpoints(ctl: Calicoctl, kube: KubeCluster) -> None:
    ctl.ok("apply", "-f", "-", stdin=SEED)
    _pods(kube, 2)
    table = rows(ctl.ok("get", "wep", "-o", "wide"))
    assert [row[1:4] for row in table] == [
        ["web-0", "node1", table[0][3]],
        ["web-1", "node1", table[1][3]],
    ]
    wep = ctl.doc("get", "wep", "node1-k8s-web--0-eth0")
    assert wep["metadata"]["labels"]["app"] == "web"
    assert wep["spec"]["containerID"] == "c0" and wep["spec"]["profiles"] == ["kns.default"]
    refused = ctl.fails("delete", "wep", "node1-k8s-web--0-eth0")
    assert "not supported on WorkloadEndpoint" in refused
    assert "Check complete; found 0 problems." in ctl.ok("ipam", "check")


def _real_check(real: Calicoctl) -> str:
    return real.ok("ipam", "check", "--allow-version-mismatch")


def test_real_calicoctl_reads_what_ours_wrote(ctl: Calicoctl, kube: KubeCluster) -> None:
    real = ctl.oracle()
    ctl.ok("apply", "-f", "-", stdin=SEED)
    ctl.ok("apply", "-f", "-", stdin=POLICY)
    _pods(kube, 3)
    for argv, table in {**SEED_TABLES, **POLICY_TABLES}.items():
        assert real.ok(*argv) == table, argv
    same_as_real(ctl, real, KDD_VIEWS)
    checked = _real_check(real)
    assert "Found 3 workload IPs." in checked
    assert "Check complete; found 0 problems." in checked


def test_ours_reads_what_real_calicoctl_wrote(ctl: Calicoctl, kube: KubeCluster) -> None:
    real = ctl.oracle()
    real.ok("apply", "-f", "-", stdin=SEED)
    real.ok("apply", "-f", "-", stdin=POLICY)
    _pods(kube, 2)
    for argv, table in {**SEED_TABLES, **POLICY_TABLES}.items():
        assert ctl.ok(*argv) == table, argv
    same_as_real(ctl, real, KDD_VIEWS)
    ctl.ok("label", "nodes", "node1", "zone=a")
    ctl.ok("patch", "gnp", "deny-blue", "-p", '{"spec":{"order":20}}')
    node: dict[str, Any] = real.doc("get", "node", "node1")
    assert node["metadata"]["labels"]["zone"] == "a"
    assert real.doc("get", "gnp", "deny-blue")["spec"]["order"] == 20
    assert "Check complete; found 0 problems." in ctl.ok("ipam", "check")
