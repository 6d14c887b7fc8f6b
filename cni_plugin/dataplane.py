"""Calico's Linux dataplane: a veth pair with proxy-ARP and /32 (/128) host routes.

Follows calico-behaviour.md §2: host end `cali<hash>` with MAC ee:ee:ee:ee:ee:ee, the pod
end created directly inside the pod netns (no move, cost-floor.md §4), pod routes via
169.254.1.1 and fe80::ecee:eeff:feee:eeee, host sysctls, one scope-link host route per IP.
pyroute2 is imported inside the functions: DEL without a netns and the other verbs must
not pay its ~250 ms import.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cni_plugin import netns
from cni_plugin.types import (
    ERR_INTERNAL,
    ERR_INVALID_ENV,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    Interface,
    IPInterface,
    IPNetwork,
)

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = ipaddress.ip_address("169.254.1.1")
GATEWAY_V6 = ipaddress.ip_address("fe80::ecee:eeff:feee:eeee")
SCOPE_LINK = 253
PROTO_BOOT = 3
IFA_F_NODAD = 0x02
DEFAULT_PREFIX = "cali"
DEL_TIMEOUT_S = 20.0
_V6_LL_ATTEMPTS = 10
_V6_LL_INTERVAL_S = 0.05


def host_veth_name(args: dict[str, str], container_id: str) -> str:
    """Felix's prefix + sha1("<ns>.<pod>")[:11] for Kubernetes pods, else `cali` + the
    container ID's first 11 characters.

    Felix computes the same name, so this must match real Calico exactly.
    """
    namespace, pod = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    if namespace and pod:
        prefix = os.environ.get("FELIX_INTERFACEPREFIX", "").split(",")[0] or DEFAULT_PREFIX
        return prefix + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]
    return DEFAULT_PREFIX + container_id[:11]


@dataclass
class PodSpec:
    """What ADD asks of the dataplane."""

    netns_path: str
    ifname: str
    host_ifname: str
    ips: list[IPInterface]
    routes: list[IPNetwork]
    mtu: int = 0
    num_queues: int = 1
    allow_ip_forwarding: bool = False
    pod_mac: str = ""  # cni.projectcalico.org/hwAddr; empty: the kernel's random MAC

    def families(self) -> set[int]:
        return {ip.version for ip in self.ips}


@dataclass
class PodInterfaces:
    host: Interface
    pod: Interface


def write_sysctl(name: str, value: str) -> None:
    """Write `net/ipv4/...` under /proc/sys of the calling thread's netns."""
    with open("/proc/sys/" + name, "w", encoding="ascii") as f:
        f.write(value)


def read_sysctl(name: str) -> str:
    with open("/proc/sys/" + name, encoding="ascii") as f:
        return f.read().strip()


def iface_sysctl(family: str, ifname: str, key: str) -> str:
    # Interface names may contain dots; build the path with slashes.
    return f"net/{family}/conf/{ifname}/{key}"


def host_sysctls(ifname: str, families: set[int]) -> list[tuple[str, str, bool]]:
    """(sysctl, value, fatal) for the host end, in Calico's order."""
    settings: list[tuple[str, str, bool]] = []
    if 4 in families:
        settings += [
            (iface_sysctl("ipv4", ifname, "route_localnet"), "1", True),
            (f"net/ipv4/neigh/{ifname}/proxy_delay", "0", False),
            (iface_sysctl("ipv4", ifname, "proxy_arp"), "1", True),
            (iface_sysctl("ipv4", ifname, "forwarding"), "1", True),
        ]
    if 6 in families:
        settings += [
            (iface_sysctl("ipv6", ifname, "accept_dad"), "0", True),
            (iface_sysctl("ipv6", ifname, "disable_ipv6"), "0", True),
            (iface_sysctl("ipv6", ifname, "proxy_ndp"), "1", True),
            (iface_sysctl("ipv6", ifname, "forwarding"), "1", True),
        ]
    settings.append((iface_sysctl("ipv6", ifname, "accept_ra"), "0", False))
    return settings


def _pod_forwarding_sysctls(families: set[int], allow: bool) -> list[tuple[str, str]]:
    value = "1" if allow else "0"
    out = []
    if 4 in families:
        out.append(("net/ipv4/ip_forward", value))
    if 6 in families:
        out.append(("net/ipv6/conf/all/forwarding", value))
    return out


