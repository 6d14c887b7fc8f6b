"""The data BIRD's configuration is rendered from: this node's BGP view of a Snapshot.

What libcalico-go's BGP syncer and confd's Go functions compute (calico-node.md §1.2-1.7):
the AS numbers and ports, the node-to-node mesh, global and node-specific BGPPeers with
their selectors and automatic reverse peerings, route-reflector clients, this node's
blocks and the pools' export and kernel-programming rules. The templates (templates/)
only lay this out; nothing here knows BIRD's syntax.

Deterministic: peers sorted by protocol name, so the same cluster always renders the same
text and BIRD is reloaded only when something really changed.

One departure from Calico, on purpose: Calico drops a route reflector from the mesh the
moment its `routeReflectorClusterID` is set, which cuts the node off until the BGPPeer
towards it exists (the seed's section 7 sets them in that order). Here a node leaves the
mesh pair by pair, when a BGPPeer-derived session to the same address replaces it; once
the BGPPeers are in place the result is Calico's (the RR's peers are all `Node_` with
`rr client`, the clients keep the mesh among themselves until it is disabled).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from calico_node.syncer import Snapshot
from libcalico.durations import parse_duration
from libcalico.model import IPPool, Node
from libcalico.selector import SelectorError, selector_matches

log = logging.getLogger("confd")

DEFAULT_AS = 64512
BGP_PORT = 179
MESH, GLOBAL, NODE = "Mesh", "Global", "Node"


@dataclass(frozen=True)
class Peer:
    """One `protocol bgp` block."""

    kind: str  # Mesh, Global, Node
    ip: str
    as_number: int
    port: int | None = None  # None: BGP's 179
    calico_node: str = ""  # the Calico node the IP belongs to
    rr_cluster_id: str = ""  # the peer's cluster ID (its Node's, when a Calico node)
    source_address: bool = True  # `source address <our IP>` (BGPPeer sourceAddress UseNodeIP)
    ttl_security: int = 0  # hops; 0: off
    keep_next_hop: bool = False
    next_hop_self: bool = False
    graceful_restart_time: int | None = None
    keepalive_time: int | None = None
    allow_local_as: int | None = None

    @property
    def name(self) -> str:
        suffix = self.ip.replace(".", "_").replace(":", "_")
        if self.port and self.port != BGP_PORT:
            suffix += f"_port_{self.port}"
        return f"{self.kind}_{suffix}"


@dataclass(frozen=True)
class PeerView:
    """A Peer as this node renders it: the parts that depend on both ends."""

    peer: Peer
    internal: bool  # same AS (iBGP): tunnel routes suppressed, RR rules apply
    passive: bool
    rr_client: bool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.peer, name)


@dataclass(frozen=True)
class PoolView:
    cidr: str
    vxlan: bool
    ipip: bool
    disable_bgp_export: bool
    ipip_cross_subnet: bool = False


@dataclass(frozen=True)
class BlockView:
    cidr: str
    state: str  # confirmed, pending, pendingDeletion ("" from old releases: confirmed)

    @property
    def confirmed(self) -> bool:
        return self.state in ("", "confirmed")


@dataclass(frozen=True)
class Community:
    cidr: str
    standard: list[tuple[int, int]]
    large: list[tuple[int, int, int]]


@dataclass
class BirdView:
    """Everything bird.cfg, bird_aggr.cfg and bird_ipam.cfg say (IPv4)."""

    nodename: str
    node_ip: str  # "" : IPv4 disabled on this node
    node_network: str
    router_id: str
    as_number: int
    listen_port: int | None
    debug: str  # "all", "states", or "" (no debug line)
    mesh_enabled: bool
    rr_cluster_id: str
    mesh: list[PeerView] = field(default_factory=list)
    mesh_comments: list[str] = field(default_factory=list)
    global_peers: list[PeerView] = field(default_factory=list)
    node_peers: list[PeerView] = field(default_factory=list)
    blocks: list[BlockView] = field(default_factory=list)
    pools: list[PoolView] = field(default_factory=list)
    static_routes: list[str] = field(default_factory=list)
    reject_cidrs: list[str] = field(default_factory=list)
    ignored_interfaces: list[str] = field(default_factory=list)
    communities: list[Community] = field(default_factory=list)


# ------------------------------------------------------------------ helpers


def _ip(text: str | None) -> str:
    """The address of a Node's `192.168.10.26/24`, "" when unset or unparsable."""
    if not text:
        return ""
    try:
        return str(ipaddress.ip_interface(text).ip)
    except ValueError:
        return ""


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_interface(text).network)
    except ValueError:
        return ""


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _seconds(value: Any) -> int | None:
    """A Go duration (`120s`, `2m`) in whole seconds; None when unset or not one."""
    seconds = parse_duration(value) if isinstance(value, str) else None
    return None if seconds is None else int(seconds)


