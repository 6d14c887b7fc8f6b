"""Felix's desired state from a snapshot (pure): which routes, devices, peers, NAT sets and
MTU a node should have, and its settings' precedence and checks."""

from __future__ import annotations

import ipaddress

import pytest

from calico_node.config import ConfigError
from calico_node.felix.config import FelixConfig
from calico_node.felix.model import HostFacts, Route, desired_dataplane, vtep_mac
from tests.felix.netns_support import block, node, pool, snapshot

HOST = HostFacts(host_mtu=1500, parents={4: "eth0"})
NODES = [
    node("n1", "172.31.5.2/24", ipv4VXLANTunnelAddr="10.65.0.0"),
    node("n2", "172.31.5.3/24", ipv4VXLANTunnelAddr="10.65.1.0"),
    node("n3", "172.31.9.3/24"),  # no tunnel address yet: no VTEP
]
BLOCKS = [block("10.65.0.0/26", "n1"), block("10.65.1.0/26", "n2"), block("10.65.2.0/26", "n3")]


def routes_of(dp, version: int = 4) -> set[str]:
    return {str(r) for r in dp.routes[version].values()}


def plan(pools, blocks=BLOCKS, nodes=NODES, backend="vxlan", host=HOST, **config):
    return desired_dataplane(
        snapshot(nodes, pools, blocks), "n1", FelixConfig(**config), backend, host
    )


def test_vtep_mac_is_felix_s() -> None:
    mac = vtep_mac("node1")
    assert mac.startswith("66:") and len(mac) == 17
    assert vtep_mac("node1", 6) != mac and vtep_mac("node1") == mac


def test_vxlan_routes_wait_for_the_peer_s_vtep() -> None:
    dp = plan([pool("vx", "10.65.0.0/16", vxlanMode="Always")])
    assert routes_of(dp) == {
        "blackhole 10.65.0.0/26 proto 80",
        "10.65.1.0/26 via 10.65.1.0 dev vxlan.calico onlink",
    }  # n3's block withheld until n3 has a tunnel address
    assert [v.node for v in dp.vxlan[4].vteps] == ["n2"]
    assert dp.mtu == 1450 and dp.vxlan[4].mtu == 1450


def test_no_tunnel_address_no_device() -> None:
    nodes = [node("n1", "172.31.5.2/24"), NODES[1]]
    dp = plan([pool("vx", "10.65.0.0/16", vxlanMode="Always")], nodes=nodes)
    assert 4 not in dp.vxlan
    assert dp.waiting == ("vxlan.calico: this node has no VXLAN tunnel address yet",)


def test_cross_subnet_needs_the_parent_interface() -> None:
    pools = [pool("vx", "10.65.0.0/16", vxlanMode="CrossSubnet")]
    assert "10.65.1.0/26 via 172.31.5.3 dev eth0 proto 80 onlink" in routes_of(plan(pools))
    no_parent = plan(pools, host=HostFacts(1500))
    assert not [r for r in routes_of(no_parent) if "10.65.1.0/26" in r]


def test_borrowed_addresses_and_tunnel_ips() -> None:
    blocks = [
        block("10.65.0.0/26", "n1", o7="n2"),  # n2 borrowed from our block
        block("10.65.1.0/26", "n2", o0="n2", o9="n1"),  # we borrowed from n2's: ours
        block("10.65.3.0/32", "n2", o0="n2"),  # a /32 block: no blackhole
    ]
    nodes = [NODES[0], node("n2", "172.31.5.3/24", ipv4VXLANTunnelAddr="10.65.3.0")]
    got = routes_of(plan([pool("vx", "10.65.0.0/16", vxlanMode="Always")], blocks, nodes))
    assert got == {
        "blackhole 10.65.0.0/26 proto 80",
        "10.65.0.7/32 via 10.65.3.0 dev vxlan.calico onlink",
        "10.65.1.0/26 via 10.65.3.0 dev vxlan.calico onlink",
        "10.65.3.0/32 dev vxlan.calico",  # the peer's tunnel IP itself: a device route
    }