def _apply_sysctls(settings: list[tuple[str, str, bool]]) -> None:
    for name, value, fatal in settings:
        try:
            write_sysctl(name, value)
        except OSError as exc:
            if fatal:
                raise CNIError(
                    ERR_INTERNAL, f"failed to set {name.replace('/', '.')}={value}: {exc}"
                ) from exc
            log.warning("failed to set %s=%s: %s", name, value, exc)


def _netlink_error(exc: Exception, what: str) -> CNIError:
    return CNIError(ERR_INTERNAL, f"{what}: {exc}")


def setup_pod(spec: PodSpec) -> PodInterfaces:
    """Create and configure the pod's veth pair; on failure remove whatever was created."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    pod_fd = netns.open_netns_for_add(spec.netns_path)
    with netns.entered(pod_fd):
        pod = IPRoute()
    host = IPRoute()
    try:
        if pod.link_lookup(ifname=spec.ifname):
            raise CNIError(
                ERR_INVALID_ENV,
                f"interface {spec.ifname!r} already exists in netns {spec.netns_path}",
                "CNI_IFNAME must name a new interface in the container",
            )
        _delete_stale_host_veth(host, spec.host_ifname)
        try:
            _create_veth(host, spec, pod_fd)
        except NetlinkError as exc:
            raise _netlink_error(exc, f"failed to create veth {spec.host_ifname}") from exc
        try:
            return _configure(host, pod, pod_fd, spec)
        except NetlinkError as exc:
            _remove_link(host, spec.host_ifname)
            raise _netlink_error(exc, f"failed to configure {spec.ifname}") from exc
        except BaseException:
            _remove_link(host, spec.host_ifname)
            raise
    finally:
        host.close()
        pod.close()
        os.close(pod_fd)


def _delete_stale_host_veth(host: IPRoute, name: str) -> None:
    """A leftover host veth of an earlier sandbox of the same pod blocks the create."""
    if host.link_lookup(ifname=name):
        log.info("Deleting stale host veth %s", name)
        _remove_link(host, name)


def _remove_link(ipr: IPRoute, name: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise


def _create_veth(host: IPRoute, spec: PodSpec, pod_fd: int) -> None:
    peer: dict[str, Any] = {"ifname": spec.ifname, "net_ns_fd": pod_fd}
    if spec.pod_mac:
        peer["address"] = spec.pod_mac
    extra: dict[str, Any] = {}
    if spec.mtu:
        peer["mtu"] = extra["mtu"] = spec.mtu
    if spec.num_queues > 1:
        for attrs in (peer, extra):
            attrs["num_tx_queues"] = attrs["num_rx_queues"] = spec.num_queues
    host.link("add", ifname=spec.host_ifname, kind="veth", address=HOST_MAC, peer=peer, **extra)


def _configure(host: IPRoute, pod: IPRoute, pod_fd: int, spec: PodSpec) -> PodInterfaces:
    families = spec.families()
    host_index = socket.if_nametoindex(spec.host_ifname)
    with netns.entered(pod_fd):
        pod_index = socket.if_nametoindex(spec.ifname)
        if 6 in families:
            write_sysctl(iface_sysctl("ipv6", spec.ifname, "accept_dad"), "0")
    _apply_sysctls(host_sysctls(spec.host_ifname, families))
    host.link("set", index=host_index, state="up")
    pod.link("set", index=pod_index, state="up")
    pod_mac = pod.link("get", index=pod_index)[0].get("IFLA_ADDRESS")
    v4_routes = [r for r in spec.routes if r.version == 4]
    v6_routes = [r for r in spec.routes if r.version == 6]
    if 4 in families:
        pod.route(
            "add",
            dst=str(GATEWAY_V4),
            dst_len=32,
            oif=pod_index,
            scope=SCOPE_LINK,
            proto=PROTO_BOOT,
        )
        for dst in v4_routes:
            _add_pod_route(pod, dst, GATEWAY_V4, pod_index)
    if 6 in families:
        with netns.entered(pod_fd):
            for dev in ("all", "default", "lo"):
                write_sysctl(f"net/ipv6/conf/{dev}/disable_ipv6", "0")
        _wait_host_link_local(host, host_index)
        for dst in v6_routes:
            _add_pod_route(pod, dst, GATEWAY_V6, pod_index)
    for ip in spec.ips:
        flags = IFA_F_NODAD if ip.version == 6 else 0
        pod.addr(
            "add", index=pod_index, address=str(ip.ip), prefixlen=ip.network.prefixlen, flags=flags
        )
    with netns.entered(pod_fd):
        for name, value in _pod_forwarding_sysctls(families, spec.allow_ip_forwarding):
            write_sysctl(name, value)
    for ip in spec.ips:
        _add_host_route(host, ip, host_index, spec.host_ifname)
    return PodInterfaces(
        host=Interface(name=spec.host_ifname, mac=HOST_MAC),
        pod=Interface(name=spec.ifname, mac=pod_mac, mtu=spec.mtu, sandbox=spec.netns_path),
    )


def _add_pod_route(pod: IPRoute, dst: IPNetwork, gateway: Any, index: int) -> None:
    pod.route(
        "add",
        dst=str(dst.network_address),
        dst_len=dst.prefixlen,
        gateway=str(gateway),
        oif=index,
        proto=PROTO_BOOT,
        family=socket.AF_INET if dst.version == 4 else socket.AF_INET6,
    )


def _wait_host_link_local(host: IPRoute, index: int) -> None:
    """The host end's link-local appears late; Calico toggles the link until it is ours."""
    for _ in range(_V6_LL_ATTEMPTS):
        addrs = [
            a.get("IFA_ADDRESS") for a in host.addr("dump", index=index, family=socket.AF_INET6)
        ]
        if str(GATEWAY_V6) in addrs:
            return
        if addrs:
            host.link("set", index=index, state="down")
            host.link("set", index=index, address=HOST_MAC)
            time.sleep(_V6_LL_INTERVAL_S)
            host.link("set", index=index, state="up")
        time.sleep(_V6_LL_INTERVAL_S)
    raise CNIError(
        ERR_TRY_AGAIN_LATER, "failed to get IPv6 addresses for host side of the pod interface"
    )


