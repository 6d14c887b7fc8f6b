"""The dataplane this node should have, computed from the syncer's Snapshot.

Pure: it reads the snapshot and what the dataplane found on the host (the host MTU, the
interface that holds the node's address, whether the kernel has IPIP) and returns the
desired state the managers converge to. These are Felix's rules (calico-node.md §2, §4):

- a VXLAN device per family when a pool of that family uses VXLAN (or vxlanEnabled),
  once this node has its tunnel address; one VTEP per other node that has its own;
- for every other node's block in a VXLAN pool a route via its VTEP, `onlink`, on the
  device (device route protocol), or for CrossSubnet pools and a peer in this node's
  subnet, directly via the peer on the parent interface (`proto 80`);
- a `/32` (`/128`) for each IP borrowed from a block by another node, the same way;
- `blackhole <block> proto 80` for this node's own blocks in pools Felix routes;
- IPIP pools: the tunnel half (peers in other subnets, `dev tunl0 onlink proto 80`) is
  Felix's; with BIRD running, same-subnet CrossSubnet peers are BIRD's (its kernel filter
  accepts exactly those), and no-encapsulation pools are BIRD's entirely;
- natOutgoing: the pools that masquerade, every pool, the nodes' addresses;
- the MTU: the smallest of the enabled encapsulations' MTUs, else the host's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import netaddr

from calico_node.felix.config import FelixConfig
from calico_node.syncer import Snapshot
from libcalico.model import AllocationBlock, IPAddress, IPNetwork, IPPool, Node, ValidationError

log = logging.getLogger("felix")

VXLAN_DEVICE = {4: "vxlan.calico", 6: "vxlan-v6.calico"}
IPIP_DEVICE = "tunl0"
VXLAN_OVERHEAD = {4: 50, 6: 70}
IPIP_OVERHEAD = 20
# Felix's assumed host MTU when no interface matches mtuIfacePattern.
FALLBACK_HOST_MTU = 1460
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def vtep_mac(nodename: str, version: int = 4) -> str:
    """Felix's VTEP MAC for a node without `vxlanTunnelMACAddr`: 0x66 then the first five
    bytes of SHA-1 of the node name (`<name>-v6` for the IPv6 device)."""
    seed = nodename if version == 4 else f"{nodename}-v6"
    digest = hashlib.sha1(seed.encode()).digest()  # an identifier, not security
    return ":".join(f"{b:02x}" for b in b"f" + digest[:5])


def _mac_field(version: int) -> str:
    return "vxlanTunnelMACAddr" if version == 4 else "vxlanTunnelMACAddrV6"


def _tunnel_field(version: int) -> str:
    return "ipv4VXLANTunnelAddr" if version == 4 else "ipv6VXLANTunnelAddr"


@dataclass(frozen=True)
class Route:
    """One main-table route as Felix programs it."""

    dst: IPNetwork
    gateway: IPAddress | None = None
    device: str = ""  # "" for a blackhole
    onlink: bool = False
    protocol: int = 3

    @property
    def blackhole(self) -> bool:
        return not self.device

    def __str__(self) -> str:
        """As `ip route` prints it (which hides `proto boot`)."""
        proto = f" proto {self.protocol}" if self.protocol != 3 else ""
        if self.blackhole:
            return f"blackhole {self.dst}{proto}"
        via = f" via {self.gateway}" if self.gateway else ""
        onlink = " onlink" if self.onlink else ""
        return f"{self.dst}{via} dev {self.device}{proto}{onlink}"


@dataclass(frozen=True)
class VTEP:
    """Another node's end of the VXLAN tunnel."""

    node: str
    parent_ip: IPAddress  # its underlay address: the FDB entry's dst
    tunnel_ip: IPAddress  # the neighbour entry's address, the routes' gateway
    mac: str


@dataclass(frozen=True)
class VXLANDevice:
    name: str
    version: int
    vni: int
    port: int
    mac: str
    local_ip: IPAddress
    tunnel_ip: IPAddress
    mtu: int
    vteps: tuple[VTEP, ...]


@dataclass(frozen=True)
class IPIPDevice:
    tunnel_ip: IPAddress | None  # None until calico-node allocated it
    mtu: int
    pools: tuple[str, ...]  # the IPIP pools that made it wanted