def test_ipip_and_plain_pools_under_bird() -> None:
    pools = [pool("ip", "10.65.0.0/16", ipipMode="CrossSubnet"), pool("plain", "10.66.0.0/16")]
    blocks = [*BLOCKS, block("10.66.1.0/26", "n2")]
    bird = plan(pools, blocks, backend="bird")
    # BIRD does same-subnet CrossSubnet, blackholes and plain pools; Felix only the tunnel.
    assert routes_of(bird) == {"10.65.2.0/26 via 172.31.9.3 dev tunl0 proto 80 onlink"}
    refused = plan(pools, blocks, backend="bird", host=HostFacts(1500, {4: "eth0"}, False))
    assert routes_of(refused) == set() and refused.ipip is not None
    alone = plan(pools, blocks, backend="none")  # no BIRD: Felix does IPIP's same-subnet too
    assert "10.65.1.0/26 via 172.31.5.3 dev eth0 proto 80 onlink" in routes_of(alone)
    assert "blackhole 10.65.0.0/26 proto 80" in routes_of(alone)
    assert bird.mtu == 1480


def test_nat_sets_and_host_mtu_overrides() -> None:
    pools = [
        pool("a", "10.65.0.0/16", vxlanMode="Always", natOutgoing=True),
        pool("b", "10.66.0.0/16"),
        pool("v6", "fd00:65::/48", vxlanMode="Always"),
    ]
    dp = plan(pools, vxlan_mtu=1300)
    assert dp.nat[4].masquerade == ("10.65.0.0/16",)
    assert dp.nat[4].all_pools == ("10.65.0.0/16", "10.66.0.0/16")
    assert dp.nat[4].hosts == ("172.31.5.2/31", "172.31.9.3/32")  # merged: one set entry
    assert dp.nat[4].tunnel_devices == ("vxlan.calico",)
    assert dp.nat[6].masquerade == () and dp.nat[6].all_pools == ("fd00:65::/48",)
    assert dp.mtu == 1300  # the smallest enabled: IPv4 VXLAN 1300 (IPv6 1430)
    assert plan(pools, ipv6_support=False).nat.keys() == {4}


def test_route_text_is_ip_route_s() -> None:
    net = ipaddress.ip_network("10.0.0.0/26")
    assert str(Route(net)) == "blackhole 10.0.0.0/26"  # proto boot is not shown
    assert str(Route(net, protocol=80)) == "blackhole 10.0.0.0/26 proto 80"


def test_config_precedence_and_checks() -> None:
    env = {"FELIX_VXLANMTU": "1400", "FELIX_IPINIPENABLED": "false"}
    per_node = {"vxlanMTU": 1300, "routeRefreshInterval": "30s", "vxlanPort": 8472}
    default = {"routeRefreshInterval": "1m", "vxlanPort": 1, "mtuIfacePattern": "^ens"}
    config = FelixConfig.resolve(env, default, per_node)
    assert (config.vxlan_mtu, config.ipip_enabled, config.route_refresh_interval) == (
        1400,
        False,
        30.0,
    )
    assert (config.vxlan_port, config.mtu_iface_pattern) == (8472, "^ens")
    with pytest.raises(ConfigError, match="FELIX_VXLANPORT='99999' is out of range"):
        FelixConfig.resolve({"FELIX_VXLANPORT": "99999"}, {}, {})
    with pytest.raises(ConfigError, match="FELIX_IPTABLESNATOUTGOINGINTERFACEFILTER"):
        FelixConfig.resolve({"FELIX_IPTABLESNATOUTGOINGINTERFACEFILTER": "eth0 -j ACCEPT"}, {}, {})
    warned: set[str] = set()
    bad = FelixConfig.resolve({}, {"vxlanMTU": "lots", "vxlanVNI": 7}, {}, warned)
    assert (bad.vxlan_mtu, bad.vxlan_vni) == (0, 7)  # a bad resource value falls back
    assert warned == {"FelixConfiguration default vxlanMTU='lots'"}
    assert FelixConfig().felix_route_protocol == 80
    assert FelixConfig(device_route_protocol=42).felix_route_protocol == 42


def test_a_pool_that_does_not_parse_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    bad = pool("bad", "10.65.0.0/16", vxlanMode="Always")
    bad.spec.cidr = "10.65.0.0/99"  # as a datastore written by something else may hold it
    dp = plan([bad, pool("ok", "10.66.0.0/16", natOutgoing=True)])
    assert dp.nat[4].all_pools == ("10.66.0.0/16",) and 4 not in dp.vxlan
    assert "ignoring IP pool bad" in caplog.text
