"""calico-node's tunnel addresses on a local datastore: allocated through IPAM with
Calico's handles and attributes from the pools that want them, recorded on the Node, kept
across passes, released when no pool wants them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from calico_node.allocateip import TunnelAddresses
from calico_node.felix.model import vtep_mac
from calico_node.syncer import NotReady
from ipam_plugin.engine import IPAM
from libcalico.datastore.base import Datastore, KVPair, NotFound
from libcalico.model import BlockListOptions, HandleKey, IPPool, ResourceKey
from tests.felix.netns_support import node, node_context, pool, store_snapshot


def put(store: Datastore, *items: object) -> None:
    for item in items:
        kind = "IPPool" if isinstance(item, IPPool) else "Node"
        store.create(KVPair(ResourceKey(kind, item.metadata.name), item))  # type: ignore[attr-defined]


def attributes(store: Datastore, ip: str) -> dict[str, str]:
    address = ipaddress.ip_address(ip)
    for kvp in store.list(BlockListOptions()):
        block = kvp.value
        if address in block.cidr:
            return block.attributes[block.allocations[block.ordinal(address)]].secondary
    raise AssertionError(f"{ip} is not allocated")


@pytest.fixture
def setup(tmp_path: Path):
    context = node_context("n1", tmp_path)
    store = context.config.datastore.open()
    put(store, node("n1", "172.31.5.2/24", labels={"zone": "a"}))
    yield context, store
    store.close()


def test_allocated_recorded_kept_released(setup) -> None:
    context, store = setup
    put(
        store,
        pool("vx", "10.65.0.0/16", vxlanMode="Always"),
        pool("ip", "10.66.0.0/16", ipipMode="CrossSubnet"),
        pool("v6", "fd00:65::/48", vxlanMode="CrossSubnet"),
        pool("workloads-only", "10.67.0.0/16", vxlanMode="Always", allowedUses=["Workload"]),
        pool("elsewhere", "10.68.0.0/16", vxlanMode="Always", nodeSelector="zone == 'b'"),
    )
    allocator = TunnelAddresses(context)
    allocator.apply(store_snapshot(store))
    spec = store.get(ResourceKey("Node", "n1")).value.spec
    v4, ipip, v6 = (
        spec["ipv4VXLANTunnelAddr"],
        spec["bgp"]["ipv4IPIPTunnelAddr"],
        spec["ipv6VXLANTunnelAddr"],
    )
    assert ipaddress.ip_address(v4) in ipaddress.ip_network("10.65.0.0/16")
    assert ipaddress.ip_address(ipip) in ipaddress.ip_network("10.66.0.0/16")
    assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:65::/48")
    assert spec["vxlanTunnelMACAddr"] == vtep_mac("n1")
    assert spec["vxlanTunnelMACAddrV6"] == vtep_mac("n1", 6)
    assert attributes(store, v4) == {"node": "n1", "type": "vxlanTunnelAddress"}
    assert attributes(store, ipip) == {"node": "n1", "type": "ipipTunnelAddress"}
    assert attributes(store, v6) == {"node": "n1", "type": "vxlanV6TunnelAddress"}
    for handle in ("vxlan-tunnel-addr-n1", "ipip-tunnel-addr-n1", "vxlan-v6-tunnel-addr-n1"):
        assert sum(store.get(HandleKey(handle)).value.block.values()) == 1

    # Another pass (a restart): the same addresses.
    TunnelAddresses(context).apply(store_snapshot(store, 2))
    again = store.get(ResourceKey("Node", "n1")).value.spec
    assert (again["ipv4VXLANTunnelAddr"], again["bgp"]["ipv4IPIPTunnelAddr"]) == (v4, ipip)

    # Someone released the address by hand: the next pass allocates one again.
    IPAM(store).release_ips([v4])
    allocator.apply(store_snapshot(store, 3))
    again = store.get(ResourceKey("Node", "n1")).value.spec["ipv4VXLANTunnelAddr"]
    assert attributes(store, again) == {"node": "n1", "type": "vxlanTunnelAddress"}

    # The VXLAN pool goes Never: released, the fields cleared; IPIP's stays.
    kvp = store.get(ResourceKey("IPPool", "vx"))
    kvp.value.spec.vxlan_mode = "Never"
    store.update(kvp)
    allocator.apply(store_snapshot(store, 4))
    spec = store.get(ResourceKey("Node", "n1")).value.spec
    assert "ipv4VXLANTunnelAddr" not in spec and "vxlanTunnelMACAddr" not in spec
    assert spec["bgp"]["ipv4IPIPTunnelAddr"] == ipip
    with pytest.raises(NotFound):
        store.get(HandleKey("vxlan-tunnel-addr-n1"))


def test_a_full_pool_is_reported_not_raised(setup) -> None:
    context, store = setup
    put(store, pool("tiny", "10.69.0.0/32", vxlanMode="Always", blockSize=32),
        node("n2", "172.31.5.3/24"))  # fmt: skip
    TunnelAddresses(node_context("n2", context.paths.lib_dir)).apply(store_snapshot(store))
    with pytest.raises(NotReady, match="no vxlanTunnelAddress for node n1"):
        TunnelAddresses(context).apply(store_snapshot(store, 2))
