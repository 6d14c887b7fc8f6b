"""Calico's Linux dataplane: a veth pair with proxy-ARP and /32 (/128) host routes.

Follows calico-behaviour.md §2: host end `cali<hash>` with MAC ee:ee:ee:ee:ee:ee, the pod
end created directly inside the pod netns (no move, cost-floor.md §4), pod routes via
169.254.1.1 and fe80::ecee:eeff:feee:eeee, host sysctls, one scope-link host route per IP.
Netlink goes through `rtnl` beside it (stdlib only; why not pyroute2 is measured there):
one socket per netns per call, and the pod-side changes in one batched send().
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass

from cni_plugin.dataplane import netns, rtnl
from cni_plugin.types import (
    ERR_INTERNAL,
    ERR_INVALID_ENV,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    Interface,
    IPInterface,
    IPNetwork,
)

log = logging.getLogger(__name__)

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = ipaddress.ip_address("169.254.1.1")
GATEWAY_V6 = ipaddress.ip_address("fe80::ecee:eeff:feee:eeee")
GATEWAYS = {4: GATEWAY_V4, 6: GATEWAY_V6}  # the pod's next hop for each family's routes
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
        import hashlib  # loads OpenSSL (~5 ms): only ADD and CHECK of a pod need it

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
    routes: list[IPNetwork]  # of the families in `ips` only (plugin.pod_routes)
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
    pod_fd = netns.open_netns_for_add(spec.netns_path)
    try:
        with netns.entered(pod_fd):
            pod = rtnl.RtnlSocket()
        with pod, rtnl.RtnlSocket() as host:
            if pod.link_index(spec.ifname) is not None:
                raise CNIError(
                    ERR_INVALID_ENV,
                    f"interface {spec.ifname!r} already exists in netns {spec.netns_path}",
                    "CNI_IFNAME must name a new interface in the container",
                )
            if _remove_link(host, spec.host_ifname):
                log.info("Deleted stale host veth %s", spec.host_ifname)
            try:
                _create_veth(host, spec, pod_fd)
            except rtnl.NetlinkError as exc:
                raise _netlink_error(exc, f"failed to create veth {spec.host_ifname}") from exc
            try:
                return _configure(host, pod, pod_fd, spec)
            except BaseException as exc:
                _remove_link(host, spec.host_ifname)
                if isinstance(exc, rtnl.NetlinkError):
                    raise _netlink_error(exc, f"failed to configure {spec.ifname}") from exc
                raise
    finally:
        os.close(pod_fd)


def _remove_link(sock: rtnl.RtnlSocket, name: str) -> bool:
    """Delete link `name` (a leftover host veth of an earlier sandbox of the same pod would
    block the create); False when there was none."""
    try:
        sock.delete_link(name)
    except rtnl.NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
        return False
    return True


def _create_veth(host: rtnl.RtnlSocket, spec: PodSpec, pod_fd: int) -> None:
    host.create_veth(
        spec.host_ifname,
        spec.ifname,
        peer_netns_fd=pod_fd,
        mac=HOST_MAC,
        peer_mac=spec.pod_mac,
        mtu=spec.mtu,
        num_queues=spec.num_queues if spec.num_queues > 1 else 0,
    )


def _created_link(sock: rtnl.RtnlSocket, name: str) -> rtnl.Link:
    """The link we just created; gone already means someone deleted it under us."""
    link = sock.link(name)
    if link is None:
        raise rtnl.NetlinkError(errno.ENODEV, f"getting link {name}")
    return link


def _configure(
    host: rtnl.RtnlSocket, pod: rtnl.RtnlSocket, pod_fd: int, spec: PodSpec
) -> PodInterfaces:
    families = spec.families()
    host_index = _created_link(host, spec.host_ifname).index
    eth0 = _created_link(pod, spec.ifname)  # its MAC too: the kernel's, or spec.pod_mac
    with netns.entered(pod_fd):
        if 6 in families:
            write_sysctl(iface_sysctl("ipv6", spec.ifname, "accept_dad"), "0")
            for dev in ("all", "default", "lo"):
                write_sysctl(f"net/ipv6/conf/{dev}/disable_ipv6", "0")
        for name, value in _pod_forwarding_sysctls(families, spec.allow_ip_forwarding):
            write_sysctl(name, value)
    _apply_sysctls(host_sysctls(spec.host_ifname, families))
    host.set_link(host_index, up=True)
    # One send(); the kernel handles the messages in order, so the route via 169.254.1.1
    # finds the scope-link route to it added just before.
    with pod.batch() as batch:
        batch.set_link(eth0.index, up=True)
        if 4 in families:
            batch.add_route(ipaddress.ip_network(GATEWAY_V4), oif=eth0.index, scope=rtnl.SCOPE_LINK)
        for dst in spec.routes:
            batch.add_route(dst, oif=eth0.index, gateway=GATEWAYS[dst.version])
        for ip in spec.ips:
            flags = rtnl.IFA_F_NODAD if ip.version == 6 else 0
            batch.add_address(eth0.index, ip.ip, ip.network.prefixlen, flags=flags)
    if 6 in families:
        _wait_host_link_local(host, host_index)
    for ip in spec.ips:
        _add_host_route(host, ip, host_index, spec.host_ifname)
    return PodInterfaces(
        host=Interface(name=spec.host_ifname, mac=HOST_MAC),
        pod=Interface(name=spec.ifname, mac=eth0.mac, mtu=spec.mtu, sandbox=spec.netns_path),
    )


def _wait_host_link_local(host: rtnl.RtnlSocket, index: int) -> None:
    """The host end's link-local appears late; Calico toggles the link until it is ours."""
    for _ in range(_V6_LL_ATTEMPTS):
        addrs = [a.address for a in host.addresses(index, rtnl.AF_INET6)]
        if GATEWAY_V6 in addrs:
            return
        if addrs:
            host.set_link(index, up=False)
            host.set_link(index, mac=HOST_MAC)
            time.sleep(_V6_LL_INTERVAL_S)
            host.set_link(index, up=True)
        time.sleep(_V6_LL_INTERVAL_S)
    raise CNIError(
        ERR_TRY_AGAIN_LATER, "failed to get IPv6 addresses for host side of the pod interface"
    )


def _add_host_route(host: rtnl.RtnlSocket, ip: IPInterface, index: int, ifname: str) -> None:
    """One /32 (/128) scope-link route per IP; an identical one (Felix's) is fine."""
    bits = ip.max_prefixlen
    try:
        host.add_route(ipaddress.ip_network(ip.ip), oif=index, scope=rtnl.SCOPE_LINK)
        return
    except rtnl.NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise _netlink_error(
                exc, f"error adding host side routes for interface: {ifname}"
            ) from exc
    oifs = [r.oif for r in host.route_get(ip.ip)]
    if index in oifs:
        return
    other = oifs[0] if oifs else 0
    other_link = host.link(index=other) if other else None
    other_name = other_link.name if other_link else "?"
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
    outcome: list[BaseException] = []

    def delete() -> None:
        try:
            with netns.entered(pod_fd):
                sock = rtnl.RtnlSocket()
            with sock:
                _remove_link(sock, ifname)
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
