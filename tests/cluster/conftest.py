"""The cluster suites' fixtures: a cluster per module, and the proof that the host looks
the same after it as before."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.cluster import Cluster, kube_cluster
from tests.cluster.node import KUBELET_TUNABLES

# Paths containerd, kubelet, kube-proxy and Calico use by default: on this host they are
# only ever the nodes' own (node.py), so none may appear here.
HOST_PATHS = (
    "/etc/cni",
    "/etc/kubernetes",
    "/opt/cni",
    "/run/containerd",
    "/run/calico",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/calico",
    "/var/log/pods",
    "/var/log/containers",
    "/var/log/calico",
    "/usr/libexec/kubernetes",
)


@dataclass(frozen=True)
class HostState:
    """What a cluster could change on the host: global tunables and default paths."""

    tunables: dict[str, str]
    paths: frozenset[str]

    @classmethod
    def read(cls) -> HostState:
        return cls(
            tunables={t: Path("/proc/sys", t).read_text() for t in KUBELET_TUNABLES},
            paths=frozenset(p for p in HOST_PATHS if os.path.lexists(p)),
        )


@contextmanager
def checked_cluster(directory: Path, nodes: int) -> Iterator[Cluster]:
    """A cluster; on exit, after it stopped, nothing it made is left and the host's
    tunables and default paths are as they were."""
    if os.geteuid() != 0:
        raise AssertionError("the cluster suites need root")
    before = HostState.read()
    with kube_cluster(directory, nodes) as cluster:
        yield cluster
        footprint = cluster.footprint()
    assert HostState.read() == before
    assert [path for path in footprint if os.path.lexists(path)] == []
