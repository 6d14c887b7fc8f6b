"""Fixtures for the calico-node suites: simulated clusters on each datastore, and the
check that a cluster leaves nothing behind (no daemon, no BIRD, no netns)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.etcd_fixture import EtcdCluster, start_etcd
from tests.node.cluster import Cluster

ClusterFactory = Callable[..., Cluster]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the calico-node suites need root (network namespaces, BIRD)")
    for tool in ("bird", "birdc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            pytest.fail(f"{tool} is missing: scripts/install-deps test installs bird2")


def processes_under(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (the cluster's directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in argv:
            found.append(f"{pid}: {argv}")
    return found


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


@pytest.fixture
def clusters() -> Iterator[ClusterFactory]:
    """make a local-datastore cluster: clusters(); each is destroyed and checked after."""
    yield from _clusters(Cluster.local)