@dataclass(frozen=True)
class NatSets:
    """One family's natOutgoing inputs (ipset members are CIDR strings)."""

    version: int
    masquerade: tuple[str, ...]  # pools with natOutgoing
    all_pools: tuple[str, ...]
    hosts: tuple[str, ...]  # every node's address (natOutgoingExclusions: IPPoolsAndHostIPs)
    tunnel_devices: tuple[str, ...]  # their host-sourced traffic gets the tunnel address


@dataclass(frozen=True)
class HostFacts:
    """What the dataplane found on this host, the model's only inputs besides the data."""

    host_mtu: int
    parents: Mapping[int, str] = field(default_factory=dict)  # family -> interface name
    ipip_supported: bool = True


@dataclass(frozen=True)
class Dataplane:
    vxlan: Mapping[int, VXLANDevice]
    ipip: IPIPDevice | None
    routes: Mapping[int, Mapping[IPNetwork, Route]]
    nat: Mapping[int, NatSets]
    mtu: int  # what CALICO_LIB_DIR/mtu says
    owned_devices: tuple[str, ...]  # every route on these is Felix's
    waiting: tuple[str, ...] = ()  # why something is withheld for now


def _encapsulation(pool: IPPool) -> tuple[str, str]:
    """("vxlan" | "ipip" | "none", mode)."""
    if pool.spec.vxlan_mode != "Never":
        return "vxlan", pool.spec.vxlan_mode
    if pool.spec.ipip_mode != "Never":
        return "ipip", pool.spec.ipip_mode
    return "none", "Never"


def _node_address(
    node: Node, version: int
) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    bgp = node.spec.get("bgp") or {}
    text = bgp.get("ipv4Address" if version == 4 else "ipv6Address")
    if not text:
        return None
    try:
        address = ipaddress.ip_interface(text)
    except ValueError:
        return None
    return address if address.version == version else None


def _tunnel_address(node: Node, version: int) -> IPAddress | None:
    text = node.spec.get(_tunnel_field(version))
    try:
        address = ipaddress.ip_address(text) if text else None
    except ValueError:
        return None
    return address if address is not None and address.version == version else None


def _node_mac(node: Node, version: int) -> str:
    mac = str(node.spec.get(_mac_field(version)) or "").lower()
    return mac if _MAC.fullmatch(mac) else vtep_mac(node.metadata.name, version)


