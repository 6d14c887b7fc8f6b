"""VXLAN CrossSubnet across a router: node1 and node2 share a subnet, node3 sits behind the
fabric's router in another. Same-subnet traffic crosses the fabric as plain IP with pod
addresses, cross-subnet traffic as VXLAN between node addresses. Switching the pool to
Always live moves node2's block into the tunnel while a ping stream runs, with a bounded
gap; switching back takes it out again."""

from __future__ import annotations

import ipaddress
import itertools
import re
import subprocess

from libcalico.model import ResourceKey
from tests.felix import kernel
from tests.felix.capture import fabric_capture
from tests.node.cluster import Cluster, Pod, SimNode
from tests.node.conftest import ClusterFactory

ENV = {"CALICO_NETWORKING_BACKEND": "vxlan", "CALICO_IPV4POOL_VXLAN": "CrossSubnet"}
POOL = "default-ipv4-ippool"
STREAM = 150  # pings, 0.1 s apart
MAX_GAP = 50  # consecutive losses the switch may cost (a generous bound, not a speed check)


def all_reach(pods: list[Pod]) -> bool:
    return all(src.ping(dst.ip) for src, dst in itertools.permutations(pods, 2))


def set_mode(cluster: Cluster, mode: str) -> None:
    with cluster.store() as store:
        kvp = store.get(ResourceKey("IPPool", POOL))
        kvp.value.spec.vxlan_mode = mode
        store.update(kvp)


def block_route(node: SimNode, pod: Pod) -> str:
    """node's route to the block holding `pod`."""
    ip = ipaddress.ip_address(pod.ip)
    for route in kernel.routes(node.netns):
        dst = route.split()[0]
        if dst.endswith("/26") and ip in ipaddress.ip_network(dst):
            return route
    return ""


def largest_gap(output: str, sent: int) -> int:
    got = sorted({int(n) for n in re.findall(r"icmp_seq=(\d+)", output)})
    marks = [0, *got, sent + 1]
    return max(b - a - 1 for a, b in itertools.pairwise(marks))


def test_cross_subnet_and_a_live_switch(clusters: ClusterFactory) -> None:
    cluster = clusters()
    far = cluster.add_subnet("172.31.201.0/24")
    n1, n2 = cluster.add_node(**ENV), cluster.add_node(**ENV)
    n3 = cluster.add_node(subnet=far, **ENV)
    assert n3.ip == "172.31.201.1"
    pods = [n.add_pod() for n in (n1, n2, n3)]
    cluster.wait(lambda: all_reach(pods), "pods to reach each other")
    assert re.fullmatch(rf"\S+ via {n2.ip} dev eth0 proto 80 onlink", block_route(n1, pods[1]))
    assert re.fullmatch(r"\S+ via \S+ dev vxlan.calico onlink", block_route(n1, pods[2]))

    with fabric_capture(cluster.fabric) as packets:
        assert pods[0].ping(pods[1].ip) and pods[0].ping(pods[2].ip)
    plain = [p for p in packets if (p.src, p.dst) == (pods[0].ip, pods[1].ip)]
    assert plain and all(p.protocol == 1 for p in plain)  # ICMP with pod addresses
    tunnelled = [p for p in packets if (p.src, p.dst) == (n1.ip, n3.ip)]
    assert tunnelled and all((p.dport, p.vni) == (4789, 4096) for p in tunnelled)
    assert {p.inner for p in tunnelled} == {(pods[0].ip, pods[2].ip)}
    assert not [p for p in packets if (p.src, p.dst) == (pods[0].ip, pods[2].ip)]

    # Live: Always, while pod1 pings pod2; then back to CrossSubnet.
    stream = subprocess.Popen(
        ["nsenter", f"--net={pods[0].netns.path}", "ping", "-i", "0.1", "-c", str(STREAM),
         "-W", "1", pods[1].ip],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        set_mode(cluster, "Always")
        cluster.wait(lambda: "vxlan.calico" in block_route(n1, pods[1]), "the switch to Always")
        cluster.wait(lambda: "vxlan.calico" in block_route(n2, pods[0]), "node2's switch")
        output, _ = stream.communicate(timeout=STREAM * 0.1 + 60)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    gap = largest_gap(output, STREAM)
    assert gap <= MAX_GAP, f"the switch lost {gap} pings in a row:\n{output[-2000:]}"
    assert all_reach(pods)
    set_mode(cluster, "CrossSubnet")
    cluster.wait(lambda: "dev eth0 proto 80" in block_route(n1, pods[1]), "back to CrossSubnet")
    assert all_reach(pods)
