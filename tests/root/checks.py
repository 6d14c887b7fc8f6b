"""Assertions on kernel state after ADD, shared by the lifecycle suites."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from typing import Any

from tests.harness import CNIResult, Netns, Node, result_ips, version_tuple, with_prev

HOST_MAC = "ee:ee:ee:ee:ee:ee"


def expected_host_veth(namespace: str, pod: str) -> str:
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def assert_result_shape(
    result: dict[str, Any],
    version: str,
    pod: Netns,
    host_if: str,
    families: list[int],
    mtu: int = 1400,
) -> list[str]:
    """The ADD result as libcni parses it for `version`; returns the pod addresses."""
    assert result["cniVersion"] == version
    ips = result_ips(result, version)
    assert sorted(ipaddress.ip_interface(a).version for a in ips) == sorted(families)
    for address in ips:
        iface = ipaddress.ip_interface(address)
        assert iface.network.prefixlen == iface.max_prefixlen, f"{address} is not narrowed"
    if version_tuple(version) < (0, 3, 0):
        assert "interfaces" not in result and "ips" not in result
        return ips
    host, container = result["interfaces"]
    assert host == {"name": host_if, "mac": HOST_MAC}
    assert container["name"] == "eth0" and container["sandbox"] == pod.path
    assert len(container["mac"]) == 17
    if version_tuple(version) >= (1, 0, 0):
        assert container["mtu"] == mtu
        assert all("version" not in ip for ip in result["ips"])
    else:
        assert "mtu" not in container
        assert [ip["version"] for ip in result["ips"]] == [
            str(ipaddress.ip_interface(ip["address"]).version) for ip in result["ips"]
        ]
    assert all(ip["interface"] == 1 for ip in result["ips"])
    assert all("gateway" not in ip for ip in result["ips"])
    return ips


def assert_pod_networking(
    node: Node,
    pod: Netns,
    host_if: str,
    ips: list[str],
    pod_mac: str | None = None,
    mtu: int = 1400,
) -> None:
    """Calico's dataplane, read back from the kernel (calico-behaviour.md §2)."""
    families = {ipaddress.ip_interface(a).version for a in ips}
    eth0 = pod.link("eth0")
    assert eth0 is not None and eth0["mtu"] == mtu and "UP" in eth0["flags"]
    if pod_mac:
        assert eth0["address"] == pod_mac
    assert sorted(pod.addrs("eth0")) == sorted(ips)
    host = node.netns.link(host_if)
    assert host is not None, f"host veth {host_if} missing"
    assert host["address"] == HOST_MAC and host["mtu"] == mtu and host["operstate"] == "UP"
    assert host.get("link_netnsid") is not None  # its peer lives in another netns
    if 4 in families:
        routes = pod.routes(4)
        assert {"dst": "169.254.1.1", "dev": "eth0", "scope": "link"}.items() <= _route(
            routes, "169.254.1.1"
        ).items()
        assert _route(routes, "default")["gateway"] == "169.254.1.1"
        for name, want in (("proxy_arp", "1"), ("route_localnet", "1"), ("forwarding", "1")):
            assert node.netns.sysctl_if("ipv4", host_if, name) == want, name
        assert (
            node.netns.exec("cat", f"/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay").stdout.strip()
            == "0"
        )
        assert pod.sysctl("net.ipv4.ip_forward") == "0"
    if 6 in families:
        default6 = _route(pod.routes(6), "default")
        assert default6["gateway"] == "fe80::ecee:eeff:feee:eeee" and default6["dev"] == "eth0"
        for name, want in (
            ("proxy_ndp", "1"),
            ("forwarding", "1"),
            ("accept_dad", "0"),
            ("disable_ipv6", "0"),
        ):
            assert node.netns.sysctl_if("ipv6", host_if, name) == want, name
        assert pod.sysctl_if("ipv6", "eth0", "accept_dad") == "0"
    assert node.netns.sysctl_if("ipv6", host_if, "accept_ra") == "0"
    for address in ips:
        iface = ipaddress.ip_interface(address)
        host_routes = node.netns.routes(iface.version)
        route = _route(host_routes, str(iface.ip))
        assert route["dev"] == host_if
        if iface.version == 4:  # the IPv6 FIB keeps no route scope
            assert route["scope"] == "link"


def prev_result_runner(
    node: Node, conf: dict[str, Any], added: CNIResult, container_id: str, pod: Netns, args: str
) -> Callable[[str], CNIResult]:
    """Runs a verb for one attachment with its ADD result as prevResult (as libcni does)."""
    return lambda command: node.run(
        command, with_prev(conf, added.json), container_id, pod.path, args=args
    )


def assert_quiet_success(result: CNIResult) -> None:
    """Exit 0 and nothing on stdout: what CHECK and DEL answer when all is well."""
    assert (result.code, result.stdout) == (0, ""), result


def assert_pod_gone(node: Node, pod: Netns, host_if: str, ips: list[str]) -> None:
    assert pod.link("eth0") is None
    assert node.netns.link(host_if) is None
    for address in ips:
        iface = ipaddress.ip_interface(address)
        assert all(r["dst"] != str(iface.ip) for r in node.netns.routes(iface.version))


def _route(routes: list[dict[str, Any]], dst: str) -> dict[str, Any]:
    found = [r for r in routes if r["dst"] == dst]
    assert found, f"no route to {dst} in {routes}"
    return found[0]