class _Builder:
    def __init__(
        self, snapshot: Snapshot, nodename: str, config: FelixConfig, backend: str, host: HostFacts
    ) -> None:
        self.snapshot = snapshot
        self.me = nodename
        self.config = config
        self.bird = backend == "bird"
        self.host = host
        self.families = (4, 6) if config.ipv6_support else (4,)
        # Parsed once per pass: a thousand blocks ask for them again and again.
        networks = sorted(usable_pools(snapshot), key=lambda item: item[0].prefixlen, reverse=True)
        self.pool_networks = networks
        self.pools = [p for _, p in networks]
        self.ipip_pools = tuple(sorted(p.name for n, p in networks if _is_ipip_pool(n, p)))
        on = config.ipip_enabled
        self._ipip_wanted = on if on is not None else bool(self.ipip_pools)
        self._addresses: dict[tuple[str, int], Any] = {}
        self.waiting: list[str] = []
        own = snapshot.nodes.get(nodename)
        self.own = own
        self.own_address = {v: _node_address(own, v) if own else None for v in (4, 6)}
        self.vxlan = {v: self._vxlan_device(v) for v in self.families if self._vxlan_wanted(v)}
        self.vxlan = {v: d for v, d in self.vxlan.items() if d is not None}
        self.vteps = {v: {t.node: t for t in d.vteps} for v, d in self.vxlan.items()}
        self.ipip = self._ipip_device()

    # -- which encapsulations are on

    def _pools_of(self, version: int) -> list[tuple[IPNetwork, IPPool]]:
        return [(n, p) for n, p in self.pool_networks if n.version == version]

    def _vxlan_wanted(self, version: int) -> bool:
        if self.config.vxlan_enabled is not None:
            return self.config.vxlan_enabled
        return any(_encapsulation(p)[0] == "vxlan" for _, p in self._pools_of(version))

    def ipip_wanted(self) -> bool:
        return self._ipip_wanted

    def vxlan_mtu(self, version: int) -> int:
        configured = self.config.vxlan_mtu if version == 4 else self.config.vxlan_mtu_v6
        return configured or self.host.host_mtu - VXLAN_OVERHEAD[version]

    def ipip_mtu(self) -> int:
        return self.config.ipip_mtu or self.host.host_mtu - IPIP_OVERHEAD

    def _vxlan_device(self, version: int) -> VXLANDevice | None:
        name = VXLAN_DEVICE[version]
        local = self.own_address[version]
        tunnel = _tunnel_address(self.own, version) if self.own else None
        if local is None or tunnel is None:
            missing = f"IPv{version} address" if local is None else "VXLAN tunnel address"
            self.waiting.append(f"{name}: this node has no {missing} yet")
            return None
        return VXLANDevice(
            name=name,
            version=version,
            vni=self.config.vxlan_vni,
            port=self.config.vxlan_port,
            mac=_node_mac(self.own, version),  # type: ignore[arg-type]
            local_ip=local.ip,
            tunnel_ip=tunnel,
            mtu=self.vxlan_mtu(version),
            vteps=tuple(self._vteps(version)),
        )

    def _vteps(self, version: int) -> Iterator[VTEP]:
        for name, node in sorted(self.snapshot.nodes.items()):
            if name == self.me:
                continue
            parent = _node_address(node, version)
            tunnel = _tunnel_address(node, version)
            if parent is not None and tunnel is not None:
                yield VTEP(name, parent.ip, tunnel, _node_mac(node, version))

    def _ipip_device(self) -> IPIPDevice | None:
        if not self.ipip_wanted():
            return None
        tunnel = None
        if self.own is not None:
            text = (self.own.spec.get("bgp") or {}).get("ipv4IPIPTunnelAddr")
            try:
                tunnel = ipaddress.IPv4Address(text) if text else None
            except ValueError:
                tunnel = None
        return IPIPDevice(tunnel, self.ipip_mtu(), self.ipip_pools)

    # -- routes

    def pool_of(self, cidr: IPNetwork) -> IPPool | None:
        for network, pool in self.pool_networks:
            if network.version == cidr.version and cidr.subnet_of(network):  # type: ignore[arg-type]
                return pool
        return None

    def _felix_routes_pool(self, kind: str) -> bool:
        """Whether Felix (not BIRD) routes this kind of pool's blocks at all."""
        return kind == "vxlan" or (kind == "ipip" and not self.bird)

    def _same_subnet(self, version: int, peer: IPAddress | None) -> bool:
        own = self.own_address[version]
        return own is not None and peer is not None and peer in own.network

    def remote_route(self, pool: IPPool, node_name: str, dst: IPNetwork) -> Route | None:
        """How to reach `dst` on node `node_name`; None when it is not Felix's or not yet
        possible (the peer's VTEP or the parent interface unknown)."""
        kind, mode = _encapsulation(pool)
        node = self.snapshot.nodes.get(node_name)
        if kind == "none" or node is None:
            return None
        version = dst.version
        key = (node_name, version)
        if key not in self._addresses:
            self._addresses[key] = _node_address(node, version)
        peer = self._addresses[key]
        felix_proto = self.config.felix_route_protocol
        if mode == "CrossSubnet" and peer is not None and self._same_subnet(version, peer.ip):
            parent = self.host.parents.get(version)
            if parent is None or (kind == "ipip" and self.bird):
                return None
            return Route(dst, peer.ip, parent, onlink=True, protocol=felix_proto)
        if kind == "ipip":
            if self.ipip is None or not self.host.ipip_supported or peer is None:
                return None
            return Route(dst, peer.ip, IPIP_DEVICE, onlink=True, protocol=felix_proto)
        device = self.vxlan.get(version)
        vtep = self.vteps.get(version, {}).get(node_name)
        if device is None or vtep is None:
            return None
        if dst.prefixlen == dst.max_prefixlen and dst.network_address == vtep.tunnel_ip:
            return Route(dst, None, device.name, protocol=self.config.device_route_protocol)
        return Route(
            dst,
            vtep.tunnel_ip,
            device.name,
            onlink=True,
            protocol=self.config.device_route_protocol,
        )

    def block_routes(self, block: AllocationBlock) -> Iterator[Route]:
        pool = self.pool_of(block.cidr)
        if pool is None or block.deleted or block.cidr.version not in self.families:
            return
        owner = block.affinity[5:] if (block.affinity or "").startswith("host:") else None
        if owner == self.me:
            if self._felix_routes_pool(_encapsulation(pool)[0]) and (
                block.cidr.prefixlen < block.cidr.max_prefixlen
            ):
                yield Route(block.cidr, protocol=self.config.felix_route_protocol)
        elif owner is not None:
            route = self.remote_route(pool, owner, block.cidr)
            if route is not None:
                yield route
        yield from self._borrowed(block, pool, owner)

    def _borrowed(self, block: AllocationBlock, pool: IPPool, owner: str | None) -> Iterator[Route]:
        """Routes for IPs another node took from this block (calico-node.md §2.4)."""
        borrowers = {
            index: attr.secondary.get("node")
            for index, attr in enumerate(block.attributes)
            if attr.secondary.get("node") not in (None, "", owner)
        }
        if not borrowers:
            return
        for ordinal, index in enumerate(block.allocations):
            borrower = borrowers.get(index) if index is not None else None
            if borrower is None or borrower == self.me:
                continue
            ip = block.ip(ordinal)
            route = self.remote_route(pool, borrower, ipaddress.ip_network(ip))
            if route is not None:
                yield route

    def routes(self) -> dict[int, dict[IPNetwork, Route]]:
        routes: dict[int, dict[IPNetwork, Route]] = {v: {} for v in self.families}
        for block in self.snapshot.blocks.values():
            for route in self.block_routes(block):
                routes[route.dst.version][route.dst] = route
        return routes

    # -- NAT and MTU

    def nat(self) -> dict[int, NatSets]:
        sets = {}
        for version in self.families:
            pools = self._pools_of(version)
            masq = netaddr.IPSet(str(n) for n, p in pools if p.spec.nat_outgoing)
            every = netaddr.IPSet(str(n) for n, _ in pools)
            hosts = netaddr.IPSet(
                str(a.ip) for n in self.snapshot.nodes.values() if (a := _node_address(n, version))
            )
            devices = []
            if version in self.vxlan:
                devices.append(self.vxlan[version].name)
            if version == 4 and self.ipip is not None and self.host.ipip_supported:
                devices.append(IPIP_DEVICE)
            sets[version] = NatSets(
                version,
                tuple(str(c) for c in masq.iter_cidrs()),
                tuple(str(c) for c in every.iter_cidrs()),
                tuple(str(c) for c in hosts.iter_cidrs()),
                tuple(devices),
            )
        return sets

    def mtu(self) -> int:
        enabled = [self.vxlan_mtu(v) for v in self.families if self._vxlan_wanted(v)]
        if self.ipip_wanted():
            enabled.append(self.ipip_mtu())
        return min(enabled) if enabled else self.host.host_mtu


