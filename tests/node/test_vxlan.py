"""VXLAN as calico-node runs it without BIRD (CALICO_NETWORKING_BACKEND=vxlan): three
nodes, a vxlanMode Always pool; pods on every node reach pods on every other; the fabric
carries nothing between the nodes but VXLAN (UDP 4789, VNI 4096) among node addresses;
the tunnel addresses are IPAM allocations `calicoctl ipam show` counts; the MTU file and a
new pod's interface say 1450 on the 1500 underlay; the node is ready; `calico-node
-uninstall` on a stopped node leaves none of it."""

from __future__ import annotations

import itertools
import json

from libcalico.model import HandleKey, ResourceKey
from tests.felix import kernel
from tests.felix.capture import fabric_capture
from tests.node.cluster import Cluster, Pod, SimNode
from tests.node.conftest import ClusterFactory

VXLAN_ENV = {"CALICO_NETWORKING_BACKEND": "vxlan", "CALICO_IPV4POOL_VXLAN": "Always"}


def all_reach(pods: list[Pod]) -> bool:
    return all(src.ping(dst.ip) for src, dst in itertools.permutations(pods, 2))


def tunnel_address(cluster: Cluster, node: SimNode) -> str:
    with cluster.store() as store:
        return store.get(ResourceKey("Node", node.name)).value.spec.get("ipv4VXLANTunnelAddr", "")


def vxlan_up(cluster: Cluster, nodes: list[SimNode]) -> bool:
    """Every node has its tunnel address, its device with it, and an FDB entry per peer."""
    for node in nodes:
        address = tunnel_address(cluster, node)
        link = kernel.vxlan_link(node.netns)
        if not address or link is None or not link["up"]:
            return False
        if kernel.addresses(node.netns, "vxlan.calico") != [f"{address}/32"]:
            return False
        if len(kernel.fdb(node.netns)) != len(nodes) - 1:
            return False
    return True


def test_vxlan_always_three_nodes(clusters: ClusterFactory) -> None:
    cluster = clusters(pod_mtu=None)
    nodes = [cluster.add_node(**VXLAN_ENV) for _ in range(3)]
    cluster.wait(lambda: vxlan_up(cluster, nodes), "the VXLAN devices and peers")
    for node in nodes:
        link = kernel.vxlan_link(node.netns)
        assert (link["vni"], link["port"], link["local"], link["mtu"]) == (
            4096,
            4789,
            node.ip,
            1450,
        )
        assert not node.bird_socket.exists()
        assert "no need to run a BGP daemon" in node.log()

    pods = [node.add_pod() for node in nodes]
    cluster.wait(lambda: all_reach(pods), "pods to reach each other over VXLAN")
    with fabric_capture(cluster.fabric) as packets:
        assert all_reach(pods)
    node_ips = {n.ip for n in nodes}
    pod_ips = {p.ip for p in pods}
    between_nodes = [p for p in packets if p.src in node_ips and p.dst in node_ips]
    assert between_nodes, "nothing crossed the fabric"
    for packet in between_nodes:
        assert (packet.protocol, packet.dport, packet.vni) == (17, 4789, 4096), packet
    assert {p.inner for p in between_nodes} >= {
        (a.ip, b.ip) for a, b in itertools.permutations(pods, 2)
    }
    assert not [p for p in packets if p.src in pod_ips or p.dst in pod_ips], (
        "pod addresses on the wire"
    )

    # The tunnel addresses: Calico's handles and attributes, counted by ipam show.
    with cluster.store() as store:
        for node in nodes:
            handle = store.get(HandleKey(f"vxlan-tunnel-addr-{node.name}"))
            assert sum(handle.value.block.values()) == 1
    show = nodes[0].calicoctl("ipam", "show")
    assert show.returncode == 0, show.stderr
    pool_row = next(line for line in show.stdout.splitlines() if "IP Pool" in line)
    assert "| 6 (0%)" in pool_row, show.stdout  # three pods, three tunnel addresses
    check = nodes[0].calicoctl("ipam", "check")
    assert "Found 3 node tunnel IPs." in check.stdout and "found 0 problems" in check.stdout, (
        check.stdout
    )

    # MTU: the file, and a new pod's interface, from the 1500 underlay less VXLAN's 50.
    for node in nodes:
        assert (node.lib_dir / "mtu").read_text() == "1450"
    new_pod = nodes[0].add_pod()
    link = json.loads(new_pod.netns.exec("ip", "-j", "link", "show", "eth0").stdout)[0]
    assert link["mtu"] == 1450
    ready = nodes[0].calico_node("-felix-ready")
    assert ready.returncode == 0, ready

    # Uninstall: refused while calico-node runs; the dataplane survives a stop; then gone.
    refused = nodes[0].calico_node("-uninstall")
    assert refused.returncode == 1 and "stop it first" in refused.stderr, refused
    assert nodes[0].stop() == 0
    ns = nodes[0].netns
    assert kernel.vxlan_link(ns) is not None and (nodes[0].lib_dir / "mtu").exists()
    done = nodes[0].calico_node("-uninstall")
    assert done.returncode == 0 and "removed vxlan.calico" in done.stdout, done
    assert kernel.vxlan_link(ns) is None
    assert not [r for r in kernel.routes(ns) if "proto 80" in r or "vxlan" in r]
    assert not [r for r in kernel.nat_rules(ns) if "cali" in r]
    assert not [s for s in kernel.ipsets(ns) if s.startswith("cali")]
    assert not (nodes[0].lib_dir / "mtu").exists()
    assert not (nodes[0].lib_dir / "nodename").exists()
