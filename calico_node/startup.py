"""calico-node's start-up (`calico component node startup`, calico-node.md §3).

In order: the node's name; its Node resource, created or updated with the address (from
`IP` or autodetection, with its prefix), the AS number and nothing else changed; a refusal
when another node already claims the address; ClusterInformation; the default pools when
the cluster has none of that family; the default Felix and BGP configurations; and last
the `nodename` file, which tells the CNI (and Calico's own readiness check) that start-up
finished. Every write is a compare-and-swap, retried on conflict.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from calico_node import VERSION
from calico_node.autodetect import Detected, HostInterface, complete_prefix, detect, host_interfaces
from calico_node.config import ConfigError, NodeConfig, PoolEnv
from calico_node.paths import write_atomic
from libcalico.datastore.base import AlreadyExists, Conflict, Datastore, KVPair, NotFound
from libcalico.model import (
    BGPConfiguration,
    ClusterInformation,
    FelixConfiguration,
    IPPool,
    IPPoolSpec,
    Node,
    ObjectMeta,
    ResourceKey,
    ResourceListOptions,
    SpecResource,
    ValidationError,
)

log = logging.getLogger("startup")
T = TypeVar("T")
RETRIES = 10
FALLBACK_POOLS = [f"172.{n}.0.0/16" for n in range(16, 32)]
DEFAULT_V4_POOL = "192.168.0.0/16"


class StartupError(Exception):
    """Start-up cannot go on; the message is calico-node's (one line)."""


def _retrying(attempt: Callable[[], T]) -> T:
    for _ in range(RETRIES - 1):
        try:
            return attempt()
        except (Conflict, AlreadyExists):
            continue
    return attempt()


def determine_nodename(config: NodeConfig) -> str:
    """NODENAME, else the nodename file a previous start wrote, else the hostname."""
    if config.nodename_env:
        return config.nodename_env
    try:
        name = config.paths.nodename_file.read_text().strip()
        if name:
            return name
    except OSError:
        pass
    name = (config.environ.get("HOSTNAME") or socket.gethostname()).strip().lower()
    log.warning("Using auto-detected node name %r (set NODENAME to choose it)", name)
    return name


@dataclass
class Registration:
    """What start-up settled: this node's name and its Node as stored."""

    nodename: str
    node: Node


def _bgp(node: Node) -> dict[str, Any]:
    return node.spec.setdefault("bgp", {})


def _address(
    setting: str,
    method: str,
    version: int,
    current: str,
    interfaces: list[HostInterface],
    k8s_internal_ip: Callable[[], str] | None,
) -> str:
    """The node's address of one family as `IP`/`IP6` and the method ask (calico-node.md
    §3.2); "" for none."""
    if setting == "none" or (version == 6 and not setting):
        return current if setting == "none" else ""
    if setting and setting != "autodetect":
        return str(complete_prefix(setting, interfaces))
    if not setting and current:
        return current
    found: Detected | None = detect(method, version, interfaces, k8s_internal_ip)
    if found is None:
        log.warning(
            "no IPv%d address found by autodetection method %r", version, method or "first-found"
        )
        return ""
    log.info(
        "Using autodetected IPv%d address %s on interface %s (method %s)",
        version, found.address, found.interface or "-", found.method,
    )  # fmt: skip
    return str(found.address)


def _check_conflict(store: Datastore, nodename: str, v4: str, v6: str) -> None:
    """Refuse an address another Calico node already has (calico-node.md §3.2)."""
    mine = {str(ipaddress.ip_interface(a).ip) for a in (v4, v6) if a}
    for kvp in store.list(ResourceListOptions("Node")):
        other: Node = kvp.value
        if other.metadata.name == nodename:
            continue
        bgp = other.spec.get("bgp") or {}
        for field, family in (("ipv4Address", "IPv4"), ("ipv6Address", "IPv6")):
            text = bgp.get(field)
            if text and str(ipaddress.ip_interface(text).ip) in mine:
                raise StartupError(
                    f"Calico node '{other.metadata.name}' is already using the {family} address "
                    f"{ipaddress.ip_interface(text).ip}: conflicting node detected (set IP or "
                    "IP_AUTODETECTION_METHOD to choose this node's own address)"
                )


