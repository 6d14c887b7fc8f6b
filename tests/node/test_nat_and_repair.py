"""natOutgoing and repair, with real calico-node daemons (VXLAN, no BIRD).

natOutgoing: a pod sends to an address in the fabric netns outside every pool and the far
end sees the node's address; pod to pod keeps pod addresses; with natOutgoing off the rule
is gone and the far end sees the pod.

Repair: a route, an FDB entry, a neighbour entry, the VXLAN device and the NAT rule removed
by hand each come back (netlink events for the kernel's tables, the iptables refresh for
the rule), and the daemon's log says what it fixed.
"""

from __future__ import annotations

import itertools
import socket

from libcalico.model import ResourceKey
from tests.felix import kernel
from tests.felix.netns_support import NetnsThread
from tests.harness import Netns, sh
from tests.node.cluster import Cluster, Pod, SimNode
from tests.node.conftest import ClusterFactory

ENV = {
    "CALICO_NETWORKING_BACKEND": "vxlan",
    "CALICO_IPV4POOL_VXLAN": "Always",
    "FELIX_IPTABLESREFRESHINTERVAL": "1",
    # Only netlink events can bring the kernel's tables back within the test's waits.
    "FELIX_ROUTEREFRESHINTERVAL": "3600",
}
FAR_END = "172.31.200.250"
POOL = "default-ipv4-ippool"


def all_reach(pods: list[Pod]) -> bool:
    return all(src.ping(dst.ip) for src, dst in itertools.permutations(pods, 2))


def source_seen(listener_ns: Netns, address: str, sender: Pod) -> str:
    """The source address a UDP listener on `address` in `listener_ns` sees for a datagram
    `sender` sends it."""
    worker = NetnsThread(listener_ns)
    try:
        sock = worker.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        worker.run(sock.bind, (address, 0))
        port = sock.getsockname()[1]
        sock.settimeout(10)
        sender.netns.exec(
            "python3", "-c",
            "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            ".sendto(b'hello', (sys.argv[1], int(sys.argv[2])))",
            address, str(port),
        )  # fmt: skip
        _, (source, _) = sock.recvfrom(64)
        sock.close()
        return source
    finally:
        worker.close()


def set_nat(cluster: Cluster, enabled: bool) -> None:
    with cluster.store() as store:
        kvp = store.get(ResourceKey("IPPool", POOL))
        kvp.value.spec.nat_outgoing = enabled
        store.update(kvp)


def outgoing_rules(node: SimNode) -> list[str]:
    return [r for r in kernel.nat_rules(node.netns) if r.startswith("-A cali-nat-outgoing")]


def test_nat_outgoing_and_repair(clusters: ClusterFactory) -> None:
    cluster = clusters()
    sh("ip", "-n", cluster.fabric.name, "addr", "add", f"{FAR_END}/24", "dev", cluster.bridge)
    # node2 with CALICO_NETWORKING_BACKEND=none: no BIRD either, Felix all the same.
    n1, n2 = (
        cluster.add_node(**ENV),
        cluster.add_node(**{**ENV, "CALICO_NETWORKING_BACKEND": "none"}),
    )
    pods = [n1.add_pod(), n2.add_pod()]
    cluster.wait(lambda: all_reach(pods), "pods to reach each other")
    assert not n2.bird_socket.exists() and kernel.vxlan_link(n2.netns) is not None

    # natOutgoing (the default pool has it): the far end sees the node.
    cluster.wait(lambda: len(outgoing_rules(n1)) == 1, "the natOutgoing rule")
    assert source_seen(cluster.fabric, FAR_END, pods[0]) == n1.ip
    assert source_seen(pods[1].netns, pods[1].ip, pods[0]) == pods[0].ip  # pod to pod: not NATed

    # Repair, each by hand, each back.
    block = next(r for r in kernel.routes(n1.netns) if "dev vxlan.calico" in r and "/26" in r)
    dst = block.split()[0]
    sh("ip", "-n", n1.netns.name, "route", "del", dst)
    cluster.wait(lambda: block in kernel.routes(n1.netns), f"the route {block} to come back")
    # The fix is logged just after it is made: wait for the line too.
    restored = f"restored route {block} (was missing)"
    cluster.wait(lambda: restored in n1.log(), "the repair to be logged")
    ((mac, underlay),) = kernel.fdb(n1.netns).items()
    sh("bridge", "-n", n1.netns.name, "fdb", "del", mac, "dev", "vxlan.calico", "dst", underlay)
    cluster.wait(lambda: kernel.fdb(n1.netns) == {mac: underlay}, "the FDB entry to come back")
    ((peer, lladdr),) = kernel.neighbours(n1.netns).items()
    sh("ip", "-n", n1.netns.name, "neigh", "del", peer, "dev", "vxlan.calico")
    cluster.wait(lambda: kernel.neighbours(n1.netns) == {peer: lladdr}, "the neighbour entry")
    sh("ip", "-n", n1.netns.name, "link", "del", "vxlan.calico")
    cluster.wait(lambda: block in kernel.routes(n1.netns), "the device and its routes")
    cluster.wait(lambda: n1.log().count("created vxlan.calico") == 2, "the re-creation logged")
    cluster.wait(lambda: all_reach(pods), "pods to reach each other again")
    n1.netns.exec("iptables", "-t", "nat", "-F", "cali-nat-outgoing")
    cluster.wait(lambda: len(outgoing_rules(n1)) == 1, "the natOutgoing rule to come back")
    cluster.wait(lambda: "nat chain cali-nat-outgoing rewritten" in n1.log(), "the rewrite logged")

    # natOutgoing off: the rule goes, and the far end sees the pod itself.
    set_nat(cluster, False)
    cluster.wait(lambda: not outgoing_rules(n1) and not outgoing_rules(n2), "the rule removed")
    assert source_seen(cluster.fabric, FAR_END, pods[0]) == pods[0].ip
