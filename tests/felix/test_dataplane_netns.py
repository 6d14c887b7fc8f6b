"""Felix's managers against a real netns: what `apply` programs, read back from the kernel,
for VXLAN (device, FDB, neighbours, routes, borrowed IPs, blackholes), CrossSubnet, MTU,
natOutgoing and IPIP's refusal; and what one pass puts back after someone tampered (the
netlink monitor tells it the kernel changed; the iptables refresh finds the NAT rule)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import pytest

from calico_node.felix.dataplane import Felix, uninstall
from calico_node.felix.model import vtep_mac
from calico_node.syncer import NotReady
from tests.felix import kernel
from tests.felix.conftest import LoneNode
from tests.felix.netns_support import block, node, node_context, pool, snapshot
from tests.harness import sh

N2_MAC = "66:aa:bb:cc:dd:02"


def cluster(mode: str = "Always", nat: bool = True, **pool_spec: object):
    """n1 (this node) and n2 in 172.31.5.0/24, n3 in another subnet; one VXLAN pool; n3
    borrowed 10.65.1.5 from n2's block."""
    nodes = [
        node("n1", "172.31.5.2/24", ipv4VXLANTunnelAddr="10.65.0.0"),
        node("n2", "172.31.5.3/24", ipv4VXLANTunnelAddr="10.65.1.0", vxlanTunnelMACAddr=N2_MAC),
        node("n3", "172.31.9.3/24", ipv4VXLANTunnelAddr="10.65.2.1"),
    ]
    pools = [pool("vx", "10.65.0.0/16", vxlanMode=mode, natOutgoing=nat, **pool_spec)]
    blocks = [
        block("10.65.0.0/26", "n1", o0="n1"),
        block("10.65.1.0/26", "n2", o0="n2", o5="n3"),
        block("10.65.2.0/26", "n3", o1="n3"),
    ]
    return nodes, pools, blocks


def felix_for(lone: LoneNode, **env: str) -> Felix:
    return lone.worker.run(lambda: Felix(node_context("n1", lone.lib_dir, env)))


def apply(lone: LoneNode, felix: Felix, snap) -> None:
    lone.worker.run(felix.apply, snap)


def test_vxlan_always_programs_device_peers_routes_and_mtu(lone_node: LoneNode) -> None:
    felix = felix_for(lone_node)
    apply(lone_node, felix, snapshot(*cluster()))
    ns = lone_node.netns
    link = kernel.vxlan_link(ns)
    assert link == {
        "mtu": 1450, "mac": vtep_mac("n1"), "up": True, "vni": 4096, "port": 4789,
        "local": "172.31.5.2", "learning": False, "parent": "eth0",
    }  # fmt: skip
    assert kernel.addresses(ns, "vxlan.calico") == ["10.65.0.0/32"]
    assert kernel.neighbours(ns) == {"10.65.1.0": N2_MAC, "10.65.2.1": vtep_mac("n3")}
    assert kernel.fdb(ns) == {N2_MAC: "172.31.5.3", vtep_mac("n3"): "172.31.9.3"}
    assert kernel.routes(ns) == {
        "blackhole 10.65.0.0/26 proto 80",
        "10.65.1.0/26 via 10.65.1.0 dev vxlan.calico onlink",
        "10.65.2.0/26 via 10.65.2.1 dev vxlan.calico onlink",
        "10.65.1.5 via 10.65.2.1 dev vxlan.calico onlink",  # borrowed by n3
    }
    assert (lone_node.lib_dir / "mtu").read_text() == "1450"
    assert oct((lone_node.lib_dir / "mtu").stat().st_mode & 0o777) == "0o644"


def test_cross_subnet_routes_same_subnet_peers_directly(lone_node: LoneNode) -> None:
    felix = felix_for(lone_node)
    apply(lone_node, felix, snapshot(*cluster("CrossSubnet")))
    assert kernel.routes(lone_node.netns) == {
        "blackhole 10.65.0.0/26 proto 80",
        "10.65.1.0/26 via 172.31.5.3 dev eth0 proto 80 onlink",  # same subnet: no tunnel
        "10.65.2.0/26 via 10.65.2.1 dev vxlan.calico onlink",
        "10.65.1.5 via 10.65.2.1 dev vxlan.calico onlink",
    }
    # The pool switched live to Always: n2's block moves into the tunnel.
    nodes, pools, blocks = cluster("Always")
    apply(lone_node, felix, snapshot(nodes, pools, blocks, generation=2))
    assert "10.65.1.0/26 via 10.65.1.0 dev vxlan.calico onlink" in kernel.routes(lone_node.netns)