def _matches(selector: str, labels: dict[str, str], what: str) -> bool:
    try:
        return selector_matches(selector, labels)
    except SelectorError as err:
        log.warning("%s has an invalid selector %r: %s", what, selector, err)
        return False


def router_id_hash(nodename: str) -> str:
    """CALICO_ROUTER_ID=hash: an IPv4-shaped ID from the node name (IPv6-only nodes)."""
    digest = hashlib.sha1(nodename.encode()).digest()
    return str(ipaddress.IPv4Address(int.from_bytes(digest[:4], "big")))


class _Cluster:
    """Per-node facts the peering rules need, read once from the snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        defaults = snapshot.bgp_configuration("default")
        self.global_as = _int(defaults.get("asNumber")) or DEFAULT_AS
        self.global_port = _int(defaults.get("listenPort"))
        self.nodes: dict[str, Node] = dict(snapshot.nodes)

    def bgp(self, name: str) -> dict[str, Any]:
        node = self.nodes.get(name)
        return dict((node.spec.get("bgp") or {}) if node else {})

    def ip(self, name: str) -> str:
        return _ip(self.bgp(name).get("ipv4Address"))

    def as_number(self, name: str) -> int:
        return _int(self.bgp(name).get("asNumber")) or self.global_as

    def port(self, name: str) -> int | None:
        own = _int(self.snapshot.bgp_configuration(f"node.{name}").get("listenPort"))
        return own or self.global_port

    def rr_cluster_id(self, name: str) -> str:
        return str(self.bgp(name).get("routeReflectorClusterID") or "")

    def labels(self, name: str) -> dict[str, str]:
        node = self.nodes.get(name)
        return dict(node.metadata.labels) if node else {}

    def by_ip(self, ip: str) -> str:
        return next((n for n in sorted(self.nodes) if self.ip(n) == ip), "")

    def node_peer(self, kind: str, name: str, template: Peer | None = None) -> Peer | None:
        """`name` (a Calico node) as a peer, with a BGPPeer's options when given."""
        ip = self.ip(name)
        if not ip:
            return None
        options = _peer_options(template) if template else {}
        return Peer(
            kind=kind,
            ip=ip,
            as_number=self.as_number(name),
            port=self.port(name),
            calico_node=name,
            rr_cluster_id=self.rr_cluster_id(name),
            **options,
        )


def _peer_options(peer: Peer) -> dict[str, Any]:
    """The BGPPeer options a derived (selector or reverse) peering inherits."""
    names = ("source_address", "ttl_security", "keep_next_hop", "next_hop_self",
             "graceful_restart_time", "keepalive_time", "allow_local_as")  # fmt: skip
    return {name: getattr(peer, name) for name in names}


def _split_peer_ip(text: str) -> tuple[str, int | None]:
    """`10.0.0.1`, `10.0.0.1:1790`, `[fd00::1]:1790`, `fd00::1`."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, _int(rest.removeprefix(":"))
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _int(port)
    return text, None


def _bgppeer_template(spec: dict[str, Any], kind: str) -> Peer:
    """The options of one BGPPeer's spec (without the remote address)."""
    ttl = _int(spec.get("ttlSecurity")) or 0
    mode = spec.get("nextHopMode") or ""
    if spec.get("password"):
        log.warning("BGPPeer password secrets are not read by this calico-node: peering without")
    return Peer(
        kind=kind,
        ip="",
        as_number=_int(spec.get("asNumber")) or 0,
        source_address=(spec.get("sourceAddress") or "UseNodeIP") == "UseNodeIP",
        ttl_security=ttl,
        keep_next_hop=bool(spec.get("keepOriginalNextHop")) or mode == "Keep",
        next_hop_self=mode == "Self",
        graceful_restart_time=_seconds(spec.get("maxRestartTime")),
        keepalive_time=_seconds(spec.get("keepaliveTime")),
        allow_local_as=_int(spec.get("numAllowedLocalASNumbers")),
    )


# ------------------------------------------------------------------ peerings


