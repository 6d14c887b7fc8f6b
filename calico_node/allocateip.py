"""The node's tunnel addresses, as calico-node's allocate-tunnel-addrs keeps them
(calico-node.md §2.5).

For IPIP (IPv4), VXLAN and VXLAN over IPv6: while some enabled pool of that kind selects
this node and allows `Tunnel` use, the node holds one address from it, allocated through
the IPAM engine with Calico's handle (`vxlan-tunnel-addr-<node>`, ...) and attributes
(`{"node": <node>, "type": "vxlanTunnelAddress"}`), so `calicoctl ipam show` counts it and
`ipam check` knows its owner; it usually comes from the node's own block. The Node records
it (`spec.ipv4VXLANTunnelAddr` with `spec.vxlanTunnelMACAddr`, `spec.ipv6VXLANTunnelAddr`
with `spec.vxlanTunnelMACAddrV6`, `spec.bgp.ipv4IPIPTunnelAddr`). When no pool wants it any
more, the address is released and the fields cleared. An address still owned by the handle
and inside an eligible pool is kept, so a restart changes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calico_node.felix.model import vtep_mac
from calico_node.syncer import Consumer, NotReady, Snapshot
from ipam_plugin.engine import IPAM, AutoAssignRequest, IPAMError
from libcalico.datastore.base import Conflict, Datastore, KVPair, NotFound
from libcalico.model import IPAddress, IPPool, Node, ResourceKey
from libcalico.selector import SelectorError, selector_matches

if TYPE_CHECKING:
    from calico_node.context import NodeContext

log = logging.getLogger("allocateip")
RETRIES = 10


@dataclass(frozen=True)
class TunnelKind:
    """One kind of tunnel address: where it lives on the Node and how IPAM names it."""

    encapsulation: str  # "vxlan" | "ipip"
    version: int
    handle_prefix: str
    attribute_type: str
    address_path: tuple[str, ...]  # path in Node.spec
    mac_field: str = ""  # the VTEP MAC written with it (VXLAN)

    def handle(self, nodename: str) -> str:
        return f"{self.handle_prefix}-{nodename}"

    def wants(self, pool: IPPool) -> bool:
        mode = pool.spec.vxlan_mode if self.encapsulation == "vxlan" else pool.spec.ipip_mode
        return pool.network.version == self.version and mode != "Never"


KINDS = (
    TunnelKind("ipip", 4, "ipip-tunnel-addr", "ipipTunnelAddress", ("bgp", "ipv4IPIPTunnelAddr")),
    TunnelKind(
        "vxlan", 4, "vxlan-tunnel-addr", "vxlanTunnelAddress", ("ipv4VXLANTunnelAddr",),
        "vxlanTunnelMACAddr",
    ),
    TunnelKind(
        "vxlan", 6, "vxlan-v6-tunnel-addr", "vxlanV6TunnelAddress", ("ipv6VXLANTunnelAddr",),
        "vxlanTunnelMACAddrV6",
    ),
)  # fmt: skip


def eligible_pools(kind: TunnelKind, pools: list[IPPool], labels: dict[str, str]) -> list[IPPool]:
    chosen = []
    for pool in pools:
        if not (kind.wants(pool) and pool.is_enabled() and "Tunnel" in pool.spec.allowed_uses):
            continue
        try:
            if selector_matches(pool.spec.node_selector, labels):
                chosen.append(pool)
        except SelectorError as err:
            log.warning("IP pool %s has an invalid nodeSelector: %s", pool.name, err)
    return chosen


def _get(spec: dict[str, Any], path: tuple[str, ...]) -> str:
    for key in path[:-1]:
        spec = spec.get(key) or {}
    return str(spec.get(path[-1]) or "")


def _set(spec: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    for key in path[:-1]:
        if not value and key not in spec:
            return
        spec = spec.setdefault(key, {})
    if value:
        spec[path[-1]] = value
    else:
        spec.pop(path[-1], None)


def settled(snapshot: Snapshot, node: Node, kind: TunnelKind, pools: list[IPPool]) -> bool:
    """Whether the snapshot already shows what `kind` should be on `node`: no pool wants it
    and the Node has none, or the Node's address is in one of `pools`, allocated in its
    block to the kind's handle, with its MAC beside it."""
    text = _get(node.spec, kind.address_path)
    mac = node.spec.get(kind.mac_field) if kind.mac_field else None
    if not pools:
        return not text and not mac
    if kind.mac_field and not mac:
        return False
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if not any(ip in p.network for p in pools):
        return False
    block = next(
        (b for cidr, b in snapshot.blocks.items() if cidr.version == ip.version and ip in cidr),
        None,
    )
    if block is None:
        return False
    handle = block.handle_of(block.ordinal(ip))
    return handle == kind.handle(node.metadata.name)


