"""What the Kubernetes-datastore tests share: a running API server per module, wiping
Calico's objects between tests, and the CRD objects read back as an operator sees them."""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libcalico.datastore.k8s_client import KubeAccess, KubeClient
from libcalico.datastore.kubernetes import KubernetesDatastore
from tests.etcd.cni_support import LoopbackRelay
from tests.harness import Node, calico_cli, calico_conf
from tests.k8s.fixture import KubeCluster, apiserver_available, kube_apiserver

CRD_V1 = "/apis/crd.projectcalico.org/v1"
IPAM_PLURALS = ("ipamblocks", "blockaffinities", "ipamhandles")
CALICO_PLURALS = (*IPAM_PLURALS, "ippools", "ipreservations", "ipamconfigs", "clusterinformations")

needs_apiserver = pytest.mark.skipif(
    not apiserver_available(),
    reason="kube-apiserver not built: run tests/k8s/apiserver.sh build "
    "(or set CALICO_BUILD_APISERVER=1)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """One API server per test module: starting one costs seconds."""
    with kube_apiserver(tmp_path_factory.mktemp("kube")) as running:
        yield running


def wipe_calico(cluster: KubeCluster) -> None:
    """Delete every Calico object, so each test starts from an empty datastore."""
    for plural in CALICO_PLURALS:
        cluster.admin.request("DELETE", f"{CRD_V1}/{plural}")


def delete_pods(cluster: KubeCluster) -> None:
    """Delete every pod at once (no kubelet runs here to wait for)."""
    for item in cluster.admin.request("GET", "/api/v1/namespaces")["items"]:
        name = item["metadata"]["name"]
        cluster.admin.request(
            "DELETE", f"/api/v1/namespaces/{name}/pods", {"gracePeriodSeconds": 0}
        )


def cni_store(cluster: KubeCluster) -> KubernetesDatastore:
    """The datastore as the CNI plugin opens it: the CNI identity's kubeconfig."""
    return KubernetesDatastore(KubeClient(KubeAccess.from_kubeconfig(str(cluster.cni_kubeconfig))))


def objects(cluster: KubeCluster, plural: str) -> dict[str, dict[str, Any]]:
    """name → object for one Calico CRD, as `kubectl get <plural> -o json` shows them."""
    items = cluster.admin.request("GET", f"{CRD_V1}/{plural}")["items"]
    return {item["metadata"]["name"]: item for item in items}


def allocations(cluster: KubeCluster) -> dict[str, str]:
    """Every allocated address → its handle, over all IPAMBlocks."""
    owners = {}
    for block in objects(cluster, "ipamblocks").values():
        spec = block["spec"]
        network = ipaddress.ip_network(spec["cidr"])
        for ordinal, index in enumerate(spec["allocations"]):
            if index is not None:
                owners[str(network[ordinal])] = spec["attributes"][index]["handle_id"]
    return owners


def add_pool(cluster: KubeCluster, name: str, cidr: str, **spec: Any) -> None:
    """An IPPool as an operator applies it with kubectl (crd.projectcalico.org/v1)."""
    cluster.admin.create(
        f"{CRD_V1}/ippools",
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "IPPool",
            "metadata": {"name": name},
            "spec": {"cidr": cidr, **spec},
        },
    )


# --------------------------------------------------------- CNI on simulated nodes

NETWORK = "k8s-pod-network"
POD_IP = "cni.projectcalico.org/podIP"
POD_IPS = "cni.projectcalico.org/podIPs"
CONTAINER_ID = "cni.projectcalico.org/containerID"


@contextlib.contextmanager
def reachable_from(cluster: KubeCluster, *nodes: Node) -> Iterator[None]:
    """While open, the API server answers on its own 127.0.0.1:<port> inside each node
    netns (the kubeconfig's server URL and the TLS name work unchanged)."""
    port = int(cluster.server.rsplit(":", 1)[1])
    with LoopbackRelay([port], [node.netns.path for node in nodes]):
        yield


def container_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def k8s_conf(
    cluster: KubeCluster,
    lock_dir: Path,
    version: str = "1.0.0",
    node: str = "node1",
    ipam: dict[str, Any] | None = None,
    kubeconfig: Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The conflist entry Calico's installer writes for the Kubernetes datastore, run as
    the CNI identity (not admin)."""
    return calico_conf(
        version,
        ipam or {"type": "calico-ipam"},
        nodename=node,
        datastore_type="kubernetes",
        kubernetes={"kubeconfig": str(kubeconfig or cluster.cni_kubeconfig)},
        policy={"type": "k8s"},
        ipam_lock_file=str(lock_dir / f"ipam-{node}.lock"),
        **extra,
    )


def pod_annotations(cluster: KubeCluster, namespace: str, pod: str) -> dict[str, str]:
    meta = cluster.admin.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")["metadata"]
    return meta.get("annotations") or {}


def assert_nothing_allocated(cluster: KubeCluster) -> None:
    assert allocations(cluster) == {}
    assert objects(cluster, "ipamhandles") == {}


def ctl(cluster: KubeCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    """`calico <argv>` as an operator runs it: DATASTORE_TYPE=kubernetes KUBECONFIG=..."""
    env = {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(cluster.admin_kubeconfig)}
    return calico_cli(*argv, env=env)


def api_requests(cluster: KubeCluster) -> int:
    """Requests the API server has served, from its own metrics: a difference is the
    round trips made in between (the metrics GET itself counts one)."""
    text = cluster.admin.request("GET", "/metrics")["raw"]
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{")
    )
