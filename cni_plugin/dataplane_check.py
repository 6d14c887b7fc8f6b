"""CHECK: the pod's interface, addresses, routes and sysctls read back against prevResult.

Real Calico's CHECK prints "OK" without looking; this one names every difference it finds.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cni_plugin import netns
from cni_plugin.dataplane import (
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_MAC,
    host_sysctls,
    iface_sysctl,
    read_sysctl,
)
from cni_plugin.types import ERR_INTERNAL, CNIError, Interface, IPInterface, IPNetwork, Result

if TYPE_CHECKING:
    from pyroute2 import IPRoute


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
    from pyroute2 import IPRoute

    pod_fd = netns.open_netns_for_add(netns_path)
    report = CheckReport()
    pod_iface = next(
        (i for i in prev.interfaces if i.name == ifname and i.sandbox == netns_path), None
    )
    report.expect(pod_iface is not None, f"prevResult has no interface {ifname} in {netns_path}")
    pod_ips = [ipc.address for ipc in prev.ips]
    families = {ip.version for ip in pod_ips}
    host = IPRoute()
    try:
        with netns.entered(pod_fd):
            pod = IPRoute()
        try:
            _check_pod_side(pod, ifname, pod_iface, pod_ips, spec_routes, families, report)
            with netns.entered(pod_fd):
                _check_pod_sysctls(ifname, families, report)
        finally:
            pod.close()
        _check_host_side(host, host_ifname, pod_ips, families, report)
    finally:
        host.close()
        os.close(pod_fd)
    if report.problems:
        raise CNIError(ERR_INTERNAL, "CHECK failed: " + "; ".join(report.problems))


def _link_kind(link: Any) -> str:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else ""


def _check_pod_side(
    pod: IPRoute,
    ifname: str,
    iface: Interface | None,
    ips: list[IPInterface],
    routes: list[IPNetwork],
    families: set[int],
    report: CheckReport,
) -> None:
    links = pod.link("get", ifname=ifname) if pod.link_lookup(ifname=ifname) else []
    if not links:
        report.expect(False, f"interface {ifname} not found in the container")
        return
    link = links[0]
    index = link["index"]
    report.expect(_link_kind(link) == "veth", f"{ifname} is not a veth")
    if iface is not None and iface.mac:
        mac = link.get("IFLA_ADDRESS")
        report.expect(
            mac == iface.mac.lower(), f"{ifname} has MAC {mac}, prevResult says {iface.mac}"
        )
    present = {
        (a.get("IFA_ADDRESS"), a["prefixlen"])
        for fam in families
        for a in pod.addr(
            "dump", index=index, family=socket.AF_INET if fam == 4 else socket.AF_INET6
        )
    }
    for ip in ips:
        report.expect(
            (str(ip.ip), ip.network.prefixlen) in present, f"address {ip} missing on {ifname}"
        )
    pod_routes = {
        (
            r.get("RTA_DST") or ("0.0.0.0" if r["family"] == socket.AF_INET else "::"),
            r["dst_len"],
            r.get("RTA_GATEWAY"),
        )
        for fam in families
        for r in pod.route(
            "dump", family=socket.AF_INET if fam == 4 else socket.AF_INET6, oif=index
        )
    }
    if 4 in families:
        report.expect(
            (str(GATEWAY_V4), 32, None) in pod_routes, f"route {GATEWAY_V4} dev {ifname} missing"
        )
    for dst in routes:
        if dst.version not in families:
            continue
        gw = str(GATEWAY_V4 if dst.version == 4 else GATEWAY_V6)
        report.expect(
            (str(dst.network_address), dst.prefixlen, gw) in pod_routes,
            f"route {dst} via {gw} dev {ifname} missing in the container",
        )


def _check_pod_sysctls(ifname: str, families: set[int], report: CheckReport) -> None:
    if 6 in families:
        value = read_sysctl(iface_sysctl("ipv6", ifname, "accept_dad"))
        report.expect(value == "0", f"container sysctl accept_dad on {ifname} is {value}, want 0")


def _check_host_side(
    host: IPRoute, host_ifname: str, ips: list[IPInterface], families: set[int], report: CheckReport
) -> None:
    if not host.link_lookup(ifname=host_ifname):
        report.expect(False, f"host interface {host_ifname} not found")
        return
    link = host.link("get", ifname=host_ifname)[0]
    index = link["index"]
    report.expect(_link_kind(link) == "veth", f"host interface {host_ifname} is not a veth")
    report.expect(
        link.get("IFLA_ADDRESS") == HOST_MAC, f"host interface {host_ifname} MAC is not {HOST_MAC}"
    )
    report.expect(link.get("IFLA_OPERSTATE") == "UP", f"host interface {host_ifname} is not up")
    for name, value, fatal in host_sysctls(host_ifname, families):
        if not fatal:
            continue
        actual = read_sysctl(name)
        report.expect(
            actual == value, f"host sysctl {name.replace('/', '.')} is {actual}, want {value}"
        )
    for ip in ips:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        routes = host.route("dump", family=family, oif=index)
        found = any(
            r.get("RTA_DST") == str(ip.ip) and r["dst_len"] == ip.max_prefixlen for r in routes
        )
        report.expect(found, f"host route {ip.ip}/{ip.max_prefixlen} dev {host_ifname} missing")
