"""The kube-apiserver fixture serves Calico's CRDs, and the CNI identity holds only its role.

Skipped only when the apiserver is neither cached nor requested; build it with
`tests/k8s/apiserver.sh build` or run with CALICO_BUILD_APISERVER=1.
"""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path

import pytest
import yaml

from tests.k8s.fixture import (
    JSON,
    STRATEGIC_MERGE_PATCH,
    ApiClient,
    ApiError,
    KubeCluster,
    kube_apiserver,
)
from tests.k8s.k8s_support import CALICO_PLURALS, CRD_V1, cluster, needs_apiserver

__all__ = ["cluster"]
pytestmark = needs_apiserver


@pytest.fixture(scope="module")
def pod(cluster: KubeCluster) -> dict:
    """One scheduled pod in its own namespace on a node with pod CIDRs."""
    cluster.create_namespace("web", labels={"team": "a"})
    cluster.create_node("node1", ["10.244.1.0/24", "fd00:244:1::/64"], {"zone": "z1"})
    return cluster.create_pod("web", "nginx", "node1", labels={"app": "nginx"})


def ipam_block(name: str, cidr: str) -> dict:
    return {
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "IPAMBlock",
        "metadata": {"name": name},
        "spec": {
            "cidr": cidr,
            "affinity": "host:node1",
            "allocations": [0, None, None, None],
            "unallocated": [1, 2, 3],
            "attributes": [
                {
                    "handle_id": "k8s-pod-network.abc",
                    "secondary": {"node": "node1", "pod": "nginx", "namespace": "web"},
                }
            ],
            "sequenceNumber": 1732580000000000000,
            "sequenceNumberForAllocation": {"0": 1732580000000000000},
            "deleted": False,
            "strictAffinity": False,
        },
    }


@pytest.mark.parametrize("plural", CALICO_PLURALS)
def test_each_calico_crd_is_served_cluster_scoped(cluster: KubeCluster, plural: str) -> None:
    listing = cluster.admin.request("GET", f"{CRD_V1}/{plural}")
    assert listing["apiVersion"] == "crd.projectcalico.org/v1"
    assert listing["kind"].endswith("List")
    assert listing["items"] == []
    resources = cluster.admin.request("GET", CRD_V1)["resources"]
    assert {"name": plural, "namespaced": False}.items() <= next(
        r for r in resources if r["name"] == plural
    ).items()


def test_cni_creates_and_reads_back_an_ipamblock(cluster: KubeCluster) -> None:
    block = ipam_block("10-0-0-0-30", "10.0.0.0/30")
    created = cluster.cni.create(f"{CRD_V1}/ipamblocks", block)
    read = cluster.cni.request("GET", f"{CRD_V1}/ipamblocks/10-0-0-0-30")
    assert read["spec"] == block["spec"]
    assert read["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_ipamblock_update_with_stale_resource_version_conflicts(cluster: KubeCluster) -> None:
    """Calico's IPAM compare-and-swap relies on this 409."""
    created = cluster.cni.create(f"{CRD_V1}/ipamblocks", ipam_block("10-0-1-0-30", "10.0.1.0/30"))
    path = f"{CRD_V1}/ipamblocks/10-0-1-0-30"
    first = dict(created, spec=dict(created["spec"], sequenceNumber=2))
    cluster.cni.request("PUT", path, first)
    stale = dict(created, spec=dict(created["spec"], sequenceNumber=3))
    with pytest.raises(ApiError) as err:
        cluster.cni.request("PUT", path, stale)
    assert err.value.status == 409
    assert cluster.cni.request("GET", path)["spec"]["sequenceNumber"] == 2


def test_blockaffinity_deleted_is_a_string_in_v1(cluster: KubeCluster) -> None:
    affinity = {
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "BlockAffinity",
        "metadata": {"name": "node1-10-0-0-0-30"},
        "spec": {
            "state": "confirmed",
            "node": "node1",
            "type": "host",
            "cidr": "10.0.0.0/30",
            "deleted": False,
        },
    }
    with pytest.raises(ApiError) as err:
        cluster.cni.create(f"{CRD_V1}/blockaffinities", affinity)
    assert err.value.status == 422
    affinity["spec"]["deleted"] = "false"
    created = cluster.cni.create(f"{CRD_V1}/blockaffinities", affinity)
    assert created["spec"]["deleted"] == "false"


def test_ippool_gets_calico_defaults_for_tunnel_modes(cluster: KubeCluster) -> None:
    cluster.admin.create(
        f"{CRD_V1}/ippools",
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "IPPool",
            "metadata": {"name": "default-ipv4-ippool"},
            "spec": {"cidr": "192.168.0.0/16", "blockSize": 26, "natOutgoing": True},
        },
    )
    spec = cluster.cni.request("GET", f"{CRD_V1}/ippools/default-ipv4-ippool")["spec"]
    assert spec == {
        "cidr": "192.168.0.0/16",
        "blockSize": 26,
        "natOutgoing": True,
        "ipipMode": "Never",
        "vxlanMode": "Never",
    }