def ensure_address(ipam: IPAM, kind: TunnelKind, nodename: str, pools: list[IPPool]) -> IPAddress:
    """The handle's address inside `pools`: the one it has, else a new one."""
    handle = kind.handle(nodename)
    try:
        owned = ipam.ips_by_handle(handle)
    except NotFound:
        owned = []
    keep = [ip for ip in owned if any(ip in p.network for p in pools)]
    if keep:
        extra = [str(ip) for ip in owned if ip != keep[0]]
        if extra:
            ipam.release_ips(extra)
        return keep[0]
    if owned:
        ipam.release_by_handle(handle)
    request = AutoAssignRequest(
        handle_id=handle,
        hostname=nodename,
        attrs={"node": nodename, "type": kind.attribute_type},
        num_v4=1 if kind.version == 4 else 0,
        num_v6=1 if kind.version == 6 else 0,
        ipv4_pools=[p.spec.cidr for p in pools] if kind.version == 4 else [],
        ipv6_pools=[p.spec.cidr for p in pools] if kind.version == 6 else [],
        intended_use="Tunnel",
    )
    v4, v6 = ipam.auto_assign(request)
    result = v4 if kind.version == 4 else v6
    if not result.ips:
        shortfall = result.shortfall_message(kind.version)
        raise NotReady(f"no {kind.attribute_type} for node {nodename}: {shortfall}")
    return result.ips[0].ip


def release_address(ipam: IPAM, kind: TunnelKind, nodename: str) -> list[IPAddress]:
    try:
        return ipam.release_by_handle(kind.handle(nodename))
    except NotFound:
        return []


class TunnelAddresses(Consumer):
    name = "allocateip"

    def __init__(self, node: NodeContext) -> None:
        self.node = node

    def apply(self, snapshot: Snapshot) -> None:
        me = self.node.name
        node = snapshot.nodes.get(me)
        if node is None:
            raise NotReady(f"Node {me} is not in the datastore")
        pools = list(snapshot.pools.values())
        labels = dict(node.metadata.labels)
        if all(
            settled(snapshot, node, kind, eligible_pools(kind, pools, labels)) for kind in KINDS
        ):
            return  # the snapshot shows every address where it belongs: nothing to read
        with self.node.config.datastore.open() as store:
            ipam = IPAM(store)
            wanted: dict[tuple[str, ...], str] = {}
            for kind in KINDS:
                chosen = eligible_pools(kind, pools, labels)
                current = _get(node.spec, kind.address_path)
                if chosen:
                    try:
                        address = str(ensure_address(ipam, kind, me, chosen))
                    except IPAMError as err:
                        raise NotReady(f"{kind.attribute_type} for node {me}: {err}") from err
                    mac = str(node.spec.get(kind.mac_field) or vtep_mac(me, kind.version))
                elif current or (kind.mac_field and node.spec.get(kind.mac_field)):
                    released = release_address(ipam, kind, me)
                    log.info("released %s %s (no pool uses it)", kind.attribute_type, released)
                    address = mac = ""
                else:
                    continue
                wanted[kind.address_path] = address
                if kind.mac_field:
                    wanted[(kind.mac_field,)] = mac
            if wanted:
                self._record(store, me, wanted)

    def _record(self, store: Datastore, nodename: str, wanted: dict[tuple[str, ...], str]) -> None:
        """Write the fields on the Node, compare-and-swap, only when they differ."""
        key = ResourceKey("Node", nodename)
        for _ in range(RETRIES):
            kvp = store.get(key)
            node: Node = kvp.value
            if all(_get(node.spec, path) == value for path, value in wanted.items()):
                return
            for path, value in wanted.items():
                _set(node.spec, path, value)
            try:
                store.update(KVPair(key, node, kvp.revision))
            except Conflict:
                continue
            log.info(
                "Node %s tunnel addresses: %s",
                nodename,
                ", ".join(f"{'.'.join(p)}={v or '-'}" for p, v in sorted(wanted.items())),
            )
            return
        raise NotReady(f"could not record the tunnel addresses on Node {nodename}: conflicts")