def test_one_pass_repairs_what_was_removed_or_changed(
    lone_node: LoneNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="felix")
    felix = felix_for(lone_node, FELIX_IPTABLESREFRESHINTERVAL="0.01")
    kicks = threading.Semaphore(0)
    felix.request_apply = kicks.release  # type: ignore[method-assign] (a runner's kick)
    snap = snapshot(*cluster())
    apply(lone_node, felix, snap)
    ns = lone_node.netns
    before = (kernel.routes(ns), kernel.fdb(ns), kernel.neighbours(ns), kernel.nat_rules(ns))
    sh("ip", "-n", ns.name, "route", "del", "10.65.2.0/26")
    sh("ip", "-n", ns.name, "route", "replace", "10.65.1.0/26", "via", "172.31.5.1", "dev", "eth0")
    sh("bridge", "-n", ns.name, "fdb", "del", N2_MAC, "dev", "vxlan.calico", "dst", "172.31.5.3")
    sh("ip", "-n", ns.name, "neigh", "del", "10.65.2.1", "dev", "vxlan.calico")
    ns.exec("iptables", "-t", "nat", "-F", "cali-nat-outgoing")  # no event: the refresh
    assert kicks.acquire(timeout=30), "the netlink monitor saw nothing"
    apply(lone_node, felix, replace(snap, generation=2))
    assert (
        kernel.routes(ns),
        kernel.fdb(ns),
        kernel.neighbours(ns),
        kernel.nat_rules(ns),
    ) == before
    assert "restored route 10.65.2.0/26 via 10.65.2.1 dev vxlan.calico onlink (was missing)" in (
        caplog.text
    )
    assert (
        "restored route 10.65.1.0/26 via 10.65.1.0 dev vxlan.calico onlink (was 10.65.1.0/26 via"
        in caplog.text
    )
    # The device itself, deleted: recreated with its address, peers and routes.
    while kicks.acquire(blocking=False):
        pass
    sh("ip", "-n", ns.name, "link", "del", "vxlan.calico")
    assert kicks.acquire(timeout=30), "the netlink monitor missed the device's removal"
    apply(lone_node, felix, replace(snap, generation=3))
    assert kernel.vxlan_link(ns)["vni"] == 4096
    assert (kernel.routes(ns), kernel.fdb(ns), kernel.neighbours(ns)) == before[:3]
    lone_node.worker.run(felix.stop)


def test_nat_outgoing_chains_and_sets(lone_node: LoneNode) -> None:
    felix = felix_for(lone_node)
    apply(lone_node, felix, snapshot(*cluster()))
    ns = lone_node.netns
    rules = kernel.nat_rules(ns)
    assert any("POSTROUTING" in r and "-j cali-POSTROUTING" in r for r in rules), rules
    outgoing = [r for r in rules if r.startswith("-A cali-nat-outgoing")]
    assert len(outgoing) == 1
    assert "--match-set cali40masq-ipam-pools src" in outgoing[0]
    assert "! --match-set cali40all-ipam-pools dst" in outgoing[0]
    assert "-j MASQUERADE" in outgoing[0]
    assert kernel.ipsets(ns)["cali40masq-ipam-pools"] == {"10.65.0.0/16"}
    nodes, pools, blocks = cluster(nat=False)
    apply(lone_node, felix, snapshot(nodes, pools, blocks, generation=2))
    assert not [r for r in kernel.nat_rules(ns) if r.startswith("-A cali-nat-outgoing")]
    assert kernel.ipsets(ns)["cali40masq-ipam-pools"] == set()


def test_ipip_is_refused_clearly_on_this_kernel(lone_node: LoneNode) -> None:
    felix = felix_for(lone_node)
    nodes = [node("n1", "172.31.5.2/24"), node("n2", "172.31.9.3/24")]
    snap = snapshot(nodes, [pool("ip", "10.66.0.0/16", ipipMode="Always")],
                    [block("10.66.1.0/26", "n2", o0="n2")])  # fmt: skip
    with pytest.raises(NotReady, match=r"IPIP is not supported by this kernel.*pool ip "):
        apply(lone_node, felix, snap)
    assert lone_node.netns.link("tunl0") is None
    assert not [r for r in kernel.routes(lone_node.netns) if "tunl0" in r]


def test_uninstall_leaves_nothing(lone_node: LoneNode) -> None:
    felix = felix_for(lone_node)
    apply(lone_node, felix, snapshot(*cluster()))
    lone_node.worker.run(felix.stop)
    removed = lone_node.worker.run(uninstall, lone_node.lib_dir, {})
    ns = lone_node.netns
    assert removed
    assert kernel.vxlan_link(ns) is None
    assert kernel.routes(ns) == set()
    assert not [r for r in kernel.nat_rules(ns) if "cali" in r]
    assert not [s for s in kernel.ipsets(ns) if s.startswith("cali")]
    assert not (lone_node.lib_dir / "mtu").exists()


def test_ipv6_vxlan(lone_node: LoneNode) -> None:
    ns = lone_node.netns
    sh("ip", "-n", ns.name, "-6", "addr", "add", "fd00:5::2/64", "dev", "eth0", "nodad")
    nodes = [
        node("n1", "fd00:5::2/64", ipv6VXLANTunnelAddr="fd00:65::"),
        node("n2", "fd00:5::3/64", ipv6VXLANTunnelAddr="fd00:65::40"),
    ]
    pools = [pool("v6", "fd00:65::/48", vxlanMode="Always")]
    blocks = [block("fd00:65::/122", "n1", o0="n1"), block("fd00:65::40/122", "n2", o0="n2")]
    felix = felix_for(lone_node)
    apply(lone_node, felix, snapshot(nodes, pools, blocks))
    link = kernel.vxlan_link(ns, "vxlan-v6.calico")
    assert (link["vni"], link["local"], link["mtu"], link["mac"]) == (
        4096, "fd00:5::2", 1430, vtep_mac("n1", 6),
    )  # fmt: skip
    assert kernel.vxlan_link(ns) is None  # no IPv4 VXLAN pool: no vxlan.calico
    assert kernel.addresses(ns, "vxlan-v6.calico") == ["fd00:65::/128"]
    assert kernel.neighbours(ns, "vxlan-v6.calico", 6) == {"fd00:65::40": vtep_mac("n2", 6)}
    assert kernel.fdb(ns, "vxlan-v6.calico") == {vtep_mac("n2", 6): "fd00:5::3"}
    assert kernel.routes(ns, 6) == {
        "blackhole fd00:65::/122 dev lo proto 80 metric 1024 pref medium",
        "fd00:65::40/122 via fd00:65::40 dev vxlan-v6.calico metric 1024 onlink pref medium",
    }
    assert (lone_node.lib_dir / "mtu").read_text() == "1430"
