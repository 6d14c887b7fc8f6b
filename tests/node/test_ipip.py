"""IPIP on a kernel without ipip: rendered fully, refused clearly, never pretended.

Two nodes in one subnet with BIRD and an ipipMode CrossSubnet pool: each node gets its
IPIP tunnel address from IPAM (Calico's handle and attributes, `bgp.ipv4IPIPTunnelAddr`);
BIRD's config parses (`bird -p`) and routes the same-subnet peer directly, so those pods
reach each other; the tunnel half is refused: in the log, in `-felix-ready`, in
`calicoctl node status` and `calicoctl node checksystem`, and no tunl0 or route through
it exists. With ipipMode Always
nothing can be routed without the tunnel, and BIRD programs nothing for the pool.
"""

from __future__ import annotations

import subprocess

from libcalico.model import HandleKey, ResourceKey
from tests.node.cluster import Cluster
from tests.node.conftest import ClusterFactory

REFUSAL = "IPIP is not supported by this kernel"
POOL = "default-ipv4-ippool"


def set_ipip(cluster: Cluster, mode: str) -> None:
    with cluster.store() as store:
        kvp = store.get(ResourceKey("IPPool", POOL))
        kvp.value.spec.ipip_mode = mode
        store.update(kvp)


def test_ipip_refused_on_this_kernel(clusters: ClusterFactory) -> None:
    cluster = clusters()
    nodes = [cluster.add_node(CALICO_IPV4POOL_IPIP="CrossSubnet") for _ in range(2)]
    cluster.wait(lambda: all(len(cluster.established(n)) == 1 for n in nodes), "the mesh")
    for node in nodes:
        cluster.wait(lambda node=node: REFUSAL in node.log(), f"{node.name}'s refusal")
        ready = node.calico_node("-felix-ready")
        assert ready.returncode == 1 and REFUSAL in ready.stdout, ready
        status = node.calicoctl("node", "status")
        assert status.stdout.splitlines()[1].startswith(f"WARNING: dataplane not ready: {REFUSAL}")
        assert node.netns.link("tunl0") is None
        assert not [r for r in node.routes() if r.get("dev") == "tunl0"]
        check = subprocess.run(["bird", "-p", "-c", str(node.bird_cfg)], capture_output=True)
        assert check.returncode == 0, check.stderr
        assert (
            "bgp_next_hop ~ 172.31.200.0/24" in (node.bird_cfg.parent / "bird_ipam.cfg").read_text()
        )

    check = nodes[0].calicoctl("node", "checksystem")
    assert "this kernel has no ipip (CONFIG_NET_IPIP is not set)" in check.stdout, check
    assert "ipip                \t\t\t\t\tMISSING" in check.stdout

    with cluster.store() as store:
        for node in nodes:
            spec = store.get(ResourceKey("Node", node.name)).value.spec
            address = spec["bgp"]["ipv4IPIPTunnelAddr"]
            handle = store.get(HandleKey(f"ipip-tunnel-addr-{node.name}")).value
            assert sum(handle.block.values()) == 1 and address.startswith("10.244.")

    # CrossSubnet within one subnet needs no tunnel: BIRD routes it, the pods reach.
    pods = [node.add_pod() for node in nodes]
    cluster.wait(lambda: pods[0].ping(pods[1].ip) and pods[1].ping(pods[0].ip), "pod to pod")
    assert any(r.get("gateway") == nodes[1].ip for r in nodes[0].bird_routes().values())

    # Always: every route would need tunl0, so BIRD programs none and Felix has no tunnel.
    set_ipip(cluster, "Always")
    cluster.wait(lambda: not any(r.get("gateway") for r in nodes[0].bird_routes().values()),
                 "BIRD to withdraw the pool's routes")  # fmt: skip
    assert REFUSAL in nodes[0].calico_node("-felix-ready").stdout
