"""Fixtures for the calico-node suites: simulated clusters on each datastore, and the
check that a cluster leaves nothing behind (no daemon, no BIRD, no netns)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.etcd_fixture import EtcdCluster, start_etcd
from tests.k8s.fixture import KubeCluster, apiserver_available, kube_apiserver
from tests.node.cluster import Cluster, processes_under

ClusterFactory = Callable[..., Cluster]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the calico-node suites need root (network namespaces, BIRD)")
    for tool in ("bird", "birdc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            pytest.fail(f"{tool} is missing: scripts/install-deps test installs bird2")


def assert_left_nothing(cluster: Cluster) -> None:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ours = [n.netns.name for n in cluster.nodes] + [cluster.fabric.name]
    ours += [p.netns.name for n in cluster.nodes for p in n.pods]
    assert not [n for n in ours if n in namespaces], namespaces
    assert not processes_under(cluster.home)


def _clusters(make: Callable[..., Cluster]) -> Iterator[ClusterFactory]:
    made: list[Cluster] = []

    def factory(**kw: object) -> Cluster:
        cluster = make(**kw)
        made.append(cluster)
        return cluster

    yield factory
    for cluster in made:
        cluster.destroy()
        assert_left_nothing(cluster)


@pytest.fixture(scope="module")
def module_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield etcd
    etcd.stop()


def etcd_cluster(etcd: EtcdCluster, **kw: object) -> Cluster:
    env = {"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": etcd.endpoint}
    conf = {"datastore_type": "etcdv3", "etcd_endpoints": etcd.endpoint}
    ports = [member.client_port for member in etcd.members]
    return Cluster(env, conf, relay_ports=ports, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def module_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    if not apiserver_available():
        pytest.fail("kube-apiserver not built: scripts/install-deps test builds it")
    with kube_apiserver(tmp_path_factory.mktemp("kube")) as kube:
        yield kube


@dataclass
class FakeKubelet:
    """Nodes as kubelet registers them, pods as the scheduler places them."""

    kube: KubeCluster

    def register_node(self, name: str) -> None:
        self.kube.create_node(name)

    def register_pod(self, name: str, node: str) -> None:
        self.kube.create_pod("default", name, node)

    def remove_node(self, name: str) -> None:
        self.kube.admin.request("DELETE", f"/api/v1/nodes/{name}")


def kube_cluster(kube: KubeCluster, **kw: object) -> Cluster:
    """calico-node with its own identity (conf/calico-node-rbac.yaml), the CNI with its."""
    env = {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(kube.node_kubeconfig)}
    conf = {
        "datastore_type": "kubernetes",
        "kubernetes": {"kubeconfig": str(kube.cni_kubeconfig)},
        "policy": {"type": "k8s"},
    }
    port = int(kube.server.rsplit(":", 1)[1])
    admin = {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(kube.admin_kubeconfig)}
    return Cluster(
        env, conf, relay_ports=[port], kubelet=FakeKubelet(kube), operator_env=admin, **kw
    )  # type: ignore[arg-type]


@pytest.fixture
def clusters() -> Iterator[ClusterFactory]:
    """make a local-datastore cluster: clusters(); each is destroyed and checked after."""
    yield from _clusters(Cluster.local)


@pytest.fixture
def etcd_clusters(module_etcd: EtcdCluster) -> Iterator[ClusterFactory]:
    """Clusters on the module's etcd, emptied first; destroyed and checked after."""
    module_etcd.wipe()
    yield from _clusters(lambda **kw: etcd_cluster(module_etcd, **kw))


@pytest.fixture
def kube_clusters(module_kube: KubeCluster) -> Iterator[ClusterFactory]:
    """Clusters on the module's API server; destroyed and checked after."""
    yield from _clusters(lambda **kw: kube_cluster(module_kube, **kw))