class _PeerRule:
    """One BGPPeer: which nodes it applies to (local side) and whom they peer with."""

    def __init__(self, cluster: _Cluster, name: str, spec: dict[str, Any]) -> None:
        self.cluster = cluster
        self.what = f"BGPPeer {name}"
        self.node = spec.get("node") or ""
        self.node_selector = spec.get("nodeSelector") or ""
        self.is_global = not self.node and not self.node_selector
        self.peer_selector = spec.get("peerSelector") or ""
        self.peer_ip, self.peer_port = _split_peer_ip(spec.get("peerIP") or "")
        self.reverse = (spec.get("reversePeering") or "Auto") != "Manual"
        self.template = _bgppeer_template(spec, GLOBAL if self.is_global else NODE)

    def local_side(self, name: str) -> bool:
        if self.node:
            return name == self.node
        if self.node_selector:
            return _matches(self.node_selector, self.cluster.labels(name), self.what)
        return True

    def remote_peers(self) -> list[Peer]:
        """Whom the local side peers with: the nodes peerSelector picks, or peerIP."""
        cluster, template = self.cluster, self.template
        if self.peer_selector:
            picked = [
                cluster.node_peer(template.kind, name, template)
                for name in sorted(cluster.nodes)
                if _matches(self.peer_selector, cluster.labels(name), self.what)
            ]
            return [p for p in picked if p is not None]
        if not self.peer_ip:
            return []
        owner = cluster.by_ip(self.peer_ip)
        return [
            replace(
                template,
                ip=self.peer_ip,
                port=self.peer_port or (cluster.port(owner) if owner else None),
                as_number=template.as_number or (cluster.as_number(owner) if owner else 0),
                calico_node=owner,
                rr_cluster_id=cluster.rr_cluster_id(owner) if owner else "",
            )
        ]

    def on_remote_side(self, name: str) -> bool:
        """Whether node `name` is one this BGPPeer's local side peers with."""
        cluster = self.cluster
        if self.peer_selector:
            return _matches(self.peer_selector, cluster.labels(name), self.what)
        wanted_as = self.template.as_number
        return (
            bool(self.peer_ip)
            and cluster.ip(name) == self.peer_ip
            and (not wanted_as or wanted_as == cluster.as_number(name))
        )

    def reverse_peers(self, me: str) -> list[Peer]:
        """The automatic reverse peering: `me` on the remote side peers back with every
        node of the local side."""
        if not self.reverse or not self.on_remote_side(me):
            return []
        cluster = self.cluster
        derived = [
            cluster.node_peer(NODE, name, self.template)
            for name in sorted(cluster.nodes)
            if name != me and self.local_side(name)
        ]
        return [p for p in derived if p is not None]


def _peerings(cluster: _Cluster, me: str) -> tuple[list[Peer], list[Peer]]:
    """(global, node-specific) peers of node `me` from every BGPPeer, with the automatic
    reverse peerings (calico-node.md §1.3)."""
    global_peers: list[Peer] = []
    node_peers: list[Peer] = []
    for name in sorted(cluster.snapshot.bgp_peers):
        rule = _PeerRule(cluster, name, dict(cluster.snapshot.bgp_peers[name].spec))
        if rule.local_side(me):
            (global_peers if rule.is_global else node_peers).extend(rule.remote_peers())
        node_peers.extend(rule.reverse_peers(me))
    return global_peers, node_peers


def _dedupe(peers: Iterable[Peer], taken: set[str], my_ip: str, what: str) -> list[Peer]:
    """One protocol per address (a duplicate name would make BIRD reject the whole config,
    bird#12); never ourselves."""
    kept = []
    for peer in peers:
        if peer.ip == my_ip:
            continue
        if peer.ip in taken:
            log.debug("dropping a second %s peering to %s", what, peer.ip)
            continue
        taken.add(peer.ip)
        kept.append(peer)
    return sorted(kept, key=lambda p: p.name)


def _view(peer: Peer, my_ip: str, my_as: int, my_rr: str) -> PeerView:
    internal = peer.as_number == my_as
    if peer.kind == MESH:
        passive = peer.ip > my_ip  # Calico compares the strings (calico-node.md §1.6a)
    elif peer.kind == GLOBAL:
        passive = bool(peer.calico_node) and peer.ip > my_ip
    else:
        passive = False
    # Mesh peers are never clients: the mesh needs no reflection.
    rr_client = peer.kind != MESH and internal and bool(my_rr) and peer.rr_cluster_id != my_rr
    return PeerView(peer, internal, passive, rr_client)


# ------------------------------------------------------------------ the view


def _log_level(snapshot: Snapshot, nodename: str) -> str:
    text = snapshot.bgp_configuration(f"node.{nodename}").get("logSeverityScreen") or (
        snapshot.bgp_configuration("default").get("logSeverityScreen") or "Info"
    )
    level = str(text).lower()
    return "all" if level == "debug" else "states" if level == "info" else ""


def _pools(snapshot: Snapshot) -> list[IPPool]:
    pools = [p for p in snapshot.pools.values() if p.network.version == 4]
    return sorted(pools, key=lambda p: p.network)


