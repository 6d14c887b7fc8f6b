"""What the Kubernetes-datastore tests share: a running API server per module, wiping
Calico's objects between tests, and the CRD objects read back as an operator sees them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from ipam_plugin.datastore.k8s_client import KubeAccess, KubeClient
from ipam_plugin.datastore.kubernetes import KubernetesDatastore
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
