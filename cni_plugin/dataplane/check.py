"""CHECK: the pod's interface, addresses, routes and sysctls read back against prevResult.

Real Calico's CHECK prints "OK" without looking; this one names every difference it finds.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from cni_plugin.dataplane import netns, rtnl
from cni_plugin.dataplane.veth import (
    GATEWAY_V4,
    GATEWAYS,
    HOST_MAC,
    host_sysctls,
    iface_sysctl,
    read_sysctl,
)
from cni_plugin.types import (
    ERR_INTERNAL,
    CNIError,
    Interface,
    IPAddress,
    IPInterface,
    IPNetwork,
    Result,
)


@dataclass
class CheckReport:
    """Collects every difference CHECK finds, so one message names them all."""

    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def check_pod(
    netns_path: str, ifname: str, host_ifname: str, prev: Result, spec_routes: list[IPNetwork]
) -> None:
    """Verify the interface, addresses, routes and sysctls against prevResult."""
    pod_fd = netns.open_netns_for_add(netns_path)
    report = CheckReport()
    pod_iface = next(
        (i for i in prev.interfaces if i.name == ifname and i.sandbox == netns_path), None
    )
    report.expect(pod_iface is not None, f"prevResult has no interface {ifname} in {netns_path}")
    pod_ips = [ipc.address for ipc in prev.ips]
    families = {ip.version for ip in pod_ips}
    try:
        with netns.entered(pod_fd), rtnl.RtnlSocket() as pod:
            _check_pod_side(pod, ifname, pod_iface, pod_ips, spec_routes, families, report)
            _check_pod_sysctls(ifname, families, report)
        with rtnl.RtnlSocket() as host:
            _check_host_side(host, host_ifname, pod_ips, families, report)
    finally:
        os.close(pod_fd)
    if report.problems:
        raise CNIError(ERR_INTERNAL, "CHECK failed: " + "; ".join(report.problems))


def _main_routes(
    sock: rtnl.RtnlSocket, families: set[int], oif: int
) -> set[tuple[IPNetwork, IPAddress | None]]:
    """(destination, gateway) of the main-table routes out of link `oif`."""
    return {
        (r.dst, r.gateway)
        for version in families
        for r in sock.routes(rtnl.family(version), oif=oif)
        if r.table == rtnl.RT_TABLE_MAIN
    }


def _check_pod_side(
    pod: rtnl.RtnlSocket,
    ifname: str,
    iface: Interface | None,
    ips: list[IPInterface],
    routes: list[IPNetwork],
    families: set[int],
    report: CheckReport,
) -> None:
    link = pod.link(ifname)
    if link is None:
        report.expect(False, f"interface {ifname} not found in the container")
        return
    report.expect(link.kind == "veth", f"{ifname} is not a veth")
    if iface is not None and iface.mac:
        report.expect(
            link.mac == iface.mac.lower(),
            f"{ifname} has MAC {link.mac}, prevResult says {iface.mac}",
        )
    present = {
        (a.address, a.prefixlen)
        for version in families
        for a in pod.addresses(link.index, rtnl.family(version))
    }
    for ip in ips:
        report.expect((ip.ip, ip.network.prefixlen) in present, f"address {ip} missing on {ifname}")
    pod_routes = _main_routes(pod, families, link.index)
    if 4 in families:
        report.expect(
            (ipaddress.ip_network(GATEWAY_V4), None) in pod_routes,
            f"route {GATEWAY_V4} dev {ifname} missing",
        )
    for dst in routes:  # of the pod's families only (plugin.pod_routes)
        gw = GATEWAYS[dst.version]
        report.expect(
            (dst, gw) in pod_routes, f"route {dst} via {gw} dev {ifname} missing in the container"
        )


def _check_pod_sysctls(ifname: str, families: set[int], report: CheckReport) -> None:
    if 6 in families:
        value = read_sysctl(iface_sysctl("ipv6", ifname, "accept_dad"))
        report.expect(value == "0", f"container sysctl accept_dad on {ifname} is {value}, want 0")


def _check_host_side(
    host: rtnl.RtnlSocket,
    host_ifname: str,
    ips: list[IPInterface],
    families: set[int],
    report: CheckReport,
) -> None:
    link = host.link(host_ifname)
    if link is None:
        report.expect(False, f"host interface {host_ifname} not found")
        return
    report.expect(link.kind == "veth", f"host interface {host_ifname} is not a veth")
    report.expect(link.mac == HOST_MAC, f"host interface {host_ifname} MAC is not {HOST_MAC}")
    report.expect(link.operstate == "UP", f"host interface {host_ifname} is not up")
    for name, value, fatal in host_sysctls(host_ifname, families):
        if not fatal:
            continue
        actual = read_sysctl(name)
        report.expect(
            actual == value, f"host sysctl {name.replace('/', '.')} is {actual}, want {value}"
        )
    host_routes = {dst for dst, _ in _main_routes(host, families, link.index)}
    for ip in ips:
        report.expect(
            ipaddress.ip_network(ip.ip) in host_routes,
            f"host route {ip.ip}/{ip.max_prefixlen} dev {host_ifname} missing",
        )