def _communities(defaults: dict[str, Any], own: dict[str, Any]) -> list[Community]:
    named = {c.get("name"): c.get("value") for c in (defaults.get("communities") or [])}
    named.update({c.get("name"): c.get("value") for c in (own.get("communities") or [])})
    adverts = own.get("prefixAdvertisements") or defaults.get("prefixAdvertisements") or []
    out = []
    for advert in adverts:
        standard, large = [], []
        for item in advert.get("communities") or []:
            value = named.get(item, item)
            parts = str(value).split(":")
            if all(p.isdigit() for p in parts) and len(parts) == 2:
                standard.append((int(parts[0]), int(parts[1])))
            elif all(p.isdigit() for p in parts) and len(parts) == 3:
                large.append((int(parts[0]), int(parts[1]), int(parts[2])))
            else:
                log.warning("community %r is neither A:B nor A:B:C; ignored", value)
        if advert.get("cidr") and ":" not in advert["cidr"]:
            out.append(Community(advert["cidr"], standard, large))
    return out


def _service_cidrs(defaults: dict[str, Any], labels: dict[str, str]) -> tuple[list[str], list[str]]:
    """(static routes advertised, CIDRs never programmed locally) from service advertisement."""
    cidrs = [
        entry.get("cidr")
        for name in ("serviceClusterIPs", "serviceExternalIPs", "serviceLoadBalancerIPs")
        for entry in defaults.get(name) or []
        if entry.get("cidr") and ":" not in entry.get("cidr")
    ]
    excluded = labels.get("node.kubernetes.io/exclude-from-external-load-balancers") == "true"
    return ([] if excluded else cidrs), cidrs


def bird_view(snapshot: Snapshot, nodename: str, router_id_setting: str = "") -> BirdView:
    cluster = _Cluster(snapshot)
    defaults = snapshot.bgp_configuration("default")
    own = snapshot.bgp_configuration(f"node.{nodename}")
    my_ip = cluster.ip(nodename)
    my_as = cluster.as_number(nodename)
    my_rr = cluster.rr_cluster_id(nodename)
    if router_id_setting == "hash":
        router_id = router_id_hash(nodename)
    else:
        router_id = router_id_setting or my_ip
    mesh_enabled = defaults.get("nodeToNodeMeshEnabled", True) is not False
    view = BirdView(
        nodename=nodename,
        node_ip=my_ip,
        node_network=_network(cluster.bgp(nodename).get("ipv4Address") or ""),
        router_id=router_id,
        as_number=my_as,
        listen_port=cluster.port(nodename),
        debug=_log_level(snapshot, nodename),
        mesh_enabled=mesh_enabled,
        rr_cluster_id=my_rr,
        ignored_interfaces=list(
            own.get("ignoredInterfaces") or defaults.get("ignoredInterfaces") or []
        ),
        communities=_communities(defaults, own),
    )
    view.static_routes, view.reject_cidrs = _service_cidrs(defaults, cluster.labels(nodename))
    for pool in _pools(snapshot):
        spec = pool.spec
        view.pools.append(
            PoolView(
                str(pool.network),
                vxlan=spec.vxlan_mode != "Never",
                ipip=spec.ipip_mode != "Never",
                disable_bgp_export=spec.disable_bgp_export,
                ipip_cross_subnet=spec.ipip_mode == "CrossSubnet",
            )
        )
    for cidr, affinity in snapshot.affine_blocks(nodename):
        if cidr.version == 4 and cidr.prefixlen < 32:
            view.blocks.append(BlockView(str(cidr), affinity.state))
    if not my_ip:
        return view
    global_peers, node_peers = _peerings(cluster, nodename)
    taken: set[str] = set()
    view.global_peers = [
        _view(p, my_ip, my_as, my_rr) for p in _dedupe(global_peers, taken, my_ip, "global")
    ]
    view.node_peers = [
        _view(p, my_ip, my_as, my_rr) for p in _dedupe(node_peers, taken, my_ip, "node-specific")
    ]
    if mesh_enabled:
        mesh = []
        for name in sorted(cluster.nodes):
            ip = cluster.ip(name)
            if not ip:
                continue
            if name == nodename:
                view.mesh_comments.append(f"Skipping ourselves ({ip})")
            elif ip in taken:
                view.mesh_comments.append(f"Skipping {ip} ({name}): peered through a BGPPeer")
            else:
                mesh.append(cluster.node_peer(MESH, name))
        view.mesh = [
            _view(p, my_ip, my_as, my_rr) for p in _dedupe(filter(None, mesh), taken, my_ip, "mesh")
        ]
    return view