def register_node(
    store: Datastore,
    config: NodeConfig,
    nodename: str,
    interfaces: list[HostInterface] | None = None,
    k8s_internal_ip: Callable[[], str] | None = None,
) -> Node:
    interfaces = host_interfaces() if interfaces is None else interfaces
    key = ResourceKey("Node", nodename)

    def attempt() -> Node:
        try:
            kvp: KVPair | None = store.get(key)
            node: Node = kvp.value
        except NotFound:
            kvp, node = None, Node(ObjectMeta(nodename))
        bgp = dict(node.spec.get("bgp") or {})
        old = (bgp.get("ipv4Address", ""), bgp.get("ipv6Address", ""))
        v4 = _address(
            config.ip, config.ip_autodetection_method, 4, old[0], interfaces, k8s_internal_ip
        )
        v6 = _address(
            config.ip6, config.ip6_autodetection_method, 6, old[1], interfaces, k8s_internal_ip
        )
        if not v4 and not v6 and not (config.ip == "none" and config.ip6 in ("", "none")):
            raise StartupError(
                "no IPv4 or IPv6 addresses configured or detected, required for Calico "
                "networking (set IP, or IP_AUTODETECTION_METHOD)"
            )
        if (v4, v6) != old and not config.disable_node_ip_check:
            _check_conflict(store, nodename, v4, v6)
        for field, value in (("ipv4Address", v4), ("ipv6Address", v6)):
            if value:
                bgp[field] = value
            else:
                bgp.pop(field, None)
        if config.as_number is not None:
            bgp["asNumber"] = config.as_number
        spec = dict(node.spec)
        if bgp:
            spec["bgp"] = bgp
        else:
            spec.pop("bgp", None)
        if kvp is not None and spec == node.spec:
            return node
        node.spec = spec
        if kvp is None:
            store.create(KVPair(key, node))
            log.info("Created Node %s", nodename)
        else:
            store.update(KVPair(key, node, kvp.revision))
            log.info("Updated Node %s", nodename)
        return node

    return _retrying(attempt)


def ensure_cluster_information(store: Datastore, config: NodeConfig) -> None:
    """ClusterInformation `default` (calico-node.md §3.4): created once with a GUID and
    `datastoreReady: true`; later starts refresh the version and fill what is missing."""
    key = ResourceKey("ClusterInformation", "default")
    cluster_type = config.cluster_type or "k8s,bgp"
    if config.datastore.type == "kubernetes" and "kdd" not in cluster_type.split(","):
        cluster_type += ",kdd"

    def attempt() -> None:
        try:
            kvp = store.get(key)
        except NotFound:
            spec = {
                "clusterGUID": secrets.token_hex(16),
                "clusterType": cluster_type,
                "calicoVersion": VERSION,
                "datastoreReady": True,
            }
            store.create(KVPair(key, ClusterInformation(ObjectMeta("default"), spec)))
            return
        info: ClusterInformation = kvp.value
        spec = dict(info.spec)
        spec["calicoVersion"] = VERSION
        spec.setdefault("clusterGUID", secrets.token_hex(16))
        spec.setdefault("clusterType", cluster_type)
        spec.setdefault("datastoreReady", True)
        if spec != info.spec:
            info.spec = spec
            store.update(kvp)

    _retrying(attempt)