def _add_host_route(host: IPRoute, ip: IPInterface, index: int, ifname: str) -> None:
    """One /32 (/128) scope-link route per IP; an identical one (Felix's) is fine."""
    from pyroute2.netlink.exceptions import NetlinkError

    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    bits = ip.max_prefixlen
    try:
        host.route(
            "add",
            dst=str(ip.ip),
            dst_len=bits,
            oif=index,
            scope=SCOPE_LINK,
            proto=PROTO_BOOT,
            family=family,
        )
        return
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise _netlink_error(
                exc, f"error adding host side routes for interface: {ifname}"
            ) from exc
    existing = host.route("get", dst=str(ip.ip), family=family)
    oifs = [r.get("RTA_OIF") for r in existing]
    if index in oifs:
        return
    other = oifs[0] if oifs else 0
    try:
        other_name = socket.if_indextoname(other)
    except OSError:
        other_name = "?"
    raise CNIError(
        ERR_INTERNAL,
        f"error adding host side routes for interface: {ifname}, error: route (Ifindex: {index}, "
        f"Dst: {ip.ip}/{bits}, Scope: link) already exists for an interface other than "
        f"'{ifname}': route (Ifindex: {other}, Dst: {ip.ip}/{bits}, Scope: link, "
        f"Iface: {other_name})",
    )


def teardown_pod(netns_path: str, ifname: str, timeout: float = DEL_TIMEOUT_S) -> None:
    """Delete the pod end (the kernel removes the host end and its routes).

    A vanished netns or link is success. The kernel's veth delete can hang on some
    kernels (calico#4722), so it runs on a helper thread with a deadline.
    """
    try:
        pod_fd = netns.open_netns(netns_path)
    except netns.NetnsGone:
        log.info("Workload's netns already gone. Nothing to do.")
        return
    # Imported before the deadline starts: on a loaded node the import alone takes seconds.
    from pyroute2 import IPRoute

    outcome: list[BaseException] = []

    def delete() -> None:
        try:
            with netns.entered(pod_fd):
                ipr = IPRoute()
            try:
                _remove_link(ipr, ifname)
            finally:
                ipr.close()
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=delete, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise CNIError(ERR_TRY_AGAIN_LATER, f"timed out deleting device in netns {netns_path}")
    os.close(pod_fd)
    if outcome:
        exc = outcome[0]
        if isinstance(exc, CNIError):
            raise exc
        raise CNIError(
            ERR_INTERNAL, f"failed to clean up workload's pod interface inside netns: {exc}"
        ) from exc
