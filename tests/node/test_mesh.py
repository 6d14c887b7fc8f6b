"""Full mesh on each datastore: three simulated nodes, each with its calico-node and BIRD.

Pods on every node reach pods on every other node; each node's kernel has one `proto bird`
route per other node's block via that node and a blackhole for its own, no /32 but a
borrowed address's; a new block (second pool) is routed, a released one no longer; a node
removed from the datastore is withdrawn everywhere; a stopped cluster leaves nothing.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Callable

from libcalico.model import ResourceKey
from tests.node.cluster import Cluster, Pod, SimNode
from tests.node.conftest import ClusterFactory

MESH_ROW = re.compile(
    r"^\| (\S+) +\| node-to-node mesh \| up +\| \d\d:\d\d:\d\d \| Established \|$"
)


def disable_pool(cluster: Cluster, name: str) -> None:
    with cluster.store() as store:
        kvp = store.get(ResourceKey("IPPool", name))
        kvp.value.spec.disabled = True
        store.update(kvp)


def in_pool(name: str) -> dict[str, object]:
    return {"type": "calico-ipam", "ipv4_pools": [name]}


def all_reach(pods: list[Pod]) -> bool:
    return all(src.ping(dst.ip) for src, dst in itertools.permutations(pods, 2))


def converged(
    cluster: Cluster, nodes: list[SimNode] | None = None, **kw: object
) -> Callable[[], bool]:
    return lambda: not cluster.routing_problems(nodes, **kw)  # type: ignore[arg-type]


def run_mesh(cluster: Cluster) -> None:
    nodes = [cluster.add_node() for _ in range(3)]
    cluster.wait(lambda: all(len(cluster.established(n)) == 2 for n in nodes), "the mesh sessions")

    # One pod per node: one block each, routed everywhere.
    pods = [node.add_pod() for node in nodes]
    cluster.wait(converged(cluster), f"routes: {cluster.routing_problems()}")
    assert all_reach(pods)
    for node in nodes:
        check = subprocess.run(
            ["bird", "-p", "-c", str(node.bird_cfg)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr

    status = nodes[0].calicoctl("node", "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[:3] == ["Calico process is running.", "", "IPv4 BGP status"]
    peers = {m.group(1) for line in lines if (m := MESH_ROW.match(line))}
    assert peers == {nodes[1].ip, nodes[2].ip}
    assert lines[-3:] == ["IPv6 BGP status", "No IPv6 peers found.", ""]
    ready = nodes[0].calico_node("-felix-ready", "-bird-ready")
    assert ready.returncode == 0 and "established = 2" in ready.stdout, ready

    # A second pool: a new block on node2, reachable from the others.
    cluster.add_pool("second", "10.245.0.0/16", blockSize=26)
    second = nodes[1].add_pod(in_pool("second"))
    cluster.wait(converged(cluster), f"the second pool's block: {cluster.routing_problems()}")
    assert pods[0].ping(second.ip) and pods[2].ping(second.ip)

    # A pool of one block: node3 borrows an address of node1's block, routed as a /32.
    cluster.add_pool("tiny", "10.246.0.0/26", blockSize=26)
    nodes[0].add_pod(in_pool("tiny"))
    borrowed = nodes[2].add_pod(in_pool("tiny"))
    assert borrowed.ip.startswith("10.246.0.")
    cluster.wait(
        converged(cluster, borrowed={borrowed.ip: nodes[2]}),
        f"the borrowed address: {cluster.routing_problems(borrowed={borrowed.ip: nodes[2]})}",
    )
    assert pods[0].ping(borrowed.ip) and pods[1].ping(borrowed.ip)

    # The second pool's block released (pool disabled, last pod gone): no longer routed.
    disable_pool(cluster, "second")
    nodes[1].delete_pod(second)
    assert "10.245.0.0/16" not in str(cluster.affine_blocks())
    cluster.wait(
        converged(cluster, borrowed={borrowed.ip: nodes[2]}),
        f"the released block: {cluster.routing_problems(borrowed={borrowed.ip: nodes[2]})}",
    )

    # node3 removed from the datastore: withdrawn everywhere.
    if cluster.kubelet is not None:
        cluster.kubelet.remove_node(nodes[2].name)  # the cluster's Node goes
    else:
        with cluster.store() as store:
            store.delete(store.get(ResourceKey("Node", nodes[2].name)))
    survivors = nodes[:2]
    cluster.wait(
        converged(cluster, survivors), f"node3 withdrawn: {cluster.routing_problems(survivors)}"
    )
    for node in survivors:
        assert not [r for r in node.bird_routes().values() if r.get("gateway") == nodes[2].ip]
    assert all_reach(pods[:2])

    # A clean stop: each daemon exits 0 and takes its BIRD with it; the routes stay.
    routes_before = nodes[0].bird_routes()
    for node in nodes:
        assert node.stop() == 0, node.log()[-3000:]
        assert node.bird_pid() is None
        assert not (node.run_dir / "cni-agent.sock").exists()
        assert not node.bird_socket.exists()
    assert nodes[0].bird_routes() == routes_before


def test_full_mesh_local(clusters: ClusterFactory) -> None:
    run_mesh(clusters())


def test_full_mesh_etcd(etcd_clusters: ClusterFactory) -> None:
    run_mesh(etcd_clusters())


def test_full_mesh_kubernetes(kube_clusters: ClusterFactory) -> None:
    run_mesh(kube_clusters())
