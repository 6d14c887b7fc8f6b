"""The seed's section 7, step by step, on three nodes: node A becomes a route reflector
(label `route-reflector: "true"`, `routeReflectorClusterID: 1.1.1.1`), the BGPPeer with
`peerSelector: route-reflector == "true"` is applied, then the BGPConfiguration turns the
mesh off with AS 63400. After each step `calicoctl node status` shows the peer types of
that step, every session is up and every pod reaches every other; at the end B reaches
C's block through the reflector with C's own address as next hop."""

from __future__ import annotations

import itertools
import re
from typing import Any

import yaml

from libcalico.datastore.base import KVPair, NotFound
from libcalico.model import RESOURCE_TYPES, ResourceKey
from tests.node.cluster import Cluster, Pod, SimNode
from tests.node.conftest import ClusterFactory

ROUTE_REFLECTOR_NODE = """
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  name: {name}
  labels:
    route-reflector: "true"
spec:
  bgp:
    ipv4Address: {address}
    routeReflectorClusterID: 1.1.1.1
"""
BGP_PEER = """
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: route-reflector == "true"
"""
BGP_CONFIGURATION = """
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  logSeverityScreen: Info
  nodeToNodeMeshEnabled: false
  asNumber: 63400
"""
ROW = re.compile(
    r"^\| (\S+) +\| (node-to-node mesh|node specific|global) +\| (\S+) +\| \S+ +\| (.+?) +\|$"
)


def apply(cluster: Cluster, document: str) -> None:
    """Create or replace one resource, as `calicoctl apply` does."""
    doc: dict[str, Any] = yaml.safe_load(document)
    resource = RESOURCE_TYPES[doc["kind"]].from_json(doc)
    key = ResourceKey(doc["kind"], doc["metadata"]["name"])
    with cluster.store() as store:
        try:
            current = store.get(key)
        except NotFound:
            store.create(KVPair(key, resource))
            return
        store.update(KVPair(key, resource, current.revision))


def peer_table(node: SimNode) -> dict[str, tuple[str, str, str]]:
    """`calicoctl node status` on `node`: peer address -> (type, state, info)."""
    out = node.calicoctl("node", "status")
    assert out.returncode == 0, out
    return {m[1]: (m[2], m[3], m[4]) for line in out.stdout.splitlines() if (m := ROW.match(line))}


def shows(node: SimNode, expected: dict[str, str]) -> bool:
    """Whether node status lists exactly `expected` (address -> type), all up/Established."""
    table = peer_table(node)
    return {a: t for a, (t, _, _) in table.items()} == expected and all(
        state == "up" and info == "Established" for _, state, info in table.values()
    )


def all_reach(pods: list[Pod]) -> bool:
    return all(src.ping(dst.ip) for src, dst in itertools.permutations(pods, 2))


def test_seed_section_7_route_reflector(clusters: ClusterFactory) -> None:
    cluster = clusters()
    a, b, c = (cluster.add_node() for _ in range(3))
    pods = [node.add_pod() for node in (a, b, c)]
    mesh, node_specific = "node-to-node mesh", "node specific"
    cluster.wait(lambda: shows(b, {a.ip: mesh, c.ip: mesh}), "the full mesh")
    cluster.wait(lambda: not cluster.routing_problems(), "routes")
    assert all_reach(pods)

    # 1. A becomes a route reflector: nobody is cut off while no BGPPeer exists yet.
    apply(cluster, ROUTE_REFLECTOR_NODE.format(name=a.name, address=f"{a.ip}/{a.prefix}"))
    cluster.wait(lambda: "cluster ID 1.1.1.1" in a.bird_cfg.read_text(), "A's config")
    cluster.wait(lambda: shows(b, {a.ip: mesh, c.ip: mesh}), "B still meshed with A")
    cluster.wait(lambda: all_reach(pods), "pods after step 1")

    # 2. The BGPPeer: every node peers with the reflector, which has them as clients.
    apply(cluster, BGP_PEER)
    cluster.wait(lambda: shows(b, {a.ip: node_specific, c.ip: mesh}), "B: A node specific")
    cluster.wait(lambda: shows(a, {b.ip: node_specific, c.ip: node_specific}), "A: its clients")
    assert "rr client;" in a.bird_cfg.read_text()
    cluster.wait(lambda: not cluster.routing_problems(), f"routes: {cluster.routing_problems()}")
    cluster.wait(lambda: all_reach(pods), "pods after step 2")

    # 3. The mesh off, AS 63400: B and C only peer with A, and learn each other through it.
    apply(cluster, BGP_CONFIGURATION)
    for client in (b, c):
        cluster.wait(lambda n=client: shows(n, {a.ip: node_specific}), f"{client.name}: only A")
    cluster.wait(lambda: shows(a, {b.ip: node_specific, c.ip: node_specific}), "A: its clients")
    assert "local as 63400;" in b.bird_cfg.read_text()
    assert "# Node-to-node mesh disabled" in b.bird_cfg.read_text()
    cluster.wait(
        lambda: not cluster.routing_problems(), f"reflected routes: {cluster.routing_problems()}"
    )
    c_block = cluster.affine_blocks()[c.name][0]
    assert b.bird_routes()[c_block]["gateway"] == c.ip  # the originator's next hop, not A's
    learnt = b.birdc(f"show route {c_block} all").stdout
    assert "BGP.originator_id" in learnt and "BGP.cluster_list: 1.1.1.1" in learnt
    assert all_reach(pods)