def usable_pools(snapshot: Snapshot) -> list[tuple[IPNetwork, IPPool]]:
    """The pools with their networks; one whose CIDR does not parse (the datastore is
    anyone's) is left out, with a warning."""
    found = []
    for pool in snapshot.pools.values():
        try:
            found.append((pool.network, pool))
        except ValidationError as err:
            log.warning("ignoring IP pool %s: %s", pool.name, err)
    return found


def _is_ipip_pool(network: IPNetwork, pool: IPPool) -> bool:
    return network.version == 4 and _encapsulation(pool)[0] == "ipip"


def ipip_wanted(snapshot: Snapshot, config: FelixConfig) -> bool:
    """IPIP is on by ipipEnabled, else when an IPv4 pool uses it (as `_Builder` decides)."""
    if config.ipip_enabled is not None:
        return config.ipip_enabled
    return any(_is_ipip_pool(n, p) for n, p in usable_pools(snapshot))


def desired_dataplane(
    snapshot: Snapshot, nodename: str, config: FelixConfig, backend: str, host: HostFacts
) -> Dataplane:
    builder = _Builder(snapshot, nodename, config, backend, host)
    owned = [VXLAN_DEVICE[v] for v in (4, 6)]
    if builder.ipip is not None and host.ipip_supported:
        owned.append(IPIP_DEVICE)
    return Dataplane(
        vxlan=builder.vxlan,
        ipip=builder.ipip,
        routes=builder.routes(),
        nat=builder.nat(),
        mtu=builder.mtu(),
        owned_devices=tuple(owned),
        waiting=tuple(builder.waiting),
    )