def _host_networks(
    interfaces: list[HostInterface],
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [a.ip for iface in interfaces for a in iface.addresses]


def default_pool(env: PoolEnv, family: int, interfaces: list[HostInterface]) -> IPPool | None:
    """The pool CALICO_IPV<family>POOL_* describe, or None when there is none to make."""
    cidr = env.cidr
    if cidr.lower() == "none":
        return None
    if not cidr:
        if family == 6:
            return None  # Calico picks a random ULA; here only an explicit CIDR makes one
        addresses = _host_networks(interfaces)
        for candidate in [DEFAULT_V4_POOL, *FALLBACK_POOLS]:
            network = ipaddress.ip_network(candidate)
            if not any(ip in network for ip in addresses):
                cidr = candidate
                break
        else:
            raise StartupError("no default IPv4 pool CIDR is free of host addresses")
    spec: dict[str, Any] = {
        "cidr": cidr,
        "ipipMode": env.encapsulation("IPIP"),
        "vxlanMode": env.encapsulation("VXLAN"),
        "natOutgoing": (env.nat_outgoing or str(family == 4)).lower() == "true",
        "disableBGPExport": env.disable_bgp_export.lower() == "true",
        "nodeSelector": env.node_selector or "all()",
    }
    if env.block_size:
        spec["blockSize"] = int(env.block_size)
    try:
        pool = IPPool(ObjectMeta(f"default-ipv{family}-ippool"), IPPoolSpec.from_json(spec))
        pool.validate()
    except ValidationError as err:
        raise StartupError(
            f"the default IPv{family} pool from CALICO_IPV{family}POOL_*: {err}"
        ) from err
    if pool.network.version != family:
        raise StartupError(f"CALICO_IPV{family}POOL_CIDR={cidr!r} is not an IPv{family} CIDR")
    return pool


def ensure_default_pools(
    store: Datastore, config: NodeConfig, interfaces: list[HostInterface]
) -> None:
    if config.no_default_pools:
        if any(env.cidr for env in config.pools):
            raise StartupError("NO_DEFAULT_POOLS is set together with a CALICO_IPV*POOL_CIDR")
        return
    existing = [kvp.value.network.version for kvp in store.list(ResourceListOptions("IPPool"))]
    for family, env in zip((4, 6), config.pools, strict=True):
        if family in existing:
            continue
        pool = default_pool(env, family, interfaces)
        if pool is None:
            continue
        try:
            store.create(KVPair(ResourceKey("IPPool", pool.name), pool))
        except AlreadyExists:
            continue
        log.info(
            "Created default IPv%d pool (%s) with NAT outgoing %s. IPIP mode: %s, VXLAN mode: %s, "
            "DisableBGPExport: %s", family, pool.spec.cidr, str(pool.spec.nat_outgoing).lower(),
            pool.spec.ipip_mode, pool.spec.vxlan_mode, str(pool.spec.disable_bgp_export).lower(),
        )  # fmt: skip


def _ensure_exists(store: Datastore, resource: SpecResource) -> None:
    key = ResourceKey(resource.kind, resource.metadata.name)
    try:
        store.get(key)
    except NotFound:
        with contextlib.suppress(AlreadyExists):
            store.create(KVPair(key, resource))


def ensure_default_configs(store: Datastore, config: NodeConfig, nodename: str) -> None:
    """FelixConfiguration `default` (and, on etcd, `node.<name>`) and an empty
    BGPConfiguration `default`, as calico-node creates them (calico-node.md §3.4)."""
    felix = {"reportingInterval": "0s", "logSeverityScreen": "Info"}
    _ensure_exists(store, FelixConfiguration(ObjectMeta("default"), felix))
    if config.datastore.type == "etcdv3":
        host = {"defaultEndpointToHostAction": "Return"}
        _ensure_exists(store, FelixConfiguration(ObjectMeta(f"node.{nodename}"), host))
    _ensure_exists(store, BGPConfiguration(ObjectMeta("default"), {}))


def write_nodename(config: NodeConfig, nodename: str) -> None:
    """The bare name, no newline, 0644, written atomically (the CNI may read it any time)."""
    write_atomic(config.paths.nodename_file, nodename)


def make_directories(config: NodeConfig) -> None:
    paths = config.paths
    for directory, mode in ((paths.run_dir, 0o755), (paths.lib_dir, 0o755), (paths.log_dir, 0o755),
                            (paths.bird_config_dir, 0o755)):  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True, mode=mode)


def run(
    store: Datastore, config: NodeConfig, k8s_internal_ip: Callable[[], str] | None = None
) -> Registration:
    """Start-up, all of it; StartupError or ConfigError when it must stop."""
    nodename = determine_nodename(config)
    interfaces = host_interfaces()
    try:
        node = register_node(store, config, nodename, interfaces, k8s_internal_ip)
    except ConfigError as err:
        raise StartupError(str(err)) from err
    make_directories(config)
    ensure_default_pools(store, config, interfaces)
    ensure_cluster_information(store, config)
    ensure_default_configs(store, config, nodename)
    write_nodename(config, nodename)
    return Registration(nodename, node)