def test_cni_reads_pod_namespace_and_node(cluster: KubeCluster, pod: dict) -> None:
    assert (
        cluster.cni.request("GET", "/api/v1/namespaces/web/pods/nginx")["spec"]["nodeName"]
        == "node1"
    )
    assert cluster.cni.request("GET", "/api/v1/namespaces/web")["metadata"]["labels"]["team"] == "a"
    node = cluster.cni.request("GET", "/api/v1/nodes/node1")
    assert node["spec"]["podCIDRs"] == ["10.244.1.0/24", "fd00:244:1::/64"]
    assert node["metadata"]["labels"] == {"zone": "z1"}


def test_cni_patches_pod_status_annotations(cluster: KubeCluster, pod: dict) -> None:
    """The KDD 'write endpoint' of calico-behaviour.md §3.4, with the pod's UID as guard."""
    annotations = {
        "cni.projectcalico.org/podIP": "10.244.1.5/32",
        "cni.projectcalico.org/podIPs": "10.244.1.5/32,fd00:244:1::5/128",
        "cni.projectcalico.org/containerID": "f" * 64,
    }
    cluster.cni.request(
        "PATCH",
        "/api/v1/namespaces/web/pods/nginx/status",
        {"metadata": {"uid": pod["metadata"]["uid"], "annotations": annotations}},
        STRATEGIC_MERGE_PATCH,
    )
    stored = cluster.admin.request("GET", "/api/v1/namespaces/web/pods/nginx")
    assert annotations.items() <= stored["metadata"]["annotations"].items()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "POST",
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "rogue"}},
        ),
        ("DELETE", "/api/v1/namespaces/web", None),
        ("PATCH", "/api/v1/namespaces/web/pods/nginx", {"metadata": {"labels": {"x": "y"}}}),
        ("GET", "/api/v1/namespaces/web/pods", None),
        ("GET", "/api/v1/namespaces/kube-system/secrets", None),
        ("PATCH", "/api/v1/nodes/node1", {"metadata": {"labels": {"x": "y"}}}),
    ],
    ids=[
        "create-node",
        "delete-namespace",
        "patch-pod-spec",
        "list-pods",
        "list-secrets",
        "patch-node",
    ],
)
def test_cni_is_forbidden_beyond_its_role(
    cluster: KubeCluster, pod: dict, method: str, path: str, body: dict | None
) -> None:
    content_type = STRATEGIC_MERGE_PATCH if method == "PATCH" else JSON
    with pytest.raises(ApiError) as err:
        cluster.cni.request(method, path, body, content_type)
    assert err.value.status == 403
    assert cluster.admin.request("GET", "/api/v1/namespaces/web")["status"]["phase"] == "Active"


def test_cni_kubeconfig_reaches_the_server_as_the_cni_identity(cluster: KubeCluster) -> None:
    config = yaml.safe_load(cluster.cni_kubeconfig.read_text())
    assert cluster.cni_kubeconfig.stat().st_mode & 0o777 == 0o600
    context = next(
        c["context"] for c in config["contexts"] if c["name"] == config["current-context"]
    )
    server = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    ca = base64.b64decode(server["certificate-authority-data"]).decode()
    client = ApiClient(server["server"], user["token"], ssl.create_default_context(cadata=ca))
    review = client.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review["status"]["userInfo"]["username"] == (
        "system:serviceaccount:kube-system:calico-cni-plugin"
    )


def test_admin_kubeconfig_is_cluster_admin(cluster: KubeCluster) -> None:
    config = yaml.safe_load(cluster.admin_kubeconfig.read_text())
    client = cluster.client(config["users"][0]["user"]["token"])
    assert client.is_allowed("delete", "namespaces")
    assert not cluster.cni.is_allowed("delete", "namespaces")


def test_leaves_no_process_running(tmp_path: Path) -> None:
    with kube_apiserver(tmp_path) as running:
        pids = running.pids
        assert len(pids) == 2
        assert all(_alive(pid) for pid in pids)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
